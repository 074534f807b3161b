"""ServerApp: one FedAvg round over numpy arrays; writes the aggregate and timings as JSON to ``out-file``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the rounds and record what came back, so the test checks the numbers, not just the exit status."""
    if context.run_config["fail"]:
        # Lets the tests prove that a crashed ServerApp is reported as a failed run, not as success.
        raise RuntimeError("echo app was asked to fail (run config fail=true)")
    num_rounds = int(context.run_config["num-rounds"])
    out_file = str(context.run_config["out-file"])
    initial = ArrayRecord([np.zeros(3, dtype=np.float32), np.arange(4, dtype=np.float64).reshape(2, 2)])
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    started = time.monotonic()
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=num_rounds, train_config=ConfigRecord({"lr": 0.1})
    )
    elapsed = time.monotonic() - started
    arrays = [a.numpy().tolist() for a in result.arrays.values()]
    if out_file:
        partition = result.train_metrics_clientapp[num_rounds]["partition"]
        report = {"arrays": arrays, "num_rounds": num_rounds, "seconds": elapsed, "mean_partition": partition}
        Path(out_file).write_text(json.dumps(report))
