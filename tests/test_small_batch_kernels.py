"""Small CPU batches train and test on PyTorch's native convolution kernels (``fedshield.training``): the switch is
on exactly for a CPU batch under :data:`SMALL_BATCH_ELEMENTS` elements without bf16 autocast, is restored after
(an error included), and gives the same training as oneDNN's kernels up to float rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedshield.dataspec import Dataset
from fedshield.tasks import get_task
from fedshield.training import SMALL_BATCH_ELEMENTS, evaluate, make_generator, small_batch_kernels, train_plain

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize(("device", "elements", "amp", "native"), [
    (CPU, SMALL_BATCH_ELEMENTS - 1, False, True),
    (CPU, SMALL_BATCH_ELEMENTS, False, False),
    (CPU, 6, True, False),  # bf16 autocast's CPU kernels are oneDNN's
    (torch.device("meta"), 6, False, False),  # not a CPU
])
def test_the_switch_is_on_only_for_a_small_cpu_batch(device: torch.device, elements: int, amp: bool,
                                                      native: bool) -> None:
    assert torch.backends.mkldnn.enabled
    with small_batch_kernels(device, elements, amp=amp):
        assert torch.backends.mkldnn.enabled is not native
    assert torch.backends.mkldnn.enabled


def test_the_switch_is_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with small_batch_kernels(CPU, 6):
            raise RuntimeError("boom")
    assert torch.backends.mkldnn.enabled


def _digits(rows: int) -> Dataset:
    data = get_task("digits").load_bundled()
    return Dataset(data.x[:rows], data.y[:rows])


def test_a_simulated_clients_round_uses_native_kernels_and_trains_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("digits")
    data = _digits(12)  # batch 6 of 8x8 images: 384 elements
    seen: list[bool] = []
    ours = task.in_channels_last(task.new_model(0))
    for module in ours.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    train_plain(ours, data, sample_rate=0.5, epochs=2, lr=0.5, loss_fn=task.loss_fn(), generator=make_generator(1))
    assert seen and not any(seen) and torch.backends.mkldnn.enabled
    reference = task.in_channels_last(task.new_model(0))
    monkeypatch.setattr("fedshield.training.SMALL_BATCH_ELEMENTS", 0)  # oneDNN for every batch
    train_plain(reference, data, sample_rate=0.5, epochs=2, lr=0.5, loss_fn=task.loss_fn(),
                generator=make_generator(1))
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # same steps, the kernels' rounding only
    seen.clear()
    loss, acc = evaluate(ours, data, task.loss_fn())  # one batch of 12 rows x 64 = 768 elements
    assert seen == [True, True] and np.isfinite(loss) and 0 <= acc <= 1  # under the patch: oneDNN, both convs
    monkeypatch.undo()
    seen.clear()
    assert evaluate(ours, data, task.loss_fn()) == pytest.approx((loss, acc), rel=1e-5)
    assert seen == [False, False]  # two convolutions of one batch, on native kernels


def test_overlapping_blocks_restore_the_switch_when_the_last_one_leaves() -> None:
    first, second = small_batch_kernels(CPU, 6), small_batch_kernels(CPU, 6)  # e.g. two threads' blocks
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first to enter leaves first: the other is still inside
    assert not torch.backends.mkldnn.enabled
    second.__exit__(None, None, None)
    assert torch.backends.mkldnn.enabled
