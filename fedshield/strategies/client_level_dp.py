"""Client-level DP on the server: a wrapper that releases only the noisy mean of clipped client updates.

Modes:

* ``central``: clients send plain updates; this wrapper clips each ``w_i - w_global`` to ``clip_norm`` and adds
  N(0, (z C)^2) to the sum. The server sees individual updates (so not with SecAgg+): it is trusted with them.
* ``distributed``: every client already clipped its update and added noise of std ``z C / sqrt(n)``
  (:mod:`fedshield.client.trainer`); the sum of n replies carries the central mechanism's noise. Under SecAgg+
  the server never sees one client's update. This wrapper only forms the mean and does the accounting.

Either way the inner strategy (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad) gets ONE synthetic reply
``w_global + noisy mean update``, so its server optimiser applies on top of the private release (post-processing).
Flower's ``DifferentialPrivacyServerSideFixedClipping`` is not used because, on 1.39, it leaves 0-d arrays
unclipped, draws noise from numpy's global (non-cryptographic) RNG, calibrates noise to ``z C / n`` although
FedAvg weights clients by example count (so one client's weight can exceed 1/n), adds the noise after the inner
strategy (wrong for FedAdam & co.) and overwrites the replies in place.

Averaging: every client counts once (weights are ignored: an example-count weight would let one client's
influence exceed ``C / n``). Fixed-size sampling divides by the number of included clients, Poisson sampling by
the expected number ``q N`` (McMahan et al. 2018's fixed-denominator estimator: the count itself is not released).

Adjacency. Poisson sampling (central mode only) is accounted as Opacus' Poisson-subsampled Gaussian: add/remove
one client, every round a release (a round that sampled nobody releases noise alone; skipping it would reveal
that). Fixed-size sampling is accounted at q = 1 (no amplification) under zero-out adjacency: one client's update
replaced by zero, the sample and its size unchanged. Add/remove under fixed-size sampling would be a
substitution in the sample (sensitivity 2C) and is not claimed.

Dropouts: central noise is added by the server, so it is always ``z C``. In distributed mode only the clients that
replied contributed noise: a round with ``m`` of ``n`` expected clients is accounted at ``z * sqrt(m / n)``
(:func:`~fedshield.privacy.client_level_mechanism.effective_noise_multiplier`): conservative, never topped up by the server.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from numpy.typing import NDArray

from .. import protocol as P
from ..arrays import record_to_numpy, to_numpy
from ..errors import ConfigError, ProtocolError
from ..flower_internals.serverapp import aggregate_metricrecords
from ..privacy.client_level_mechanism import (
    NormalSource,
    SecureNormal,
    accounting_sample_rate,
    add_gaussian_noise,
    clip_update,
    effective_noise_multiplier,
)
from ..records_view import array_records, metric_records
from .outcomes import ReleaseEvent, RoundOutcomes
from .wrapper import StrategyWrapper

__all__ = ["ClientLevelDP", "ReleaseEvent"]

_log = logging.getLogger(__name__)


class ClientLevelDP(StrategyWrapper):
    """Wrap an averaging strategy so that each round releases a client-level DP mean of the updates.

    Args:
        inner: an averaging Message-API strategy (FedAvg family).
        mode: ``"central"`` or ``"distributed"`` (see the module docstring).
        noise_multiplier: z; the noise on the sum has std ``z * clip_norm``.
        clip_norm: C, the bound on each client's update norm.
        num_clients: N, the clients available (Poisson sampling draws from them).
        expected_clients: n, the clients per round (fixed) or the Poisson mean ``fraction * N``.
        sampling: ``"fixed"`` (the inner strategy samples) or ``"poisson"`` (this wrapper keeps each node of the
            inner's sample independently with probability ``fraction``; give the inner a fraction of 1.0).
        fraction: Poisson sampling probability.
        aggregated_replies: True under SecAgg+: each reply is already a mean whose weight is its client count.
        min_clients: a Poisson sample smaller than this skips the round (nothing sent, nothing released, no
            privacy spent); SecAgg+ needs 2.
        noise_source: standard normals for central noise; the OS CSPRNG unless a test passes a generator.
        sampler: randomness for Poisson sampling; the OS CSPRNG by default.
        weight_key: the metric the inner strategy weights by (Flower's ``weighted_by_key``).
        outcomes: the run's shared round state, where each round's release goes (a new one if not given).

    ``last_event`` (``outcomes.release``) is the round's :class:`ReleaseEvent`, or None if nothing was released (no
    replies, or the round was aborted before aggregation): only released rounds cost privacy.
    """

    #: ``aggregate_train`` folds each reply into a running sum and keeps none (see :mod:`.streaming`).
    streams_replies: ClassVar[bool] = True

    def __init__(
        self,
        inner: Strategy,
        *,
        mode: str,
        noise_multiplier: float,
        clip_norm: float,
        num_clients: int,
        expected_clients: int,
        sampling: str = "fixed",
        fraction: float = 1.0,
        aggregated_replies: bool = False,
        min_clients: int = 1,
        noise_source: NormalSource | None = None,
        sampler: random.Random | None = None,
        weight_key: str = P.NUM_EXAMPLES,
        outcomes: RoundOutcomes | None = None,
    ) -> None:
        if mode not in ("central", "distributed"):
            raise ConfigError(f"client-level DP mode must be central or distributed, got {mode!r}")
        if mode == "central" and aggregated_replies:
            raise ConfigError("central client-level DP clips individual updates: it cannot run on SecAgg+ sums")
        if not (noise_multiplier > 0 and clip_norm > 0):
            raise ConfigError(f"client-level DP needs z > 0 and C > 0, got {noise_multiplier} and {clip_norm}")
        super().__init__(inner)
        self.mode = mode
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.num_clients = num_clients
        self.sampling = sampling
        self.fraction = float(fraction)
        self.sample_rate = accounting_sample_rate(sampling=sampling, fraction=fraction)
        self.expected_clients = fraction * num_clients if sampling == "poisson" else float(expected_clients)
        self.aggregated_replies = aggregated_replies
        self.min_clients = min_clients
        self.noise_source: NormalSource = noise_source or SecureNormal()
        self._sampler = sampler or random.SystemRandom()
        self.weight_key = weight_key
        self.outcomes = outcomes if outcomes is not None else RoundOutcomes()
        self._global: ArrayRecord | None = None

    @property
    def last_event(self) -> ReleaseEvent | None:
        return self.outcomes.release

    def summary(self) -> None:
        _log.info("client-level DP (%s): z=%g, C=%g, sampling=%s (q=%g), expected clients %g", self.mode,
                  self.noise_multiplier, self.clip_norm, self.sampling, self.sample_rate, self.expected_clients)
        self.inner.summary()

    # --- training -------------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.outcomes.release = None
        self._global = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if self.sampling == "poisson":
            messages = [m for m in messages if self._sampler.random() < self.fraction]
            _log.info("round %d: Poisson client sampling kept %d node(s)", server_round, len(messages))
            if len(messages) < self.min_clients:
                # Still a release: skipping it would reveal that (almost) nobody was sampled, a fact the
                # Poisson add/remove accounting assumes hidden. aggregate_train releases noise alone.
                _log.info("round %d: Poisson sampling drew no client; the round releases noise only", server_round)
                return []
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        base = self._require_global()
        fold = _UpdateSum(base, clip_norm=self.clip_norm if self.mode == "central" else None)
        metric_contents: list[RecordDict] = []
        weight_key = self.weight_key
        for msg in replies:
            if msg.has_error():
                continue
            arrays, metrics = _records(msg)
            fold.add(arrays, self._clients_in(metrics, weight_key))
            metric_contents.append(RecordDict({P.METRICS: metrics}))
        poisson = self.sampling == "poisson"
        if fold.clients <= 0 and not poisson:
            return None, None
        event, noisy_sum = self._release(server_round, fold)
        denominator = self.expected_clients if poisson else fold.clients
        new = {k: _add_update(g, noisy_sum.get(k), denominator) for k, g in fold.base.items()}
        metrics_out = _average_metrics(metric_contents, weight_key) if metric_contents else MetricRecord()
        # Under Poisson sampling the number of participants is part of what the accounting hides: not published.
        metrics_out[weight_key] = 1.0 if poisson else fold.clients
        synthetic = Message(RecordDict({P.ARRAYS: ArrayRecord(new), P.METRICS: metrics_out}),
                            dst_node_id=0, message_type=MessageType.TRAIN)
        result = self.inner.aggregate_train(server_round, [synthetic])
        self.outcomes.release = event if result[0] is not None else None
        return result

    def _clients_in(self, metrics: MetricRecord, weight_key: str) -> float:
        """How many clients one reply stands for: 1, or under SecAgg+ the summed weights (each client's is 1)."""
        if not self.aggregated_replies:
            return 1.0
        weight = metrics.get(weight_key)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ProtocolError(f"aggregated reply has no valid {weight_key!r} count: {weight!r}")
        return float(weight)

    def _release(self, server_round: int, fold: _UpdateSum) -> tuple[ReleaseEvent, dict[str, NDArray[Any]]]:
        if self.mode == "central":
            z = self.noise_multiplier
            noisy = add_gaussian_noise(fold.sums, std=z * self.clip_norm, source=self.noise_source)
        else:
            z = effective_noise_multiplier(noise_multiplier=self.noise_multiplier,
                                           expected_clients=self.expected_clients, included_clients=fold.clients)
            noisy = fold.sums
            if z < self.noise_multiplier:
                _log.warning("round %d: %g of %g expected clients contributed noise shares; accounted at z=%.4g "
                             "instead of %.4g", server_round, fold.clients, self.expected_clients, z,
                             self.noise_multiplier)
        event = ReleaseEvent(server_round, z, self.sample_rate, fold.clients, self.expected_clients, fold.clipped)
        return event, noisy

    def _require_global(self) -> ArrayRecord:
        if self._global is None:
            raise ProtocolError("aggregate_train was called before configure_train: call strategy.start()")
        return self._global

class _UpdateSum:
    """Running float64 sum of (optionally clipped) updates ``w_i - w_global`` over the floating-point arrays.

    Integer arrays (counters such as BatchNorm's ``num_batches_tracked``) carry no noise, so they are left out of
    the update and keep the global value.
    """

    def __init__(self, base: ArrayRecord, *, clip_norm: float | None) -> None:
        self.base = record_to_numpy(base)
        self.floating = [k for k, v in self.base.items() if np.issubdtype(v.dtype, np.floating)]
        self.clip_norm = clip_norm
        self.sums: dict[str, NDArray[np.float64]] = {k: np.zeros(self.base[k].shape) for k in self.floating}
        self.clients = 0.0
        self.clipped = 0

    def add(self, arrays: ArrayRecord, clients: float) -> None:
        update = {k: np.subtract(to_numpy(arrays[k], copy=False), self.base[k], dtype=np.float64)
                  for k in self.floating}
        if self.clip_norm is not None:
            update, norm = clip_update(update, clip_norm=self.clip_norm)
            self.clipped += int(norm > self.clip_norm)
        for key, value in update.items():
            # Under SecAgg+ a reply is the mean of `clients` updates: its share of the sum is clients x mean.
            np.add(self.sums[key], value * clients if clients != 1.0 else value, out=self.sums[key])
        self.clients += clients


def _records(msg: Message) -> tuple[ArrayRecord, MetricRecord]:
    if len(array_records(msg.content)) != 1 or len(metric_records(msg.content)) != 1:
        raise ProtocolError("a train reply must carry one ArrayRecord and one MetricRecord: wrap this strategy in "
                            "UpdateValidation so malformed replies are rejected before they get here")
    return next(iter(array_records(msg.content).values())), next(iter(metric_records(msg.content).values()))


def _add_update(global_value: NDArray[Any], update_sum: NDArray[Any] | None, denominator: float) -> Array:
    if update_sum is None:  # an integer array: keeps the global value
        return Array(np.array(global_value, copy=True))
    new = np.asarray(global_value, dtype=np.float64) + update_sum / denominator
    return Array(np.asarray(new, dtype=global_value.dtype))


def _average_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted metric average, or a plain one when every weight is 0 (it would divide by 0)."""
    weights = [r[P.METRICS].get(weight_key, 0) for r in contents]  # type: ignore[union-attr]
    if all(isinstance(w, (int, float)) and w > 0 for w in weights):
        try:
            return aggregate_metricrecords(contents, weight_key)
        except (TypeError, ValueError, KeyError):
            pass
    return MetricRecord()

