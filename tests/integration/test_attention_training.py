"""Issue #15 end to end on the toy encoder task: `--loss attn|attn-relation|rkd|spkd` train through
the CLI, log a term per layer pair and lower it; the attention taps capture only the mapped blocks;
`--cache` refuses the attention losses in one line; bad head counts are one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from toyglue import options
from typer.testing import CliRunner

from geokd.cli import app

runner = CliRunner()


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


@pytest.mark.parametrize(
    "student, loss, extra",
    [
        ("truncate:2", "attn", {}),
        ("truncate:2", "attn", {"attn_map": "probs"}),
        ("shrink:layers=2,hidden=16,heads=2", "attn-relation", {}),
        ("shrink:layers=2,hidden=16,heads=2", "rkd", {"features": "cls"}),
        ("shrink:layers=2,hidden=16,heads=2", "spkd", {"features": "tokens"}),
    ],
)
def test_new_losses_train_log_a_term_per_pair_and_decrease(teacher_dir, glue_dir, tmp_path, student, loss, extra):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["distill", *options(teacher=teacher_dir / "final", student=student, task="sst2", data=glue_dir, out=out,
                             loss=loss, max_steps=16, batch_size=16, lr=3e-3, seed=1, **extra)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = _records(out)
    terms = [k for k in records[0] if k.startswith(f"feature/{loss}/")]
    assert terms == [f"feature/{loss}/1->2", f"feature/{loss}/2->4"]
    assert all(torch.isfinite(torch.tensor([r[k] for r in records for k in terms])))
    first = sum(sum(r[k] for k in terms) for r in records[:3])
    last = sum(sum(r[k] for k in terms) for r in records[-3:])
    assert last < first
    if loss.startswith("attn"):
        assert "attention capture: student:" in result.output
        env = json.loads((out / "env.json").read_text())
        assert len(env["attention"]) == 3


def test_cache_refuses_attention_losses_in_one_line(teacher_dir, glue_dir, tmp_path):
    result = runner.invoke(
        app,
        ["distill", *options(teacher=teacher_dir / "final", student="truncate:2", task="sst2", data=glue_dir,
                             out=tmp_path / "run", loss="attn-relation", cache=tmp_path, max_steps=2)],
    )  # fmt: skip
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "cache" in line and "attn-relation" in line
    assert not (tmp_path / "run").exists()


def test_attn_with_different_head_counts_is_one_line_exit_2(teacher_dir, glue_dir, tmp_path):
    result = runner.invoke(
        app,
        ["distill", *options(teacher=teacher_dir / "final", student="shrink:layers=2,hidden=16,heads=2", task="sst2",
                             data=glue_dir, out=tmp_path / "run", loss="attn", max_steps=2)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "equal head counts" in result.output and "student 2 and teacher 4" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_relation_heads_that_do_not_divide_the_widths_are_refused(teacher_dir, glue_dir, tmp_path):
    result = runner.invoke(
        app,
        ["distill", *options(teacher=teacher_dir / "final", student="shrink:layers=2,hidden=16,heads=2", task="sst2",
                             data=glue_dir, out=tmp_path / "run", loss="attn-relation", relation_heads=3, max_steps=2)],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "--relation-heads: 3" in result.output and "student 16" in result.output
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Decoders: Llama (grouped-query attention), Qwen3 (q/k norms), GPT-2 (fused c_attn), OPT
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory):
    from tinylm import write_instruct_data

    return write_instruct_data(tmp_path_factory.mktemp("instruct") / "toy")


def _decoder_run(teacher, data, out, **extra):
    from geokd.config import resolve_config
    from geokd.engine import train

    flags = dict(teacher=str(teacher), student="truncate:2", task="instruct", data=str(data), out=str(out),
                 max_steps=8, batch_size=8, lr=3e-3, seed=5, save_minutes=0, max_length=64, max_prompt_length=48)  # fmt: skip
    flags.update(extra)
    train(resolve_config("distill", flags=flags))
    return _records(out)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "opt"])
@pytest.mark.parametrize("loss", ["attn", "attn-relation"])
def test_decoder_attention_losses_every_family(instruct_dir, tmp_path, family, loss):
    from tinylm import save_causal_lm

    # initialised wider than the default 0.02, so that its attention is far from uniform
    teacher = save_causal_lm(tmp_path / "teacher", family, initializer_range=0.3)
    # a random-init student of the same head count (attn compares head by head) and half the width
    student = "shrink:layers=2,hidden=16,heads=4" + (",kv_heads=2" if family in ("llama", "qwen3") else "")
    records = _decoder_run(teacher, instruct_dir, tmp_path / "run", loss=loss, alpha=0.8, student=student)
    terms = [k for k in records[0] if k.startswith(f"feature/{loss}/")]
    assert terms == [f"feature/{loss}/1->2", f"feature/{loss}/2->4"]
    values = torch.tensor([[r[k] for k in terms] for r in records])
    assert torch.isfinite(values).all() and (values > 0).all()
    assert values[-2:].sum() < values[:2].sum()
    assert "kd" in records[0]


@pytest.mark.parametrize("loss", ["rkd", "spkd"])
def test_decoder_relational_losses_on_token_and_mean_rows(instruct_dir, tmp_path, loss):
    from tinylm import save_causal_lm

    teacher = save_causal_lm(tmp_path / "teacher", "llama")
    for features in ("mean", "tokens"):
        records = _decoder_run(teacher, instruct_dir, tmp_path / f"run-{features}", loss=loss, features=features,
                               student="shrink:layers=2,hidden=16,heads=2,kv_heads=1")  # fmt: skip
        terms = [k for k in records[0] if k.startswith(f"feature/{loss}/")]
        assert len(terms) == 2 and all(torch.isfinite(torch.tensor([r[k] for r in records for k in terms])))


def test_decoder_attn_relation_accumulates_exactly(instruct_dir, tmp_path):
    """attn-relation is a mean over response-token queries, and a decoder micro-batch weighs its
    response tokens: 2 micro-batches of 4 give the term (and step) of one batch of 8."""
    from tinylm import save_causal_lm

    teacher = save_causal_lm(tmp_path / "teacher", "llama", initializer_range=0.3, attention_dropout=0.0)
    common = dict(loss="attn-relation", student="shrink:layers=2,hidden=16,heads=4,kv_heads=2", max_steps=2,
                  alpha=0.8)  # fmt: skip
    big = _decoder_run(teacher, instruct_dir, tmp_path / "big", batch_size=8, **common)
    acc = _decoder_run(teacher, instruct_dir, tmp_path / "acc", batch_size=4, grad_accum=2, **common)
    for one, two in zip(big, acc, strict=True):
        for name in one:
            if name.startswith(("feature/", "sft", "kd", "loss")):
                assert two[name] == pytest.approx(one[name], rel=1e-5), name
