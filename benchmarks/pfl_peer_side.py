"""pfl's side of ``benchmarks/pfl_peer.py``: issue 13's job run by Apple's pfl-research (``pfl`` 0.6.0).

Runs ONLY in the benchmark's own virtualenv (``python benchmarks/pfl_peer.py --setup`` makes it; pfl is never a
fedshield dependency), so it imports nothing of fedshield's: fedshield's side exported the job into a directory
(``job.npz``: the initial weights, every client's training rows, the server test set, the initial model's logits on
that test set; ``job.json``: the hyperparameters) and this script reads it.

The model is fedshield's ``DigitsCNN`` (``fedshield/tasks/builtin.py``), duplicated below because its module imports
fedshield. The duplicate is checked, not trusted: the same parameter names, shapes and count, the exported
initial weights loaded strictly, and the same logits on the whole server test set as fedshield's model gave (to
1e-5), so a drift of either copy fails the run instead of comparing two different models.

How pfl is set up (its own components, as its benchmarks/image_classification/pytorch/train.py uses them):
``FederatedAveraging`` over a ``SimulatedBackend``; ``PyTorchModel`` with ``torch.optim.SGD`` as the local
optimizer (lr 0.5) and ``SGD(lr=1.0)`` as the central one (plain FedAvg); ``NNTrainHyperParams`` with one local
epoch at fedshield's batch size (``ceil(0.5 * rows)``, the same for every client here, checked by the exporter).
No DP: ``WeightByDatapoints`` (fedshield's FedAvg weights by example count). Central client-level DP:
``CentrallyAppliedPrivacyMechanism(GaussianMechanism.from_privacy_accountant(PLD accountant, clipping_bound=C))``,
weight 1 per client (fedshield's central mode averages clients uniformly): each update clipped to C, N(0, (zC)^2)
on the sum, divided by the cohort size, as fedshield does. pfl's PRV accountant fails at z 0.3 (``Discrete mean
differs``), so its PLD accountant gives pfl's epsilon.

Where this deviates from a default pfl set-up, to run fedshield's job exactly:
- Users are sampled 10 distinct per round, uniformly without replacement (Flower's FedAvg samples so); pfl's
  ``'random'`` sampler draws with replacement.
- Each sampled user's rows are shuffled before local training (fedshield's DataLoader has ``shuffle=True``; pfl's
  ``Dataset`` iterates in order).
- The server-side evaluation runs after EVERY round (pfl's ``CentralEvaluationCallback`` skips the first round;
  fedshield evaluates after each). ``evaluation_frequency`` is past the last round, so pfl's per-user
  before/after-training evaluation runs only in its first round (it always runs there).

Prints one JSON line: per-round wall time (round 1 from the start of training), users trained per round, server
test accuracy per round, pfl's epsilon, and the absolute time round 1 ended.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """fedshield's DigitsCNN (fedshield/tasks/builtin.py), plus the ``loss``/``metrics`` methods pfl requires."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.features(x).flatten(1))

    def loss(self, x, y, eval=False):  # type: ignore[no-untyped-def]  # noqa: A002 (pfl's signature)
        self.train()
        return F.cross_entropy(self(x), y.long())  # fedshield's loss: nn.CrossEntropyLoss (mean)

    @torch.no_grad()
    def metrics(self, x, y, eval=False):  # type: ignore[no-untyped-def]  # noqa: A002
        from pfl.metrics import Weighted

        self.eval()
        logits = self(x)
        y = y.long()
        loss = float(F.cross_entropy(logits, y, reduction="sum"))
        correct = float((logits.argmax(dim=1) == y).sum())
        return {"loss": Weighted(loss, len(y)), "accuracy": Weighted(correct, len(y))}


def checked_model(job: dict[str, np.ndarray], meta: dict) -> DigitsCNN:
    """The duplicate, with fedshield's initial weights, after checking it IS fedshield's model."""
    model = DigitsCNN()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    if shapes != meta["state_shapes"]:
        raise SystemExit(f"pfl side: DigitsCNN differs from fedshield's: {shapes} vs {meta['state_shapes']}")
    numel = sum(p.numel() for p in model.parameters())
    if numel != meta["num_params"]:
        raise SystemExit(f"pfl side: DigitsCNN has {numel} parameters, fedshield's {meta['num_params']}")
    model.load_state_dict({k: torch.from_numpy(job[f"init/{k}"]) for k in shapes}, strict=True)
    with torch.no_grad():
        logits = model(torch.from_numpy(job["test_x"])).numpy()
    gap = float(np.max(np.abs(logits - job["init_logits"])))
    if gap > 1e-5:
        raise SystemExit(f"pfl side: the duplicate DigitsCNN's logits differ from fedshield's by {gap}")
    return model


