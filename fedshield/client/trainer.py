"""One client round: check and charge the privacy budget, then train or evaluate. No Flower types here, so the
same logic serves the ClientApp and the warm worker that `fedshield client` keeps running."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .. import protocol as P
from ..compression import quantize_update
from ..protocol import RoundSettings
from ..privacy.client_level_mechanism import SecureNormal, add_gaussian_noise, clip_update
from ..privacy.dpsgd import train_dp_sgd
from ..training import evaluate, make_generator, train_plain
from ..privacy.ledger import LEDGER_FILE, PrivacyLedger, charge_ledger
from ..privacy.secure_noise import SecureGaussian
from ..tasks.partial import check_frozen, is_partial, load_travelling, travelling_state
from .policy import ledger_terms
from .site import Site

__all__ = ["TrainOutcome", "train_round", "evaluate_round", "reply_metrics"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    """``payload``: what goes on the wire instead of ``state_dict`` when updates are compressed.

    ``metrics`` is exactly what the reply carries in clear (see :func:`reply_metrics`); ``train_loss`` stays on
    the site: under DP it is a noise-free statistic of the private records, so it never goes on the wire.
    """

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]
    payload: dict[str, np.ndarray] | None = None
    train_loss: float = float("nan")
    secure_noise: bool = False


def _generator(site: Site, settings: RoundSettings) -> torch.Generator:
    # Simulations are reproducible from --seed. A deployed client draws its sampling and noise seed from the OS
    # entropy pool, so nobody (the server included) can predict the noise it adds.
    if site.partition_id is None:
        return make_generator(None)
    return make_generator(hash((settings.seed, site.partition_id, settings.server_round)) & (2**62 - 1))


def _secure_noise(site: Site) -> SecureGaussian | None:
    # A deployed site draws its DP-SGD noise from a CSPRNG: nobody, the server included, can predict and subtract
    # it. A simulated client keeps torch's generator seeded from --seed (reproducible; its epsilon is nominal).
    return SecureGaussian() if site.partition_id is None else None


#: Models this process keeps between plain rounds and evaluations, by :func:`_model_key` (see :func:`_spare`).
_SPARE: dict[tuple[str, int, str, str], torch.nn.Module] = {}
#: A kept model's parameters by ``state_dict`` key, looked up once (see :func:`_spare`).
_PARAMS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def _model_key(site: Site, settings: RoundSettings) -> tuple[str, int, str, str]:
    return site.task.name, settings.seed, settings.frozen_digest, str(site.device)


def _model(site: Site, settings: RoundSettings, state: dict[str, torch.Tensor], *, plain: bool = False
           ) -> torch.nn.Module:
    """The task's model holding ``state``. ``plain``: for a round without DP-SGD or an evaluation, so a model
    :func:`_spare` kept serves if there is one, and a ``channels_last`` task's model is in that memory format
    (its convolutions and pooling run ~10% faster on a CPU; Opacus' per-sample gradients keep the default)."""
    model = _SPARE.pop(_model_key(site, settings), None) if plain else None
    if model is not None and _load_kept(model, state):
        return model
    if model is None:
        model = site.task.new_model(settings.seed)
        check_frozen(model, settings.frozen_digest, task=site.task.name)  # a partial model's frozen base must match
        model = model.to(site.device)
        if plain and site.task.channels_last:
            model = site.task.in_channels_last(model)
    load_travelling(model, state)
    return model


def _load_kept(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Copy ``state`` into a kept model's parameters (what ``load_state_dict`` does for a model whose whole state
    is its parameters); False, copying nothing, when the keys or a shape differ, so that
    :func:`~fedshield.tasks.partial.load_travelling` raises its own error."""
    params = _PARAMS.get(model)
    if params is None or state.keys() != params.keys():
        return False
    if any(params[k].shape != v.shape for k, v in state.items()):
        return False
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)
    return True


def _spare(site: Site, settings: RoundSettings, model: torch.nn.Module) -> None:
    """Keep ``model`` for this process's next plain round or evaluation of the same task.

    Why: building the task's model draws its random initial weights only for :func:`_model` to overwrite them, a
    millisecond of a simulated client's few (issue 13). Only a CPU model whose whole state travels is kept
    (loading the next round's weights then leaves nothing of this round behind; building a model also seeds the
    CUDA generators, which a GPU round keeps relying on) and never one DP-SGD trained (Opacus hooks its layers).
    A kept model whose state is plain parameters (:func:`_plain_parameters`) also keeps them by key, so the next
    load and read of its weights skip ``state_dict``'s walk of the module tree: 0.15 ms of a simulated client's 2.6
    (issue 13).
    """
    params = _PARAMS.get(model)
    if params is None:
        if (site.device.type != "cpu" or is_partial(model)
                or any(m._non_persistent_buffers_set for m in model.modules())):
            return
        if _plain_parameters(model):
            params = _PARAMS[model] = dict(model.state_dict(keep_vars=True))
    for param in (params.values() if params is not None else model.parameters()):
        param.grad = None
    _SPARE.clear()  # one model at most: a long-lived warm worker serves run after run
    _SPARE[_model_key(site, settings)] = model


def _plain_parameters(model: torch.nn.Module) -> bool:
    """True when ``state_dict(keep_vars=True)`` is exactly the model's parameters, each under one key, and
    ``load_state_dict`` would only copy into them: no buffers (a module may replace a buffer object), no tied
    parameters (their keys' values would race), and no module with its own state-dict loading, extra state or
    state-dict hooks (which the direct copy would skip)."""
    if next(model.buffers(), None) is not None:
        return False
    base = torch.nn.Module
    for module in model.modules():
        kind = type(module)
        if (kind._load_from_state_dict is not base._load_from_state_dict
                or kind.get_extra_state is not base.get_extra_state
                or module._state_dict_hooks or module._state_dict_pre_hooks or module._load_state_dict_pre_hooks
                or module._load_state_dict_post_hooks):
            return False
    state = model.state_dict(keep_vars=True)
    distinct = len({id(v) for v in state.values()}) == len(state)
    return distinct and all(isinstance(v, torch.nn.Parameter) for v in state.values())


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained weights that travel as fresh, contiguous CPU tensors (whatever the model's memory format): what
    the codec, client-level DP and compression expect."""
    tensors = _PARAMS.get(model) or travelling_state(model)
    return {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for k, v in tensors.items()}


def train_round(site: Site, settings: RoundSettings, global_state: dict[str, torch.Tensor]) -> TrainOutcome:
    """Train one round; raises :class:`BudgetExhaustedError` (after recording the refusal) instead of overspending."""
    metrics = reply_metrics(site, settings)
    model = _model(site, settings, global_state, plain=not settings.dp)
    generator = _generator(site, settings)
    loss_fn = site.task.loss_fn()
    if settings.dp and settings.dp_mode == "distributed":  # the site sends Skellam field integers, never weights
        from .distributed_round import distributed_train_round

        vector, extra = distributed_train_round(site, settings, global_state, generator)
        return TrainOutcome(global_state, {**metrics, **extra}, {P.SKELLAM_FIELD: vector}, secure_noise=True)
    if settings.dp:
        ledger = _charge(site, settings)
        result = train_dp_sgd(
            model, site.train, noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
            sample_rate=settings.sample_rate, epochs=settings.local_epochs, lr=settings.lr, loss_fn=loss_fn,
            generator=generator, grad_sample_mode=settings.grad_sample_mode, proximal_mu=settings.proximal_mu,
            device=site.device, max_physical_batch_size=settings.max_physical_batch_size, amp=settings.amp,
            secure_noise=_secure_noise(site),
        )
        metrics.update({P.EPSILON: ledger.epsilon, P.STEPS: float(ledger.steps), P.ROUNDS_TRAINED: float(len(ledger.rounds))})
        metrics[P.DELTA] = ledger.delta  # the delta this site accounted at (its own, under a site policy)
    else:
        result = train_plain(
            model, site.train, sample_rate=settings.sample_rate, epochs=settings.local_epochs, lr=settings.lr,
            loss_fn=loss_fn, generator=generator, proximal_mu=settings.proximal_mu, device=site.device,
            amp=settings.amp,
        )
    if not settings.dp:
        metrics[P.TRAIN_LOSS] = result.mean_loss  # no guarantee to keep without DP: the loss helps debugging
    state = _cpu_state(model)
    if not settings.dp:
        _spare(site, settings, model)
    if settings.client_dp == "distributed":
        state = _client_level_dp(state, global_state, settings, site, generator)
    payload = _compress(state, global_state, settings, generator) if settings.quantize else None
    return TrainOutcome(state, metrics, payload, result.mean_loss, result.secure_noise)


def reply_metrics(site: Site, settings: RoundSettings) -> dict[str, float]:
    """What a train reply says in clear besides the (noised) weights; docs/PRIVACY.md lists it.

    Under record-level or client-level DP the weight is the public constant :data:`~fedshield.protocol.
    PUBLIC_WEIGHT` (FedAvg averages sites uniformly): the exact record count would tell an add/remove neighbour
    apart, and under client-level DP an example-count weight would let one client's influence exceed C/n. Only
    ``--no-dp`` runs, which promise nothing, send the count. The ledger figures (epsilon, steps, rounds) are
    functions of public mechanism parameters and of the site's participation, never of its records.
    """
    private = settings.dp or settings.client_dp != "off"
    metrics = {P.NUM_EXAMPLES: P.PUBLIC_WEIGHT if private else float(len(site.train))}
    if site.partition_id is not None:  # simulation only: the partition id is the server's own choice
        metrics[P.PARTITION_ID] = float(site.partition_id)
    return metrics


def _client_level_dp(
    state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor], settings: RoundSettings, site: Site,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Distributed client-level DP: clip ``w_local - w_global`` to C and add this client's noise share.

    Runs before the reply leaves the handler, so under SecAgg+ (whose mod wraps the handler) the update is
    clipped and noised before it is masked. Integer buffers go back unchanged from the global model: they cannot
    carry noise. A deployed client draws the noise from the OS CSPRNG; a simulated one from a generator seeded
    like its training, so simulations stay reproducible from --seed.
    """
    floating = [k for k, v in state.items() if v.is_floating_point()]
    update = {k: (state[k].double() - global_state[k].double()).numpy() for k in floating}
    clipped, _ = clip_update(update, clip_norm=settings.client_clip_norm)
    source = SecureNormal() if site.partition_id is None else np.random.default_rng(
        int(torch.randint(0, 2**62, (1,), generator=generator)))
    noisy = add_gaussian_noise(clipped, std=settings.client_noise_std_share, source=source)
    out = {k: global_state[k].detach().clone() for k in state}
    for key in floating:
        out[key] = (global_state[key].double() + torch.from_numpy(noisy[key])).to(state[key].dtype)
    return out


def _compress(
    state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor], settings: RoundSettings,
    generator: torch.Generator,
) -> dict[str, np.ndarray]:
    """Quantize the update ``w_local - w_global`` (after any DP noise: post-processing keeps the guarantee)."""
    update = {k: (state[k] - global_state[k]).numpy() if state[k].is_floating_point() else state[k].numpy()
              for k in state}
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return quantize_update(update, bits=settings.quantize, rng=rng)


def _charge(site: Site, settings: RoundSettings) -> PrivacyLedger:
    # A deployed site charges at its own accountant, delta and budget, whatever the round config says. Write-ahead
    # and locked: the spend is on disk before any data is touched (a crash can only over-count), and two processes
    # sharing this state directory never lose a charge.
    accountant, delta, budget = ledger_terms(site.policy, accountant=settings.accountant, delta=settings.delta,
                                             target_epsilon=settings.target_epsilon, site_budget=site.budget)
    return charge_ledger(
        site.state_dir / LEDGER_FILE, accountant=accountant, delta=delta, budget=budget,
        noise_multiplier=settings.noise_multiplier, sample_rate=settings.sample_rate, steps=settings.steps_per_round,
        run_id=settings.run_id, server_round=settings.server_round,
    )


def evaluate_round(site: Site, settings: RoundSettings, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
    model = _model(site, settings, global_state, plain=True)
    loss, acc = evaluate(model, site.test, site.task.loss_fn(), device=site.device)
    _spare(site, settings, model)
    return {P.NUM_EXAMPLES: float(len(site.test)), P.EVAL_LOSS: loss, P.EVAL_ACCURACY: acc}
