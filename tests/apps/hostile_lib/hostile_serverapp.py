"""A hostile coordinator's ServerApp (tests/test_hostile_server.py): every attack on a site's privacy in one run.

It speaks fedshield's wire format (round config + global arrays) but chooses the round settings itself, as a
malicious server would: DP off, almost no noise, a huge delta, an unknown accountant, foreign tasks, a budget-busting
round, and evaluation under rotating seeds; and on the wire itself: a packed array whose table lies about its
size, and a pickle (which would create ``pickle-marker`` if a site ever unpickled it) inside a packed record and in
a plain one. It then sends an honest round. Every reply (error reason or metrics) is written to the run config's
``out-file`` for the test to read.
"""

from __future__ import annotations

import io
import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedshield.config import RoundSettings
from fedshield.tasks import get_task
from fedshield.wire import PACKED_KEY, PACKED_STYPE, pack_record

app = ServerApp()

#: name -> (message type, changes to the honest round config)
ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "dp-off": ("train", {"dp": False}),
    "tiny-sigma-no-target": ("train", {"noise-multiplier": 0.01, "target-epsilon": 0.0}),
    "zero-sigma": ("train", {"noise-multiplier": 0.0}),
    "delta-0.5": ("train", {"delta": 0.5}),
    "unknown-accountant": ("train", {"accountant": "gdp"}),
    "task-os-getpid": ("train", {"task": "os:getpid"}),
    "task-sys-exit": ("train", {"task": "sys:exit"}),
    "task-sys-exit-evaluate": ("evaluate", {"task": "sys:exit"}),
    "over-budget": ("train", {"local-epochs": 40, "server-round": 2}),
    "seed-a": ("evaluate", {"seed": 1}),
    "seed-b": ("evaluate", {"seed": 987654321}),
}


def honest_config(task: str) -> dict[str, Any]:
    return RoundSettings(
        run_id="hostile", server_round=1, num_rounds=1, task=task, partition="iid", seed=0, local_epochs=1, lr=0.5,
        sample_rate=0.5, dp=True, noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=0.0, delta=1e-5,
        accountant="prv", grad_sample_mode="ghost",
    ).to_record_dict()


class _Marker:
    """Unpickling this creates the marker file: the proof a site would have run the server's code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def _pickled(path: str) -> Array:
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Marker(path)], dtype=object), allow_pickle=True)
    return Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())


def wire_attacks(arrays: ArrayRecord, marker: str) -> dict[str, ArrayRecord]:
    """name -> the model record a train message carries instead of the honest one."""
    table = json.dumps([["w", "float32", [4], "numpy.ndarray", 10**6]]).encode()
    lying = struct.pack("<Q", len(table)) + table + b"\0" * 16
    return {
        "packed-table-lies": ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(lying),), stype=PACKED_STYPE,
                                                            data=lying)}),
        "packed-pickle": pack_record(ArrayRecord({**dict(arrays.items()), "evil": _pickled(marker)})),
        "plain-pickle": ArrayRecord({**dict(arrays.items()), "evil": _pickled(marker)}),
    }


def _message(node: int, kind: str, config: dict[str, Any], arrays: ArrayRecord) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=node, message_type=kind)


def _outcome(reply: Message) -> dict[str, Any]:
    if reply.has_error():
        return {"error": reply.error.reason, "metrics": None}
    return {"error": None, "metrics": dict(reply.content["metrics"])}


@app.main()
def main(grid: Grid, context: Context) -> None:
    task, node = str(context.run_config["task"]), int(context.run_config["node-id"])
    while node not in set(grid.get_node_ids()):
        time.sleep(0.5)
    model = get_task(task).new_model(0)
    arrays = ArrayRecord({k: Array(v.detach().numpy()) for k, v in model.state_dict().items()})
    honest = honest_config(task)
    names = list(ATTACKS)
    messages = [_message(node, ATTACKS[n][0], {**honest, **ATTACKS[n][1]}, arrays) for n in names]
    for name, record in wire_attacks(arrays, str(context.run_config["pickle-marker"])).items():
        names.append(name)
        messages.append(_message(node, "train", honest, record))
    results = _exchange(grid, dict(zip(names, messages)))
    # After every attack: the site must still serve an honest round.
    results.update(_exchange(grid, {"honest-after": _message(node, "train", honest, arrays)}))
    Path(str(context.run_config["out-file"])).write_text(json.dumps(results, indent=1))


def _exchange(grid: Grid, messages: dict[str, Message], timeout: float = 600.0) -> dict[str, Any]:
    """Send all at once; collect replies polling every 0.5 s (Grid.send_and_receive sleeps 3 s between pulls)."""
    ids = list(grid.push_messages(list(messages.values())))
    name_of = dict(zip(ids, messages))
    results: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(ids) and time.monotonic() < deadline:
        pending = [i for i in ids if name_of[i] not in results]
        for reply in grid.pull_messages(pending):
            results[name_of[reply.metadata.reply_to_message_id]] = _outcome(reply)
        time.sleep(0.5)
    return results
