"""fedshield's client side of SecAgg+: Flower 1.39's ``secaggplus_mod``, ported, with authenticated keys and
CSPRNG masks.

Same stages, record keys and arithmetic as Flower's mod (its state class, stage and config checks, key agreement,
share encryption and quantisation are reused), with three changes:

* SETUP: the reply also names the mask expansion (:data:`~fedshield.crypto.prg.MASK_PRG`) and, when the site has
  a node key, carries a signature of both round public keys bound to the run, round, node id and stage
  (:mod:`fedshield.crypto.secagg_auth`), with the signer's fingerprint;
* SHARE_KEYS: a site with a roster checks every participant's signature before it makes a single share; a key not
  signed by a roster key, one roster key behind two node ids, a signature for another run/round/node, or fewer
  than the site's minimum of signed peers, and it replies ``fedshield:secagg-refused: <reason>`` and sends nothing;
* masks (its own and the pairwise ones) come from :func:`fedshield.crypto.prg.expand_mask`: ChaCha20 keyed by HKDF
  of the whole secret, not a Mersenne Twister seeded with 32 bits of it.

UNMASK also refuses requests no honest server sends: a node listed both alive and dead, this site listed as dead
after it sent its vector, or a node it holds no share of. Only a site's own ``fedshield client`` settings decide
whether it verifies (:mod:`fedshield.client.secagg_identity`).

One round ahead (:mod:`fedshield.strategies._secagg_pipeline`): a masked-vector request may ask for the next
round's keys (the round tag to sign them for) and the UNMASK request that follows it may carry the next round's
settings and signed keys, in fields of the SecAgg+ record named with ``SECAGG_NEXT`` / ``SECAGG_NEXT_KEY``. The site then does, in those two messages, exactly what SETUP and SHARE_KEYS
would do, with the same checks: fresh key pairs signed for the named round, every peer's signature checked against
the roster before a share is made. The next round's secrets are kept apart from this round's and are spent by the
next message whatever it is, so keys are never used for two rounds, and a refusal of the next round's part still
sends this round's shares (the server falls back to a full SETUP).

Wire: a share-keys entry is ``str(node_id) -> [pk1, pk2]`` (unsigned) or ``[pk1, pk2, signature, signer]``.
"""

from __future__ import annotations

import os
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarray_to_bytes, parameters_to_ndarrays

from ..flower_internals.secagg import (
    SecAggPlusState, check_configs, check_stage, decrypt, encrypt, generate_shared_key, factor_combine,
    parameters_addition, parameters_mod, parameters_multiply, parameters_subtraction, quantize,
    RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage, share_keys_plaintext_concat, share_keys_plaintext_separate,
    recorddict_compat as compat, bytes_to_private_key, bytes_to_public_key, generate_key_pairs,
    private_key_to_bytes, public_key_to_bytes,
)
from ..crypto.prg import MASK_PRG, expand_mask
from ..crypto.secagg_auth import KeyAuthenticationError, SignedKeys, check_participants, sign_round_keys, signed_payload
from ..crypto.shamir import create_shares
from ..errors import ConfigError, FedshieldError, KeyMaterialError
from ..protocol import (
    MIN_HONEST, SECAGG_NEXT, SECAGG_NEXT_KEY, SECAGG_NEXT_REFUSED, SECAGG_ROUND_TAG, prefixed, take_prefixed,
)
from ..protocol import SECAGG_MASK_PRG as KEY_MASK_PRG
from ..protocol import SECAGG_REFUSAL, SECAGG_REFUSED_CODE
from ..protocol import SECAGG_SIGNATURE as KEY_SIGNATURE
from ..protocol import SECAGG_SIGNER as KEY_SIGNER
from .secagg_identity import SiteIdentity, site_identity

__all__ = ["SECAGG_REFUSAL", "SECAGG_REFUSED_CODE", "secaggplus_mod"]



class _Refused(FedshieldError):
    """The round is refused; the text becomes the error reply's reason after :data:`SECAGG_REFUSAL`."""


#: ``context.state`` record with the next round's key pairs between the masked-vector request and the UNMASK.
RECORD_KEY_NEXT = "fedshield-secagg-prepared"


