"""A calibrated sigma remembered across processes (``fedshield/privacy/calibration_cache.py``) is Opacus' own, is
used only when Opacus' accountant re-checks it into the calibration band, and a cache that is forged, corrupt or
unwritable never changes a calibration."""

from __future__ import annotations

import functools
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from opacus.accountants import utils as opacus_utils
from threadpoolctl import threadpool_limits

from fedshield.privacy import accounting, calibration_cache
from fedshield.privacy.rdp_memo import memoised_rdp

TARGET = {"target_epsilon": 3.0, "delta": 1e-5, "sample_rate": 0.25, "steps": 8}


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "cache"
    monkeypatch.setenv(calibration_cache.CACHE_ENV, str(directory))
    accounting.calibrate_noise_multiplier.cache_clear()  # the in-process memo would hide the file
    yield directory
    accounting.calibrate_noise_multiplier.cache_clear()


@functools.cache
def _opacus_sigma() -> float:
    """Opacus' own calibration, once per module; under the RDP memo, which changes no value
    (``tests/test_rdp_memo.py``) and which the calibrations below then share."""
    with threadpool_limits(limits=1, user_api="blas"), memoised_rdp():
        return float(opacus_utils.get_noise_multiplier(
            target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, steps=8, accountant="prv",
            epsilon_tolerance=accounting.CALIBRATION_TOLERANCE))


def _entries(directory: Path) -> dict[str, float]:
    return json.loads((directory / "calibration.json").read_text())


def _forbid_bisection(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> float:
        raise AssertionError("calibrated again although a valid sigma was remembered")

    monkeypatch.setattr(opacus_utils, "get_noise_multiplier", refuse)


def test_a_calibration_is_remembered_privately_and_reused_without_a_bisection(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sigma = accounting.calibrate_noise_multiplier(**TARGET)
    assert sigma == _opacus_sigma()
    assert list(_entries(cache_dir).values()) == [sigma]
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((cache_dir / "calibration.json").stat().st_mode) == 0o600
    accounting.calibrate_noise_multiplier.cache_clear()  # as a new process would start
    _forbid_bisection(monkeypatch)
    assert accounting.calibrate_noise_multiplier(**TARGET) == sigma


@pytest.mark.parametrize("forged", [0.5, 50.0], ids=["too-little-noise", "too-much-noise"])
def test_a_forged_sigma_outside_the_band_is_recomputed_and_replaced(cache_dir: Path, forged: float) -> None:
    honest = accounting.calibrate_noise_multiplier(**TARGET)
    key = next(iter(_entries(cache_dir)))
    (cache_dir / "calibration.json").write_text(json.dumps({key: forged}))
    accounting.calibrate_noise_multiplier.cache_clear()
    assert accounting.calibrate_noise_multiplier(**TARGET) == honest
    assert _entries(cache_dir) == {key: honest}


def test_an_entry_of_another_opacus_version_or_target_is_not_used(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sigma = accounting.calibrate_noise_multiplier(**TARGET)
    key = json.loads(next(iter(_entries(cache_dir))))
    key[0] = "0.0.1"  # another Opacus
    (cache_dir / "calibration.json").write_text(json.dumps({json.dumps(key): sigma}))
    accounting.calibrate_noise_multiplier.cache_clear()
    calls: list[object] = []
    original = opacus_utils.get_noise_multiplier
    monkeypatch.setattr(opacus_utils, "get_noise_multiplier", lambda **kw: calls.append(kw) or original(**kw))
    assert accounting.calibrate_noise_multiplier(**TARGET) == sigma
    assert len(calls) == 1 and len(_entries(cache_dir)) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": "2.5"}', ""])
def test_a_corrupt_cache_is_ignored_and_rewritten(cache_dir: Path, content: str) -> None:
    cache_dir.mkdir(mode=0o700)
    (cache_dir / "calibration.json").write_text(content)
    assert accounting.calibrate_noise_multiplier(**TARGET) == _opacus_sigma()
    assert list(_entries(cache_dir).values()) == [_opacus_sigma()]


def test_an_unwritable_cache_never_fails_a_calibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(calibration_cache.CACHE_ENV, str(blocker / "cache"))
    accounting.calibrate_noise_multiplier.cache_clear()
    try:
        assert accounting.calibrate_noise_multiplier(**TARGET) == _opacus_sigma()
    finally:
        accounting.calibrate_noise_multiplier.cache_clear()


def test_the_default_place_is_the_users_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(calibration_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration_cache.cache_file() == tmp_path / "fedshield" / "calibration.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert calibration_cache.cache_file() == tmp_path / "home" / ".cache" / "fedshield" / "calibration.json"
