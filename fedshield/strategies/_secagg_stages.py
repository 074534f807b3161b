"""Server side of the SecAgg+ protocol, stage by stage, for :class:`fedshield.strategies.secagg.SecAggPlus`.

A port of the stages of Flower's legacy ``SecAggPlusWorkflow`` (flwr 1.39) to the Message API. Clients run
fedshield's port of Flower's ``secaggplus_mod`` (:mod:`fedshield.client.secaggplus`), so the record keys, stage
names and arithmetic here mirror that workflow, with fedshield's two hardenings: each SETUP reply's key signature
is forwarded with the keys in SHARE_KEYS (the clients verify it; the server cannot), and masks are expanded with
:func:`fedshield.crypto.prg.expand_mask` (ChaCha20 from the whole secret), which a node must announce at SETUP: a
node running Flower's stock mod (Mersenne-Twister masks) is dropped with the reason. Two more things differ from
the legacy workflow on purpose (read from the 1.39 code; tests/test_secagg.py fails if this module does either
the legacy way):

* only nodes whose key shares were forwarded (they completed SHARE_KEYS) are listed as dead in UNMASK. The
  legacy workflow also lists nodes that dropped earlier, for which no neighbour holds a share: every neighbour
  fails with a KeyError and the round is lost;
* the dequantised sum is built without in-place operations, which on 0-d arrays rebind instead of mutating
  (the legacy workflow skips the offset and the scaling for scalar parameters that way).

A dead node's pairwise masks are removed only against neighbours whose vectors are in the sum (the legacy
workflow also removes them against other dead nodes, which nets out to zero but costs time).

Flower's client sends masked vectors as int64, whatever the field. When a round's field is sized for quantized
updates, the masked-vector request asks the client (fedshield's ``secagg_wire_mod``) for the narrowest unsigned type
that holds the modulus instead; :func:`read_masked_reply` widens whatever integer type arrives back to int64.

"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from ..flower_internals.secagg import (
    factor_extract, parameters_addition, parameters_mod, RECORD_KEY_CONFIGS, Key, Stage, recorddict_compat as compat,
)
from ..compression import SECAGG_NARROW_KEY
from ..crypto.prg import MASK_PRG
from ..errors import ProtocolError
from ..protocol import (
    ARRAYS, SECAGG_COMPACT, SECAGG_COUNT, SECAGG_MASK_PRG, SECAGG_METRIC, SECAGG_SIGNATURE, SECAGG_SIGNER,
)
from ._secagg_params import ProtocolParams

_log = logging.getLogger(__name__)

Vector = list[NDArray[Any]]
Shape = tuple[int, ...]


@dataclass
class RoundState:
    """What the server keeps of one round between ``configure_train`` and ``aggregate_train``."""

    server_round: int
    params: ProtocolParams
    sampled: list[int]
    neighbours: dict[int, frozenset[int]]
    contents: dict[int, RecordDict]
    active: set[int] = field(default_factory=set)
    #: Why a node left the protocol; nodes in it never have their vector in the sum.
    errors: dict[int, str] = field(default_factory=dict)
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    #: Per node, its signature of its public keys and the signer's fingerprint (absent when it signs nothing).
    signatures: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: frozenset[int] = frozenset()
    forwards: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)

    def message(self, node_id: int, content: RecordDict) -> Message:
        return Message(
            content=content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(self.server_round)
        )

    def enough_shares(self, owners: Iterable[int], holders: set[int]) -> bool:
        """True if every owner has at least ``threshold`` neighbours (itself included) among the holders."""
        t = self.params.threshold
        short = sorted(nid for nid in owners if len(self.neighbours[nid] & holders) < t)
        if short:
            _log.error(
                "SecAgg+ round %d: nodes %s have fewer than %d surviving neighbours; round aborted",
                self.server_round, short, t,
            )
        return not short


def settle(state: RoundState, stage: str, replies: Iterable[Message]) -> tuple[dict[int, RecordDict], dict[int, str]]:
    """Split one stage's replies from the active nodes into good contents and failure reasons.

    An error reply's reason is kept verbatim (a client's refusal must reach the operator as it was written); a
    node that sent nothing "timed out". ``state.active`` becomes the nodes with good replies.
    """
    expected, good, failed = set(state.active), {}, {}
    for reply in replies:
        nid = reply.metadata.src_node_id
        if nid not in expected:
            _log.warning("SecAgg+ stage %s: ignoring a reply from node %d, which was not asked", stage, nid)
        elif reply.has_error():
            failed[nid] = reply.error.reason or f"error reply with code {reply.error.code} and no reason"
        else:
            good[nid] = reply.content
    for nid in expected - good.keys() - failed.keys():
        failed[nid] = f"timed out in stage {stage}"
    state.active = set(good)
    return good, failed


def _exchange(
    grid: Grid, state: RoundState, stage: str, records: dict[int, ConfigRecord], timeout: float | None
) -> dict[int, ConfigRecord]:
    """Send one stage's records, drop the nodes that fail, return each good reply's SecAgg+ record."""
    messages = [state.message(nid, RecordDict({RECORD_KEY_CONFIGS: rec})) for nid, rec in records.items()]
    good, failed = settle(state, stage, grid.send_and_receive(messages, timeout=timeout))
    state.errors.update(failed)
    out = {}
    for nid, content in good.items():
        if RECORD_KEY_CONFIGS in content.config_records:
            out[nid] = content.config_records[RECORD_KEY_CONFIGS]
        else:
            state.errors[nid] = f"malformed reply in stage {stage}: no '{RECORD_KEY_CONFIGS}' record"
            state.active.discard(nid)
    return out


def run_setup(grid: Grid, state: RoundState, timeout: float | None) -> bool:
    """Stage 0: send the settings, collect each node's two public keys."""
    records = {nid: state.params.setup_record() for nid in state.active}
    for nid, rec in _exchange(grid, state, Stage.SETUP, records, timeout).items():
        if (error := read_setup(state, nid, rec)) is not None:
            state.errors[nid] = error
            state.active.discard(nid)
    return state.enough_shares(state.active, state.active)