class _State(SecAggPlusState):  # type: ignore[misc]
    """Flower's state plus the run and round the keys were signed for (saved in ``context.state``)."""

    run_id: int = 0
    round_tag: str = ""
    min_honest: int = 0  # distributed DP: UNMASK refuses with fewer surviving sites (0: not a distributed round)


def secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run one SecAgg+ stage for a train message; other messages pass through."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    # Keys prepared for a next round are spent by this message, used or not; the next round's part is taken out
    # of the SecAgg+ record before anything reads it.
    prepared = _take(ctxt.state, RECORD_KEY_NEXT)
    state = _State(**ctxt.state.config_records.get(RECORD_KEY_STATE, ConfigRecord({})))
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    ahead = {prefix: take_prefixed(configs, prefix) for prefix in (SECAGG_NEXT, SECAGG_NEXT_KEY)}
    check_stage(state.current_stage, configs)
    state.current_stage = cast(str, configs.pop(Key.STAGE))
    out_content, following = RecordDict(), None
    try:
        if state.current_stage == Stage.SETUP:
            check_configs(Stage.SETUP, configs)
            res = _setup(state, configs, msg, _identity(ctxt))
        elif state.current_stage == Stage.SHARE_KEYS:
            _check_round(state, msg)
            res = _share_keys(state, _signed_entries(configs), _identity(ctxt))
        elif state.current_stage == Stage.COLLECT_MASKED_VECTORS:
            res, out_content = _collect(state, configs, msg, ctxt, call_next, ahead[SECAGG_NEXT])
        elif state.current_stage == Stage.UNMASK:
            _check_round(state, msg)
            check_configs(Stage.UNMASK, configs)
            res = _unmask(state, configs)
            if ahead[SECAGG_NEXT] is not None:
                next_res, following = _next_share_keys(prepared, ahead, msg, ctxt)
                res.update(prefixed(SECAGG_NEXT, next_res))
        else:
            raise ValueError(f"Unknown SecAgg/SecAgg+ stage: {state.current_stage}")
    except (_Refused, KeyAuthenticationError) as exc:
        state.current_stage = Stage.UNMASK  # a new SETUP may start afresh
        ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())
        return Message(Error(code=SECAGG_REFUSED_CODE, reason=f"{SECAGG_REFUSAL}: {exc}"), reply_to=msg)
    ctxt.state.config_records[RECORD_KEY_STATE] = ConfigRecord((following or state).to_dict())
    out_content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(res, False)
    return Message(out_content, reply_to=msg)


def _collect(state: _State, configs: ConfigRecord, msg: Message, ctxt: Context, call_next: ClientAppCallable,
             next_request: dict[str, Any] | None) -> tuple[dict[str, Any], RecordDict]:
    """Stage 2: take the forwarded shares, train, mask; with ``next_request``, also the next round's keys."""
    _check_round(state, msg)
    check_configs(Stage.COLLECT_MASKED_VECTORS, configs)
    srcs, ctxts = cast(list[int], configs[Key.SOURCE_LIST]), cast(list[bytes], configs[Key.CIPHERTEXT_LIST])
    _receive_shares(state, srcs, ctxts)  # before training: nothing is spent on a round that is refused
    if next_request is not None:
        _check_next_tag(state, next_request.get(SECAGG_ROUND_TAG))  # a lying request refuses before training
    out_content = call_next(msg, ctxt).content
    fitres = compat.recorddict_to_fitres(out_content, keep_input=True)
    state.min_honest = int(fitres.metrics.get(MIN_HONEST, 0))
    res = _masked_vector(state, srcs, fitres.num_examples, parameters_to_ndarrays(fitres.parameters))
    for arr_record in out_content.array_records.values():
        arr_record.clear()
    if next_request is not None:
        try:
            nxt, next_res = _next_keys(state, next_request, _identity(ctxt))
            ctxt.state.config_records[RECORD_KEY_NEXT] = ConfigRecord(nxt.to_dict())
        except Exception as exc:  # noqa: BLE001  the trained vector still goes; the next round sets up in full
            next_res = {SECAGG_NEXT_REFUSED: f"{SECAGG_REFUSAL}: {exc}"}
        res.update(prefixed(SECAGG_NEXT, next_res))
    return res, out_content


