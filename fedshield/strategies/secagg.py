"""SecAgg+ secure aggregation as a wrapper around any Message-API strategy.

Flower 1.39 ships SecAgg+ only for its legacy API (``SecAggPlusWorkflow``). :class:`SecAggPlus` runs the same
protocol from inside a Message-API :class:`~flwr.serverapp.strategy.Strategy`, so ``strategy.start()`` keeps owning
the round loop and the inner strategy (FedAvg, FedAvgM, FedAdam, ...) keeps its server-side logic.

Clients must run fedshield's port of Flower's ``secaggplus_mod`` (:mod:`fedshield.client.secaggplus`: signed
round keys, ChaCha20 masks) around fedshield's adapter, and fedshield's wire mod around both (without it every
field still works, at Flower's int64 on the wire)::

    @app.train(mods=[secagg_wire_mod, secaggplus_mod, secagg_adapter_mod])

The adapter sends the *difference* between the client's new weights and the global weights it received, so the
server learns only the weighted average of the updates of the nodes that finished the round, never one node's
update. What does travel in clear: each node's example count and its privacy-ledger figures
(see :mod:`fedshield.client.secagg_mod`).

Compressed updates (``quantize`` 8 or 16, or a round config asking for them) are quantised into the field itself:
2**bits - 1 levels per client and the smallest modulus that holds the sum of the sampled clients' values
(:func:`fedshield.compression.secagg_field`); the masked vectors then travel in the narrowest unsigned type that
holds the modulus instead of Flower's int64; so does the full-precision field (2**32: uint32). Clients add their DP
noise before any of this.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..arrays import to_numpy
from ..flower_internals.secagg_keys import Stage
from ..compression import secagg_field
from ..errors import ConfigError, ProtocolError
from ..protocol import ARRAYS, METRICS, NUM_EXAMPLES, ClientReply, round_config_key
from ._secagg_params import ProtocolParams, check_bits, check_params, neighbour_graph, protocol_params
from ._secagg_clear import average_clear_metrics, check_masked_clear, reply_outcomes
from ._secagg_fold import FieldSum, fold_masked_replies, remove_masks
from .clear_values import DEFAULT_MAX_WEIGHT
from .outcomes import RoundOutcomes
from ._secagg_pipeline import ask_next_keys, next_round, next_round_records, settle_next_round, tap_next_keys
from ._secagg_stages import (
    MaskedReply,
    RoundState,
    Vector,
    collect_messages,
    common_arrays,
    contents_by_node,
    needed_owners,
    run_setup,
    run_share_keys,
    run_unmask,
    weighted_average,
)
from .wrapper import StrategyWrapper

__all__ = ["SecAggPlus"]

_log = logging.getLogger(__name__)

#: Round config key (``fedshield.protocol.RoundSettings.quantize``) with the bits per value the run compresses to.
QUANTIZE_KEY = "quantize"

#: Default ``clipping_range`` per field (bits per value; 0: the full-precision field). The clipped entry is the
#: weighted update ``delta * num_examples / max_weight``; in the default run (digits, DP eps 8, 230 examples per
#: client, max_weight 1000) those entries have std 0.0225 and reached 0.111 at most over 20 rounds x 5 clients,
#: dominated by the DP noise. 8 bits: +-0.25 leaves 2.2x headroom over that maximum (11 std), and its step of
#: 0.5/255 adds rounding noise of std <= 0.001, +0.2% to the variance of the entries. 16 bits keep the
#: full-precision field's +-8 (72x headroom): its step of 16/65535 adds +0.003% to that variance.
DEFAULT_CLIPPING_RANGE = {0: 8.0, 8: 0.25, 16: 8.0}


class SecAggPlus(StrategyWrapper):
    """Secure aggregation (SecAgg+, Bell et al. 2020) around a Message-API strategy.

    Each round runs four stages: SETUP and SHARE_KEYS inside :meth:`configure_train`, COLLECT_MASKED_VECTORS as
    the round's train messages, UNMASK inside :meth:`aggregate_train`. With ``pipeline`` (the default), a round
    that trains every connected node also runs the next round's SETUP and SHARE_KEYS inside its own last two
    messages (:mod:`._secagg_pipeline`), so the next round, if it samples the same nodes, sends two messages per
    node instead of four. The inner strategy then aggregates a
    single synthetic reply holding the new global arrays, so its own server logic (momentum, adaptive
    optimisers) applies on top.

    Privacy contract: an honest-but-curious server learns the sum of the included clients' quantised, clipped,
    weighted updates and nothing else of them, as long as fewer than ``threshold`` neighbours of a node collude
    with it (a threshold above half the shares also stops a server that lies about who dropped). Example counts
    and ledger figures travel in clear. Against a malicious server: clients with a roster sign their round keys
    and verify every peer's (:mod:`fedshield.crypto.secagg_auth`), so a substituted key makes them refuse the
    round; masks come from a CSPRNG keyed by the whole secret (:mod:`fedshield.crypto.prg`). A server that lies
    about who dropped can still, with a threshold at or below half, rebuild both secrets of a node. It is not
    differential privacy: combine it with DP-SGD.

    Args:
        inner: the strategy that samples nodes and turns the averaged update into the new global model. Its
            train messages must carry the global model under ``"arrays"``.
        num_shares: neighbours (including the node) that hold shares of each node's secrets: an int >= 3,
            or a fraction in (0, 1] of the sampled nodes.
        reconstruction_threshold: shares needed to rebuild a secret: an int >= 2, or a fraction in (0, 1] of
            ``num_shares`` (at least 2). Higher is safer, lower tolerates more dropouts.
        clipping_range: each weighted update entry, ``delta * num_examples / max_weight``, is clipped to
            +-clipping_range before quantisation. None: :data:`DEFAULT_CLIPPING_RANGE` for the round's field.
            Fit it to the update scale: the quantisation step is ``2 * clipping_range / quantization_range``.
        quantization_range: quantisation levels over [-clipping_range, clipping_range] of the full-precision
            field (rounds without ``quantize``).
        modulus_range: size of the full-precision field the masks live in, a power of two; at most
            ``(modulus_range - 1) // quantization_range`` nodes can be sampled per round.
        quantize: 8 or 16: quantise into a field sized for that many bits per value (see the module
            docstring); 0: the full-precision field; None: what each round's train config asks for
            (:data:`QUANTIZE_KEY`, 0 if absent). Either way, clients are sent ``quantize = 0``: the field does the
            quantisation, a client compressing its update as well would do it twice.
        max_weight: the largest example count a client should report. Larger counts still aggregate but their
            updates are clipped at ``clipping_range * max_weight / num_examples``; a max_weight far above the real
            counts coarsens quantisation by the same factor. A count the field cannot hold (above its 1/n share of
            the modulus) drops that node from the round.
        timeout: seconds to wait for replies in SETUP, SHARE_KEYS and UNMASK (None: no limit). The train stage
            uses the ``timeout`` given to :meth:`start`.
        rng: randomness for the neighbour ring; defaults to the operating system's CSPRNG.
        weight_key, outcomes: the metric ``inner`` weights by; the run's round state, which holds ``last_replies``.
        pipeline: exchange the next round's keys one round ahead when every node trains (False: four messages
            per node and round, always).
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        num_shares: int | float = 1.0,
        reconstruction_threshold: int | float = 0.66,
        clipping_range: float | None = None,
        quantization_range: int = 2**22,
        modulus_range: int = 2**32,
        max_weight: float = DEFAULT_MAX_WEIGHT,
        timeout: float | None = 600.0,
        rng: random.Random | None = None,
        quantize: int | None = None,
        weight_key: str = NUM_EXAMPLES, outcomes: RoundOutcomes | None = None, pipeline: bool = True,
    ) -> None:
        if not isinstance(inner, Strategy):
            raise ConfigError(f"inner must be a flwr.serverapp.strategy.Strategy, got {type(inner).__name__}")
        check_params(num_shares, reconstruction_threshold, clipping_range, quantization_range, modulus_range,
                  max_weight, timeout)
        if quantize is not None:
            check_bits(quantize, "quantize")
        super().__init__(inner)
        self.num_shares = num_shares
        self.reconstruction_threshold = reconstruction_threshold
        self.clipping_range = None if clipping_range is None else float(clipping_range)
        self.quantize = quantize
        self.quantization_range = quantization_range
        self.modulus_range = modulus_range
        self.max_weight = float(max_weight)
        self.timeout = None if timeout is None else float(timeout)
        self._rng = rng if rng is not None else random.SystemRandom()
        self.weight_key = weight_key
        self.outcomes = outcomes if outcomes is not None else RoundOutcomes()
        self._grid: Grid | None = None
        self._round: RoundState | None = None
        self._global: ArrayRecord | None = None
        self._aborted: str | None = None
        self.pipeline = bool(pipeline)
        self._bits = 0
        #: One round ahead: the next round's keys asked for this round, as they arrive; the round they prepared.
        self._ahead, self._next_keys = False, dict[int, ConfigRecord]()
        self._prepared: RoundState | None = None

    @property
    def last_replies(self) -> list[ClientReply]:  # one per node sampled in the last aggregated round
        return self.outcomes.replies

    @last_replies.setter
    def last_replies(self, replies: list[ClientReply]) -> None:
        self.outcomes.settle(replies)

    # --- training -----------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample through the inner strategy, run SETUP and SHARE_KEYS, return the masked-vector requests.

        Raises ConfigError if the settings cannot work for the number of nodes sampled (fewer than 2, more than
        the field holds, or fewer than an integer threshold); returns no messages if too many nodes drop.
        """
        self._grid, self._round, self._aborted = grid, None, None
        prepared, self._prepared, self._ahead, self._next_keys = self._prepared, None, False, {}
        bits = self.quantize if self.quantize is not None else check_bits(config.get(QUANTIZE_KEY, 0), QUANTIZE_KEY)
        if config.get(QUANTIZE_KEY, 0):
            config = ConfigRecord({**config, QUANTIZE_KEY: 0})
        contents = contents_by_node(self.inner.configure_train(server_round, arrays, config, grid))
        if not contents:
            return []
        self._global, self._bits = common_arrays(contents), bits
        params = self._params(len(contents))
        if prepared is not None and (prepared.server_round, set(prepared.sampled), prepared.params) == \
                (server_round, set(contents), params):
            prepared.contents, self._round = contents, prepared
            _log.info("SecAgg+ round %d: %d nodes, keys exchanged one round ahead", server_round, len(contents))
            return self._masked_vector_requests(prepared, config, grid)
        if prepared is not None:
            _log.info("SecAgg+ round %d: the nodes or settings differ from those the keys exchanged one round ahead "
                      "were made for; full key exchange", server_round)
        state = RoundState(
            server_round, params, sampled=list(contents), contents=contents, active=set(contents),
            neighbours=neighbour_graph(contents, params.num_shares, self._rng),
        )
        self._round = state
        _log.info("SecAgg+ round %d: %d nodes, %d shares, threshold %d; %s field: %d levels in +-%g, modulus 2^%d",
                  server_round, params.num_samples, params.num_shares, params.threshold,
                  f"{bits}-bit" if bits else "full-precision", params.quantization_range, params.clipping_range,
                  params.modulus_range.bit_length() - 1)
        if not run_setup(grid, state, self.timeout):
            return self._abort(f"too few nodes left after stage {Stage.SETUP}")
        if not run_share_keys(grid, state, self.timeout):
            return self._abort(f"too few nodes left after stage {Stage.SHARE_KEYS}")
        return self._masked_vector_requests(state, config, grid)

    def _masked_vector_requests(self, state: RoundState, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Stage 2's requests; they ask for the next round's keys if it can be prepared (:mod:`._secagg_pipeline`):
        the config names the run's length and this is not its last round, and every connected node trains."""
        messages = collect_messages(state)
        last = config.get(round_config_key("num_rounds"))
        if self.pipeline and isinstance(last, int) and state.server_round < last and \
                set(state.sampled) == set(grid.get_node_ids()):
            ask_next_keys(messages, state.server_round + 1)
            self._ahead = True
        return messages

    def _params(self, num_nodes: int) -> ProtocolParams:
        """The protocol settings of a round of ``num_nodes`` in this round's field."""
        return protocol_params(num_nodes, num_shares=self.num_shares, threshold=self.reconstruction_threshold,
                               max_weight=self.max_weight, **self._field(self._bits, num_nodes))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked vectors and let the inner strategy aggregate the resulting average.

        Returns ``(None, None)`` (global model unchanged) if too few nodes survived; ``last_replies`` is filled
        either way.
        """
        state, self._round = self._round, None
        if state is None or state.server_round != server_round:
            self.last_replies = []
            replies = list(replies)
            if replies:
                _log.warning("SecAgg+ round %d: %d replies without a configured round; ignored",
                             server_round, len(replies))
            return None, None
        if self._aborted is not None:
            self.last_replies = reply_outcomes(state, {}, self._aborted)
            return None, None
        field = FieldSum(state.params.modulus_range)  # the running masked sum: O(model), not O(nodes x model)
        if self._ahead:
            replies = tap_next_keys(replies, self._next_keys)
        masked = self._read_replies(state, replies, field)
        average = self._secure_average(state, masked, field)
        if average is None:
            _log.error("SecAgg+ round %d aborted, global model unchanged: %s", server_round, self._aborted)
            self.last_replies = reply_outcomes(state, masked, self._aborted)
            return None, None
        self.last_replies = reply_outcomes(state, masked, None)
        reply = self._synthetic_reply(masked, average)
        del average  # float64, twice the model: not kept while the inner strategy aggregates
        return self.inner.aggregate_train(server_round, [reply])

    def _field(self, bits: int, num_samples: int) -> dict[str, Any]:
        """This round's clipping range, levels, modulus and wire type, for ``bits`` per value (0: full precision)."""
        clip = self.clipping_range if self.clipping_range is not None else DEFAULT_CLIPPING_RANGE[bits]
        if not bits:
            # Masked values are < modulus_range (2^32 by default): sending them as uint32 instead of Flower's int64
            # is lossless and halves every client's upload.
            return {"clipping_range": clip, "quantization_range": self.quantization_range,
                    "modulus_range": self.modulus_range, "narrow_wire": True}
        levels, modulus = secagg_field(bits, num_samples)
        return {"clipping_range": clip, "quantization_range": levels, "modulus_range": modulus, "narrow_wire": True}

    def _read_replies(self, state: RoundState, replies: Iterable[Message], field: FieldSum) -> dict[int, MaskedReply]:
        """Fold stage-2 replies into ``field`` as they arrive (:mod:`._secagg_fold`); a malformed one, or one whose
        clear figures fail the checks, leaves the node out (as dead)."""
        return fold_masked_replies(state, replies, self._vector_shapes(), field, lambda reply: self._check_clear(state, reply))

    def _check_clear(self, state: RoundState, reply: MaskedReply) -> str | None:
        reason = check_masked_clear(reply, state.params)
        if reason is not None:
            _log.warning("SecAgg+ round %d: dropped a node: %s", state.server_round, reason)
            return reason
        if reply.num_examples > self.max_weight:
            _log.warning(
                "SecAgg+ round %d: a node reported %d examples > max_weight %g, so its update was clipped "
                "at +-%g: raise max_weight to at least %d",
                state.server_round, reply.num_examples, self.max_weight,
                state.params.clipping_range * self.max_weight / reply.num_examples, reply.num_examples,
            )
        return None

    def _secure_average(self, state: RoundState, masked: dict[int, MaskedReply], field: FieldSum) -> Vector | None:
        """Run UNMASK and dequantise; None (with ``self._aborted`` set) if the round cannot complete."""
        included, p = set(masked), state.params
        q_expected = sum(p.q_ratio(r.num_examples) for r in masked.values())
        if len(included) < p.threshold or not state.enough_shares(needed_owners(state, included), included):
            self._aborted = f"{len(included)} masked vectors arrived, too few for threshold {p.threshold}"
            return None
        if q_expected >= p.modulus_range or q_expected <= 0:
            self._aborted = (f"summed weight {q_expected} is outside (0, modulus_range {p.modulus_range}): "
                             "check the reported example counts against max_weight")
            return None
        shares = self._unmask(state, included)
        if not remove_masks(field, shares, state, included):  # in place: the sum is the only copy
            self._aborted = f"too few key shares arrived in stage {Stage.UNMASK}"
            return None
        q_total, average = self._decode(state, field.value(), len(included))
        field.total = None  # the field sum is spent: free it before the new model is built beside the average
        if q_total != q_expected:
            # The masked weights must add up to what the clients declared in clear; anything else means a
            # client lied about its count, or masks were not removed cleanly. Never apply such a sum.
            self._aborted = f"integrity check failed: masked weights sum to {q_total}, declared {q_expected}"
            return None
        return average

    def _unmask(self, state: RoundState, included: set[int]) -> dict[int, list[bytes]]:
        """Stage 3, with the next round's SETUP settings and SHARE_KEYS when its keys were asked for."""
        upcoming = None
        if self._ahead:
            try:
                upcoming = next_round(state, included, self._next_keys, self._params(len(included)), self._rng)
            except ConfigError as exc:  # too few nodes for the settings: the next round configures itself
                _log.info("SecAgg+ round %d: no key exchange one round ahead: %s", state.server_round, exc)
        ahead = next_round_records(upcoming) if upcoming is not None else None
        shares, replies = run_unmask(self._require_grid(), state, included, self.timeout, ahead)
        self._prepared = settle_next_round(upcoming, replies) if upcoming is not None else None
        return shares

    def _vector_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of a masked vector's arrays (after the weight): the global model's. A hook for subclasses."""
        return [tuple(arr.shape) for arr in self._require_global().values()]

    def _decode(self, state: RoundState, unmasked: Vector, num_included: int) -> tuple[int, Vector]:
        """(summed weight, average update per global array) from the unmasked field sum. A hook for subclasses."""
        return weighted_average(unmasked, state.params, num_included)

    def _synthetic_reply(self, masked: dict[int, MaskedReply], average: Vector) -> Message:
        """One reply carrying ``global + average update``, for the inner strategy to aggregate."""
        base = self._require_global()
        new = {k: Array(_add_update(g, d)) for (k, g), d in zip(_numpy_items(base), average, strict=True)}
        metrics = MetricRecord()
        metrics.update(average_clear_metrics(list(masked.values())))
        metrics[self.weight_key] = sum(r.num_examples for r in masked.values())
        content = RecordDict({ARRAYS: ArrayRecord(new), METRICS: metrics})
        return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)

    def _abort(self, reason: str) -> list[Message]:
        self._aborted = reason
        _log.error("SecAgg+ round aborted before training, global model unchanged: %s", reason)
        return []

    def _require_grid(self) -> Grid:
        if self._grid is None:
            raise ProtocolError("aggregate_train was called before configure_train: call strategy.start()")
        return self._grid

    def _require_global(self) -> ArrayRecord:
        if self._global is None:
            raise ProtocolError("aggregate_train was called before configure_train: call strategy.start()")
        return self._global

    # --- evaluation and reporting: the inner strategy's ---------------------------------------------------

    def summary(self) -> None:
        _log.info(
            "SecAgg+ around %s: num_shares=%s, reconstruction_threshold=%s, clipping_range=%s, "
            "quantization_range=%d, modulus_range=%d, max_weight=%g, timeout=%s, quantize=%s",
            type(self.inner).__name__, self.num_shares, self.reconstruction_threshold,
            "per field" if self.clipping_range is None else f"{self.clipping_range:g}",
            self.quantization_range, self.modulus_range, self.max_weight, self.timeout,
            "per round config" if self.quantize is None else self.quantize,
        )
        self.inner.summary()


# --- helpers ----------------------------------------------------------------------------------------------


def _numpy_items(record: ArrayRecord) -> list[tuple[str, np.ndarray[Any, Any]]]:
    return [(k, to_numpy(arr)) for k, arr in record.items()]


def _add_update(global_arr: np.ndarray[Any, Any], update: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    new = np.asarray(global_arr, dtype=np.float64) + update
    if np.issubdtype(global_arr.dtype, np.integer):
        new = np.rint(new)
    return np.asarray(new.astype(global_arr.dtype))
