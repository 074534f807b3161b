"""ServerApp of the code-carrying bundle: one train message to every site, each reply written to ``out-file``."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    while not (nodes := list(grid.get_node_ids())):
        time.sleep(0.5)
    messages = [Message(RecordDict({"config": ConfigRecord({"task": "digits"})}), dst_node_id=n, message_type="train")
                for n in nodes]
    replies = grid.send_and_receive(messages, timeout=300)
    out = [{"error": r.error.reason if r.has_error() else None,
            "metrics": None if r.has_error() else dict(r.content["metrics"])} for r in replies]
    Path(str(context.run_config["out-file"])).write_text(json.dumps(out))
