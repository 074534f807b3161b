"""Run every benchmark and write ``benchmarks/RESULTS.md``: for each, our figure, the baseline's, their ratio, and
the machine. Usage::

    python benchmarks/run_all.py                  # quick mode: small sizes, minutes on 2 cores
    python benchmarks/run_all.py --full           # the issue's sizes (hours on 2 cores)
    python benchmarks/run_all.py --only sim_throughput --args 'sim_throughput=--clients 100 1000 --rounds 3' --merge

Each benchmark runs as a subprocess with ``--json OUT`` and reports rows ``{name, ours, baseline, unit, ratio,
detail}``; baseline and ours are always measured in the same run, on the same machine, and every ratio is
ours / baseline (``detail.better`` says which way is better). A script without ``--json`` (``compression.py``) has
its printed table parsed instead, or is reported as skipped if the table is not recognised. ``--merge`` keeps the
sections of benchmarks not run this time from the existing RESULTS.md; a run with ``--args`` is written as a
section of its own, beside that benchmark's quick/full section.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
CUSTOM = "custom arguments"


@dataclass(frozen=True)
class Bench:
    name: str
    title: str
    quick: tuple[str, ...] | None  # None: not run in quick mode (skip_note says why)
    full: tuple[str, ...]
    skip_note: str = ""


BENCHMARKS = (
    Bench("sim_throughput", "Simulation throughput and peak memory: fedshield vs a stock Flower + Opacus app",
          ("--clients", "100", "--rounds", "3", "--repeats", "3"),
          ("--clients", "100", "1000", "10000", "--rounds", "5", "4", "2", "--repeats", "2")),
    Bench("sim_handoff", "Simulation hand-off latency (push to all replies): event-driven vs fixed ticks",
          ("--clients", "10", "--rounds", "10"),
          ("--clients", "100", "--rounds", "20")),
    Bench("sim_rounds", "Simulation rounds: event-driven hand-offs vs the engine's fixed ticks (issue 13's job)",
          ("--clients", "100", "--rounds", "10", "--settings", "nodp"), ("--clients", "100", "--rounds", "20", "--repeats", "3")),
    Bench("sim_dispatch", "Simulation engine dispatch sweep: Flower's per-node get_message_ins vs fedshield's one walk",
          ("--nodes", "100", "1000", "--repeats", "3"), ("--nodes", "100", "1000", "5000", "--repeats", "3")),
    Bench("dpsgd_modes", "DP-SGD epoch time and peak memory per Opacus grad-sample mode vs plain PyTorch",
          ("--repeats", "3"), ("--repeats", "5")),
    Bench("secure_noise", "DP-SGD step time: CSPRNG noise (ChaCha20, secure_mode mitigation) vs torch's generator",
          ("--repeats", "3"), ("--repeats", "5")),
    Bench("aggregation", "Server aggregation memory and time: streaming vs Flower's aggregate_arrayrecords",
          ("--clients", "10", "100", "--params", "100000", "1000000", "--repeats", "3"), ("--repeats", "3")),
    Bench("secagg_sim", "SecAgg+ vs plain FedAvg round time in simulation",
          ("--clients", "5", "--rounds", "5"), ("--clients", "10", "100", "--rounds", "5", "--repeats", "2", "--app", "protocol", "fedshield")),
    Bench("accounting_memo", "PRV accounting: Opacus' per-order RDP memoised vs Opacus as shipped (calibration, per-round epsilon)",
          ("--rounds", "10", "--repeats", "1"), ("--rounds", "20", "--repeats", "3")),
    Bench("shamir", "Shamir secret sharing for SecAgg+: fedshield's vs Flower's (PyCryptodome)",
          ("--neighbours", "10", "100", "--repeats", "3"), ("--neighbours", "10", "100", "500", "--repeats", "3")),
    Bench("mask_prg", "SecAgg+ mask expansion: fedshield's ChaCha20 (and AES-CTR) vs Flower's Mersenne Twister",
          ("--repeats", "15"), ("--repeats", "31")),
    Bench("compression", "Bytes per client per round and accuracy: quantized vs full-precision updates",
          ("--clients", "5", "--rounds", "3"), ("--seeds", "0", "1", "2")),
    Bench("large_models", "Real model sizes: DP-SGD per grad-sample mode, LoRA bytes, SecAgg+ server memory",
          ("--steps", "2", "--batch", "4"), ("--full",)),
    Bench("deploy_overhead", "Real deployment on loopback: fedshield round time vs a stock Flower echo app",
          None, ("--clients", "3", "10", "--rounds", "3", "--stock", "3", "--before", "3"),
          skip_note="not run in quick mode: it starts a real SuperLink and SuperNodes (minutes); `--full` runs it"),
)


# ---------------------------------------------------------------------------------------------------------------
# Running


def supports_json(script: Path) -> bool:
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    return "--json" in out.stdout


def run_bench(bench: Bench, args: list[str], timeout: float) -> dict[str, Any]:
    """Run one benchmark; return its rows (or an error) with how, when and under what load it ran."""
    script = HERE / f"{bench.name}.py"
    use_json = supports_json(script)
    with tempfile.TemporaryDirectory(prefix="fsbench-") as tmp:
        out_json = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(script), *args, *(["--json", str(out_json)] if use_json else [])]
        shown = " ".join(["python", f"benchmarks/{script.name}", *map(shlex.quote, args)])
        print(f"== {bench.name}: {shown}", flush=True)
        load_before, started, start = os.getloadavg(), _now(), time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stdout, stderr = None, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {timeout:.0f} s)"
        result: dict[str, Any] = {
            "command": shown, "started": started, "code": _git(), "wall_s": time.monotonic() - start, "rc": rc,
            "load_before": load_before, "load_after": os.getloadavg(), "stdout": stdout, "rows": [], "error": None,
        }
        if rc != 0:
            result["error"] = f"exit {rc}:\n{stderr[-4000:]}"
        elif use_json:
            result["rows"] = json.loads(out_json.read_text())
        else:
            try:
                result["rows"] = parse_compression(stdout)
            except ValueError as exc:
                result["error"] = f"skipped: its printed table was not recognised ({exc}); see the output below"
    print(f"   {result['wall_s']:.0f} s, " + (result["error"].splitlines()[0] if result["error"] else
                                             f"{len(result['rows'])} rows"), flush=True)
    return result


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def parse_compression(stdout: str) -> list[dict[str, Any]]:
    """Rows from ``compression.py``'s printed table: 16- and 8-bit bytes and accuracy against the fp32 run."""
    lines = stdout.splitlines()
    header = next((i for i, x in enumerate(lines) if x.split()[:1] == ["update"] and "bytes/client/round" in x), None)
    if header is None:
        raise ValueError("no 'update ... bytes/client/round' header line")
    table: dict[str, tuple[float, float]] = {}
    for line in lines[header + 1:]:
        tokens = line.split()
        if not tokens or tokens[0] not in ("fp32", "16-bit", "8-bit"):
            break
        if len(tokens) < 5 or not tokens[4].endswith("%"):
            raise ValueError(f"unexpected row {line!r}")
        table[tokens[0]] = (float(tokens[1]), float(tokens[4].rstrip("%")))
    if "fp32" not in table or len(table) < 2:
        raise ValueError(f"expected fp32, 16-bit and 8-bit rows, got {sorted(table)}")
    seeds = re.search(r"median of (\d+) seed", stdout)
    repeats = int(seeds.group(1)) if seeds else 1
    setting = next((x for x in lines if x.startswith("default digits run")), "").strip()
    base_bytes, base_acc = table["fp32"]
    rows = []
    for name, (nbytes, acc) in table.items():
        if name == "fp32":
            continue
        common = {"repeats": repeats, "ours_is": name, "baseline_is": "fp32", "note": setting}
        rows.append({"name": f"{name} bytes/client/round vs fp32", "ours": nbytes, "baseline": base_bytes,
                     "unit": "B", "ratio": nbytes / base_bytes, "detail": {**common, "better": "lower"}})
        rows.append({"name": f"{name} final accuracy vs fp32", "ours": acc, "baseline": base_acc, "unit": "%",
                     "ratio": acc / base_acc if base_acc else None, "detail": {**common, "better": "higher"}})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The machine


