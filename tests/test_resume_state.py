"""Resuming a stateful strategy: FedAdam checkpointed after round 2 of 3 (through a real checkpoint file), restored
into a freshly built strategy, gives exactly the uninterrupted run's model AND optimizer state (``m_t``, ``v_t``)
after round 3; without the restored moments the same round 3 gives a different model (the state matters).

The real-process version (``fedshield simulate`` SIGKILLed after round 2 and ``--resume``d, FedAdam too) is
``test_resume.py``; this one isolates the strategy state from float summation order, so it can ask for bit
equality, and runs in a second.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from _grid import FakeGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedshield.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from fedshield.server.checkpoint import (
    Checkpoint,
    capture_strategy_state,
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
)
from fedshield.strategies.registry import Sampling, build

N = 4
SHAPES = {"conv.weight": (2, 3, 3), "fc.bias": (5,), "scale": ()}


def _fedadam() -> Any:
    return build("fedadam", {}, sampling=Sampling(min_train_nodes=N, min_evaluate_nodes=N, min_available_nodes=N))


def _round(strategy: Any, server_round: int, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One round: configure, N deterministic client replies (they depend on the round), aggregate."""
    arrays = ArrayRecord({k: Array(v) for k, v in model.items()})
    messages = sorted(strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}), FakeGrid(N)),
                      key=lambda m: m.metadata.dst_node_id)
    rng = np.random.default_rng(server_round)
    replies = []
    for i, msg in enumerate(messages):
        msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        trained = {k: (v + rng.normal(scale=0.1 * (i + 1), size=v.shape)).astype(v.dtype) for k, v in model.items()}
        content = RecordDict({ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in trained.items()}),
                              METRICS: MetricRecord({NUM_EXAMPLES: 10 * (i + 1)})})
        replies.append(Message(content, reply_to=msg))
    new, _ = strategy.aggregate_train(server_round, replies)
    assert new is not None
    return {k: a.numpy() for k, a in new.items()}


def _moments(strategy: Any) -> dict[str, dict[str, np.ndarray]]:
    state = capture_strategy_state({"strategy": strategy})  # as StrategyStack.stateful names it
    found = {key.rpartition(".")[2]: arrays for key, (_, arrays) in state.items()}
    assert {"m_t", "v_t"} <= set(found), f"FedAdam's moments are not captured: {sorted(state)}"
    return found


@pytest.mark.usefixtures("task_identity")
def test_fedadam_resumed_after_round_two_equals_the_uninterrupted_run(tmp_path: Any) -> None:
    rng = np.random.default_rng(0)
    initial = {k: np.asarray(rng.normal(size=s), dtype=np.float32) for k, s in SHAPES.items()}

    uninterrupted, model = _fedadam(), initial
    for server_round in (1, 2, 3):
        model = _round(uninterrupted, server_round, model)
    reference_model, reference_moments = model, _moments(uninterrupted)

    first, model = _fedadam(), initial
    for server_round in (1, 2):
        model = _round(first, server_round, model)
    save_checkpoint(tmp_path, Checkpoint(server_round=2, run_id="r", noise_multiplier=0.0, model=model,
                                         strategy_state=capture_strategy_state({"strategy": first}), rounds=[{}, {}]))
    del first  # the server died: only the file is left
    ckpt = load_checkpoint(tmp_path)
    resumed = _fedadam()
    restore_strategy_state({"strategy": resumed}, ckpt.strategy_state)
    resumed_model = _round(resumed, 3, ckpt.model)

    for key in SHAPES:
        np.testing.assert_array_equal(resumed_model[key], reference_model[key], err_msg=key)
    for attr, arrays in _moments(resumed).items():
        assert arrays.keys() == reference_moments[attr].keys(), attr
        for name, value in arrays.items():
            np.testing.assert_array_equal(value, reference_moments[attr][name], err_msg=f"{attr}/{name}")

    # The control: the same round 3 from the same model but fresh moments lands elsewhere.
    forgetful = _fedadam()
    forgot = _round(forgetful, 3, ckpt.model)
    assert max(float(np.max(np.abs(forgot[k] - reference_model[k]))) for k in SHAPES) > 1e-3
