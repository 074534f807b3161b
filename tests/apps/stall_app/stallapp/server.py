"""ServerApp: pushes one train message of ``arrays`` small arrays to every node, writes ``marker`` as the push
starts, and then waits for replies until the run is stopped from outside (``flwr stop``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    count, size = int(context.run_config["arrays"]), int(context.run_config["size"])
    marker = str(context.run_config["marker"])
    arrays = ArrayRecord([np.full(size, i, dtype=np.float32) for i in range(count)])
    messages = [Message(RecordDict({"arrays": arrays}), dst_node_id=node, message_type="train")
                for node in grid.get_node_ids()]
    pushing = threading.Thread(target=grid.push_messages, args=(messages,), daemon=True)
    pushing.start()
    if marker:
        Path(marker).write_text("pushing", encoding="utf-8")
    pushing.join()
    if marker:
        Path(marker).write_text("pushed", encoding="utf-8")
    while True:  # ended by `flwr stop`
        time.sleep(1)