def _take(content: RecordDict, key: str) -> ConfigRecord | None:
    record = content.config_records.get(key)
    if record is not None:
        del content[key]
    return record


def _identity(ctxt: Context) -> SiteIdentity:
    """This site's key and roster; an unreadable one refuses the round (with the fix) instead of failing it."""
    try:
        return site_identity(ctxt.node_config)
    except (KeyMaterialError, ConfigError) as exc:
        raise _Refused(str(exc)) from exc


def _check_round(state: _State, msg: Message) -> None:
    if msg.metadata.run_id != state.run_id or msg.metadata.group_id != state.round_tag:
        raise _Refused(f"stage {state.current_stage} is for run {msg.metadata.run_id} round "
                       f"{msg.metadata.group_id!r}, but this site's keys were made for run {state.run_id} round "
                       f"{state.round_tag!r}")


def _setup(state: _State, configs: ConfigRecord, msg: Message, site: SiteIdentity) -> dict[str, Any]:
    state.nid, state.run_id, state.round_tag = msg.metadata.dst_node_id, msg.metadata.run_id, msg.metadata.group_id
    _read_params(state, configs)
    return _new_keys(state, site)


def _read_params(state: _State, configs: ConfigRecord) -> None:
    state.sample_num = cast(int, configs[Key.SAMPLE_NUMBER])
    state.share_num = cast(int, configs[Key.SHARE_NUMBER])
    state.threshold = cast(int, configs[Key.THRESHOLD])
    state.clipping_range = cast(float, configs[Key.CLIPPING_RANGE])
    state.target_range = cast(int, configs[Key.TARGET_RANGE])
    state.mod_range = cast(int, configs[Key.MOD_RANGE])
    state.max_weight = cast(float, configs[Key.MAX_WEIGHT])
    state.rd_seed_share_dict, state.sk1_share_dict, state.ss2_dict, state.public_keys_dict = {}, {}, {}, {}


def _new_keys(state: _State, site: SiteIdentity) -> dict[str, Any]:
    """Fresh key pairs for ``state``'s run, round tag and node; the SETUP reply that announces them."""
    # One pair for the pairwise masks, one for encrypting the shares.
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    state.sk1, state.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
    state.sk2, state.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
    res: dict[str, Any] = {Key.PUBLIC_KEY_1: state.pk1, Key.PUBLIC_KEY_2: state.pk2, KEY_MASK_PRG: MASK_PRG}
    if site.key is not None:
        payload = signed_payload(run_id=state.run_id, round_tag=state.round_tag, node_id=state.nid,
                                 stage=Stage.SETUP, pk1=state.pk1, pk2=state.pk2)
        res[KEY_SIGNATURE], res[KEY_SIGNER] = sign_round_keys(site.key, payload)
    return res


def _check_next_tag(state: _State, tag: object) -> str:
    """The next round's tag: this round's plus one, the only round a site signs keys for ahead of time."""
    expected = str(int(state.round_tag) + 1) if state.round_tag.isdigit() else None
    if expected is None or tag != expected:
        raise _Refused(f"asked for keys for round {tag!r} while round {state.round_tag!r} runs: not the next round")
    return expected


def _next_keys(state: _State, request: dict[str, Any], site: SiteIdentity) -> tuple[_State, dict[str, Any]]:
    """Keys for the next round, as a SETUP would make them (its reply's fields)."""
    nxt = _State()
    nxt.nid, nxt.run_id, nxt.round_tag = state.nid, state.run_id, _check_next_tag(state, request.get(SECAGG_ROUND_TAG))
    return nxt, _new_keys(nxt, site)


