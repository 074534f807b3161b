"""Authenticated SecAgg+ with the in-process grid of tests/test_secagg.py: signed rounds stay exact, and a server
that substitutes keys, lies in UNMASK, or talks to a stock Flower client is refused or refuses, with the reason.

The real-process version of the key substitution is tests/test_secagg_malicious_server.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from _secagg_harness import MAX_WEIGHT, _LocalGrid, as_numpy, assert_weighted_average, initial_arrays, make_client_app

from fedshield.client.node_config import NODE_KEY, SECAGG_MIN_PEERS, SECAGG_ROSTER
from fedshield.crypto import make_site_key
from fedshield.protocol import PARTITION_ID, SECAGG_REFUSAL, ClientReply
from fedshield.strategies.secagg import SecAggPlus

pytestmark = pytest.mark.usefixtures("task_identity")

Tamper = Callable[[str, int, ConfigRecord], None]  # (stage, destination node, its SecAgg+ record) -> edit in place


class _MaliciousGrid(_LocalGrid):
    """The in-process grid, with a server that edits each SecAgg+ record before it is delivered."""

    def __init__(self, app: ClientApp, num_nodes: int, tamper: Tamper) -> None:
        super().__init__(app, num_nodes)
        self._tamper = tamper

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            rec = msg.content.config_records[RECORD_KEY_CONFIGS]
            self._tamper(str(rec[Key.STAGE]), msg.metadata.dst_node_id, rec)
        return super().send_and_receive(messages, timeout=timeout)


def _sign_in(grid: _LocalGrid, root: Path, *, signed: Iterable[int] | None = None, min_peers: int = 2) -> None:
    """Give each node (or the partitions in ``signed``) its own node key and the roster of all of them."""
    pubs = [make_site_key(root, name=f"site-{i}")[0] for i in range(len(grid.node_ids))]
    roster = root / "roster.txt"
    roster.write_text("".join(p.read_text() for p in pubs))
    for i, nid in enumerate(grid.node_ids):
        if signed is None or i in signed:
            grid.contexts[nid].node_config.update({SECAGG_ROSTER: str(roster), NODE_KEY: str(root / f"site-{i}.key"),
                                                   SECAGG_MIN_PEERS: min_peers})


def _run(grid: _LocalGrid, num_rounds: int = 1, *, config: ConfigRecord | None = None, **kw: Any
         ) -> tuple[list[dict[str, Any]], list[list[ClientReply]]]:
    """Run ``num_rounds`` with Strategy.start (``config``: the train config); the models after each round and the
    replies. Without ``num-rounds`` in the config SecAgg+ prepares no round ahead (tests/test_secagg_pipeline.py)."""
    n = len(grid.node_ids)
    strategy = SecAggPlus(FedAvg(fraction_evaluate=0.0, min_available_nodes=n), max_weight=MAX_WEIGHT, **kw)
    models: list[dict[str, Any]] = []
    replies: list[list[ClientReply]] = []

    def record(rnd: int, arrays: ArrayRecord) -> None:
        models.append(as_numpy(arrays))
        if rnd:
            replies.append(list(strategy.last_replies))

    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds, evaluate_fn=record,
                   train_config=config)
    return models, replies


def _errors(replies: list[ClientReply]) -> dict[int, str]:
    return {r.node_id: r.error for r in replies if r.error is not None}


def test_signed_rounds_are_exact_weighted_averages(tmp_path: Path) -> None:
    grid = _LocalGrid(make_client_app(), 4)
    _sign_in(grid, tmp_path)
    models, replies = _run(grid, num_rounds=2)
    for rnd in (1, 2):
        assert all(r.ok for r in replies[rnd - 1]), replies
        assert_weighted_average(models[rnd - 1], models[rnd], [0, 1, 2, 3], rnd)


def test_substituted_keys_make_the_victim_refuse_before_sending_shares(tmp_path: Path) -> None:
    sent: dict[int, int] = {}
    victim: list[int] = []

    def swap_peer_keys(stage: str, dst: int, rec: ConfigRecord) -> None:
        if stage == Stage.SHARE_KEYS and dst == victim[0]:
            for key in [k for k in rec if k.isdigit() and int(k) != dst]:
                fake = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]
                rec[key] = [*fake, *list(rec[key])[2:]]  # genuine signatures, server keys
        if stage == Stage.COLLECT_MASKED_VECTORS:
            sent[dst] = len(rec[Key.CIPHERTEXT_LIST])  # type: ignore[arg-type]

    grid = _MaliciousGrid(make_client_app(), 4, swap_peer_keys)
    victim.append(grid.node_ids[1])
    _sign_in(grid, tmp_path)
    models, replies = _run(grid)
    errors = _errors(replies[0])
    assert list(errors) == [victim[0]]
    assert errors[victim[0]].startswith(f"{SECAGG_REFUSAL}: node ") and "do not verify" in errors[victim[0]]
    # The others got no share from the victim: each holds shares from the two other honest nodes only.
    assert sent == {nid: 2 for nid in grid.node_ids if nid != victim[0]}
    ok = sorted(int(r.metrics[PARTITION_ID]) for r in replies[0] if r.ok)
    assert_weighted_average(models[0], models[1], ok, 1)


def test_an_unsigned_participant_is_refused_by_the_signed_ones(tmp_path: Path) -> None:
    grid = _LocalGrid(make_client_app(), 3)
    _sign_in(grid, tmp_path, signed=[0, 1], min_peers=1)
    _, replies = _run(grid)
    errors = _errors(replies[0])
    signed = {grid.node_ids[0], grid.node_ids[1]}
    assert signed <= set(errors)
    for nid in signed:
        assert "carry no signature" in errors[nid] and str(grid.node_ids[2]) in errors[nid]


def test_too_few_signed_peers_is_refused_by_site_policy(tmp_path: Path) -> None:
    grid = _LocalGrid(make_client_app(), 3)
    _sign_in(grid, tmp_path, min_peers=3)
    _, replies = _run(grid)
    errors = _errors(replies[0])
    assert set(errors) == set(grid.node_ids)
    assert all("fewer than this site's minimum of 3" in e for e in errors.values())


@pytest.mark.parametrize(
    ("lie", "match"),
    [("both", "listed both alive and dead"), ("self-dead", "lists this site as dropped")],
)
def test_unmask_requests_no_honest_server_sends_are_refused(
    lie: str, match: str, caplog: pytest.LogCaptureFixture
) -> None:
    def lie_in_unmask(stage: str, dst: int, rec: ConfigRecord) -> None:
        if stage != Stage.UNMASK:
            return
        active = list(rec[Key.ACTIVE_NODE_ID_LIST])  # type: ignore[arg-type]
        other = next(n for n in active if n != dst)
        if lie == "both":
            rec[Key.DEAD_NODE_ID_LIST] = [other]
        else:  # claims the recipient itself dropped, to get its pairwise-mask key share too
            rec[Key.ACTIVE_NODE_ID_LIST] = [n for n in active if n != dst]
            rec[Key.DEAD_NODE_ID_LIST] = [dst]

    grid = _MaliciousGrid(make_client_app(), 4, lie_in_unmask)
    with caplog.at_level("WARNING", logger="fedshield.strategies._secagg_stages"):
        _, replies = _run(grid)
    # Every node refused to reveal, so no secret can be rebuilt: the round is aborted, nothing is unmasked.
    assert all(not r.ok and "too few key shares" in (r.error or "") for r in replies[0])
    refusals = [m for m in caplog.messages if "failed in stage unmask" in m]
    assert len(refusals) == 4 and all(SECAGG_REFUSAL in m and match in m for m in refusals), caplog.messages


def test_unmask_refusals_name_the_lie() -> None:
    from fedshield.client.secaggplus import _Refused, _State, _unmask

    state = _State(nid=5, threshold=2, rd_seed_share_dict={5: b"a", 6: b"b", 7: b"c"},
                   sk1_share_dict={5: b"x", 6: b"y", 7: b"z"})
    cases = {
        "listed both alive and dead": ([5, 6, 7], [6]),
        "lists this site as dropped": ([6, 7], [5]),
        "holds none of": ([5, 6, 9], []),
        "fewer than the threshold": ([5], [6]),
    }
    for match, (active, dead) in cases.items():
        rec = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
        with pytest.raises(_Refused, match=match):
            _unmask(state, rec)
    ok = _unmask(state, ConfigRecord({Key.ACTIVE_NODE_ID_LIST: [5, 6], Key.DEAD_NODE_ID_LIST: [7]}))
    assert ok[Key.SHARE_LIST] == [b"a", b"b", b"z"]


def test_a_stock_flower_client_is_dropped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's own secaggplus_mod masks with a 32-bit-seeded Mersenne Twister; the server cannot unmask it."""
    import _secagg_harness
    from flwr.client.mod import secaggplus_mod as flower_mod

    with monkeypatch.context() as mp:
        mp.setattr(_secagg_harness, "secaggplus_mod", flower_mod)
        stock = make_client_app(narrow=False)
    grid = _LocalGrid(make_client_app(), 4)
    stock_node, ours = grid.node_ids[3], grid._app

    def dispatch(msg: Message, ctx: Context) -> Message:
        return (stock if msg.metadata.dst_node_id == stock_node else ours)(msg, ctx)

    grid._app = dispatch  # type: ignore[assignment]
    models, replies = _run(grid)
    errors = _errors(replies[0])
    assert list(errors) == [stock_node] and "Mersenne Twister" in errors[stock_node]
    ok = sorted(int(r.metrics[PARTITION_ID]) for r in replies[0] if r.ok)
    assert_weighted_average(models[0], models[1], ok, 1)


def test_a_deployed_client_needs_a_roster_unless_insecure(tmp_path: Path) -> None:
    from fedshield.deploy.site import ClientOptions
    from fedshield.crypto import init_keys
    from fedshield.errors import ConfigError

    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=1)
    common = {"server": "127.0.0.1:9092", "data": tmp_path, "state_dir": tmp_path / "state"}
    with pytest.raises(ConfigError, match="--roster required"):
        ClientOptions(**common, ca_cert=keys.ca_cert, node_key=keys.node("node-1").private_key_path)  # type: ignore
    with pytest.raises(ConfigError, match="drop --roster"):
        ClientOptions(**common, insecure=True, roster=keys.authorized_nodes)  # type: ignore[arg-type]
    assert ClientOptions(**common, insecure=True).roster is None  # type: ignore[arg-type]
