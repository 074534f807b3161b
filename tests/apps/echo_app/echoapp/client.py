"""ClientApp: replies to every train message with the received arrays plus one."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Echo the arrays back, shifted by one, with the example count FedAvg weights by."""
    arrays = msg.content["arrays"]
    updated = ArrayRecord([a.numpy() + 1 for a in arrays.values()])
    metrics = MetricRecord({"num-examples": 10, "partition": int(context.node_config.get("partition-id", -1))})
    return Message(RecordDict({"arrays": updated, "metrics": metrics}), reply_to=msg)
