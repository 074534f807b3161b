"""Server checkpoints: everything needed to continue a run after the server dies, in ONE file.

The global model, the strategy's own state (server momentum, Adam moments, ...), the per-client privacy records,
the metrics rows and the round number go into a single safetensors file whose metadata carries a JSON manifest.
One file means one atomic rename: a kill -9 at any moment leaves the previous complete checkpoint or the new one,
never a model from round 3 with the accounting from round 2. Tensors only, so loading it cannot execute code.

The rows ``metrics.jsonl`` already holds on disk when the checkpoint is written (every round's but the last, which
is appended after it: :mod:`fedshield.server.run_writer`) stay there: the manifest says how many
(``rows_in_metrics``) and carries the rest, and loading reads them back from ``metrics.jsonl``. Why: carrying every
row made each round's checkpoint grow with the run. Format 1 checkpoints (every row inline) still load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes
from ..config import RunConfig
from ..errors import ConfigError
from ..flower_internals.strategy_state import STATE_ATTRS  # Flower's attribute names, canary-tested

__all__ = ["Checkpoint", "CHECKPOINT_FILE", "encode_checkpoint", "save_checkpoint", "load_checkpoint", "load_resume",
           "capture_strategy_state", "restore_strategy_state"]

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedshield-checkpoint/2"
_FORMATS = ("fedshield-checkpoint/1", FORMAT)  # 1: every row inline
METRICS_FILE = "metrics.jsonl"
_PRIVACY_TENSOR = "report/privacy_clients.jsonl"  # format 2: the privacy records, one JSON text per client
#: Checkpoints written before the stateful layers were named keyed them by their path down the wrapper chain
#: (``s.inner.inner.m_t``); the only layer with these attributes was the named strategy.
_LEGACY_PATH = re.compile(r"^s(\.inner)*$")


@dataclass(frozen=True)
class Checkpoint:
    server_round: int
    run_id: str
    noise_multiplier: float
    model: dict[str, np.ndarray]
    strategy_state: dict[str, tuple[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    privacy_clients: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: Leading rows of :attr:`rounds` that were read from ``metrics.jsonl`` (so are on disk there) when loaded.
    rows_in_metrics: int = 0
    #: :attr:`privacy_clients` already encoded, one JSON text per client (``PrivacyReport.state_lines``); written
    #: instead of encoding ``privacy_clients`` when given.
    privacy_lines: list[str] | None = None


def save_checkpoint(out_dir: Path, ckpt: Checkpoint) -> Path:
    path = Path(out_dir) / CHECKPOINT_FILE
    atomic_write_bytes(path, encode_checkpoint(ckpt))
    return path


def encode_checkpoint(ckpt: Checkpoint, *, rows_in_file: int = 0) -> bytes:
    """The checkpoint file's bytes (what :func:`save_checkpoint` writes atomically); ``rows_in_file``: how many
    leading rows ``metrics.jsonl`` holds on disk (left out here, read back from there)."""
    if not 0 <= rows_in_file <= len(ckpt.rounds):
        raise ValueError(f"rows_in_file {rows_in_file} of {len(ckpt.rounds)} rows")
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {f"model/{k}": np.ascontiguousarray(v) for k, v in ckpt.model.items()}
    kinds: dict[str, str] = {}
    for path, (kind, arrays) in ckpt.strategy_state.items():
        kinds[path] = kind
        for key, value in arrays.items():
            tensors[f"strategy/{path}/{key}"] = np.ascontiguousarray(value)
    lines = ckpt.privacy_lines
    if lines is None:
        lines = [json.dumps(c, sort_keys=True, allow_nan=False) for c in ckpt.privacy_clients]
    # One client per line, as bytes beside the tensors: the manifest is JSON-encoded every round, these are not.
    tensors[_PRIVACY_TENSOR] = np.frombuffer("\n".join(lines).encode("utf-8") or b"\n", dtype=np.uint8)
    manifest = {
        "format": FORMAT, "server_round": ckpt.server_round, "run_id": ckpt.run_id,
        "noise_multiplier": ckpt.noise_multiplier, "model_keys": list(ckpt.model), "strategy_kinds": kinds,
        "privacy_clients": _PRIVACY_TENSOR, "rows_in_metrics": rows_in_file, "rounds": ckpt.rounds[rows_in_file:],
        "config": ckpt.config, "extra": ckpt.extra,
    }
    return save(tensors, metadata={"manifest": json.dumps(manifest, allow_nan=False)})


def load_checkpoint(run_dir: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise ConfigError(
            f"--resume {run_dir}: no {CHECKPOINT_FILE} there; a run writes one after its first completed round"
        )
    try:
        raw = path.read_bytes()
        tensors = load(raw)
        manifest = json.loads(_metadata(raw)["manifest"])
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise ConfigError(f"--resume {run_dir}: {path.name} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in _FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise ConfigError(f"--resume {run_dir}: {path.name} has format {found!r}, expected {FORMAT}")
    try:
        earlier = _rows_in_metrics(Path(run_dir), int(manifest.get("rows_in_metrics", 0)))
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"--resume {run_dir}: {path.name} leaves its first {manifest.get('rows_in_metrics')} "
                          f"rows to {METRICS_FILE}, which does not hold them ({exc}); restore the run's own "
                          f"{METRICS_FILE}, or start a new run with --force") from None
    try:
        return _from_manifest({**manifest, "rounds": [*earlier, *manifest["rounds"]],
                               "rows_in_metrics": len(earlier)}, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited or truncated manifest
        raise ConfigError(f"--resume {run_dir}: {path.name} has an incomplete manifest ({type(exc).__name__}: "
                          f"{exc}); resume from an untouched checkpoint, or start a new run with --force") from None


def _from_manifest(manifest: dict[str, Any], tensors: dict[str, np.ndarray]) -> Checkpoint:
    """The checkpoint the manifest describes; raises KeyError/TypeError/ValueError where it is incomplete."""
    model = {k: tensors[f"model/{k}"] for k in manifest["model_keys"]}
    if not model:
        raise ValueError("no model tensors")
    state: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
    for spath, kind in manifest["strategy_kinds"].items():
        prefix = f"strategy/{spath}/"
        state[spath] = (str(kind), {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    ckpt = Checkpoint(
        server_round=int(manifest["server_round"]), run_id=str(manifest["run_id"]),
        noise_multiplier=float(manifest["noise_multiplier"]), model=model, strategy_state=state,
        privacy_clients=_privacy_clients(manifest["privacy_clients"], tensors), rounds=list(manifest["rounds"]),
        config=dict(manifest["config"]), extra=dict(manifest.get("extra", {})),
        rows_in_metrics=int(manifest.get("rows_in_metrics", 0)),
    )
    if ckpt.server_round < 0 or len(ckpt.rounds) != ckpt.server_round:
        raise ValueError(f"server_round {ckpt.server_round} with {len(ckpt.rounds)} recorded rounds")
    if not (ckpt.noise_multiplier >= 0 and np.isfinite(ckpt.noise_multiplier)):
        raise ValueError(f"noise_multiplier {ckpt.noise_multiplier}")
    return ckpt


def _privacy_clients(stored: Any, tensors: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Format 1 stores the records in the manifest, format 2 names the tensor that holds them."""
    if isinstance(stored, list):
        return stored
    text = tensors[str(stored)].tobytes().decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _rows_in_metrics(run_dir: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` rows of the run's ``metrics.jsonl``. Only those lines are decoded: a torn line after
    them (a power cut during the append the checkpoint carries the row of) is never read."""
    if count <= 0:
        return []
    rows: list[dict[str, Any]] = []
    with open(run_dir / METRICS_FILE, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if number > count:
                break
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                raise ValueError(f"line {number} is not a JSON row") from None
            if not isinstance(row, dict) or row.get("round") != number:
                raise ValueError(f"line {number} is not the row of round {number}")
            rows.append(row)
    if len(rows) < count:
        raise ValueError(f"it holds {len(rows)} rows")
    return rows


def _metadata(raw: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header whose "__metadata__" we stored.
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return dict(header.get("__metadata__", {}))


def capture_strategy_state(stateful: Mapping[str, object]) -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """The round-to-round state of each stateful strategy layer (see ``StrategyStack.stateful``), keyed
    ``<layer name>.<attribute>``."""
    from flwr.app import ArrayRecord

    state: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
    for name, layer in stateful.items():
        for attr in STATE_ATTRS:
            value = getattr(layer, attr, None)  # Flower's strategies have only the attributes of their kind
            key = f"{name}.{attr}"
            if isinstance(value, ArrayRecord):
                state[key] = ("arrayrecord", {k: a.numpy() for k, a in value.items()})
            elif isinstance(value, dict):
                state[key] = ("dict", {k: np.asarray(v) for k, v in value.items()})
            elif isinstance(value, list):
                state[key] = ("list", {f"{i:06d}": np.asarray(v) for i, v in enumerate(value)})
    return state


def restore_strategy_state(
    stateful: Mapping[str, object], state: dict[str, tuple[str, dict[str, np.ndarray]]]
) -> None:
    """Put captured state back on the stateful layers of a freshly built strategy; a mismatch is an error."""
    from flwr.app import Array, ArrayRecord

    for key, (kind, arrays) in state.items():
        name, _, attr = key.rpartition(".")
        name = _LEGACY_PATH.sub("strategy", name)
        if name not in stateful or attr not in STATE_ATTRS:
            raise ConfigError(f"checkpoint holds state {key!r} that this run's strategy does not have: "
                              "resume with the same --strategy and settings as the original run")
        if kind == "arrayrecord":
            value: Any = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        elif kind == "dict":
            value = dict(arrays)
        else:
            value = [arrays[k] for k in sorted(arrays)]
        setattr(stateful[name], attr, value)


def load_resume(run_dir: Path) -> tuple[RunConfig, Checkpoint]:
    """The original settings and last checkpoint of ``run_dir``; the run continues exactly as configured."""
    run_dir = Path(run_dir)
    try:
        raw = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--resume {run_dir}: no config.json there; is it a fedshield run directory?") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {run_dir}: config.json is unreadable ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--resume {run_dir}: config.json holds {type(raw).__name__}, expected the run's settings")
    config = RunConfig.from_mapping({**raw, "out": str(run_dir)})
    ckpt = load_checkpoint(run_dir)
    if ckpt.server_round > config.num_rounds:
        raise ConfigError(f"--resume {run_dir}: checkpoint is at round {ckpt.server_round} of {config.num_rounds}")
    differ = sorted(k for k in {*raw, *ckpt.config} - {"out"} if raw.get(k) != ckpt.config.get(k))
    if differ:
        raise ConfigError(f"--resume {run_dir}: config.json and {CHECKPOINT_FILE} disagree on "
                          f"{', '.join(differ)} (config.json: {[raw.get(k) for k in differ]}, checkpoint: "
                          f"{[ckpt.config.get(k) for k in differ]}); restore the run's own config.json")
    return config, ckpt
