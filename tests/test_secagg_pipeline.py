"""SecAgg+ one round ahead (fedshield.strategies._secagg_pipeline) with the in-process grid of test_secagg.py and
sites that sign their keys: after round 1 a round sends each node two messages instead of four and stays exact;
anything that does not fit falls back to the full key exchange; and a server that tampers with the next round's
part is refused by the sites exactly as in SETUP / SHARE_KEYS, without losing the round that is unmasking.

The real-process version of the tampering is tests/test_secagg_malicious_server.py (its round 2).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from _secagg_harness import Fault, _LocalGrid, assert_weighted_average, make_client_app
from test_secagg_auth import _run as _run_rounds, _sign_in

from fedshield.crypto.secagg_auth import SignedKeys, check_participants, load_roster
from fedshield.protocol import (
    PARTITION_ID, SECAGG_NEXT, SECAGG_NEXT_KEY, SECAGG_NEXT_REFUSED, SECAGG_REFUSAL, SECAGG_ROUND_TAG,
    SECAGG_SIGNATURE, SECAGG_SIGNER, ClientReply,
)

pytestmark = pytest.mark.usefixtures("task_identity")

Tamper = Callable[[Message], None]


class _WatchedGrid(_LocalGrid):
    """The in-process grid; notes each request's (round, stage) and each reply, and lets a server edit requests."""

    def __init__(self, num_nodes: int, tamper: Tamper | None = None, fault: Fault | None = None) -> None:
        super().__init__(make_client_app(), num_nodes, fault)
        self._tamper = tamper or (lambda _msg: None)
        self.sent: Counter[tuple[int, str]] = Counter()
        self.replies: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            self._tamper(msg)
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
            self.sent[(int(msg.metadata.group_id), stage)] += 1
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies

    def stages(self, rnd: int) -> dict[str, int]:
        return {stage: n for (r, stage), n in self.sent.items() if r == rnd}


def _next(msg: Message) -> dict[str, Any]:
    """The next round's fields of a message's SecAgg+ record, unprefixed."""
    rec = msg.content.config_records[RECORD_KEY_CONFIGS]
    return {k[len(SECAGG_NEXT):]: v for k, v in rec.items() if k.startswith(SECAGG_NEXT)}


def _set(field: str, value: Any) -> Tamper:
    def edit(msg: Message) -> None:
        msg.content.config_records[RECORD_KEY_CONFIGS][SECAGG_NEXT + field] = value
    return edit


def _drop_next_keys(msg: Message) -> None:
    rec = msg.content.config_records[RECORD_KEY_CONFIGS]
    for key in [k for k in rec if k.startswith(SECAGG_NEXT_KEY)]:
        del rec[key]


def _run(grid: _LocalGrid, num_rounds: int, *, config: ConfigRecord | None = None, **kw: Any
         ) -> tuple[list[dict[str, Any]], list[list[ClientReply]]]:
    # The round config names the run's length, as fedshield's server's does: without it nothing is prepared.
    return _run_rounds(grid, num_rounds, config=ConfigRecord({"num-rounds": num_rounds}) if config is None else config,
                       **kw)


def _assert_exact(models: list[dict[str, Any]], replies: list[list[ClientReply]], rounds: Iterable[int]) -> None:
    for rnd in rounds:
        ok = sorted(int(r.metrics[PARTITION_ID]) for r in replies[rnd - 1] if r.ok)
        assert_weighted_average(models[rnd - 1], models[rnd], ok, rnd)


FULL = {Stage.SETUP: 4, Stage.SHARE_KEYS: 4, Stage.COLLECT_MASKED_VECTORS: 4, Stage.UNMASK: 4}
AHEAD = {Stage.COLLECT_MASKED_VECTORS: 4, Stage.UNMASK: 4}


def test_after_round_one_a_round_sends_two_messages_per_node_and_stays_exact(tmp_path: Path) -> None:
    grid = _WatchedGrid(4)
    _sign_in(grid, tmp_path)
    models, replies = _run(grid, 3)
    assert [grid.stages(r) for r in (1, 2, 3)] == [FULL, AHEAD, AHEAD]
    assert all(r.ok for rnd in replies for r in rnd), replies
    _assert_exact(models, replies, (1, 2, 3))

    plain = _WatchedGrid(4)
    _sign_in(plain, tmp_path / "off")
    models_off, replies_off = _run(plain, 2, pipeline=False)
    assert [plain.stages(r) for r in (1, 2)] == [FULL, FULL]
    _assert_exact(models_off, replies_off, (1, 2))


