"""Distillation between a teacher and a student whose tokenizers differ (issue #12): a word-level
teacher and a byte-level BPE student (tests/tinylm.py). Example-level feature rows (`mean`, `last`)
and ULD are the defined paths; token rows and one-vocabulary KD are refused in one line before
anything runs; the run says which path it took."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tinylm import save_causal_lm, write_instruct_data
from toyglue import options
from typer.testing import CliRunner

from geokd.cli import app
from geokd.workloads.decoder import aligned_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory) -> Path:
    return write_instruct_data(tmp_path_factory.mktemp("instruct") / "toy")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": save_causal_lm(root / "teacher", "llama"),
        "student": save_causal_lm(root / "student", "qwen3", seed=3, tokenizer="bpe", hidden=16, layers=2),
    }


def _distill(models, data, out, **extra):
    flags = dict(teacher=models["teacher"], student=models["student"], task="instruct", data=data, out=out,
                 max_steps=4, batch_size=6, lr=3e-3, seed=1, save_minutes=0, max_length=160, max_prompt_length=120)  # fmt: skip
    flags.update(extra)
    return runner.invoke(app, ["distill", *options(**flags)])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


@pytest.mark.parametrize("features", ["mean", "last"])
def test_example_level_geometry_across_tokenizers(models, instruct_dir, tmp_path, features):
    out = tmp_path / "run"
    result = _distill(models, instruct_dir, out, loss="procrustes", features=features, alpha=1.0, layers="2:4")
    assert result.exit_code == 0, result.output
    assert "cross-tokenizer path" in result.output and "feature rows are examples" in result.output
    records = _records(out)
    term = "feature/procrustes/2->4"
    assert len(records) == 4 and all(math.isfinite(r[term]) and 0 <= r[term] <= 2 for r in records)
    assert "kd" not in records[0]


def test_uld_across_tokenizers(models, instruct_dir, tmp_path):
    out = tmp_path / "run"
    result = _distill(models, instruct_dir, out, loss="gram", features="mean", alpha=0.5, kd="uld", layers="2:4")
    assert result.exit_code == 0, result.output
    assert "KD by ULD" in result.output
    records = _records(out)
    assert all(0 < r["kd"] <= 2 for r in records)


@pytest.mark.parametrize(("extra", "message"), [
    ({"loss": "procrustes", "features": "tokens", "alpha": 1.0}, "use --features spans (span-aligned token rows), mean or last"),
    ({"loss": "none", "kd": "forward"}, "use --kd uld or --alpha 1"),
])  # fmt: skip
def test_undefined_cross_tokenizer_settings_are_one_line(models, instruct_dir, tmp_path, extra, message):
    out = tmp_path / "run"
    result = _distill(models, instruct_dir, out, **extra)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert lines[0].startswith("error: tokenizer:") and not out.exists()


def test_uld_alignment_keeps_the_first_min_positions_of_each_example():
    student = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)  # 3 and 2 response positions
    teacher = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)  # 2 and 4
    s_keep, t_keep = aligned_rows(student, teacher)
    assert s_keep.tolist() == [True, True, False, True, True]  # example 0: first 2 of 3; example 1: both
    assert t_keep.tolist() == [True, True, True, True, False, False]  # example 0: both; example 1: first 2 of 4


def test_span_rows_across_tokenizers(models, instruct_dir, tmp_path):
    out = tmp_path / "run"
    result = _distill(models, instruct_dir, out, loss="procrustes", features="spans", alpha=1.0, layers="2:4")
    assert result.exit_code == 0, result.output
    assert "feature rows are spans" in result.output
    assert all(0 <= r["feature/procrustes/2->4"] <= 2 for r in _records(out))


def test_spans_with_one_tokenizer_are_the_token_rows(models, instruct_dir, tmp_path):
    """Same tokenizer: every span is one token, so the span run's feature terms equal the token run's."""
    runs = {}
    for features in ("tokens", "spans"):
        out = tmp_path / features
        result = _distill(models, instruct_dir, out, student="truncate:2", loss="procrustes", features=features,
                          alpha=0.5, layers="1:2,2:4")  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[features] = _records(out)
    for a, b in zip(runs["tokens"], runs["spans"], strict=True):
        for term in ("loss", "feature/procrustes/1->2", "feature/procrustes/2->4"):
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-6), term


def test_example_rows_from_a_cache_across_tokenizers(models, instruct_dir, tmp_path):
    from geokd.cache_decoder import DecoderCacheRequest, build_decoder_cache

    build_decoder_cache(DecoderCacheRequest(teacher=str(models["teacher"]), data=str(instruct_dir), out=str(tmp_path / "cache"),
                                            layers="4", features="mean", topk=4, max_length=160, max_prompt_length=120))  # fmt: skip
    live, cached = tmp_path / "live", tmp_path / "cached"
    common = dict(loss="cka", features="mean", alpha=1.0, layers="2:4")
    assert _distill(models, instruct_dir, live, **common).exit_code == 0
    result = _distill(models, instruct_dir, cached, cache=tmp_path / "cache", **common)
    assert result.exit_code == 0, result.output
    assert "does not tokenise like the cached teacher: cross-tokenizer path" in result.output
    for a, b in zip(_records(live), _records(cached), strict=True):  # bf16 rows: close, not equal
        assert a["feature/cka/2->4"] == pytest.approx(b["feature/cka/2->4"], abs=2e-2)
    refused = _distill(models, instruct_dir, tmp_path / "kd", cache=tmp_path / "cache", loss="none", alpha=0.5)
    assert refused.exit_code == 2 and "use --kd uld (it compares sorted probabilities) or pass --alpha 1" in refused.output


def test_uld_from_a_cache_across_tokenizers(models, instruct_dir, tmp_path):
    """With k covering the teacher's vocabulary and fp32 values, ULD from the cache is ULD: every
    per-step term equals the live run's (alignment, masking and the loss all agree). With k = 4
    it is the top-k lower bound: at the first step (same weights) at most the live value."""
    from tinylm import VOCAB

    from geokd.cache_decoder import DecoderCacheRequest, build_decoder_cache

    common = dict(loss="none", alpha=0.5, kd="uld")
    live = tmp_path / "live"
    assert _distill(models, instruct_dir, live, **common).exit_code == 0
    for k in (len(VOCAB), 4):
        build_decoder_cache(DecoderCacheRequest(teacher=str(models["teacher"]), data=str(instruct_dir),
                                                out=str(tmp_path / f"cache{k}"), layers="", topk=k, dtype="fp32",
                                                max_length=160, max_prompt_length=120))  # fmt: skip
        out = tmp_path / f"cached{k}"
        result = _distill(models, instruct_dir, out, cache=tmp_path / f"cache{k}", **common)
        assert result.exit_code == 0, result.output
        assert "top-k ranks + tail mass from the cache" in result.output
        if k == len(VOCAB):
            for a, b in zip(_records(live), _records(out), strict=True):
                for term in ("loss", "sft", "kd"):
                    assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-6), (a["step"], term)
        else:
            first_live, first = _records(live)[0], _records(out)[0]
            assert 0 < first["kd"] <= first_live["kd"] + 1e-6 and first["sft"] == pytest.approx(first_live["sft"], rel=1e-5)


@pytest.mark.parametrize("features", ["mean", "last"])
def test_an_encoder_as_feature_teacher_for_a_decoder_student(models, base_dir, instruct_dir, tmp_path, features):
    """A WordPiece BERT (the conftest's tiny encoder) embeds each response (or prompt) as a
    sentence; a causal-LM student with another tokenizer aligns its example rows to it."""
    out = tmp_path / "run"
    result = _distill({"teacher": base_dir, "student": models["student"]}, instruct_dir, out, loss="procrustes",
                      features=features, alpha=1.0, layers="2:4")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "is an encoder (bert): feature-teacher path" in result.output
    assert all(0 <= r["feature/procrustes/2->4"] <= 2 for r in _records(out))
    for extra, message in (({"alpha": 0.5}, "pass --alpha 1"), ({"student": "truncate:2"}, "pass a causal-LM --student"),
                           ({"features": "tokens"}, "use --features mean")):  # fmt: skip
        flags = {"loss": "procrustes", "features": features, "alpha": 1.0, "layers": "2:4", **extra}
        refused = _distill({"teacher": base_dir, "student": extra.get("student", models["student"])}, instruct_dir,
                           tmp_path / "refused", **{k: v for k, v in flags.items() if k != "student"})  # fmt: skip
        lines = [line for line in refused.output.splitlines() if line.strip()]
        assert refused.exit_code == 2 and len(lines) == 1 and message in lines[0], refused.output


def test_span_rows_from_a_cache_across_tokenizers_equal_the_live_ones(models, instruct_dir, tmp_path):
    from geokd.cache_decoder import DecoderCacheRequest, build_decoder_cache

    manifest = build_decoder_cache(DecoderCacheRequest(
        teacher=str(models["teacher"]), data=str(instruct_dir), out=str(tmp_path / "cache"), layers="4",
        features="tokens", dtype="fp32", topk=4, max_length=160, max_prompt_length=120))  # fmt: skip
    assert manifest["token_ends"]
    live, cached = tmp_path / "live", tmp_path / "cached"
    common = dict(loss="procrustes", features="spans", alpha=1.0, layers="2:4")
    assert _distill(models, instruct_dir, live, **common).exit_code == 0
    result = _distill(models, instruct_dir, cached, cache=tmp_path / "cache", **common)
    assert result.exit_code == 0, result.output
    for a, b in zip(_records(live), _records(cached), strict=True):
        assert a["feature/procrustes/2->4"] == pytest.approx(b["feature/procrustes/2->4"], rel=1e-5, abs=1e-6)