def machine() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((x.split(":", 1)[1].strip() for x in cpuinfo.splitlines() if x.startswith("model name")),
                 platform.processor() or platform.machine())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()) if Path("/proc/meminfo").exists() else None
    ram = f"{int(mem.group(1)) / 2**20:.1f} GiB" if mem else "unknown"
    versions = ", ".join(f"{p} {_version(p)}" for p in ("torch", "flwr", "opacus", "ray", "numpy"))
    return [
        f"- CPU: {model}, {usable} usable cores ({os.cpu_count()} logical)",
        f"- RAM: {ram}",
        f"- GPU: {_gpu()}",
        f"- Software: Linux {platform.release()}, Python {platform.python_version()}, {versions}",
        f"- Code: {_git()}",
    ]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gpu() -> str:
    if not shutil.which("nvidia-smi"):
        return "none (no nvidia-smi; every figure is CPU-only)"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    names = [x.strip() for x in out.stdout.splitlines() if x.strip()]
    return "; ".join(names) + " (benchmarks ran on the CPU unless a section says otherwise)" if names else "none"


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"commit {head or 'unknown'}" + (" plus uncommitted changes" if dirty else "")


# ---------------------------------------------------------------------------------------------------------------
# Writing RESULTS.md


def fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    x = float(x)
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def section_key(bench: Bench, mode: str) -> str:
    """A run with ``--args`` gets a section of its own beside the quick/full one (the latest such run is kept)."""
    return f"{bench.name}.custom" if mode == CUSTOM else bench.name


