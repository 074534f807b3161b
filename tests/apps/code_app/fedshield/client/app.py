"""The coordinator's own ClientApp, disguised as fedshield's: if a site ever ran it, it would write the marker."""

from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker"])).write_text("the coordinator's code ran on the site")
    return Message(content=RecordDict({"metrics": MetricRecord({"pwned": 1.0})}), reply_to=msg)