class CohortSampler:
    """``cohort`` distinct users per round, uniformly (as Flower's FedAvg samples), one id per call."""

    def __init__(self, users: int, cohort: int, seed: int) -> None:
        self.users, self.cohort, self.rng, self.pending = users, cohort, np.random.default_rng(seed), []

    def __call__(self) -> int:
        if not self.pending:
            self.pending = [int(u) for u in self.rng.choice(self.users, self.cohort, replace=False)]
        return self.pending.pop()


def federated_data(job: dict[str, np.ndarray], meta: dict, counter: list[int]):  # type: ignore[no-untyped-def]
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset

    x, y, offsets = torch.from_numpy(job["train_x"]), torch.from_numpy(job["train_y"]), job["offsets"]
    shuffle = torch.Generator().manual_seed(meta["seed"])

    def make_user(uid: int) -> Dataset:
        counter[0] += 1
        lo, hi = int(offsets[uid]), int(offsets[uid + 1])
        perm = lo + torch.randperm(hi - lo, generator=shuffle)
        return Dataset((x[perm], y[perm]), user_id=str(uid))

    sampler = CohortSampler(meta["num_clients"], meta["cohort"], meta["seed"])
    return FederatedDataset(make_user, sampler)


def privacy(meta: dict, setting: str, rounds: int) -> tuple[list, float | None]:
    """pfl's postprocessors for ``setting`` and pfl's epsilon (None without DP)."""
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism, PLDPrivacyAccountant

    if setting != "central":
        return [WeightByDatapoints()], None
    accountant = PLDPrivacyAccountant(num_compositions=rounds, sampling_probability=meta["cohort"] / meta["num_clients"],
                                      mechanism="gaussian", noise_parameter=meta["z"], delta=meta["delta"])
    mechanism = GaussianMechanism.from_privacy_accountant(accountant, clipping_bound=meta["clip"])
    return [CentrallyAppliedPrivacyMechanism(mechanism)], float(accountant.epsilon)


def callbacks(test, eval_params, counter: list[int], record: dict[str, list]) -> list:  # type: ignore[no-untyped-def]
    """The server-side evaluation after every round, then a clock; both write into ``record``."""
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.metrics import Metrics

    class EveryRoundEvaluation(CentralEvaluationCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):  # type: ignore[no-untyped-def]
            stop, metrics = self._eval(model)
            record["accuracy"].append(next(float(v.overall_value) for k, v in metrics if "accuracy" in str(k)))
            # Kept here, not returned: round 1's names would collide with on_train_begin's evaluation in pfl's
            # per-round metrics (the reason pfl's own callback skips that round).
            return stop, Metrics()

    class Clock(TrainingProcessCallback):
        def on_train_begin(self, *, model):  # type: ignore[no-untyped-def]
            record["stamps"].append(time.time())  # after the initial evaluation, as fedshield's round clock
            return super().on_train_begin(model=model)

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):  # type: ignore[no-untyped-def]
            record["stamps"].append(time.time())
            record["trained"].append(counter[0] - sum(record["trained"]))
            return False, Metrics()

    return [EveryRoundEvaluation(test, model_eval_params=eval_params), Clock()]


def run(job_dir: Path, setting: str, rounds: int) -> dict:
    import pfl.model.pytorch  # noqa: F401  (selects pfl's torch backend before any dataset is built)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm.base import NNAlgorithmParams
    from pfl.algorithm.federated_averaging import FederatedAveraging
    from pfl.data.dataset import Dataset
    from pfl.hyperparam.base import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    meta = json.loads((job_dir / "job.json").read_text())
    job = dict(np.load(job_dir / "job.npz"))
    torch.manual_seed(meta["seed"])
    torch_model = checked_model(job, meta)
    model = PyTorchModel(model=torch_model, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(torch_model.parameters(), lr=1.0))
    counter = [0]
    train = federated_data(job, meta, counter)
    postprocessors, epsilon = privacy(meta, setting, rounds)
    eval_params = NNEvalHyperParams(local_batch_size=512)  # fedshield's server evaluation batch
    test = Dataset((torch.from_numpy(job["test_x"]), torch.from_numpy(job["test_y"])))
    record: dict[str, list] = {"accuracy": [], "stamps": [], "trained": []}
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                                           train_cohort_size=meta["cohort"], val_cohort_size=None),
        backend=SimulatedBackend(training_data=train, val_data=train, postprocessors=postprocessors), model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=meta["lr"], local_num_epochs=1,
                                              local_batch_size=meta["batch_size"]),
        model_eval_params=eval_params, callbacks=callbacks(test, eval_params, counter, record),
        send_metrics_to_platform=False,
    )
    stamps = record["stamps"]
    return {"round_s": [b - a for a, b in zip(stamps, stamps[1:])], "trained": record["trained"],
            "accuracy": record["accuracy"], "epsilon": epsilon, "first_round_end": stamps[1], "pfl": _version("pfl"),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    job_dir, setting, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    result = run(job_dir, setting, rounds)
    if not all(math.isfinite(a) for a in result["accuracy"]):
        raise SystemExit(f"pfl side: accuracy is not finite: {result['accuracy']}")
    print(json.dumps(result))
