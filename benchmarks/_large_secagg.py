"""``large_models.py --parts secagg-memory``: the SecAgg+ server's peak memory for N clients x P parameters.

Three ways to aggregate the same N masked replies, each traced with tracemalloc (numpy's buffers included):

* **ours**: fedshield's real server path, :func:`~fedshield.strategies._secagg_fold.fold_masked_replies` over
  real Flower reply Messages that "arrive" one at a time (each read from a file as one ``bytes`` object, as a reply's
  bytes come off the wire), then :func:`~fedshield.strategies._secagg_fold.remove_masks` with the secrets rebuilt
  from real Shamir shares, then :func:`~fedshield.strategies._secagg_stages.weighted_average` (the dequantised
  average). Stage 2 (the fold) and stage 3 + decode are reported apart;
* **before**: the server this replaces (commit 333c212), spelled out below: an int64 running sum, each reply
  decoded by Flower's ``bytes_to_ndarray`` (a copy), whole int64 masks subtracted, Flower's ``dequantize``;
* **listed**: the server before the fold: every reply listed and widened to int64, summed, then as before;
* **Flower**: ``aggregate_arrayrecords`` over N plain float32 replies (the plain path's stock baseline, no SecAgg+).

Every client's vector is a real masked one (random quantised values plus its ChaCha20 self mask) so that all three
SecAgg+ paths must give the same average: the run fails if they differ by one bit.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLIP, LEVELS, MODULUS = 8.0, 2**22, 2**32


@dataclass
class Setup:
    """N clients' masked replies on disk, their secrets' Shamir shares, and the server's round state."""

    root: Path
    shapes: list[tuple[int, ...]]
    state: Any
    shares: dict[int, list[bytes]]
    ids: list[int]


