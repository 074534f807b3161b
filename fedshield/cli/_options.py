"""The run settings that ``fedshield simulate`` and ``fedshield server`` both take: one definition per flag, so
the two commands cannot drift apart in a flag's name, type or help, and one mapping onto :class:`RunConfig` keys.

Every flag defaults to ``None`` ("not given"): a config file's value, then RunConfig's default, applies (see
:func:`fedshield.cli.simulate.build_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["RUN_FLAGS", "check_resume_or_force", "run_flags"]

Rounds = Annotated[int | None, typer.Option("--rounds", help="Federated rounds (default 20).")]
Task = Annotated[str | None, typer.Option("--task", help="digits | breast-cancer | package.module:factory.")]
Epsilon = Annotated[float | None, typer.Option("--epsilon", help="Record-level budget for the whole run (default 8).")]
Delta = Annotated[float | None, typer.Option("--delta", help="DP delta (default 1e-5).")]
NoiseMultiplier = Annotated[float | None, typer.Option("--noise-multiplier", help="Fix sigma instead of calibrating it.")]
MaxGradNorm = Annotated[float | None, typer.Option("--max-grad-norm", help="Per-example clipping bound C.")]
SampleRate = Annotated[float | None, typer.Option(
    "--sample-rate", help="Poisson sampling rate q = 1/steps per epoch.")]
Lr = Annotated[float | None, typer.Option("--lr", help="Client learning rate.")]
LocalEpochs = Annotated[int | None, typer.Option("--local-epochs", help="Local epochs per round.")]
FractionTrain = Annotated[float | None, typer.Option(
    "--fraction-train", help="Fraction of the clients trained per round (default 1).")]
FractionEvaluate = Annotated[float | None, typer.Option(
    "--fraction-evaluate",
    help="Fraction of the clients that evaluate the global model per round (default 1; 0: server-side only).")]
SecaggShares = Annotated[float | None, typer.Option(
    "--secagg-shares", help="SecAgg+ neighbours per client: 1.0 = all (default) or a count >= 3 (sparser: faster).")]
SecaggThreshold = Annotated[float | None, typer.Option(
    "--secagg-threshold", help="SecAgg+ shares needed to rebuild a secret: a fraction (default 0.66) or a count.")]
Accountant = Annotated[str | None, typer.Option("--accountant", help="prv (default, tightest) | rdp.")]
GradSampleMode = Annotated[str | None, typer.Option(
    "--grad-sample-mode", help="Opacus per-sample gradients: ghost (default) | hooks | functorch | ew.")]
NoDp = Annotated[bool, typer.Option("--no-dp", help="Train WITHOUT differential privacy (prints a warning).")]
NoSecagg = Annotated[bool, typer.Option(
    "--no-secagg", help="Send updates in clear to the server (prints a warning).")]
MaxPhysicalBatchSize = Annotated[int | None, typer.Option(
    "--max-physical-batch-size",
    help="Cap the examples per DP-SGD forward/backward pass to bound memory (0: no cap; epsilon unchanged).")]
Amp = Annotated[bool, typer.Option("--amp", help="bf16 autocast (needs --grad-sample-mode hooks or functorch).")]
RoundTimeout = Annotated[float | None, typer.Option(
    "--round-timeout", help="Seconds to wait for clients' replies in each exchange of a round; later ones are left "
    "out of the round (default 600).")]
Dispatch = Annotated[str | None, typer.Option(
    "--dispatch", help="Simulation message dispatch: fedshield (default, one pass per sweep) | flower (Flower's own loop).")]
Partition = Annotated[str | None, typer.Option(
    "--partition", help="How one dataset is split among virtual clients: iid | dirichlet:ALPHA | shard:N "
    "(simulate only: deployed sites bring their own data).")]
Seed = Annotated[int | None, typer.Option(
    "--seed", help="Seed for model init and partitions (simulation: also the noise; deployed clients draw their own).")]
Device = Annotated[str | None, typer.Option(
    "--device", help="Where clients train: auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N "
    "(a deployed site's own --device wins).")]
Strategy = Annotated[str | None, typer.Option(
    "--strategy", help="fedavg | fedavgm | fedprox | fedadam | fedyogi | fedadagrad | krum | multikrum | bulyan | "
    "fedmedian | fedtrimmedavg (parameters: [strategy] table in --config).")]
ClientDp = Annotated[str | None, typer.Option("--client-dp", help="Client-level DP: off | central | distributed.")]
ClientNoiseMultiplier = Annotated[float | None, typer.Option(
    "--client-noise-multiplier", help="Client-level noise multiplier z.")]
ClientClipNorm = Annotated[float | None, typer.Option("--client-clip-norm", help="Client-level update clipping bound.")]
ClientEpsilon = Annotated[float | None, typer.Option(
    "--client-epsilon", help="Calibrate z to this client-level epsilon.")]
MaxUpdateNorm = Annotated[float | None, typer.Option(
    "--max-update-norm", help="Reject updates whose L2 norm exceeds this (fedshield server without SecAgg+: "
    "default 10).")]
Quantize = Annotated[int | None, typer.Option(
    "--quantize", help="Send updates quantized to 8 or 16 bits (under SecAgg+: into its field).")]
NodeWaitTimeout = Annotated[float | None, typer.Option(
    "--node-wait-timeout", help="Seconds to wait for the run's clients to connect before the first round; then "
    "the run fails naming the fix (default 300).")]
Out = Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/latest).")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="TOML file with the same keys as these flags.")]
Resume = Annotated[Path | None, typer.Option(
    "--resume", help="Continue the run in this directory from its last completed round (its own settings).")]
Force = Annotated[bool, typer.Option(
    "--force", help="Replace the run already in --out (its metrics, privacy report and checkpoint are removed).")]
Data = Annotated[Path | None, typer.Option(
    "--data", help="simulate: a .csv/.parquet/.npz file the virtual clients partition instead of the task's bundled data.")]
TextColumn = Annotated[str | None, typer.Option("--text-column", help="Text tasks: the column holding the text (default text).")]
LabelColumn = Annotated[str | None, typer.Option("--label-column", help="Label column of a .csv/.parquet (default label).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's logs.")]


#: The command parameters (above) that map one to one onto RunConfig keys.
_SAME_NAME = ("task", "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "lr", "local_epochs",
              "fraction_train", "fraction_evaluate", "accountant", "grad_sample_mode", "seed", "device",
              "max_physical_batch_size", "round_timeout", "out", "secagg_shares", "secagg_threshold", "partition",
              "strategy", "client_dp", "client_noise_multiplier", "client_clip_norm", "client_epsilon",
              "max_update_norm", "quantize", "node_wait_timeout", "dp_mode", "min_honest", "ddp_records")

#: Every run-settings parameter that ``simulate`` and ``server`` both take, under the same name and annotation
#: (tests/test_cli_flags.py holds both commands to it). Each command adds only what is its own: how many clients
#: (``--clients`` are made, ``--min-clients`` are awaited), Ray resources, keys and addresses.
RUN_FLAGS = (*_SAME_NAME, "rounds", "amp", "no_dp", "no_secagg", "config", "resume", "force", "verbose")


DpMode = Annotated[str | None, typer.Option(
    "--dp-mode", help="Record-level DP: local (default: each site noises its own DP-SGD) | distributed (Skellam "
                      "noise shares summed under SecAgg+: central DP-SGD's noise, one step a round).")]
MinHonest = Annotated[float | None, typer.Option(
    "--min-honest", help="Distributed mode: sites assumed to add their noise share, a count or a fraction of the "
                         "round's sites (default 0.5); each share is the total noise / min-honest.")]
DdpRecords = Annotated[int | None, typer.Option(
    "--ddp-records", help="Distributed mode: public estimate of all sites' training records (the DP-SGD divisor "
                          "q*N); default: the simulation's own partitions.")]


def run_flags(params: Mapping[str, Any]) -> dict[str, Any]:
    """The shared flags among a command's parameters (its ``locals()`` on entry) as RunConfig keys. A flag or switch
    that was not given is ``None``, so it does not override the config file or the default."""
    flags = {key: params[key] for key in _SAME_NAME}
    flags.update({
        "num_rounds": params["rounds"], "amp": True if params["amp"] else None,
        "dp": False if params["no_dp"] else None, "secagg": False if params["no_secagg"] else None,
        # simulate only (a deployed site brings its own data, and the coordinator none)
        "dispatch": params.get("dispatch"), "data": params.get("data"),
        "text_column": params.get("text_column"), "label_column": params.get("label_column"),
    })
    return flags


def check_resume_or_force(resume: Path | None, force: bool) -> None:
    """``--resume`` continues a run and ``--force`` replaces one: both at once cannot mean anything."""
    if resume is not None and force:
        from ..errors import ConfigError

        raise ConfigError("--resume continues the run in its directory and --force replaces it: give one of them")
