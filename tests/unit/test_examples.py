"""The examples run and do what they say (tiny models, a few steps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loss,features", [("procrustes", "mean"), ("gram", "tokens"), ("cka", "mean")])
def test_align_features_lowers_the_loss(loss, features, capsys):
    result = _load("align_features").main(["--loss", loss, "--features", features, "--steps", "25"])
    assert result["last"] < 0.8 * result["first"], result
    if features == "tokens":
        assert result["rows"] > 16  # one row per non-padding token, not per example
    assert "step" in capsys.readouterr().out
