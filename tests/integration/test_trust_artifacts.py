"""Trustworthy runs end to end (issue #10): a damaged or pickled model folder given to a command is
one `error:` line naming the file, and a teacher whose head lists the task's labels in another
order distils (and caches) exactly like the same teacher in the task's order."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toyglue import options
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from geokd.cli import app

runner = CliRunner()


def _one_error_line(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def swapped_teacher(teacher_dir, tmp_path_factory) -> Path:
    """The fine-tuned toy teacher with its head rows and id2label in the other order (0=positive):
    the same function, labelled differently."""
    folder = tmp_path_factory.mktemp("swapped") / "teacher"
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir / "final")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label = {0: "positive", 1: "negative"}
    model.config.label2id = {"positive": 0, "negative": 1}
    model.save_pretrained(folder)
    for file in (teacher_dir / "final").iterdir():
        if file.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(file, folder / file.name)
    return folder


# ---------------------------------------------------------------------------------------------
# Teacher label order (item 14)
# ---------------------------------------------------------------------------------------------


def _distill(teacher: Path, glue_dir: Path, out: Path):
    args = {"teacher": teacher, "student": "truncate:2", "task": "sst2", "data": glue_dir, "loss": "procrustes",
            "layers": "1:2,2:4", "alpha": 0.5, "max_steps": 3, "batch_size": 16, "seed": 3, "out": out}  # fmt: skip
    return runner.invoke(app, ["distill", "--quiet", *options(**args)])


def test_distilling_from_a_teacher_in_another_label_order_gives_the_same_student(
    teacher_dir, swapped_teacher, glue_dir, tmp_path
):
    runs = {}
    for name, teacher in (("ordered", teacher_dir / "final"), ("swapped", swapped_teacher)):
        result = _distill(teacher, glue_dir, tmp_path / name)
        assert result.exit_code == 0, result.output
        runs[name] = load_file(tmp_path / name / "final" / "model.safetensors")
    assert runs["ordered"].keys() == runs["swapped"].keys()
    assert all(torch.equal(runs["ordered"][k], runs["swapped"][k]) for k in runs["ordered"])
    config = (tmp_path / "swapped" / "final" / "config.json").read_text()
    assert '"0": "negative"' in config and '"1": "positive"' in config


def test_the_cache_holds_teacher_logits_in_task_order(teacher_dir, swapped_teacher, glue_dir, tmp_path):
    shards = {}
    for name, teacher in (("ordered", teacher_dir / "final"), ("swapped", swapped_teacher)):
        args = {"teacher": teacher, "task": "sst2", "data": glue_dir, "layers": "4", "dtype": "fp32",
                "shard_size": 64, "out": tmp_path / name}  # fmt: skip
        result = runner.invoke(app, ["cache", "--quiet", *options(**args)])
        assert result.exit_code == 0, result.output
        shards[name] = load_file(tmp_path / name / "shard-00000.safetensors")
    assert torch.equal(shards["ordered"]["logits"], shards["swapped"]["logits"])
    assert torch.equal(shards["ordered"]["layer.4"], shards["swapped"]["layer.4"])


# ---------------------------------------------------------------------------------------------
# Damaged and pickled weights (items 11 and 12)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_eval_of_a_damaged_model_folder_is_one_line_naming_the_file(teacher_dir, glue_dir, tmp_path, how):
    folder = tmp_path / "model"
    shutil.copytree(teacher_dir / "final", folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\xff" * 8 + data[8:]}[how]
    )
    result = runner.invoke(
        app, ["eval", "--quiet", str(folder), "--task", "sst2", "--data", str(glue_dir / "dev.tsv")]
    )
    _one_error_line(result, str(weights), "not a valid safetensors file")


def test_distill_from_a_damaged_teacher_is_one_line_naming_the_file(teacher_dir, glue_dir, tmp_path):
    folder = tmp_path / "teacher"
    shutil.copytree(teacher_dir / "final", folder)
    (folder / "model.safetensors").write_bytes(b"")
    result = _distill(folder, glue_dir, tmp_path / "run")
    _one_error_line(result, str(folder / "model.safetensors"), "empty")


def test_eval_of_a_pickled_model_folder_is_refused_with_the_conversion(teacher_dir, glue_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(teacher_dir / "final", folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")  # transformers 5 writes safetensors only
    result = runner.invoke(
        app, ["eval", "--quiet", str(folder), "--task", "sst2", "--data", str(glue_dir / "dev.tsv")]
    )
    _one_error_line(result, "pytorch_model.bin", "never unpickles", "safe_serialization=True")