def read_setup(state: RoundState, nid: int, rec: ConfigRecord) -> str | None:
    """Keep one node's SETUP reply (or its keys for this round, sent one round ahead); why it is unusable if so."""
    pk1, pk2 = rec.get(Key.PUBLIC_KEY_1), rec.get(Key.PUBLIC_KEY_2)
    if not isinstance(pk1, bytes) or not isinstance(pk2, bytes):
        return f"malformed reply in stage {Stage.SETUP}: public keys missing"
    if rec.get(SECAGG_MASK_PRG) != MASK_PRG:
        return (f"the node masks with {rec.get(SECAGG_MASK_PRG) or 'Flower stock secaggplus_mod (Mersenne Twister)'}, "
                f"not {MASK_PRG}: its masks could not be removed; upgrade fedshield on that site")
    state.public_keys[nid] = (pk1, pk2)
    sig, signer = rec.get(SECAGG_SIGNATURE), rec.get(SECAGG_SIGNER)
    if isinstance(sig, bytes) and isinstance(signer, str):
        state.signatures[nid] = (sig, signer.encode("ascii", errors="replace"))
    return None


def share_keys_entry(state: RoundState, nid: int) -> list[bytes]:
    """What every neighbour receives of ``nid``: ``[pk1, pk2]``, plus ``[signature, signer]`` when it signed."""
    return [*state.public_keys[nid], *state.signatures.get(nid, ())]


def run_share_keys(grid: Grid, state: RoundState, timeout: float | None) -> bool:
    """Stage 1: give each node its neighbours' public keys, collect encrypted key shares to forward."""
    records = share_keys_records(state)
    for rec in records.values():
        rec[Key.STAGE] = Stage.SHARE_KEYS
    return read_share_keys(state, _exchange(grid, state, Stage.SHARE_KEYS, records, timeout))


def share_keys_records(state: RoundState) -> dict[int, ConfigRecord]:
    """Per active node, its neighbours' public keys (with their signatures): ``str(node id) -> entry``."""
    return {nid: ConfigRecord({str(n): share_keys_entry(state, n) for n in state.neighbours[nid] & state.active})
            for nid in state.active}


def read_share_keys(state: RoundState, replies: dict[int, ConfigRecord]) -> bool:
    """Keep the encrypted key shares to forward from each node's SHARE_KEYS reply; True if enough nodes remain."""
    sent = {}
    for src, rec in replies.items():
        dsts, ctxts = rec.get(Key.DESTINATION_LIST), rec.get(Key.CIPHERTEXT_LIST)
        if isinstance(dsts, list) and isinstance(ctxts, list) and len(dsts) == len(ctxts):
            sent[src] = list(zip(cast(list[int], dsts), cast(list[bytes], ctxts), strict=True))
        else:
            state.errors[src] = f"malformed reply in stage {Stage.SHARE_KEYS}: destination and share lists"
            state.active.discard(src)
    # Forward only between surviving neighbours: a share for a node that dropped in this stage is discarded,
    # and a share addressed to a non-neighbour would make its recipient fail.
    forwards: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in state.active}
    for src, pairs in sent.items():
        for dst, ctxt in pairs:
            if dst in forwards and src in state.active and dst in state.neighbours[src]:
                forwards[dst][0].append(src)
                forwards[dst][1].append(ctxt)
    state.forwards, state.shared = forwards, frozenset(state.active)
    return state.enough_shares(state.active, state.active)


