"""What the local simulation backend itself costs: starting its workers, and one ClientApp call's round trip.

The pool (``fedshield.simulation.local_backend.LocalPool``) forks its workers from this process with torch already
imported; each call carries a ``Message`` (an ArrayRecord of DigitsCNN's size, 6,090 float32) and a ``Context``
over a pipe as Flower's protobuf and back. The baseline is the same ClientApp called in this process (what a Ray
actor's ``run`` does once the message has reached it, without Ray's own transport). The start of Ray itself is in
``pfl_peer.py``'s rows (start to the end of round 1 with ``--backend ray``).

Usage::

    python benchmarks/sim_backend.py [--calls 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedshield.flower_internals.serde import decode_message
from fedshield.simulation.local_pool import PRELOAD, LocalPool

echo = ClientApp()


@echo.train()
def _train(msg: Message, context: Context) -> Message:
    return Message(content=RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)


def _message(seq: int) -> Message:
    """A train instruction as the engine hands one over (built from protobuf: a Message needs a run to be made)."""
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

    proto = ProtoMessage()
    proto.metadata.run_id, proto.metadata.dst_node_id, proto.metadata.message_type = 1, 1 + seq, "train"
    proto.content.SetInParent()
    msg = decode_message(proto.SerializeToString())
    weights = np.random.default_rng(seq).standard_normal(6090).astype(np.float32)
    msg.content = RecordDict({"arrays": ArrayRecord({"w": Array(weights)})})
    return msg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    started = time.perf_counter()
    for module in PRELOAD:  # what the simulating process imports anyway (the server's model, evaluation)
        __import__(module)
    import_s = time.perf_counter() - started
    started = time.perf_counter()
    pool = LocalPool(echo, workers=args.workers, threads=1, preload=())
    start_s = time.perf_counter() - started
    try:
        local, direct = [], []
        for i in range(args.calls):
            msg = _message(i)
            t = time.perf_counter()
            reply, _ = pool.run(msg, context)
            local.append(time.perf_counter() - t)
            t = time.perf_counter()
            echo(message=msg, context=context)
            direct.append(time.perf_counter() - t)
            assert reply.content["arrays"]["w"].numpy().shape == (6090,)
    finally:
        pool.close()
    print(f"imports before the fork (torch, fedshield's training modules): {import_s * 1000:.0f} ms; "
          f"forking {args.workers} workers: {start_s * 1000:.1f} ms")
    print(f"one call, median of {args.calls}: local backend {statistics.median(local) * 1000:.2f} ms, "
          f"in-process {statistics.median(direct) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
