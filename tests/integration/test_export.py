"""`geokd export` on tiny trained runs (issue #6): the key set is a plain model's, the round trip
is exact in fp32 and within tolerance in fp16/bf16, the export loads without geokd, and writing is
atomic and refuses to overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from toyglue import options
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

import geokd.export
from geokd import GeokdError
from geokd.cli import app
from geokd.export import export_model, load_export, verify_export

runner = CliRunner()


@pytest.fixture(scope="module")
def proj_run(teacher_dir, glue_dir, tmp_path_factory) -> Path:
    """A distill run whose objective has projection heads (proj loss) in its checkpoints."""
    out = tmp_path_factory.mktemp("proj") / "run"
    result = runner.invoke(app, ["distill", "--quiet", *options(teacher=teacher_dir / "final", task="sst2",
                                 student="shrink:layers=2,hidden=16,heads=2", data=glue_dir, loss="proj",
                                 max_steps=4, save_every=2, batch_size=16, out=out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _batch(folder: Path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return dict(
        tokenizer(["good w1 w2 w3", "w4 bad w5", "w6 w7 nice w8 w9 w10"], padding=True, return_tensors="pt")
    )


def _logits(folder: Path, batch, dtype=torch.float32) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def test_hf_export_loads_with_plain_transformers_and_matches_exactly(proj_run, tmp_path):
    out = tmp_path / "student"
    result = runner.invoke(app, ["export", str(proj_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "README.md", "geokd.json"} <= {p.name for p in out.iterdir()}
    batch = _batch(out)
    assert torch.equal(_logits(out, batch), _logits(proj_run / "final", batch))  # fp32: exact
    # Only the model's own parameters: the key set of a plain model of the same config.
    plain = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(out))
    assert set(load_file(out / "model.safetensors")) == set(plain.state_dict())
    trainer_state = torch.load(proj_run / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=False)
    assert trainer_state["objective"], "the proj run must have projection state to leave out"
    info = json.loads((out / "geokd.json").read_text())
    assert (
        info["objective"]["loss"] == "proj"
        and info["task"] == "sst2"
        and info["check"]["max_abs_logit_diff"] == 0
    )
    card = (out / "README.md").read_text()
    assert "proj" in card and "dev accuracy" in card and "teacher parameters" in card
    assert verify_export(out)["ok"]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_exports_are_within_tolerance(proj_run, tmp_path, dtype):
    out = tmp_path / dtype
    info = export_model(str(proj_run), str(out), dtype=dtype)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    assert next(iter(load_file(out / "model.safetensors").values())).dtype == torch_dtype
    batch = _batch(out)
    diff = (_logits(out, batch, torch_dtype) - _logits(proj_run / "final", batch)).abs().max()
    assert float(diff) <= geokd.export.TOLERANCE[dtype]
    assert info["check"]["max_abs_logit_diff"] <= geokd.export.TOLERANCE[dtype]
    assert runner.invoke(app, ["export", "--check", str(out)]).exit_code == 0


def test_single_safetensors_file_describes_itself(teacher_dir, tmp_path):
    out = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["export", str(teacher_dir), "--out", str(out), "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        keys = set(handle.keys())
    info = json.loads(metadata["geokd"])
    assert info["task"] == "sst2" and info["metrics"]["accuracy"] > 0.8 and info["mode"] == "finetune"
    assert json.loads(metadata["config"])["model_type"] == "bert"
    model, _, _ = load_export(out)
    assert keys == set(model.state_dict())
    batch = _batch(teacher_dir / "final")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, _logits(teacher_dir / "final", batch))


def test_the_exported_tokenizer_carries_no_run_time_truncation(proj_run, tmp_path):
    out = tmp_path / "student"
    export_model(str(proj_run), str(out))
    definition = json.loads((out / "tokenizer.json").read_text())
    assert definition["truncation"] is None and definition["padding"] is None
    # The single file checks itself from the stored token ids, without a tokenizer.
    single = tmp_path / "model.safetensors"
    export_model(str(proj_run), str(single), fmt="safetensors")
    assert verify_export(single)["ok"]


def test_checkpoints_can_be_exported_and_bad_ones_are_named(proj_run, tmp_path):
    info = export_model(str(proj_run), str(tmp_path / "s2"), checkpoint="step-2")
    assert info["source"]["folder"].endswith("checkpoints/step-2/student")
    with pytest.raises(GeokdError, match="choose final or one of: step-2, step-4"):
        export_model(str(proj_run), str(tmp_path / "s9"), checkpoint="step-9")


def test_overwrite_needs_force_and_a_failed_export_leaves_nothing(proj_run, tmp_path, monkeypatch):
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = runner.invoke(app, ["export", str(proj_run), "--out", str(out)])
    assert refused.exit_code == 2 and "pass --force" in refused.output and (out / "keep.txt").exists()

    def broken(*args, **kwargs):
        raise GeokdError("export: simulated failure while checking")

    monkeypatch.setattr(geokd.export, "_round_trip", broken)
    failed = runner.invoke(app, ["export", str(proj_run), "--out", str(out), "--force"])
    assert failed.exit_code == 2 and "simulated failure" in failed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary left behind
    assert (out / "keep.txt").read_text() == "mine"  # the old content survives a failed export
    monkeypatch.undo()
    assert runner.invoke(app, ["export", str(proj_run), "--out", str(out), "--force"]).exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_check_detects_changed_weights(proj_run, tmp_path):
    out = tmp_path / "student"
    export_model(str(proj_run), str(out))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        model.classifier.bias.add_(0.5)
    model.save_pretrained(out)
    result = runner.invoke(app, ["export", "--check", str(out)])
    assert result.exit_code == 2 and "does not reproduce its recorded logits" in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["{run}", "--out", "{tmp}/x", "--format", "onnx"], "--format must be one of"),
        (["{run}", "--out", "{tmp}/x", "--dtype", "int8"], "--dtype must be one of"),
        (["{run}", "--out", "{tmp}/x", "--format", "safetensors"], "ending in .safetensors"),
        (["{tmp}/missing", "--out", "{tmp}/x"], "does not exist"),
        (["{run}"], "pass SOURCE and --out"),
        (["--check", "{tmp}"], "has no geokd.json"),
        (["--check", "{run}/final"], "not an export's"),
    ],
)
def test_bad_export_options_are_one_line_errors(proj_run, tmp_path, args, fragment):
    result = runner.invoke(app, ["export", *[a.format(run=proj_run, tmp=tmp_path) for a in args]])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
