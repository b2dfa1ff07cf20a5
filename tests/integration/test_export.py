"""`geokd export` on tiny trained runs (issue #6): the key set is a plain model's, the round trip
is exact in fp32 and within tolerance in fp16/bf16, the export loads without geokd, and writing is
atomic and refuses to overwrite."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
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
    from geokd.checkpoints import read_state  # safetensors + JSON, nothing unpickled

    trainer_state = read_state(proj_run / "checkpoints" / "step-4")
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
    with pytest.raises(GeokdError, match="expected final or step-N"):
        export_model(str(proj_run), str(tmp_path / "s9"), checkpoint="../../etc")


def test_a_damaged_checkpoint_is_not_exported(proj_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(proj_run, run)
    weights = run / "checkpoints" / "step-2" / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the tensor data: only the recorded SHA-256 can tell
    weights.write_bytes(bytes(data))
    result = runner.invoke(app, ["export", str(run), "--checkpoint", "step-2", "--out", str(tmp_path / "out")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "--checkpoint" in lines[0] and str(weights) in lines[0] and "damaged" in lines[0]
    assert not (tmp_path / "out").exists()


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


# ---------------------------------------------------------------------------------------------
# Trustworthy exports (issue #10): never into the source, full disks, stale temporaries, umask
# ---------------------------------------------------------------------------------------------


def _one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, (
        result.output
    )
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _run_intact(run: Path) -> None:
    assert (run / "config.yaml").is_file() and (run / "results.json").is_file()
    assert _logits(run / "final", _batch(run / "final")).shape == (3, 2)


@pytest.fixture
def own_run(proj_run, tmp_path) -> Path:
    """A copy of the distill run that a test may lose without harming the other tests."""
    return Path(shutil.copytree(proj_run, tmp_path / "runs" / "run", symlinks=True))


@pytest.mark.parametrize(
    ("source", "out", "fragment"),
    [
        ("{run}", "{run}", "is the source"),
        ("{run}", "{run}/final", "is the source"),
        ("{run}", "{run}/export", "lies inside the source"),
        ("{run}/final", "{run}/final/sub", "lies inside the source"),
        ("{run}/final", "{run}", "is the source"),  # a run's final/ knows its run directory
        ("{run}", "{tmp}/runs", "contains the source"),
        ("{run}", "{tmp}/link", "is the source"),  # a symlink to the run
        ("{run}", "{tmp}/link/final", "is the source"),
        ("{link}", "{run}", "is the source"),  # the source given through a symlink
        ("{run}", "{tmp}/home", "home directory"),
        ("{run}", "{tmp}/home/..", "home directory"),
        ("{run}", "/", "file-system root"),
    ],
)
def test_an_out_that_would_delete_the_source_is_refused(
    own_run, tmp_path, monkeypatch, source, out, fragment
):
    (tmp_path / "link").symlink_to(own_run)
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    values = {"run": own_run, "tmp": tmp_path, "link": tmp_path / "link"}
    source, out = source.format(**values), out.format(**values)
    with pytest.raises(GeokdError) as exc:
        export_model(source, out, force=True)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    _run_intact(own_run)
    assert (home / "notes.txt").read_text() == "mine"


def test_export_run_out_run_force_through_the_cli_keeps_the_run(own_run):
    result = runner.invoke(app, ["export", str(own_run), "--out", str(own_run), "--force"])
    _one_error_line(result, str(own_run), "is the source")
    _run_intact(own_run)
    assert (
        runner.invoke(app, ["export", str(own_run), "--out", str(own_run.parent / "export")]).exit_code == 0
    )


def _disk_full(kind: str) -> BaseException:
    if kind == "oserror":
        return OSError(errno.ENOSPC, "No space left on device")
    from safetensors import SafetensorError

    return SafetensorError(  # how the Rust writer reports it
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_during_an_hf_export_keeps_the_old_export(proj_run, tmp_path, monkeypatch, kind):
    out = tmp_path / "student"
    export_model(str(proj_run), str(out))
    before = (out / "model.safetensors").read_bytes()
    real_write_text = Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name == "README.md":  # the disk fills up half-way through the model card
            real_write_text(self, data[:10], *args, **kwargs)
            raise _disk_full(kind)
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    result = runner.invoke(app, ["export", str(proj_run), "--out", str(out), "--force"])
    _one_error_line(result, str(out), "free", "no space left")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no temporary left
    assert (out / "model.safetensors").read_bytes() == before and verify_export(out)["ok"]
    assert runner.invoke(app, ["export", str(proj_run), "--out", str(out), "--force"]).exit_code == 0
    assert verify_export(out)["ok"] and sorted(p.name for p in tmp_path.iterdir()) == ["student"]


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_during_a_single_file_export_keeps_the_old_file(proj_run, tmp_path, monkeypatch, kind):
    import safetensors.torch

    out = tmp_path / "model.safetensors"
    export_model(str(proj_run), str(out), fmt="safetensors")
    before = out.read_bytes()

    def full(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")  # a partial file
        raise _disk_full(kind)

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    result = runner.invoke(
        app, ["export", str(proj_run), "--out", str(out), "--format", "safetensors", "--force"]
    )
    _one_error_line(result, str(out), "free")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"] and out.read_bytes() == before
    args = ["export", str(proj_run), "--out", str(out), "--format", "safetensors", "--force"]
    assert runner.invoke(app, args).exit_code == 0 and verify_export(out)["ok"]


def test_stale_temporaries_never_block_and_an_interrupted_swap_is_undone(proj_run, tmp_path):
    out = tmp_path / "student"
    export_model(str(proj_run), str(out))
    (tmp_path / ".student.tmp-export").mkdir()  # what a kill during writing leaves
    (tmp_path / ".student.tmp-export" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".student.old-export").mkdir()  # a kill after the swap, before the clean-up
    assert runner.invoke(app, ["export", str(proj_run), "--out", str(out), "--force"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"] and verify_export(out)["ok"]
    # Killed between the two renames: --out is gone and .old-export is the last complete export.
    out.rename(tmp_path / ".student.old-export")
    (tmp_path / ".student.tmp-export").write_bytes(b"half")  # a file where a folder is written
    refused = runner.invoke(app, ["export", str(proj_run), "--out", str(out)])
    _one_error_line(refused, "pass --force")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"] and verify_export(out)["ok"]


def test_exports_follow_the_umask(proj_run, tmp_path):
    previous = os.umask(0o022)
    try:
        folder = tmp_path / "student"
        export_model(str(proj_run), str(folder))
        single = tmp_path / "model.safetensors"
        export_model(str(proj_run), str(single), fmt="safetensors")
    finally:
        os.umask(previous)
    modes = {
        str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
        for p in [folder, *folder.iterdir(), single]
    }
    assert modes.pop("student") == 0o755 and modes.pop("model.safetensors") == 0o644
    assert modes["student/model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_check_of_a_damaged_export_is_one_line_naming_the_file(proj_run, tmp_path, fmt):
    out = tmp_path / ("student" if fmt == "hf" else "model.safetensors")
    export_model(str(proj_run), str(out), fmt=fmt)
    weights = out / "model.safetensors" if fmt == "hf" else out
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    _one_error_line(runner.invoke(app, ["export", "--check", str(out)]), str(weights), "truncated")