def section(bench: Bench, result: dict[str, Any] | None, mode: str) -> str:
    key = section_key(bench, mode)
    title = f"{bench.name} ({mode})" if mode == CUSTOM else bench.name
    lines = [f"<!-- begin {key} -->", f"## {title}: {bench.title}", ""]
    if result is None:
        lines += [f"Skipped: {bench.skip_note}", "", f"<!-- end {key} -->"]
        return "\n".join(lines)
    load = " / ".join(f"{x:.1f}" for x in result["load_before"]), " / ".join(f"{x:.1f}" for x in result["load_after"])
    again = f"python benchmarks/run_all.py --only {bench.name}" + (
        " --full" if mode == "full" else _args_flag(bench, result) if mode == CUSTOM else "")
    lines += [
        f"Command: `{result['command']}` ({mode}; reproduce with `{again}`). Run {result['started']} on "
        f"{result['code']}, {result['wall_s']:.0f} s wall; load average (1/5/15 min) before {load[0]}, after "
        f"{load[1]}.", "",
    ]
    if result["error"]:
        lines += ["**Not measured.** " + result["error"].splitlines()[0], "", "```",
                  "\n".join(result["error"].splitlines()[1:])[-3000:], "```", ""]
    if result["rows"]:
        lines += ["| metric | ours | baseline | unit | ratio ours/baseline | better | repeats | note |",
                  "|---|---:|---:|---|---:|---|---:|---|"]
        for row in result["rows"]:
            d = row.get("detail") or {}
            lines.append(f"| {row['name']} | {fmt(row['ours'])} | {fmt(row['baseline'])} | {row['unit']} | "
                         f"**{fmt(row['ratio'])}** | {d.get('better', '')} | {d.get('repeats', '')} | "
                         f"{str(d.get('note', '')).replace('|', '/')} |")
        lines += ["", "Figures are medians over the repeats (see each script's docstring for what one repeat is).", ""]
    if result["stdout"].strip():
        lines += ["<details><summary>script output</summary>", "", "```", result["stdout"].strip()[-6000:], "```",
                  "", "</details>", ""]
    lines.append(f"<!-- end {key} -->")
    return "\n".join(lines)