def collect_messages(state: RoundState) -> list[Message]:
    """Stage 2 instructions: the inner strategy's train content plus the forwarded key shares."""
    messages = []
    for nid in sorted(state.active):
        srcs, ctxts = state.forwards[nid]
        rec = ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ctxts, Key.SOURCE_LIST: srcs,
                            SECAGG_COMPACT: True})
        if state.params.narrow_wire:
            rec[SECAGG_NARROW_KEY] = True
        messages.append(state.message(nid, RecordDict({**state.contents[nid], RECORD_KEY_CONFIGS: rec})))
    state.forwards = {}
    return messages


@dataclass(frozen=True)
class MaskedReply:
    """One node's stage-2 reply: its masked vector and what it told the server in clear."""

    vector: Vector
    num_examples: int
    metrics: dict[str, float]


def read_masked_reply(content: RecordDict, shapes: list[Shape], *, widen: bool = True) -> MaskedReply:
    """Parse a stage-2 reply; raises ValueError/KeyError/TypeError on a malformed one. ``widen=False`` keeps the
    wire's integer type (uint32 for the default field): the server's fold adds it into int64 without a copy."""
    rec = content.config_records[RECORD_KEY_CONFIGS]
    vector = [_widen(npy_view(b), copy=widen) for b in cast(list[bytes], rec[Key.MASKED_PARAMETERS])]
    expected = [(1,), *shapes]
    if [v.shape for v in vector] != expected:
        raise ValueError(f"masked vector shapes {[v.shape for v in vector]} differ from the model's {expected}")
    if SECAGG_COUNT in rec:  # the compact reply: count and clear metrics in the SecAgg+ record
        count, n = rec[SECAGG_COUNT], len(SECAGG_METRIC)
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError(f"the example count must be an int, got {type(count).__name__}")
        raw = {k[n:]: v for k, v in rec.items() if k.startswith(SECAGG_METRIC)}
    else:  # Flower's legacy FitRes layout (a client that was not asked for the compact reply)
        fitres = compat.recorddict_to_fitres(content, keep_input=True)
        count, raw = int(fitres.num_examples), fitres.metrics
    metrics = {k: float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return MaskedReply(vector, count, metrics)


def npy_view(data: bytes) -> NDArray[Any]:
    """A read-only array over Flower's serialized ndarray (the ``.npy`` format) that shares ``data``'s memory.

    Flower's ``bytes_to_ndarray`` (``np.load``) copies the values, so a reply being read used to sit in memory
    twice. Raises ValueError on a truncated or unknown header and TypeError on an object (pickled) dtype.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a serialized array must be bytes, got {type(data).__name__}")
    fp = io.BytesIO(data)  # over bytes, BytesIO shares the buffer until written to
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise TypeError("a serialized array must not hold Python objects")
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype=dtype)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=fp.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def _widen(arr: NDArray[Any], *, copy: bool = True) -> NDArray[Any]:
    """int64, as Flower's client sends and the mask arithmetic expects; lossless for every value below 2**32."""
    if arr.dtype.kind not in "iu":
        raise TypeError(f"a masked vector must hold integers, got dtype {arr.dtype}")
    # uint64 does not add into int64 without a cast: it is widened (copied) either way.
    return np.asarray(arr, dtype=np.int64) if copy or not np.can_cast(arr.dtype, np.int64) else arr


def unmask_records(state: RoundState, included: set[int]) -> dict[int, ConfigRecord]:
    """Stage 3 instructions: per node, which neighbours' mask seeds (alive) or private keys (dead) to reveal."""
    dead = set(state.shared) - included
    records = {}
    for nid in sorted(included):
        neigh = state.neighbours[nid]
        records[nid] = ConfigRecord(
            {
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: sorted(neigh & included),
                Key.DEAD_NODE_ID_LIST: sorted(neigh & dead),
            }
        )
    return records


def needed_owners(state: RoundState, included: set[int]) -> set[int]:
    """Nodes whose secret the server must rebuild: every included node, and dead nodes that masked with one."""
    dead = set(state.shared) - included
    return included | {nid for nid in dead if (state.neighbours[nid] - {nid}) & included}


def run_unmask(
    grid: Grid, state: RoundState, included: set[int], timeout: float | None,
    ahead: dict[int, dict[str, Any]] | None = None,
) -> tuple[dict[int, list[bytes]], dict[int, RecordDict]]:
    """Stage 3: collect the key shares; return shares by owner, and the good replies (for the fields ``ahead``
    adds to each node's record besides: the next round's key exchange). Failures here do not remove any vector."""
    records, ahead = unmask_records(state, included), ahead or {}
    for nid, rec in records.items():
        rec.update(ahead.get(nid, {}))
    messages = [state.message(nid, RecordDict({RECORD_KEY_CONFIGS: rec})) for nid, rec in records.items()]
    state.active = set(included)
    good, failed = settle(state, Stage.UNMASK, grid.send_and_receive(messages, timeout=timeout))
    for nid, reason in sorted(failed.items()):
        _log.warning("SecAgg+ round %d: node %d failed in stage unmask (its vector stays in): %s",
                     state.server_round, nid, reason)
    shares: dict[int, list[bytes]] = {}
    for nid, content in good.items():
        try:
            rec = content.config_records[RECORD_KEY_CONFIGS]
            owners, shares_ = cast(list[int], rec[Key.NODE_ID_LIST]), cast(list[bytes], rec[Key.SHARE_LIST])
            pairs = list(zip(owners, shares_, strict=True))
        except (KeyError, ValueError) as exc:
            _log.warning("SecAgg+ round %d: node %d sent a malformed unmask reply: %r", state.server_round, nid, exc)
            continue
        for owner, share in pairs:
            shares.setdefault(owner, []).append(share)
    return shares, good


def masked_sum(vectors: Iterable[Vector], modulus_range: int) -> Vector:
    """Sum masked vectors in the field; int64 cannot overflow for the node counts protocol_params allows."""
    total: Vector | None = None
    for vec in vectors:
        total = vec if total is None else parameters_addition(total, vec)
    if total is None:
        raise ValueError("no masked vectors to sum")
    return parameters_mod(total, modulus_range)


def weighted_average(unmasked: Vector, params: ProtocolParams, num_included: int) -> tuple[int, Vector]:
    """Dequantise the unmasked sum into the weighted average of the included updates.

    Returns the summed quantised weight (sum of the clients' ``q_ratio``) and the average, weighted by
    ``q_ratio``, i.e. by ``num_examples`` rounded to steps of ``max_weight / quantization_range``.
    """
    q_total_raw, body = factor_extract(unmasked)
    q_total = int(q_total_raw)
    if q_total <= 0:
        raise ValueError(f"summed weight is {q_total}; every included node reported zero examples")
    # Flower's ``dequantize`` (x * quantizer + shift), then the offset and the scale, each in place on one float64
    # copy per array: the same float operations in the same order (bit-identical results), without the four
    # float64 temporaries per array the expression form allocated (they set the server's peak at 10M parameters).
    # ``out=`` on 0-d arrays mutates them (a ``*=`` on a numpy scalar would rebind instead).
    quantizer = (2 * params.clipping_range) / params.quantization_range
    shift = -params.clipping_range
    # Each client's clipped value c was shifted to c + range before quantising; the sum carries n x range,
    # dequantize removes one of them.
    offset = -(num_included - 1) * params.clipping_range
    scale = params.quantization_range / q_total
    out = []
    for arr in body:
        x = np.asarray(arr).astype(np.float64)
        for op, operand in ((np.multiply, quantizer), (np.add, shift), (np.add, offset), (np.multiply, scale)):
            op(x, operand, out=x)
        out.append(x)
    return q_total, out


def contents_by_node(messages: Iterable[Message]) -> dict[int, RecordDict]:
    """The inner strategy's train content by node; ProtocolError unless one message per node carries the model."""
    contents: dict[int, RecordDict] = {}
    for msg in messages:
        nid = msg.metadata.dst_node_id
        if nid in contents:
            raise ProtocolError(f"the inner strategy addressed node {nid} twice in one round; SecAgg+ needs one "
                                "train message per node")
        if ARRAYS not in msg.content.array_records:
            raise ProtocolError(f"the inner strategy's train message has no '{ARRAYS}' ArrayRecord (records: "
                                f"{list(msg.content.keys())}): SecAgg+ needs the global model under '{ARRAYS}'")
        contents[nid] = msg.content
    return contents


def common_arrays(contents: dict[int, RecordDict]) -> ArrayRecord:
    """The global arrays every sampled node receives; clients send updates relative to them."""
    records = [c.array_records[ARRAYS] for c in contents.values()]
    base = records[0]
    for rec in records[1:]:
        if rec is not base and [(k, a.data) for k, a in rec.items()] != [(k, a.data) for k, a in base.items()]:
            raise ProtocolError("the inner strategy sent different arrays to different nodes; SecAgg+ can only "
                                "average updates relative to one global model")
    return base
