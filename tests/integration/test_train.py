"""`geokd finetune` and `geokd distill` end to end on tiny random BERTs and a learnable toy task
written in the GLUE SST-2 layout (issue #3): run-directory contents, reload, resume equivalence,
training that is not vacuous, and one-line user errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toyglue import options, sentence
from transformers import AutoModelForSequenceClassification, BertTokenizer
from typer.testing import CliRunner

from geokd import GeokdError
from geokd.cli import app
from geokd.config import resolve_config
from geokd.engine import train

runner = CliRunner()


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_finetune_run_directory_and_learning(teacher_dir, glue_dir):
    run = teacher_dir
    for name in ("config.yaml", "env.json", "metrics.jsonl", "results.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-30", "step-60"]
    assert {"model.safetensors", "config.json", "geokd.json"} <= {p.name for p in (run / "final").iterdir()}
    records = _records(run)
    assert [r["step"] for r in records] == list(range(1, 61))
    assert {"step", "loss", "task", "lr", "examples_per_s", "tokens_per_s", "epoch"} <= set(records[0])
    assert all(r["tokens_per_s"] > 0 for r in records if "step" in r)
    assert "eval" in records[29]
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # the toy task is learnable
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "sst2" and results["split"] == "dev"
    assert results["metrics"]["accuracy"] > 0.8
    env = json.loads((run / "env.json").read_text())
    assert env["data"]["train"].startswith("sha256:") and env["world_size"] == 1


def test_final_model_reloads_with_plain_transformers_and_reproduces_the_dev_metric(teacher_dir, glue_dir):
    from geokd import data as data_lib
    from geokd.tasks import compute_metrics, get_task

    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir / "final").eval()
    tokenizer = BertTokenizer.from_pretrained(teacher_dir / "final")
    task = get_task("sst2")
    dev = data_lib.load_split(task, glue_dir, "dev")
    batch = data_lib.make_collate_fn(tokenizer, task)(data_lib.tokenize_examples(dev, tokenizer, 128))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    metrics = compute_metrics(task, logits.argmax(-1).numpy(), batch["labels"].numpy())
    results = json.loads((teacher_dir / "results.json").read_text())
    assert metrics["accuracy"] == pytest.approx(results["metrics"]["accuracy"])


@pytest.mark.parametrize(
    "student, loss, features",
    [("truncate:2", "procrustes", "cls"), ("shrink:layers=2,hidden=16,heads=2", "proj", "tokens")],
)
def test_distill_logs_every_term_and_moves_the_student(
    teacher_dir, glue_dir, tmp_path, student, loss, features
):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["distill", "--quiet", *options(teacher=teacher_dir / "final", student=student, task="sst2", data=glue_dir,
                                          out=out, loss=loss, features=features, max_steps=12, batch_size=16,
                                          lr=2e-3, seed=1)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = _records(out)
    feature_terms = [k for k in records[0] if k.startswith(f"feature/{loss}/")]
    assert feature_terms == ["feature/" + loss + "/1->2", "feature/" + loss + "/2->4"]
    assert {"task", "kl", "loss"} <= set(records[0])
    first, last = records[0], records[-1]
    assert sum(last[k] for k in feature_terms) < sum(first[k] for k in feature_terms)
    weights = load_file(str(out / "final" / "model.safetensors"))
    if student.startswith("truncate"):
        teacher = load_file(str(teacher_dir / "final" / "model.safetensors"))
        moved = [k for k in weights if k in teacher and weights[k].shape == teacher[k].shape
                 and not torch.equal(weights[k], teacher[k])]  # fmt: skip
        assert moved, "training did not change the truncated student"
    assert not any("proj" in k or "feature_losses" in k for k in weights)  # auxiliary heads stay out


def _distill_config(teacher_dir, glue_dir, out, **extra):
    flags = dict(teacher=str(teacher_dir / "final"), student="truncate:2", task="sst2", data=str(glue_dir),
                 out=str(out), loss="gram", features="tokens", max_steps=8, batch_size=16, lr=2e-3, seed=3,
                 save_every=4)  # fmt: skip
    flags.update(extra)
    return resolve_config("distill", flags=flags)


def test_resume_reaches_the_same_final_weights(teacher_dir, glue_dir, tmp_path):
    straight = train(_distill_config(teacher_dir, glue_dir, tmp_path / "a"))

    class Interrupted(Exception):
        pass

    def stop_after_six(record):
        if record["step"] == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(_distill_config(teacher_dir, glue_dir, tmp_path / "b"), progress=stop_after_six)
    assert not (tmp_path / "b" / "final").exists()
    resumed = train(_distill_config(teacher_dir, glue_dir, tmp_path / "b", resume="auto"))
    assert resumed.steps == straight.steps == 8
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert [r["loss"] for r in _records(tmp_path / "a")] == [r["loss"] for r in _records(tmp_path / "b")]


def test_non_finite_loss_stops_with_a_clear_message(teacher_dir, glue_dir, tmp_path):
    config = _distill_config(
        teacher_dir, glue_dir, tmp_path / "nan", lr=1e12, max_grad_norm=1e30, max_steps=30, save_every=1
    )
    with pytest.raises(
        GeokdError, match=r"non-finite loss at step (\d+) .*the last checkpoint, .*step-\d+, is kept"
    ) as info:
        train(config)
    bad_step = int(str(info.value).split("step ")[1].split(" ")[0])
    assert (tmp_path / "nan" / "checkpoints" / f"step-{bad_step - 1}").is_dir()
    assert not (tmp_path / "nan" / "checkpoints" / f"step-{bad_step}").exists()
    assert not (tmp_path / "nan" / "final").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--task", "nope"], "unknown task"),
        (["--data", "/no/such/dir"], "no such file or folder"),
        (["--layers", "9:9"], "9"),
        (["--loss", "mse", "--student", "shrink:layers=2,hidden=16,heads=2"], "mse needs equal widths"),
        (["--data", "TRAIN_FILE"], "is a single file, so train and dev would be the same rows"),
        (["--max-length", "1000"], "--max-length: 1000 tokens exceeds the model's 128 positions"),
        (["--set", "lr=nan"], "lr: must be a finite number"),
        (
            ["--layers", "1:2", "--resume", "/no/such/checkpoint"],
            "checkpoint '/no/such/checkpoint' does not exist",
        ),
    ],
)
def test_distill_bad_input_is_one_line_exit_2(teacher_dir, glue_dir, tmp_path, args, fragment):
    args = [str(glue_dir / "train.tsv") if a == "TRAIN_FILE" else a for a in args]
    base = options(teacher=teacher_dir / "final", student="truncate:2", task="sst2", data=glue_dir,
                    out=tmp_path / "run", max_steps=2)  # fmt: skip
    result = runner.invoke(app, ["distill", "--quiet", *base, *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_headless_teacher_is_refused_naming_finetune(base_dir, glue_dir, tmp_path):
    result = runner.invoke(
        app,
        ["distill", "--quiet", *options(teacher=base_dir, student="truncate:2", task="sst2", data=glue_dir,
                                          out=tmp_path / "run", max_steps=2)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "geokd finetune" in result.output and "Traceback" not in result.output


def test_existing_run_directory_is_not_overwritten(teacher_dir, glue_dir, base_dir):
    before = (teacher_dir / "results.json").read_text()
    result = runner.invoke(
        app,
        [
            "finetune",
            "--quiet",
            *options(model=base_dir, task="sst2", data=glue_dir, out=teacher_dir, max_steps=1),
        ],
    )
    assert result.exit_code == 2 and "already holds a run; pass --resume auto" in result.output
    assert (teacher_dir / "results.json").read_text() == before


def test_finetune_teacher_flag_trains_the_headless_teacher_first(base_dir, glue_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["distill", "--quiet", "--finetune-teacher",
         *options(teacher=base_dir, student="truncate:2", task="sst2", data=glue_dir, out=out, max_steps=4,
                   batch_size=16, lr=3e-3)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (out / "teacher" / "final" / "model.safetensors").is_file()
    assert (out / "teacher" / "results.json").is_file() and (out / "results.json").is_file()
    env = json.loads((out / "env.json").read_text())
    assert env["teacher"]["path_or_id"].endswith("teacher/final")


def test_run_summary_is_printed_before_training(teacher_dir, glue_dir, tmp_path):
    result = runner.invoke(
        app,
        ["distill", "--quiet", *options(teacher=teacher_dir / "final", student="truncate:2", task="sst2",
                                          data=glue_dir, out=tmp_path / "run", max_steps=1)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for fragment in ("resolved configuration", "parameters", "layer mapping", "device cpu", "float32"):
        assert fragment in result.output, fragment


def test_custom_task_from_jsonl(base_dir, tmp_path):
    rng = random.Random(5)
    folder = tmp_path / "custom"
    folder.mkdir()
    for split, n in (("train", 64), ("dev", 16)):
        rows = [{"text": sentence(rng, i % 2), "y": "pos" if i % 2 else "neg"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["finetune", "--quiet", *options(model=base_dir, task="custom", data=folder, text_fields="text",
                                          label_field="y", out=out, max_steps=3, batch_size=16)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}


def test_models_lists_aliases():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0 and "bert-base" in result.output and "truncate:N" in result.output


def test_mnli_reports_matched_and_mismatched_dev(base_dir, tmp_path):
    header = (
        "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
        "sentence2_parse sentence1 sentence2"
    ).split()
    rng = random.Random(7)
    folder = tmp_path / "MNLI"
    folder.mkdir()
    names = ["entailment", "neutral", "contradiction"]
    for split, n, extra in (
        ("train", 30, ["label1"]),
        ("dev_matched", 9, ["label1"] * 5),
        ("dev_mismatched", 6, ["label1"] * 5),
    ):
        lines = ["\t".join(header + extra + ["gold_label"])]
        for i in range(n):
            label = names[i % 3]
            row = [str(i), "1", f"{i}n", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)",
                   sentence(rng, i % 2), sentence(rng, 0)] + [label] * (len(extra) + 1)  # fmt: skip
            lines.append("\t".join(row))
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "finetune",
            "--quiet",
            *options(model=base_dir, task="mnli", data=folder, out=out, max_steps=2, batch_size=8),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["split"] == "dev_matched" and set(results["metrics"]) == {"accuracy"}
    assert set(results["other_splits"]) == {"dev_mismatched"}


def test_gradient_accumulation_matches_one_big_batch(teacher_dir, glue_dir, tmp_path):
    """4 micro-batches of 8 with --grad-accum 4 take the same first step as one batch of 32 (the
    feature loss is batch-level geometry, so use loss=none: task + KL are per-example means).
    Dropout is switched off in a copy of the teacher (the truncated student inherits its config),
    since its masks depend on the batch shape."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir / "final", teacher)
    config = json.loads((teacher / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (teacher / "config.json").write_text(json.dumps(config))
    common = dict(loss="none", max_steps=1, save_every=None, teacher=str(teacher))
    train(_distill_config(teacher_dir, glue_dir, tmp_path / "big", batch_size=32, **common))
    train(_distill_config(teacher_dir, glue_dir, tmp_path / "acc", batch_size=8, grad_accum=4, **common))
    first_big, first_small = _records(tmp_path / "big")[0], _records(tmp_path / "acc")[0]
    assert first_small["loss"] == pytest.approx(first_big["loss"], rel=1e-5)
    a = load_file(str(tmp_path / "big" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "final" / "model.safetensors"))
    # Attention key biases have an exactly-zero true gradient (softmax is shift-invariant), and
    # Adam's first step turns their rounding noise into ±lr updates: they are not comparable.
    compared = [key for key in a if not key.endswith("attention.self.key.bias")]
    assert len(compared) > 10
    for key in compared:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
