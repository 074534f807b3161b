"""ClientApp: answers the one train message with an empty reply (the race test only needs it to start)."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"arrays": len(msg.content["arrays"])})}), reply_to=msg)
