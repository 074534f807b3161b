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
from ..arrays import array_record, from_numpy, record_to_numpy, to_numpy
from ..errors import ConfigError, ProtocolError
from ..privacy.client_level_mechanism import (
    NormalSource,
    SecureNormal,
    accounting_sample_rate,
    add_gaussian_noise_to,
    clip_vector,
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
        metric_contents: list[MetricRecord] = []
        weight_key = self.weight_key
        for msg in replies:
            if msg.has_error():
                continue
            arrays, metrics = _records(msg)
            fold.add(arrays, self._clients_in(metrics, weight_key))
            metric_contents.append(metrics)
        poisson = self.sampling == "poisson"
        if fold.clients <= 0 and not poisson:
            return None, None
        event, noisy_sum = self._release(server_round, fold)
        denominator = self.expected_clients if poisson else fold.clients
        new = fold.new_model(noisy_sum, denominator)
        metrics_out = _average_metrics(metric_contents, weight_key) if metric_contents else MetricRecord()
        # Under Poisson sampling the number of participants is part of what the accounting hides: not published.
        metrics_out[weight_key] = 1.0 if poisson else fold.clients
        synthetic = Message(RecordDict({P.ARRAYS: new, P.METRICS: metrics_out}),
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

    def _release(self, server_round: int, fold: _UpdateSum) -> tuple[ReleaseEvent, NDArray[np.float64]]:
        if self.mode == "central":
            z = self.noise_multiplier
            noisy = fold.total  # the fold is done: its sum becomes the release, noised in place
            add_gaussian_noise_to(noisy, std=z * self.clip_norm, source=self.noise_source)
        else:
            z = effective_noise_multiplier(noise_multiplier=self.noise_multiplier,
                                           expected_clients=self.expected_clients, included_clients=fold.clients)
            noisy = fold.total
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

    The floating-point arrays travel as ONE flat float64 vector (in the global record's key order): a reply is
    flattened once, and its update, norm, clip and sum are a handful of vector operations instead of several per
    tensor (issue 13: per-tensor calls cost more than the arithmetic on a small model). :meth:`new_model` splits a
    vector back into the global model's tensors. Integer arrays (counters such as BatchNorm's
    ``num_batches_tracked``) carry no noise, so they are left out of the update and keep the global value.
    """

    def __init__(self, base: ArrayRecord, *, clip_norm: float | None) -> None:
        self.base = record_to_numpy(base)
        self.floating = [k for k, v in self.base.items() if np.issubdtype(v.dtype, np.floating)]
        self.flat_base = _flat([self.base[k] for k in self.floating])
        self.clip_norm = clip_norm
        self.total = np.zeros(self.flat_base.size)
        self.clients = 0.0
        self.clipped = 0

    def add(self, arrays: ArrayRecord, clients: float) -> None:
        local = []
        for key in self.floating:
            value = to_numpy(arrays[key], copy=False)
            if value.shape != self.base[key].shape:
                raise ProtocolError(f"reply array {key!r} has shape {value.shape}, the global model's is "
                                    f"{self.base[key].shape}: wrap this strategy in UpdateValidation")
            local.append(value)
        update = _flat(local)
        np.subtract(update, self.flat_base, out=update)
        if self.clip_norm is not None:
            update, norm = clip_vector(update, clip_norm=self.clip_norm)
            self.clipped += int(norm > self.clip_norm)
        # Under SecAgg+ a reply is the mean of `clients` updates: its share of the sum is clients x mean.
        np.add(self.total, update * clients if clients != 1.0 else update, out=self.total)
        self.clients += clients

    def new_model(self, noisy_sum: NDArray[np.float64], denominator: float) -> ArrayRecord:
        """``w_global + noisy_sum / denominator`` as an ArrayRecord in the global model's keys, dtypes and shapes."""
        new = self.flat_base + noisy_sum / denominator
        out: dict[str, Array] = {}
        offset = 0
        floating = set(self.floating)
        for key, value in self.base.items():
            if key not in floating:  # an integer array: keeps the global value
                out[key] = from_numpy(value)
                continue
            piece = new[offset : offset + value.size].reshape(value.shape)
            offset += value.size
            out[key] = from_numpy(piece.astype(value.dtype, copy=False))
        return array_record(out)


def _flat(arrays: list[NDArray[Any]]) -> NDArray[np.float64]:
    """The arrays' entries, in order, as one new float64 vector (exact: every float widens to float64)."""
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.ravel(a) for a in arrays], dtype=np.float64)


def _records(msg: Message) -> tuple[ArrayRecord, MetricRecord]:
    if len(array_records(msg.content)) != 1 or len(metric_records(msg.content)) != 1:
        raise ProtocolError("a train reply must carry one ArrayRecord and one MetricRecord: wrap this strategy in "
                            "UpdateValidation so malformed replies are rejected before they get here")
    return next(iter(array_records(msg.content).values())), next(iter(metric_records(msg.content).values()))


def _average_metrics(records: list[MetricRecord], weight_key: str) -> MetricRecord:
    """Flower's weighted metric average (``aggregate_metricrecords``: the weight key left out, lists averaged entry
    by entry, the same arithmetic in the same order), read through plain dicts; an empty record when a weight is
    not > 0 (Flower's would divide by 0) or the metrics do not line up.

    Why not Flower's own: it wants a RecordDict per reply and reads each through synced views, 0.3 ms a round on
    the released round's critical path (issue 13)."""
    contents = [dict(record) for record in records]
    weights = [content.get(weight_key, 0) for content in contents]
    if not all(isinstance(w, (int, float)) and w > 0 for w in weights):
        return MetricRecord()
    total = sum(weights)
    out: dict[str, Any] = {}
    try:
        for content, weight in zip(contents, weights, strict=True):
            factor = weight / total
            for key, value in content.items():
                if key == weight_key:
                    continue
                if isinstance(value, list):
                    scaled = [v * factor for v in value]
                    out[key] = scaled if key not in out else [c + v for c, v in zip(out[key], scaled, strict=True)]
                else:
                    out[key] = value * factor if key not in out else out[key] + value * factor
        return MetricRecord(out)
    except (TypeError, ValueError, KeyError):
        return MetricRecord()