def test_the_next_keys_are_fresh_and_signed_for_the_next_round_only(tmp_path: Path) -> None:
    grid = _WatchedGrid(4)
    _sign_in(grid, tmp_path)
    _run(grid, 2)
    setup = {r.metadata.src_node_id: r.content.config_records[RECORD_KEY_CONFIGS] for r in grid.replies
             if Key.PUBLIC_KEY_1 in r.content.config_records[RECORD_KEY_CONFIGS]}
    ahead = {r.metadata.src_node_id: _next(r) for r in grid.replies
             if r.metadata.group_id == "1" and Key.PUBLIC_KEY_1 in _next(r)}
    assert set(setup) == set(ahead) == set(grid.node_ids)
    keys = [rec[k] for rec in (*setup.values(), *ahead.values()) for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2)]
    assert len(set(keys)) == 16  # a fresh pair of pairs per node and round
    signed = {nid: SignedKeys(rec[Key.PUBLIC_KEY_1], rec[Key.PUBLIC_KEY_2], rec[SECAGG_SIGNATURE],  # type: ignore[arg-type]
                              str(rec[SECAGG_SIGNER])) for nid, rec in ahead.items()}
    roster, me = load_roster(tmp_path / "roster.txt"), grid.node_ids[0]
    check_participants(roster, signed, own_node_id=me, run_id=1, round_tag="2", stage=Stage.SETUP, min_peers=2)
    with pytest.raises(Exception, match="another run, round or node id"):
        check_participants(roster, signed, own_node_id=me, run_id=1, round_tag="1", stage=Stage.SETUP, min_peers=2)


def test_the_last_round_asks_for_no_next_keys_nor_a_run_of_unknown_length(tmp_path: Path) -> None:
    grid = _WatchedGrid(3)
    _run(grid, 2)
    asked = {int(m.metadata.group_id) for m in grid.replies if _next(m)}
    assert asked == {1}
    assert grid.stages(2) == {Stage.COLLECT_MASKED_VECTORS: 3, Stage.UNMASK: 3}
    unknown = _WatchedGrid(3)
    _run(unknown, 2, config=ConfigRecord({}))
    assert not any(_next(m) for m in unknown.replies)
    assert unknown.stages(2) == {stage: 3 for stage in FULL}


def test_a_dropout_falls_back_to_the_full_key_exchange_and_stays_exact() -> None:
    def drop_once(partition: int, stage: str) -> str | None:
        return "timeout" if (partition, stage) == (2, Stage.COLLECT_MASKED_VECTORS) and drop_once.armed else None

    drop_once.armed = False  # type: ignore[attr-defined]
    grid = _WatchedGrid(4, fault=drop_once)

    def arm(msg: Message) -> None:  # partition 2 times out in round 2's masked-vector stage only
        drop_once.armed = msg.metadata.group_id == "2"  # type: ignore[attr-defined]

    grid._tamper = arm
    models, replies = _run(grid, 3)
    # Round 2 unmasks the three vectors it got and prepares round 3 for those three; round 3 samples all four.
    assert grid.stages(2) == {Stage.COLLECT_MASKED_VECTORS: 4, Stage.UNMASK: 3} and grid.stages(3) == FULL
    assert [sum(r.ok for r in rnd) for rnd in replies] == [4, 3, 4]
    _assert_exact(models, replies, (1, 2, 3))


def test_a_site_sending_unusable_next_keys_makes_the_next_round_set_up_in_full() -> None:
    """A hostile (or broken) site answers the next-keys request with garbage: the server does not prepare the next
    round on it (nobody makes shares for a key it cannot read); the next round runs SETUP and SHARE_KEYS."""
    grid = _WatchedGrid(3)
    original = grid.send_and_receive

    def corrupt_one(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(original(messages, timeout=timeout))
        for reply in replies[:1]:
            rec = reply.content.config_records.get(RECORD_KEY_CONFIGS) if not reply.has_error() else None
            if rec is not None and SECAGG_NEXT + Key.PUBLIC_KEY_1 in rec:
                rec[SECAGG_NEXT + Key.PUBLIC_KEY_1] = "not a key"  # type: ignore[assignment]
        return replies

    grid.send_and_receive = corrupt_one  # type: ignore[method-assign]
    models, replies = _run(grid, 3)
    assert grid.stages(2) == {stage: 3 for stage in FULL} and grid.stages(3) == {stage: 3 for stage in FULL}
    assert all(r.ok for rnd in replies for r in rnd), replies
    _assert_exact(models, replies, (1, 2, 3))


def _victim_tamper(victim: list[int], edit: Callable[[Message], None], stage: str, rnd: str = "1") -> Tamper:
    def tamper(msg: Message) -> None:
        rec = msg.content.config_records[RECORD_KEY_CONFIGS]
        if msg.metadata.dst_node_id == victim[0] and rec[Key.STAGE] == stage and msg.metadata.group_id == rnd:
            edit(msg)
    return tamper


def _next_refusals(grid: _WatchedGrid) -> dict[int, str]:
    return {r.metadata.src_node_id: str(_next(r)[SECAGG_NEXT_REFUSED])
            for r in grid.replies if not r.has_error() and SECAGG_NEXT_REFUSED in _next(r)}


def test_substituted_next_round_keys_are_refused_and_the_round_still_unmasks(tmp_path: Path) -> None:
    victim: list[int] = []

    def swap_peer_keys(msg: Message) -> None:
        rec = msg.content.config_records[RECORD_KEY_CONFIGS]
        for key in [k for k in rec if k.startswith(SECAGG_NEXT_KEY)
                    and int(k[len(SECAGG_NEXT_KEY):]) != msg.metadata.dst_node_id]:
            fake = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]
            rec[key] = [*fake, *list(rec[key])[2:]]  # genuine signatures, server keys  # type: ignore[arg-type]

    grid = _WatchedGrid(4)
    victim.append(grid.node_ids[1])
    grid._tamper = _victim_tamper(victim, swap_peer_keys, Stage.UNMASK)
    _sign_in(grid, tmp_path)
    models, replies = _run(grid, 2)
    refusals = _next_refusals(grid)
    assert list(refusals) == victim
    assert refusals[victim[0]].startswith(f"{SECAGG_REFUSAL}: node ") and "do not verify" in refusals[victim[0]]
    assert all(r.ok for rnd in replies for r in rnd), replies  # round 1 unmasked; round 2 ran its own exchange
    assert grid.stages(2) == FULL
    _assert_exact(models, replies, (1, 2))


