"""The memo of Opacus' per-order RDP (``fedshield/privacy/rdp_memo.py``) changes no epsilon and no calibration,
and leaves Opacus as it found it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp
from opacus.accountants.utils import get_noise_multiplier
from threadpoolctl import threadpool_limits

from fedshield.privacy import accounting, calibration_cache
from fedshield.privacy.rdp_memo import memoised_rdp

HISTORIES = [
    [(1.283, 0.5, 12)],
    [(0.9, 0.02, 300)],
    [(1.1, 0.1, 40), (2.0, 0.05, 10)],  # heterogeneous: two PRVs, one domain
]


def _opacus_epsilon(history: list[tuple[float, float, int]], accountant: str) -> float:
    """Opacus' epsilon on one BLAS thread, as fedshield runs it (the thread count alone moves the last bit of the
    PRV's mesh sums)."""
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with threadpool_limits(limits=1, user_api="blas"):
        return float(acc.get_epsilon(delta=1e-5))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("history", HISTORIES, ids=["digits-default", "small-q", "mixed"])
def test_epsilon_is_bit_for_bit_opacus_own(history: list[tuple[float, float, int]], accountant: str) -> None:
    plain = _opacus_epsilon(history, accountant)  # Opacus alone, no memo installed
    with memoised_rdp():
        first = _opacus_epsilon(history, accountant)
        again = _opacus_epsilon(history, accountant)  # now from the memo
    assert first == again == plain
    accounting._epsilon_cached.cache_clear()
    assert accounting.epsilon(history, delta=1e-5, accountant=accountant) == plain


def test_calibration_is_opacus_get_noise_multiplier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(calibration_cache.CACHE_ENV, str(tmp_path))  # computed here, not remembered
    accounting.calibrate_noise_multiplier.cache_clear()
    kwargs = dict(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, steps=8, accountant="prv",
                  epsilon_tolerance=0.01)
    with threadpool_limits(limits=1, user_api="blas"):
        plain = get_noise_multiplier(**kwargs)
    memoised = accounting.calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=0.25, steps=8)
    assert memoised == plain


def test_the_memo_is_installed_only_inside_the_block_and_nests() -> None:
    original = rdp._compute_rdp
    with memoised_rdp():
        memo = rdp._compute_rdp
        assert memo is not original and memo.__wrapped__ is original  # lru_cache over Opacus' own function
        with memoised_rdp():
            assert rdp._compute_rdp is memo
        assert rdp._compute_rdp is memo
    assert rdp._compute_rdp is original
    with pytest.raises(RuntimeError), memoised_rdp():
        raise RuntimeError("restored on the way out of an error too")
    assert rdp._compute_rdp is original


def test_if_opacus_drops_the_function_the_memo_steps_aside_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Opacus without ``_compute_rdp`` (renamed in a release): the block installs nothing, leaves the module as
    it was, and says once that accounting runs unmemoised."""
    import warnings

    from fedshield.privacy import rdp_memo

    monkeypatch.delattr(rdp, "_compute_rdp")
    monkeypatch.setattr(rdp_memo, "_warned", [])
    with pytest.warns(RuntimeWarning, match="unmemoised"), memoised_rdp():
        assert not hasattr(rdp, "_compute_rdp")
    assert not hasattr(rdp, "_compute_rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second entry must not warn again
        with memoised_rdp():
            pass


def test_canary_opacus_looks_the_function_up_at_call_time() -> None:
    """What the memo relies on: ``compute_rdp`` calls the module-level ``_compute_rdp`` by name (so replacing the
    module attribute reaches it), and the PRV accountant sizes its domain through ``RDPAccountant``."""
    assert "_compute_rdp(" in inspect.getsource(rdp.compute_rdp)
    assert list(inspect.signature(rdp._compute_rdp).parameters) == ["q", "sigma", "alpha"]
    from opacus.accountants.analysis.prv import domain

    assert "RDPAccountant()" in inspect.getsource(domain.compute_safe_domain_size)
