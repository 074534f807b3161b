"""The server's half of record-level distributed DP: decode the SecAgg+ field sum and take one DP-SGD step.

The unmasked sum is the sites' summed clipped per-record gradients plus the Skellam noise of at least
``min_honest`` sites (:mod:`fedshield.privacy.skellam`). Dividing by the *expected* batch size over the union
(``q * N``, a public setting) and stepping is exactly Opacus' DP-SGD step on the union of the sites' records
(``loss_reduction="mean"``); everything here is post-processing of the accounted noisy sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from ..flower_internals.secagg import factor_extract
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from numpy.typing import NDArray

from ..protocol import RoundSettings
from ..privacy.rotation import RandomizedHadamard
from ..errors import PrivacyError
from ..privacy.skellam import SkellamPlan, decode_sum
from ..privacy.skellam_round import round_plan, round_rotation
from ._secagg_stages import MaskedReply, RoundState, Vector
from ._secagg_fold import FieldSum
from .secagg import SecAggPlus

__all__ = ["dp_sgd_step", "DistributedSecAggPlus"]


def dp_sgd_step(
    params: dict[str, NDArray[np.floating]], field_sum: NDArray[np.integer], plan: SkellamPlan,
    rotation: RandomizedHadamard, *, lr: float, expected_batch: float,
) -> dict[str, NDArray[np.floating]]:
    """New trainable parameters (same keys, order and dtypes as ``params``, the model's trainable ones in order)."""
    if not expected_batch > 0:
        raise PrivacyError(f"the expected batch size over the union must be > 0, got {expected_batch}")
    gradient = decode_sum(field_sum, plan, rotation) / expected_batch
    total = sum(int(v.size) for v in params.values())
    if total != gradient.size:
        raise PrivacyError(f"the decoded sum has {gradient.size} entries, the model's trainable parameters {total}")
    out, start = {}, 0
    for key, value in params.items():
        step = gradient[start:start + value.size].reshape(value.shape)
        out[key] = (value.astype(np.float64) - lr * step).astype(value.dtype)
        start += value.size
    return out


class DistributedSecAggPlus(SecAggPlus):
    """SecAgg+ whose masked vectors are Skellam field vectors: the unmasked sum is decoded and stepped on once.

    ``settings_for(round)`` gives the public round settings the sites planned with; ``param_keys`` the model's
    trainable parameters in order (the flat vector's layout). A round in which fewer than ``min_honest`` sites'
    vectors arrived is not released (the sites refuse to unmask it too: :mod:`fedshield.client.secaggplus`).
    """

    def __init__(self, inner: Strategy, *, settings_for: Callable[[int], RoundSettings], param_keys: list[str],
                 expected_batch: float, **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        self.settings_for, self.param_keys, self.expected_batch = settings_for, list(param_keys), expected_batch
        self._settings: RoundSettings | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._settings = self.settings_for(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def _plan(self) -> tuple[SkellamPlan, RandomizedHadamard]:
        if self._settings is None:
            raise PrivacyError("distributed DP: no round configured")
        dim = sum(int(self._require_global()[k].numpy().size) for k in self.param_keys)
        return round_plan(self._settings, dim), round_rotation(self._settings, dim)

    def _vector_shapes(self) -> list[tuple[int, ...]]:
        return [(self._plan()[0].padded_dim,)]

    def _secure_average(self, state: RoundState, masked: dict[int, MaskedReply], field: FieldSum) -> Vector | None:
        need = self._settings.min_honest if self._settings is not None else 0
        if len(masked) < need:
            self._aborted = (f"{len(masked)} sites' vectors arrived, fewer than min-honest {need}: the sum would "
                             "carry too little noise; not released")
            return None
        return super()._secure_average(state, masked, field)

    def _decode(self, state: RoundState, unmasked: Vector, num_included: int) -> tuple[int, Vector]:
        q_total, body = factor_extract(unmasked)
        plan_, rotation = self._plan()
        settings = self._settings
        lr = settings.lr if settings is not None else 0.0
        base = {k: v.numpy() for k, v in self._require_global().items()}
        stepped = dp_sgd_step({k: base[k] for k in self.param_keys}, body[0], plan_, rotation, lr=lr,
                              expected_batch=self.expected_batch)
        average = [np.asarray(stepped[k], dtype=np.float64) - base[k] if k in stepped else np.zeros(base[k].shape)
                   for k in base]
        return int(q_total), average
