"""What the ``fedshield server`` / ``client`` bad-input tests share: a one-node key set, a site's CSV export, the
CLI runner, and the check that a failure printed exactly one ``error:`` line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedshield.crypto import KeySet, init_keys


ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys", server_hosts=["127.0.0.1"], nodes=1)


@pytest.fixture(scope="module")
def site_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 digits as a site would export them: 64 pixel columns and a label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "site.csv"
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    rows = np.column_stack([digits.data[:100].astype(int), digits.target[:100]])
    np.savetxt(path, rows, delimiter=",", header=header, comments="", fmt="%d")
    return path


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]