def _args_flag(bench: Bench, result: dict[str, Any]) -> str:
    args = result["command"].split(f"benchmarks/{bench.name}.py", 1)[1].strip()
    return " --args " + shlex.quote(f"{bench.name}={args}")


def existing_sections(path: Path) -> dict[str, str]:
    text = path.read_text() if path.exists() else ""
    pattern = r"<!-- begin ([\w.]+) -->.*?<!-- end \1 -->"
    return {m.group(1): m.group(0) for m in re.finditer(pattern, text, flags=re.S)}


def write_results(
    path: Path, sections: dict[str, str], *, command: str, wall_s: float, load: tuple[Any, Any], merged: bool
) -> None:
    kept = " (sections it did not run were kept from earlier runs)" if merged else ""
    head = [
        "# Benchmark results", "",
        f"{'Last updated' if merged else 'Written'} by `{command}` on {_now()} ({wall_s / 60:.1f} min){kept}. Every "
        "ratio is ours / baseline, both measured in the same run on this machine; each section gives its command, "
        "its time and the load average around it (the machine is shared and noisy: compare ratios, not absolute "
        "figures, across machines).", "",
        "## Machine", "", *machine(),
        f"- Load average (1/5/15 min) at the start of that command {' / '.join(f'{x:.1f}' for x in load[0])}, "
        f"at its end {' / '.join(f'{x:.1f}' for x in load[1])}", "",
    ]
    keys = [k for b in BENCHMARKS for k in (b.name, f"{b.name}.custom")]
    body = [sections[k] for k in keys if k in sections]
    path.write_text("\n".join(head) + "\n" + "\n\n".join(body) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the issue's sizes (slow) instead of quick mode")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], help="run just these")
    parser.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                        help="replace one benchmark's arguments, e.g. 'sim_throughput=--clients 1000 --rounds 3'")
    parser.add_argument("--merge", action="store_true", help="keep the other benchmarks' sections of --out")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 1 h; 6 h --full)")
    opts = parser.parse_args()
    overrides: dict[str, list[str]] = {}
    for item in opts.args:
        name, sep, value = item.partition("=")
        if not sep or name not in {b.name for b in BENCHMARKS}:
            parser.error(f"--args {item!r}: expected NAME=ARGS with NAME one of {', '.join(b.name for b in BENCHMARKS)}")
        overrides[name] = shlex.split(value)
    timeout = opts.timeout or (6 * 3600 if opts.full else 3600)
    sections = existing_sections(opts.out) if opts.merge else {}
    load_start, start, failed = os.getloadavg(), time.monotonic(), []
    for bench in BENCHMARKS:
        if opts.only and bench.name not in opts.only:
            continue
        mode = "full" if opts.full else "quick"
        args = bench.full if opts.full else bench.quick
        if bench.name in overrides:
            args, mode = tuple(overrides[bench.name]), CUSTOM
        if args is None:
            sections[section_key(bench, mode)] = section(bench, None, mode)
            continue
        result = run_bench(bench, list(args), timeout)
        if result["rc"] != 0:
            failed.append(bench.name)
        sections[section_key(bench, mode)] = section(bench, result, mode)
    command = " ".join(["python benchmarks/run_all.py", *map(shlex.quote, sys.argv[1:])])
    write_results(opts.out, sections, command=command, wall_s=time.monotonic() - start,
                  load=(load_start, os.getloadavg()), merged=opts.merge)
    print(f"wrote {opts.out} in {(time.monotonic() - start) / 60:.1f} min" + (f"; FAILED: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
