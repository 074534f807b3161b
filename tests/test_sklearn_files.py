"""The bundled data read without scikit-learn is scikit-learn's, array for array (a canary for a release that
changes the files or their parsing), and a missing file falls back to scikit-learn's own loader."""

from __future__ import annotations

import numpy as np
import pytest

from fedshield.tasks import sklearn_files


@pytest.mark.parametrize(("ours", "theirs"), [("digits_arrays", "load_digits"),
                                              ("breast_cancer_arrays", "load_breast_cancer")])
def test_arrays_equal_scikit_learns_loader(ours: str, theirs: str) -> None:
    import sklearn.datasets

    data, target = getattr(sklearn_files, ours)()
    raw = getattr(sklearn.datasets, theirs)()
    assert data.dtype == raw.data.dtype and data.shape == raw.data.shape
    np.testing.assert_array_equal(data, raw.data)
    np.testing.assert_array_equal(target, raw.target)
    assert target.dtype.kind == raw.target.dtype.kind == "i"


def test_a_moved_file_falls_back_to_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sklearn_files, "_data_file", lambda name: None)
    data, target = sklearn_files.digits_arrays()
    assert data.shape == (1797, 64) and target.shape == (1797,)


def test_reading_digits_does_not_import_scikit_learn() -> None:
    import subprocess
    import sys

    code = ("import sys; from fedshield.tasks.sklearn_files import digits_arrays; d, t = digits_arrays(); "
            "assert d.shape == (1797, 64); print(any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"