@pytest.mark.parametrize(
    ("stage", "edit", "match"),
    [
        (Stage.UNMASK, _set(SECAGG_ROUND_TAG, "7"), "not for the keys this site made"),
        (Stage.UNMASK, _drop_next_keys, "not for the keys this site made"),
        # More participants than shares: Shamir would index past its shares (an IndexError once crashed the reply).
        (Stage.UNMASK, _set(Key.SHARE_NUMBER, 2), "4 participants and threshold"),
    ],
)
def test_next_round_settings_that_do_not_match_the_prepared_keys_are_refused(
    tmp_path: Path, stage: str, edit: Tamper, match: str
) -> None:
    victim: list[int] = []
    grid = _WatchedGrid(4)
    victim.append(grid.node_ids[2])
    grid._tamper = _victim_tamper(victim, edit, stage)
    _sign_in(grid, tmp_path)
    models, replies = _run(grid, 2)
    refusals = _next_refusals(grid)
    assert list(refusals) == victim and match in refusals[victim[0]], refusals
    assert grid.stages(2) == FULL
    _assert_exact(models, replies, (1, 2))


@pytest.mark.parametrize("tag", ["1", "3", "02", ""])
def test_keys_asked_for_any_round_but_the_next_are_refused(tmp_path: Path, tag: str) -> None:
    victim: list[int] = []
    grid = _WatchedGrid(4)
    victim.append(grid.node_ids[0])
    grid._tamper = _victim_tamper(
        victim, _set(SECAGG_ROUND_TAG, tag), Stage.COLLECT_MASKED_VECTORS)
    _sign_in(grid, tmp_path)
    _, replies = _run(grid, 2)
    errors = {r.node_id: r.error for r in replies[0] if not r.ok}
    assert list(errors) == victim and "not the next round" in str(errors[victim[0]]), errors


def test_a_replayed_unmask_is_refused_and_the_prepared_round_still_runs(tmp_path: Path) -> None:
    """A server that sends round 1's UNMASK (with the next round's part) twice gets an error the second time: the
    site has moved on to round 2's keys, and a second set of round-2 shares is never made."""
    grid = _WatchedGrid(3)
    _sign_in(grid, tmp_path)
    replayed: list[Message] = []
    original = grid.send_and_receive

    def send_and_receive(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(original(messages, timeout=timeout))
        first = messages[0] if messages else None
        if first is not None and first.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.UNMASK \
                and not replayed:
            copy = Message(first.content, dst_node_id=first.metadata.dst_node_id,
                           message_type=first.metadata.message_type, group_id=first.metadata.group_id)
            replayed.extend(original([copy], timeout=timeout))
        return replies

    grid.send_and_receive = send_and_receive  # type: ignore[method-assign]
    models, replies = _run(grid, 2)
    assert len(replayed) == 1 and replayed[0].has_error() and "expect collect_masked_vectors" in replayed[0].error.reason
    assert grid.stages(1)[Stage.UNMASK] == 4  # three, and the replay
    assert grid.stages(2) == {Stage.COLLECT_MASKED_VECTORS: 3, Stage.UNMASK: 3}
    assert all(r.ok for rnd in replies for r in rnd), replies
    _assert_exact(models, replies, (1, 2))
