"""SecAgg+ one round ahead: the next round's SETUP and SHARE_KEYS ride in this round's last two messages.

Why: a deployed site answers each message with a ClientApp process and a dozen requests through the SuperLink,
so a SecAgg+ round's four messages per site (SETUP, SHARE_KEYS, COLLECT_MASKED_VECTORS, UNMASK) cost four times a
plain round's one (issue 13). Neither key stage needs anything of the round's model: when the same nodes train
again, round r's masked-vector request also asks each node for round r + 1's two public keys (signed for round
r + 1), and round r's UNMASK request also carries round r + 1's settings and every participant's signed keys, so
each node makes and encrypts its round-(r + 1) key shares while it reveals its round-r shares. Round r + 1 then
starts with its masked-vector request: two messages per site and round instead of four. The next round's part
rides as prefixed fields of the SecAgg+ record (``SECAGG_NEXT``, ``SECAGG_NEXT_KEY``), not in records of its own:
Flower moves every record of a message as an object with its own request on every hop.

Nothing a site checks or reveals changes (:mod:`fedshield.client.secaggplus`): the keys are fresh per round and
signed for that round, every peer's signature is checked against the site's roster before it makes a share, and
the next round's secrets are kept apart from this round's. The server learns the next round's public keys and
encrypted shares one round earlier, which it would learn anyway.

The prepared round is used only if round r + 1 samples exactly the nodes that prepared it with the same protocol
settings; otherwise (a node dropped or joined, the field changed, a node refused its next-round part, the server
restarted) round r + 1 runs the full key exchange, as every round did before. It is asked for only when a round
trains every connected node and the round config names the run's length (fedshield's does) and this is not its
last round, so a run that samples a fraction of its nodes never spends a next-round key exchange it cannot use.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator

from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from ..flower_internals.secagg_keys import RECORD_KEY_CONFIGS, Key
from ..protocol import SECAGG_NEXT, SECAGG_NEXT_KEY, SECAGG_NEXT_REFUSED, SECAGG_ROUND_TAG, prefixed
from ._secagg_params import ProtocolParams, neighbour_graph
from ._secagg_stages import RoundState, read_setup, read_share_keys, share_keys_records

__all__ = ["ask_next_keys", "next_round", "next_round_records", "settle_next_round", "tap_next_keys"]

_log = logging.getLogger(__name__)


def ask_next_keys(messages: Iterable[Message], next_round: int) -> None:
    """Ask every masked-vector request's node for its keys of ``next_round``."""
    for msg in messages:
        msg.content.config_records[RECORD_KEY_CONFIGS][SECAGG_NEXT + SECAGG_ROUND_TAG] = str(next_round)


def tap_next_keys(replies: Iterable[Message], sink: dict[int, ConfigRecord]) -> Iterator[Message]:
    """Pass ``replies`` on unchanged, keeping each good one's next-round keys in ``sink`` by node."""
    for reply in replies:
        if not reply.has_error() and (fields := _next_fields(reply.content)):
            sink[reply.metadata.src_node_id] = ConfigRecord(fields)
        yield reply


def _next_fields(content: RecordDict) -> dict[str, Any]:
    """The next round's fields of a reply's SecAgg+ record, unprefixed (left in place: the record is read on)."""
    rec = content.config_records.get(RECORD_KEY_CONFIGS)
    n = len(SECAGG_NEXT)
    return {key[n:]: value for key, value in rec.items() if key.startswith(SECAGG_NEXT)} if rec is not None else {}


def next_round(
    current: RoundState, included: set[int], keys: dict[int, ConfigRecord], params: ProtocolParams,
    rng: random.Random,
) -> RoundState | None:
    """Round ``current + 1`` over the nodes whose vectors this round summed, if each sent usable next keys."""
    missing = sorted(included - keys.keys())
    if missing or len(included) < 2:
        if missing:
            _log.info("SecAgg+ round %d: nodes %s sent no keys for round %d; it will run the full key exchange",
                      current.server_round, missing, current.server_round + 1)
        return None
    nodes = sorted(included)
    state = RoundState(current.server_round + 1, params, sampled=nodes, contents={}, active=set(nodes),
                       neighbours=neighbour_graph(nodes, params.num_shares, rng))
    for nid in nodes:
        if (error := read_setup(state, nid, keys[nid])) is not None:
            _log.warning("SecAgg+ round %d: node %d's keys for the next round are unusable (%s); it will run the "
                         "full key exchange", current.server_round, nid, error)
            return None
    return state


def next_round_records(state: RoundState) -> dict[int, dict[str, Any]]:
    """Per node, the fields its UNMASK record gains for ``state``'s round: the settings SETUP would send, with the
    round tag its keys were signed for, and its neighbours' signed keys as SHARE_KEYS would send them."""
    setup = {k: v for k, v in state.params.setup_record().items() if k != Key.STAGE}
    setup[SECAGG_ROUND_TAG] = str(state.server_round)
    return {nid: {**prefixed(SECAGG_NEXT, setup), **prefixed(SECAGG_NEXT_KEY, rec)}
            for nid, rec in share_keys_records(state).items()}


def settle_next_round(state: RoundState, replies: dict[int, RecordDict]) -> RoundState | None:
    """``state`` ready for its masked-vector requests if every node made a key share for each of its neighbours;
    None otherwise (a share missing here would make its recipient short of the threshold, or mask with fewer
    peers than planned)."""
    shares: dict[int, ConfigRecord] = {}
    for nid in sorted(state.active):
        fields = _next_fields(replies[nid]) if nid in replies else {}
        if not fields or SECAGG_NEXT_REFUSED in fields:
            why = fields.get(SECAGG_NEXT_REFUSED, "no reply")
            _log.warning("SecAgg+ round %d: node %d did not make its key shares one round ahead (%s); the round "
                         "will run the full key exchange", state.server_round, nid, why)
            return None
        shares[nid] = ConfigRecord(fields)
    sampled = set(state.sampled)
    if not read_share_keys(state, shares) or state.active != sampled or any(
            set(state.forwards[nid][0]) != state.neighbours[nid] - {nid} for nid in sampled):
        _log.warning("SecAgg+ round %d: the key shares made one round ahead are incomplete; the round will run the "
                     "full key exchange", state.server_round)
        return None
    return state