def _next_share_keys(prepared: ConfigRecord | None, ahead: dict[str, dict[str, Any] | None], msg: Message,
                     ctxt: Context) -> tuple[dict[str, Any], _State | None]:
    """The next round's SETUP settings and SHARE_KEYS on the keys this site prepared: its shares (and the state it
    enters), or why it refuses (this round's shares still go: the server runs a full SETUP next round)."""
    try:
        if prepared is None:
            raise _Refused("the server sent next-round keys but this site prepared none for it")
        nxt, setup, entries = _State(**prepared), ahead[SECAGG_NEXT], ahead[SECAGG_NEXT_KEY]
        if setup is None or entries is None or setup.get(SECAGG_ROUND_TAG) != nxt.round_tag or \
                (msg.metadata.run_id, msg.metadata.dst_node_id) != (nxt.run_id, nxt.nid):
            raise _Refused(f"the next round's settings are not for the keys this site made (run {nxt.run_id}, "
                           f"round {nxt.round_tag!r}, node {nxt.nid})")
        params = ConfigRecord({k: v for k, v in setup.items() if k != SECAGG_ROUND_TAG})
        check_configs(Stage.SETUP, params)
        _read_params(nxt, params)
        res = _share_keys(nxt, _signed_entries(ConfigRecord(entries)), _identity(ctxt))
    except Exception as exc:  # noqa: BLE001  whatever fails here, this round's shares still go
        return {SECAGG_NEXT_REFUSED: f"{SECAGG_REFUSAL}: {exc}"}, None
    nxt.current_stage = Stage.SHARE_KEYS
    return res, nxt


def _signed_entries(configs: ConfigRecord) -> dict[int, SignedKeys | tuple[bytes, bytes]]:
    out: dict[int, SignedKeys | tuple[bytes, bytes]] = {}
    for key, value in configs.items():
        ok = isinstance(value, list) and len(value) in (2, 4) and all(isinstance(v, bytes) for v in value)
        if not ok or not key.isdigit():
            raise TypeError(f"Stage {Stage.SHARE_KEYS}: entry {key!r} must map a node id to [pk1, pk2] or "
                            "[pk1, pk2, signature, signer]")
        items = cast(list[bytes], value)
        out[int(key)] = (items[0], items[1]) if len(items) == 2 else \
            SignedKeys(items[0], items[1], items[2], items[3].decode("ascii", errors="replace"))
    return out


def _share_keys(state: _State, entries: dict[int, SignedKeys | tuple[bytes, bytes]], site: SiteIdentity) -> dict[str, Any]:
    if site.roster is not None:
        unsigned = sorted(nid for nid, e in entries.items() if not isinstance(e, SignedKeys))
        if unsigned:
            raise _Refused(f"the keys of node(s) {unsigned} carry no signature; this site accepts only keys signed "
                           f"by its roster {site.roster.source}")
        check_participants(site.roster, cast(dict[int, SignedKeys], entries), own_node_id=state.nid,
                           run_id=state.run_id, round_tag=state.round_tag, stage=Stage.SETUP,
                           min_peers=site.min_peers)
    keys = {nid: (e.pk1, e.pk2) if isinstance(e, SignedKeys) else e for nid, e in entries.items()}
    if keys.get(state.nid) != (state.pk1, state.pk2):
        raise _Refused("the server relayed keys for this node that are not the ones it sent at setup")
    if len(keys) > state.share_num or state.threshold > state.share_num:
        raise _Refused(f"{len(keys)} participants and threshold {state.threshold} for {state.share_num} shares")
    if len(keys) < state.threshold:
        raise _Refused(f"{len(keys)} participants, fewer than the threshold {state.threshold}")
    flat = [pk for pair in keys.values() for pk in pair]
    if len(set(flat)) != len(flat):
        raise _Refused("two participants share a public key")
    state.public_keys_dict = keys
    state.rd_seed = os.urandom(32)
    # As many shares as participants (indices 1..n, the first n of the share_num Flower makes): share_num comes
    # from the server, and a huge one would only cost this site time and memory.
    b_shares = create_shares(state.rd_seed, state.threshold, len(keys))
    sk1_shares = create_shares(state.sk1, state.threshold, len(keys))
    dsts, ciphertexts = [], []
    for idx, (nid, (_, pk2)) in enumerate(keys.items()):
        if nid == state.nid:
            state.rd_seed_share_dict[nid], state.sk1_share_dict[nid] = b_shares[idx], sk1_shares[idx]
            continue
        shared_key = generate_shared_key(bytes_to_private_key(state.sk2), bytes_to_public_key(pk2))
        state.ss2_dict[nid] = shared_key
        dsts.append(nid)
        ciphertexts.append(encrypt(shared_key, share_keys_plaintext_concat(state.nid, nid, b_shares[idx],
                                                                            sk1_shares[idx])))
    return {Key.DESTINATION_LIST: dsts, Key.CIPHERTEXT_LIST: ciphertexts}


