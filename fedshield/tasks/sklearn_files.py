"""scikit-learn's bundled data files, read without importing scikit-learn.

Why: ``sklearn.datasets`` costs ~1.6 CPU-s to import, paid by every process that loads a built-in task (each
simulated run, each ServerApp), to read two small CSV files that ship inside the package. These readers parse the
same files the way ``load_digits`` and ``load_breast_cancer`` do (``tests/test_sklearn_files.py`` checks they are
equal, array for array); if a scikit-learn release moves the files, the loaders fall back to scikit-learn's own.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["digits_arrays", "breast_cancer_arrays"]


def _data_file(name: str) -> Path | None:
    spec = importlib.util.find_spec("sklearn")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    return path if path.is_file() else None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits()``'s ``(data, target)``: 1,797 rows of 64 pixels (0..16) and their labels."""
    path = _data_file("digits.csv.gz")
    if path is None:
        from sklearn.datasets import load_digits

        raw = load_digits()
        return raw.data, raw.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int, copy=False)


def breast_cancer_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``load_breast_cancer()``'s ``(data, target)``: 569 rows of 30 features and their 0/1 labels."""
    path = _data_file("breast_cancer.csv")
    if path is None:
        from sklearn.datasets import load_breast_cancer

        raw = load_breast_cancer()
        return raw.data, raw.target
    data = np.loadtxt(path, delimiter=",", skiprows=1, encoding="utf-8")  # row 1: sizes and class names
    return data[:, :-1], data[:, -1].astype(int)