def _prepare(n: int, params: int) -> Setup:
    """Outside the traced region: write each client's masked vector (as Flower's ndarray bytes) to a file."""
    from flwr.common import ndarray_to_bytes

    from fedshield.crypto.prg import expand_mask
    from fedshield.crypto.shamir import create_shares
    from fedshield.strategies._secagg_params import ProtocolParams
    from fedshield.strategies._secagg_stages import RoundState

    shapes = [(params // 2,), (params - params // 2,)]
    ids = list(range(1, n + 1))
    threshold = n // 2 + 1
    p = ProtocolParams(num_samples=n, num_shares=n, threshold=threshold, clipping_range=CLIP,
                       quantization_range=LEVELS, modulus_range=MODULUS, max_weight=1000.0, narrow_wire=True)
    root = Path(tempfile.mkdtemp(prefix="fs-secagg-mem-"))
    shares: dict[int, list[bytes]] = {}
    for nid in ids:
        seed = nid.to_bytes(4, "little") * 8
        rng = np.random.default_rng(nid)
        plain = [np.array([p.q_ratio(100)]), *(rng.integers(0, LEVELS, size=s, dtype=np.int64) for s in shapes)]
        mask = expand_mask(seed, MODULUS, [(1,), *shapes])
        for j, (v, m) in enumerate(zip(plain, mask, strict=True)):
            (root / f"{nid}-{j}.npy").write_bytes(ndarray_to_bytes(((v + m) % MODULUS).astype(np.uint32)))
        del plain, mask
        shares[nid] = create_shares(seed, threshold, n)  # one per holder; the server gets >= threshold back
    everyone = frozenset(ids)
    state = RoundState(1, p, sampled=ids, neighbours={i: everyone for i in ids}, contents={}, active=set(ids),
                       shared=everyone)
    return Setup(root, shapes, state, shares, ids)


def _arrive(setup: Setup, nid: int) -> Any:
    """One client's stage-2 reply as the server gets it: a Flower Message holding the masked arrays' bytes."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common import Code, FitRes, Parameters, Status

    from fedshield.flower_internals.secagg import RECORD_KEY_CONFIGS, Key
    from fedshield.flower_internals.secagg import recorddict_compat as compat

    fitres = FitRes(Status(Code.OK, ""), Parameters([], ""), 100, {})
    content = compat.fitres_to_recorddict(fitres, keep_input=True)
    blobs = [(setup.root / f"{nid}-{j}.npy").read_bytes() for j in range(len(setup.shapes) + 1)]
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({Key.MASKED_PARAMETERS: blobs})
    request = Message(RecordDict(), dst_node_id=nid, message_type="train")
    return Message(content, reply_to=request)


def ours(setup: Setup, marks: dict[str, float]) -> list[np.ndarray]:
    from fedshield.strategies._secagg_clear import check_masked_clear
    from fedshield.strategies._secagg_fold import FieldSum, fold_masked_replies, remove_masks
    from fedshield.strategies._secagg_stages import weighted_average

    state = setup.state
    state.active = set(setup.ids)
    field = FieldSum(MODULUS)
    replies = (_arrive(setup, nid) for nid in setup.ids)
    included = fold_masked_replies(state, replies, setup.shapes, field,
                                   lambda reply: check_masked_clear(reply, state.params))
    marks["stage2_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    if len(included) != len(setup.ids) or not remove_masks(field, setup.shares, state, set(included)):
        raise RuntimeError(f"the fold left nodes out: {state.errors}")
    return weighted_average(field.value(), state.params, len(included))[1]


def before(setup: Setup, marks: dict[str, float]) -> list[np.ndarray]:
    """Commit 333c212's server: an int64 running sum, each reply decoded by Flower's ``bytes_to_ndarray`` (a copy)
    and kept alive until the next one arrives, whole int64 masks, Flower's ``dequantize``."""
    total: list[np.ndarray] | None = None
    for reply in (_arrive(setup, nid) for nid in setup.ids):
        vector = _decoded(reply, widen=False)
        if total is None:
            total = [np.mod(np.asarray(v, dtype=np.int64), MODULUS) for v in vector]
            continue
        for acc, v in zip(total, vector, strict=True):
            np.add(acc, v, out=acc, casting="safe")
            np.mod(acc, MODULUS, out=acc)
    marks["stage2_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    del reply, vector
    return _old_unmask_decode(setup, total or [])


def listed(setup: Setup, marks: dict[str, float]) -> list[np.ndarray]:
    """Before the fold: every reply listed, every vector widened to int64, then summed."""
    from fedshield.strategies._secagg_stages import masked_sum

    replies = [_arrive(setup, nid) for nid in setup.ids]
    total = masked_sum([_decoded(r, widen=True) for r in replies], MODULUS)
    marks["stage2_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    del replies
    return _old_unmask_decode(setup, total)


def _decoded(reply: Any, *, widen: bool) -> list[np.ndarray]:
    from flwr.common import bytes_to_ndarray

    from fedshield.flower_internals.secagg import RECORD_KEY_CONFIGS, Key

    blobs = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    return [np.asarray(bytes_to_ndarray(b), dtype=np.int64) if widen else bytes_to_ndarray(b) for b in blobs]


def _old_unmask_decode(setup: Setup, total: list[np.ndarray]) -> list[np.ndarray]:
    """333c212's ``remove_masks`` (whole int64 masks, new vectors) and ``weighted_average`` (Flower's dequantize)."""
    from fedshield.crypto.prg import expand_mask
    from fedshield.crypto.shamir import combine_shares
    from fedshield.flower_internals.secagg import dequantize, factor_extract, parameters_mod, parameters_subtraction

    p = setup.state.params
    shapes = [v.shape for v in total]
    for owner in setup.ids:
        total = parameters_subtraction(total, expand_mask(combine_shares(setup.shares[owner][: p.threshold]),
                                                          MODULUS, shapes))
    q_total, body = factor_extract(parameters_mod(total, MODULUS))
    summed = dequantize(body, p.clipping_range, p.quantization_range)
    offset, scale = -(len(setup.ids) - 1) * p.clipping_range, p.quantization_range / int(q_total)
    return [np.asarray((np.asarray(s, dtype=np.float64) + offset) * scale) for s in summed]


def flower_plain(setup: Setup, marks: dict[str, float]) -> Any:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    replies = [RecordDict({"arrays": ArrayRecord({f"a{j}": Array(np.full(s, 0.001 * i, dtype=np.float32))
                                                  for j, s in enumerate(setup.shapes)}),
                           "metrics": MetricRecord({"num-examples": 1.0})}) for i in range(len(setup.ids))]
    marks["stage2_peak"] = tracemalloc.get_traced_memory()[1]
    return aggregate_arrayrecords(replies, "num-examples")


def _traced(fn: Callable[[Setup, dict[str, float]], Any], setup: Setup) -> tuple[dict[str, float], Any]:
    gc.collect()
    marks: dict[str, float] = {}
    tracemalloc.start()
    try:
        start = time.perf_counter()
        result = fn(setup, marks)
        marks["seconds"] = time.perf_counter() - start
        marks["rest_peak"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    marks["peak"] = max(marks["stage2_peak"], marks["rest_peak"])
    return marks, result


def run_secagg_memory(clients: int, params: int) -> list[dict[str, Any]]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp process has them
    model_mib = params * 4 / 2**20
    warm = _prepare(2, 8)
    try:
        for fn in (ours, before, listed, flower_plain):
            _traced(fn, warm)  # imports and first-call costs out of the measured run
    finally:
        shutil.rmtree(warm.root, ignore_errors=True)
    setup = _prepare(clients, params)
    try:
        got, results = {}, {}
        for name, fn in (("ours", ours), ("before", before), ("listed", listed), ("flower", flower_plain)):
            got[name], results[name] = _traced(fn, setup)
            results.pop("flower", None)
            gc.collect()
    finally:
        shutil.rmtree(setup.root, ignore_errors=True)
    identical = all(np.array_equal(a, b) and np.array_equal(a, c)
                    for a, b, c in zip(results["ours"], results["before"], results["listed"], strict=True))
    if not identical:
        raise RuntimeError("ours and before gave different averages: the O(model) path is not exact")
    for name, m in got.items():
        print(f"secagg server memory {clients} x {params:,}: {name:7s} peak {m['peak'] / 2**20:,.0f} MiB "
              f"({m['peak'] / 2**20 / model_mib:.2f} x the fp32 model; stage 2 {m['stage2_peak'] / 2**20:,.0f} MiB, "
              f"unmask + decode {m['rest_peak'] / 2**20:,.0f} MiB)  {m['seconds']:.2f} s", flush=True)
    print(f"  ours, before and listed give bit-identical averages: {identical}")
    return _rows(clients, params, model_mib, got)


def _rows(clients: int, params: int, model_mib: float, got: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    mib = {k: {m: v / 2**20 for m, v in d.items() if m != "seconds"} | {"seconds": d["seconds"]}
           for k, d in got.items()}
    detail = {"clients": clients, "params": params, "model_fp32_mib": model_mib, "better": "lower",
              "stage2_mib": {k: d["stage2_peak"] for k, d in mib.items()},
              "unmask_decode_mib": {k: d["rest_peak"] for k, d in mib.items() if k != "flower"},
              "seconds": {k: d["seconds"] for k, d in mib.items()}, "ours_over_model": mib["ours"]["peak"] / model_mib}
    return [
        {"name": f"SecAgg+ server peak {clients}x{params} vs before", "ours": mib["ours"]["peak"],
         "baseline": mib["before"]["peak"], "unit": "MiB", "ratio": mib["ours"]["peak"] / mib["before"]["peak"],
         "detail": {**detail, "baseline": "int64 running sum, decoded reply copies, whole int64 masks (333c212)"}},
        {"name": f"SecAgg+ server peak {clients}x{params} vs listing", "ours": mib["ours"]["peak"],
         "baseline": mib["listed"]["peak"], "unit": "MiB", "ratio": mib["ours"]["peak"] / mib["listed"]["peak"],
         "detail": {**detail, "baseline": "every masked reply held as int64, then as before"}},
        {"name": f"SecAgg+ server peak {clients}x{params} vs Flower plain", "ours": mib["ours"]["peak"],
         "baseline": mib["flower"]["peak"], "unit": "MiB", "ratio": mib["ours"]["peak"] / mib["flower"]["peak"],
         "detail": {**detail, "baseline": "Flower aggregate_arrayrecords over N fp32 replies (no SecAgg+)"}},
    ]

