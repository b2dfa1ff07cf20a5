"""`--loss flexkd` end to end (issue #13): the scoring pass on a real (tiny) BERT whose output
reads a known subset of dimensions, encoder and decoder runs with their record in the run
directory, resume reusing the checkpoint's selection (same final weights as a straight run), a
restart before the first checkpoint reading the record back, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tinylm import save_causal_lm, write_instruct_data
from toyglue import distill_pruned_decoder, options
from transformers import BertConfig, BertForSequenceClassification
from typer.testing import CliRunner

from geokd import GeokdError
from geokd import flexkd as flexkd_lib
from geokd.cli import app
from geokd.config import resolve_config
from geokd.engine import train
from geokd.losses.objective import Objective

runner = CliRunner()


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


def test_scoring_a_bert_selects_the_dimensions_its_classifier_reads():
    """The pooler reads only dimensions {3, 8, 13, 21} of the last hidden state's [CLS] row, so the
    gradient of the output with respect to that layer is zero everywhere else."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, num_labels=3)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    used = [3, 8, 13, 21]
    with torch.no_grad():
        keep = torch.zeros(24)
        keep[used] = 1.0
        model.bert.pooler.dense.weight.mul_(keep)
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen teacher, as in training
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1, 50, (6, 9), generator=g), "attention_mask": torch.ones(6, 9, dtype=torch.long),
                "labels": torch.randint(0, 3, (6,), generator=g)} for _ in range(3)]  # fmt: skip

    def forward(batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return out.hidden_states, flexkd_lib.classifier_output(out.logits, batch["labels"], "prediction"), (
            batch["attention_mask"].bool())  # fmt: skip

    scores = flexkd_lib.score_teacher(model, batches, [1, 2], forward, tangent=True)
    assert scores[2].select(4).tolist() == used
    assert scores[2].rows == scores[1].rows == 3 * 6 * 9
    assert (scores[1].abs_sum > 0).all()  # an inner layer feeds every dimension
    assert not any(p.grad is not None for p in model.parameters())  # nothing accumulated on the weights
    u = scores[2].basis(4)  # the gradients live in the span of the used coordinates
    assert u[[i for i in range(24) if i not in used]].abs().max() < 1e-6


def _distill(teacher_dir, glue_dir, out, **extra):
    flags = dict(teacher=str(teacher_dir / "final"), student="shrink:layers=2,hidden=16,heads=2", task="sst2",
                 data=str(glue_dir), out=str(out), loss="flexkd", layers="1:2,2:4", features="tokens", max_steps=8,
                 batch_size=16, lr=2e-3, seed=3, save_every=4, flexkd_samples=64, alpha=1.0, gamma=0.0)  # fmt: skip
    flags.update(extra)
    return resolve_config("distill", flags=flags)


def test_encoder_flexkd_run_records_its_selection_and_resume_reuses_it(teacher_dir, glue_dir, tmp_path):
    summaries = []
    straight = train(_distill(teacher_dir, glue_dir, tmp_path / "a"), on_start=summaries.append)
    flexkd = summaries[0]["flexkd"]
    assert not flexkd["reused"] and flexkd["rows"] > 64  # 64 examples, every non-padding token
    assert set(flexkd["pairs"]) == {"1->2", "2->4"} and flexkd["pairs"]["2->4"]["width"] == 16
    assert 16 / 32 < flexkd["pairs"]["2->4"]["score_kept"] <= 1.0  # the top half holds more than half
    record = tmp_path / "a" / flexkd_lib.RECORD
    with safe_open(str(record), framework="pt") as handle:
        chosen = handle.get_tensor("pair.2.4")
        meta = json.loads(handle.metadata()["geokd"])
        abs_sum = handle.get_tensor("layer.4.abs_sum")
    assert chosen.tolist() == sorted(chosen.tolist()) and len(set(chosen.tolist())) == 16
    assert set(chosen.tolist()) == set(abs_sum.topk(16).indices.tolist())
    assert meta["samples"] == 64 and meta["teacher_layers"] == [2, 4] and meta["basis"] == "dims"
    records = _records(tmp_path / "a")
    assert all(0 <= r["feature/flexkd/2->4"] <= 2 for r in records)
    def total(rows):
        return sum(r["feature/flexkd/1->2"] + r["feature/flexkd/2->4"] for r in rows) / len(rows)

    assert total(records[-3:]) < total(records[:3]) - 0.03  # flexkd alone (alpha 1, gamma 0): it learns
    report = tmp_path / "geometry.json"
    result = runner.invoke(app, ["eval", str(tmp_path / "a"), "--task", "sst2", "--data", str(glue_dir), "--geometry",
                                 "--teacher", str(teacher_dir / "final"), "--features", "mean", "--json", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "flexkd corr" in result.output
    entries = {(e["student_layer"], e["teacher_layer"]): e for e in json.loads(report.read_text())["geometry"]["layer_pairs"]}
    assert set(entries) == {(1, 2), (2, 4)} and all(-1 <= e["flexkd_correlation"] <= 1 for e in entries.values())

    class Interrupted(Exception):
        pass

    def stop_after_six(record):
        if record["step"] == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(_distill(teacher_dir, glue_dir, tmp_path / "b"), progress=stop_after_six)
    (tmp_path / "b" / flexkd_lib.RECORD).unlink()  # resume must take the selection from the checkpoint
    summaries.clear()
    resumed = train(_distill(teacher_dir, glue_dir, tmp_path / "b", resume="auto"), on_start=summaries.append)
    assert summaries[0]["flexkd"] == {"reused": True, "from": "checkpoint"}
    assert resumed.steps == straight.steps == 8
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_restart_before_the_first_checkpoint_reads_the_record_back(tmp_path):
    objective = Objective("flexkd", [(1, 2)], 4, 10, alpha=1.0)
    state = flexkd_lib.DimensionScores(10)
    state.update(torch.tensor([[0.0, 5, 0, 1, 0, 4, 0, 0, 3, 2]]))
    meta = {"basis": "dims", "teacher_layers": [2], "samples": 8}
    first = flexkd_lib.prepare(objective, tmp_path, meta, lambda: {2: state}, print)
    assert not first["reused"] and objective.feature_losses[0].index.tolist() == [1, 5, 8, 9]

    def must_not_score():
        raise AssertionError("scored again")

    again = Objective("flexkd", [(1, 2)], 4, 10, alpha=1.0)
    second = flexkd_lib.prepare(again, tmp_path, meta, must_not_score, print)
    assert second["reused"] and again.feature_losses[0].index.tolist() == [1, 5, 8, 9]
    warnings = []
    other = Objective("flexkd", [(1, 2)], 4, 10, alpha=1.0)  # another setting: scored afresh, with a warning
    third = flexkd_lib.prepare(other, tmp_path, {**meta, "samples": 16}, lambda: {2: state}, warnings.append)
    assert not third["reused"] and "scoring again" in warnings[0]
    (tmp_path / flexkd_lib.RECORD).write_bytes(b"not a safetensors file")
    with pytest.raises(GeokdError, match="is damaged"):
        flexkd_lib.prepare(other, tmp_path, meta, lambda: {2: state}, print)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_causal_lm(tmp_path_factory.mktemp("llama") / "teacher", "llama")


def test_decoder_flexkd_run_with_the_tangent_basis(llama, tmp_path):
    data = write_instruct_data(tmp_path / "data")
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", *options(
        teacher=llama, student="shrink:layers=2,hidden=16,heads=2,kv_heads=1", task="instruct", data=data, out=out,
        loss="flexkd", flexkd_basis="tangent", flexkd_output="label", layers="1:2,2:4", max_steps=4, batch_size=6,
        lr=3e-3, seed=1, save_minutes=0, max_length=96, max_prompt_length=64)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "flexkd (tangent, label): scored on" in result.output
    with safe_open(str(out / flexkd_lib.RECORD), framework="pt") as handle:
        basis = handle.get_tensor("pair.2.4")
    assert basis.shape == (32, 16)
    torch.testing.assert_close(basis.T @ basis, torch.eye(16), rtol=0, atol=1e-5)
    assert all(0 <= r["feature/flexkd/2->4"] <= 2 for r in _records(out))


def test_a_pruned_student_pairs_each_channel_with_the_teacher_channel_it_was_cut_from(tmp_path):
    """A `prune:` student's channel i is the teacher's channel hidden_channels[i]; Flex-KD keeps its own
    top-width teacher dimensions and pairs every selected one that a student channel was cut from with
    that channel (before, the ascending pairing shifted them apart as soon as the two selections differed)."""
    result, out = distill_pruned_decoder(tmp_path, "flexkd", max_steps=2)
    assert result.exit_code == 0, result.output
    assert "paired with the channel they were cut from" in result.output
    channels = json.loads((out / "final" / "geokd.json").read_text())["hidden_channels"]
    assert len(channels) == 16 and channels == sorted(channels) and max(channels) < 32
    reordered = 0
    with safe_open(str(out / flexkd_lib.RECORD), framework="pt") as handle:
        pairs = [name for name in handle.keys() if name.startswith("pair.")]
        assert pairs
        for name in pairs:
            chosen = handle.get_tensor(name).tolist()
            top = set(handle.get_tensor(f"layer.{name.split('.')[2]}.abs_sum").topk(16).indices.tolist())
            assert set(chosen) == top  # still Flex-KD's subspace
            assert all(c == o for c, o in zip(chosen, channels, strict=True) if o in top)
            reordered += chosen != sorted(chosen)
    assert reordered  # the selections differ from the pruned channels here, so the pairing had work to do


def test_a_run_from_a_saved_pruned_student_keeps_its_channel_and_block_origin(tmp_path):
    """`--student RUN/final` of a `prune:` run: its geokd.json's hidden_channels and teacher_blocks are
    read back, so Flex-KD pairs channels with their origin again and `--layers copied` the copied blocks
    (before, such a run fell back to the ascending pairing)."""
    first, run = distill_pruned_decoder(tmp_path, "none", max_steps=1)
    assert first.exit_code == 0, first.output
    record = json.loads((run / "final" / "geokd.json").read_text())
    assert record["hidden_channels"] and record["teacher_blocks"]
    again = tmp_path / "again"
    result = runner.invoke(app, ["distill", *options(
        teacher=tmp_path / "teacher", student=run / "final", task="instruct", data=tmp_path / "data", out=again,
        loss="flexkd", layers="copied", max_steps=1, batch_size=6, lr=3e-3, seed=1, save_minutes=0, max_length=96,
        max_prompt_length=64)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "paired with the channel they were cut from" in result.output
    kept = json.loads((again / "final" / "geokd.json").read_text())
    assert kept["hidden_channels"] == record["hidden_channels"] and kept["teacher_blocks"] == record["teacher_blocks"]
    with safe_open(str(again / flexkd_lib.RECORD), framework="pt") as handle:
        names = [name for name in handle.keys() if name.startswith("pair.")]
        # the copied blocks: student layer i + 1 against teacher layer teacher_blocks[i] + 1
        assert sorted(names) == sorted(f"pair.{i + 1}.{b + 1}" for i, b in enumerate(record["teacher_blocks"]))


@pytest.mark.parametrize(("extra", "message"), [
    ({"flexkd_basis": "pca"}, "flexkd_basis: must be dims"),
    ({"flexkd_samples": -1}, "flexkd_samples: must be >= 0"),
    ({"flexkd_output": "gold"}, "flexkd_output: must be prediction"),
])  # fmt: skip
def test_bad_flexkd_options_are_one_line(teacher_dir, glue_dir, tmp_path, extra, message):
    flags = dict(teacher=teacher_dir / "final", student="truncate:2", task="sst2", data=glue_dir, out=tmp_path / "r",
                 loss="flexkd", max_steps=2)  # fmt: skip
    result = runner.invoke(app, ["distill", *options(**flags, **extra)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "r").exists()


def _selection(run: Path, pair: str = "pair.2.4") -> list[int]:
    with safe_open(str(run / flexkd_lib.RECORD), framework="pt") as handle:
        return handle.get_tensor(pair).tolist()


def test_flexkd_scores_from_an_encoder_cache_give_the_live_selection(teacher_dir, glue_dir, tmp_path):
    from geokd.cache import CacheRequest, build_cache, verify_cache

    manifest = build_cache(CacheRequest(teacher=str(teacher_dir / "final"), task="sst2", data=str(glue_dir),
                                        out=str(tmp_path / "cache"), layers="2,4", features="tokens", batch_size=32,
                                        flexkd_samples=64))  # fmt: skip
    assert manifest["flexkd"]["examples"] == 64 and manifest["flexkd"]["layers"] == [2, 4]
    train(_distill(teacher_dir, glue_dir, tmp_path / "live", seed=42, max_steps=2))
    train(_distill(teacher_dir, glue_dir, tmp_path / "cached", seed=42, max_steps=2, cache=str(tmp_path / "cache")))
    assert _selection(tmp_path / "cached") == _selection(tmp_path / "live")
    assert _selection(tmp_path / "cached", "pair.1.2") == _selection(tmp_path / "live", "pair.1.2")
    with pytest.raises(GeokdError, match="pass --flexkd-output prediction --flexkd-samples 64"):
        train(_distill(teacher_dir, glue_dir, tmp_path / "other", cache=str(tmp_path / "cache"), flexkd_samples=32))
    (tmp_path / "cache" / "flexkd.safetensors").write_bytes(b"tampered")
    assert "flexkd.safetensors: SHA-256 mismatch" in verify_cache(tmp_path / "cache")["problems"]
    with pytest.raises(GeokdError, match="does not match the manifest's SHA-256"):
        train(_distill(teacher_dir, glue_dir, tmp_path / "broken", cache=str(tmp_path / "cache"), flexkd_samples=64))
    build_cache(CacheRequest(teacher=str(teacher_dir / "final"), task="sst2", data=str(glue_dir),
                             out=str(tmp_path / "plain"), layers="2,4", features="tokens"))  # fmt: skip
    with pytest.raises(GeokdError, match="the cache holds no Flex-KD scores"):
        train(_distill(teacher_dir, glue_dir, tmp_path / "none", cache=str(tmp_path / "plain")))
    assert not any((tmp_path / name).exists() for name in ("other", "broken", "none"))


def test_flexkd_scores_from_a_decoder_cache_give_the_live_selection(llama, tmp_path):
    from geokd.cache_decoder import DecoderCacheRequest, build_decoder_cache

    data = write_instruct_data(tmp_path / "data")
    common = dict(max_length=96, max_prompt_length=64)
    build_decoder_cache(DecoderCacheRequest(teacher=str(llama), data=str(data), out=str(tmp_path / "cache"), layers="2,4",
                                            dtype="fp32", flexkd_samples=0, batch_size=5, **common))  # fmt: skip
    runs = {}
    for name, extra in (("live", {}), ("cached", {"cache": str(tmp_path / "cache")})):
        flags = dict(teacher=str(llama), student="truncate:2", task="instruct", data=str(data), out=str(tmp_path / name),
                     loss="flexkd", layers="1:2,2:4", flexkd_samples=0, flexkd_basis="tangent", max_steps=2,
                     batch_size=6, lr=3e-3, seed=1, save_minutes=0, **common, **extra)  # fmt: skip
        train(resolve_config("distill", flags=flags))
        runs[name] = torch.tensor(_selection(tmp_path / name))
    torch.testing.assert_close(runs["cached"], runs["live"], rtol=0, atol=1e-5)  # the same tangent basis
    with pytest.raises(GeokdError, match="--flexkd-samples scores the cached hidden states: pass --layers"):
        build_decoder_cache(DecoderCacheRequest(teacher=str(llama), data=str(data), out=str(tmp_path / "c2"),
                                                flexkd_samples=8, **common))  # fmt: skip