def _receive_shares(state: _State, srcs: list[int], ciphertexts: list[bytes]) -> None:
    if len(srcs) != len(ciphertexts) or len(set(srcs)) != len(srcs):
        raise _Refused("the forwarded share lists have different lengths or repeat a source")
    if len(ciphertexts) + 1 < state.threshold:
        raise _Refused(f"{len(ciphertexts) + 1} share holders, fewer than the threshold {state.threshold}")
    for src, ciphertext in zip(srcs, ciphertexts, strict=True):
        if src not in state.ss2_dict:
            raise _Refused(f"a share from node {src}, which is not an authenticated participant of this round")
        actual_src, dst, rd_seed_share, sk1_share = share_keys_plaintext_separate(decrypt(state.ss2_dict[src],
                                                                                          ciphertext))
        if actual_src != src or dst != state.nid:
            raise _Refused(f"a share labelled {actual_src}->{dst} arrived as {src}->{state.nid}")
        state.rd_seed_share_dict[src], state.sk1_share_dict[src] = rd_seed_share, sk1_share


def _masked_vector(state: _State, srcs: list[int], num_examples: int, update: list[Any]) -> dict[str, Any]:
    """Quantise the weighted update and add the self mask and one pairwise mask per share holder (Flower's maths)."""
    q_ratio = round(num_examples / state.max_weight * state.target_range)
    if state.min_honest:  # distributed DP: the update already is the Skellam field vector; no second quantisation
        vec = factor_combine(q_ratio, [np.mod(np.asarray(update[0], dtype=np.int64), state.mod_range)])
    else:
        vec = quantize(parameters_multiply(update, q_ratio / state.target_range), state.clipping_range,
                       state.target_range)
        vec = factor_combine(q_ratio, vec)
    shapes: list[tuple[int, ...]] = [a.shape for a in vec]
    vec = parameters_addition(vec, expand_mask(state.rd_seed, state.mod_range, shapes))
    for nid in srcs:
        shared_key = generate_shared_key(bytes_to_private_key(state.sk1),
                                         bytes_to_public_key(state.public_keys_dict[nid][0]))
        mask = expand_mask(shared_key, state.mod_range, shapes)
        vec = parameters_addition(vec, mask) if state.nid > nid else parameters_subtraction(vec, mask)
    return {Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in parameters_mod(vec, state.mod_range)]}


def _unmask(state: _State, configs: ConfigRecord) -> dict[str, Any]:
    active, dead = cast(list[int], configs[Key.ACTIVE_NODE_ID_LIST]), cast(list[int], configs[Key.DEAD_NODE_ID_LIST])
    if set(active) & set(dead):
        raise _Refused(f"node(s) {sorted(set(active) & set(dead))} listed both alive and dead: revealing both "
                       "shares would unmask them")
    if state.nid in dead:
        raise _Refused("the server lists this site as dropped, but it sent its masked vector")
    if len(active) < state.threshold:
        raise _Refused(f"{len(active)} active neighbours, fewer than the threshold {state.threshold}")
    if len(active) < state.min_honest:
        # Each share was sized for min_honest noise shares in the sum: with fewer sites the sum is under-noised.
        raise _Refused(f"{len(active)} sites survived, fewer than the {state.min_honest} (min-honest) this site's "
                       "noise share was sized for: the sum would carry too little noise, so it is not released")
    unknown = sorted(set(active) - state.rd_seed_share_dict.keys() | set(dead) - state.sk1_share_dict.keys())
    if unknown:
        raise _Refused(f"asked for shares of node(s) {unknown}, which this site holds none of")
    shares = [state.rd_seed_share_dict[n] for n in active] + [state.sk1_share_dict[n] for n in dead]
    return {Key.NODE_ID_LIST: active + dead, Key.SHARE_LIST: shares}
