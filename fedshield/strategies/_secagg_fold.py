"""SecAgg+ stages 2 and 3 on the server in O(model) memory: fold each masked vector into a running sum as it
arrives, then strip the masks from that sum in place.

Unmasking needs only the sum of the masked vectors (modulo the field) and the seeds recovered in stage 3, never
one node's vector, so nothing but the running sum and the reply being read is held: with a lazy grid
(:class:`~fedshield.strategies.streaming.StreamingGrid`) the server's peak memory stays about one uint32 vector of
the model's size (the sum) plus one reply read in place, whatever the number of clients; each mask is expanded
and subtracted a chunk at a time (it used to list every reply, then an int64 sum plus a decoded copy of the
reply, and whole int64 masks beside an int64 sum while unmasking).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Message

from ..crypto.prg import expand_mask, mask_chunks
from ..crypto.shamir import combine_shares
from ..flower_internals.secagg import (
    RECORD_KEY_CONFIGS, Key, bytes_to_private_key, bytes_to_public_key, generate_shared_key,
)
from ..flower_internals.secagg_keys import Stage
from ._secagg_stages import MaskedReply, RoundState, Shape, Vector, needed_owners, read_masked_reply

__all__ = ["FieldSum", "fold_masked_replies", "remove_masks"]

_log = logging.getLogger(__name__)


class FieldSum:
    """``sum_i v_i mod modulus`` over integer vectors, one at a time, in place; masks are removed in place too.

    For a power-of-two modulus up to 2**32 (every field :func:`~._secagg_params.check_params` allows) the running
    sum is uint32: uint32 arithmetic wraps modulo 2**32, a multiple of the modulus, so one reduction at the end
    gives exactly ``sum mod modulus``, in half the memory of the int64 sum it replaces (one fp32 model's worth).
    Any other modulus keeps an int64 sum reduced after every step.
    """

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus
        self.wraps = modulus & (modulus - 1) == 0 and 2 <= modulus <= 2**32
        self.dtype = np.dtype(np.uint32 if self.wraps else np.int64)
        self.total: Vector | None = None
        self.chunk = 1 << 20  #: mask values expanded at a time (4 MiB of uint32)

    def add(self, vector: Vector) -> None:
        for v in vector:
            if np.asarray(v).dtype.kind not in "iu":
                raise TypeError(f"a masked vector must hold integers, got dtype {np.asarray(v).dtype}")
        if self.total is None:
            # A copy in the sum's type; int64 -> uint32 keeps each value modulo 2**32, which is all the sum needs.
            self.total = [np.asarray(v).astype(self.dtype) for v in vector]
            self._reduce()
            return
        for acc, v in zip(self.total, vector, strict=True):
            if acc.shape != np.shape(v):
                raise ValueError(f"a masked array of shape {np.shape(v)} cannot be added to the sum's {acc.shape}")
            # uint32 wire values add without a copy; an int64 (Flower's stock wire) or a malformed negative entry
            # is cast modulo 2**32 chunk by chunk: the same residue, caught by the integrity check if wrong.
            np.add(acc, v, out=acc, casting="unsafe" if self.wraps else "safe")
        if not self.wraps:
            self._reduce()

    def add_mask(self, seed: bytes, sign: int) -> None:
        """Add (``sign`` +1) or subtract (-1) :func:`~fedshield.crypto.prg.expand_mask` of ``seed`` in place."""
        total = self._require()
        if not self.wraps:
            mask = expand_mask(seed, self.modulus, [a.shape for a in total])
            for acc, m in zip(total, mask, strict=True):
                (np.add if sign > 0 else np.subtract)(acc, m, out=acc)
            self._reduce()
            return
        op = np.add if sign > 0 else np.subtract
        flats = [a.reshape(-1) for a in total]  # views: the sum's arrays are contiguous copies
        chunks = mask_chunks(seed, self.modulus, sum(f.size for f in flats), self.chunk)
        pending = np.empty(0, dtype=np.uint32)
        for flat in flats:
            done = 0
            while done < flat.size:
                if pending.size == 0:
                    pending = next(chunks)
                take = min(pending.size, flat.size - done)
                op(flat[done:done + take], pending[:take], out=flat[done:done + take])
                pending, done = pending[take:], done + take

    def value(self) -> Vector:
        """The sum, each entry in ``[0, modulus)`` (uint32 for a power-of-two modulus, else int64)."""
        total = self._require()
        self._reduce()
        return total

    def _reduce(self) -> None:
        for acc in self.total or []:
            if self.wraps:
                np.bitwise_and(acc, self.dtype.type(self.modulus - 1), out=acc)
            else:
                np.mod(acc, self.modulus, out=acc)

    def _require(self) -> Vector:
        if self.total is None:
            raise ValueError("no masked vectors to sum")
        return self.total


def fold_masked_replies(
    state: RoundState, replies: Iterable[Message], shapes: list[Shape], field: FieldSum,
    check: Callable[[MaskedReply], str | None],
) -> dict[int, MaskedReply]:
    """Read stage-2 replies one by one; fold each good vector into ``field``; return the included nodes' clear
    figures (their :class:`MaskedReply` without the vector).

    Bookkeeping as :func:`~fedshield.strategies._secagg_stages.settle`: an error reply's reason is kept
    verbatim, a node that sent nothing "timed out", ``state.active`` becomes the nodes that replied without error.
    A malformed reply, or one ``check`` rules out (its reason returned), leaves the node out of the sum.
    A second reply from one node is ignored: folding it twice would corrupt the sum.
    """
    expected, replied, ok, included = set(state.active), set(), set(), {}
    for reply in replies:
        nid = reply.metadata.src_node_id
        if nid not in expected or nid in replied:
            _log.warning("SecAgg+ stage %s: ignoring a reply from node %d (not asked, or a second reply)",
                         Stage.COLLECT_MASKED_VECTORS, nid)
        else:
            replied.add(nid)
            if reply.has_error():
                state.errors[nid] = reply.error.reason or f"error reply with code {reply.error.code} and no reason"
            else:
                ok.add(nid)
                _fold_one(reply, nid, state, shapes, field, check, included)
        # Let go of this reply before the next one is pulled: the loop variable would keep it (and the vector
        # viewing its bytes) alive while the next arrives, two replies beside the sum instead of one.
        del reply
    for nid in expected - replied:
        state.errors[nid] = f"timed out in stage {Stage.COLLECT_MASKED_VECTORS}"
    state.active = ok
    return included


def _fold_one(reply: Message, nid: int, state: RoundState, shapes: list[Shape], field: FieldSum,
              check: Callable[[MaskedReply], str | None], included: dict[int, MaskedReply]) -> None:
    try:
        masked = read_masked_reply(reply.content, shapes, widen=False)  # views over the reply's bytes: no copy
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(inf) is an OverflowError
        state.errors[nid] = f"malformed reply in stage {Stage.COLLECT_MASKED_VECTORS}: {exc!r}"
        return
    reason = check(masked)
    if reason is not None:
        state.errors[nid] = reason
        return
    field.add(masked.vector)
    included[nid] = MaskedReply([], masked.num_examples, masked.metrics)  # the clear figures, not the vector
    # The reply is consumed: drop its masked bytes now. Reading a RecordDict's ``config_records`` (as this and
    # Flower's compat helpers do) ties it into a reference cycle (flwr 1.39), so the reply would otherwise wait
    # for the cyclic garbage collector, several replies beside the sum.
    del masked
    reply.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = []

def remove_masks(field: FieldSum, shares: dict[int, list[bytes]], state: RoundState, included: set[int]) -> bool:
    """Rebuild each needed secret from ``threshold`` shares and strip its masks from ``field`` in place, one
    mask chunk at a time (never a whole mask beside the sum); False if a secret is short (the sum is then spoiled)."""
    p = state.params
    for owner in sorted(needed_owners(state, included)):
        got = shares.get(owner, [])
        if len(got) < p.threshold:
            _log.error("SecAgg+ round %d: %d of %d shares for node %d; round aborted",
                       state.server_round, len(got), p.threshold, owner)
            return False
        # Exactly `threshold` shares: any `threshold` of them rebuild the secret.
        secret = combine_shares(got[: p.threshold])
        if owner in included:
            field.add_mask(secret, -1)
        else:
            _cancel_pairwise(field, owner, secret, state, included & state.neighbours[owner])
    return True


def _cancel_pairwise(field: FieldSum, dead: int, sk1: bytes, state: RoundState, partners: set[int]) -> None:
    # Each partner added +mask if its id > dead's id, else -mask (secaggplus_mod); undo exactly that.
    for partner in sorted(partners - {dead}):
        key = generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(state.public_keys[partner][0]))
        field.add_mask(key, 1 if dead > partner else -1)
