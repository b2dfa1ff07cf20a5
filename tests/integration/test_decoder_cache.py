"""The decoder cache (issue #12): a tiny causal-LM teacher's top-k targets and hidden rows written
by `build_decoder_cache`, read back by example id, and checked against the live teacher (ids,
values, tail mass, rows), plus the size plan, resume, verification and refusal of stale and
corrupt caches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tinylm import save_causal_lm, write_instruct_data

from geokd import GeokdError
from geokd.cache_decoder import (
    DecoderCache,
    DecoderCacheRequest,
    build_decoder_cache,
    check_decoder_cache_matches,
    decoder_cache_bytes,
    id_dtype,
    verify_decoder_cache,
)
from geokd.losses.topk_kd import topk_targets
from geokd.models import decoder as decoder_lib
from geokd.tasks import instruct
from geokd.workloads.decoder import _base_forward, response_positions


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory) -> Path:
    return write_instruct_data(tmp_path_factory.mktemp("instruct") / "toy")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_causal_lm(tmp_path_factory.mktemp("llama") / "teacher", "llama")


def _request(teacher, data, out, **extra) -> DecoderCacheRequest:
    options = dict(teacher=str(teacher), data=str(data), out=str(out), layers="2,4", features="tokens", dtype="fp32",
                   topk=5, temperature=1.5, max_prompt_length=48, max_length=64, batch_size=3, shard_size=7)  # fmt: skip
    options.update(extra)
    return DecoderCacheRequest(**options)


def _live(teacher_dir, data, request):
    """The live teacher's top-k targets and token rows for every kept train example, in order."""
    teacher = decoder_lib.load_causal_lm(str(teacher_dir))
    split = instruct.load_instruct_split(str(data), "train")
    features, _ = instruct.tokenize_instruct(split, teacher.tokenizer, max_prompt_length=request.max_prompt_length,
                                             max_length=request.max_length)  # fmt: skip
    collate = instruct.make_instruct_collate(teacher.tokenizer)
    head = decoder_lib.output_head(teacher.model)
    out = {}
    with torch.no_grad():
        for f in features:
            batch = collate([f])
            mask, _ = response_positions(batch["labels"])
            output = _base_forward(teacher.model, batch, True)
            logits = output.last_hidden_state[:, :-1][mask] @ head.weight.T
            rows = decoder_lib.decoder_features(output.hidden_states, batch["labels"] != -100, [2, 4], "tokens")
            out[f["example_id"]] = (topk_targets(logits, request.topk, temperature=request.temperature), rows)
    return out


def test_decoder_cache_round_trip_matches_the_live_teacher(llama_dir, instruct_dir, tmp_path):
    request = _request(llama_dir, instruct_dir, tmp_path / "cache")
    plans = []
    manifest = build_decoder_cache(request, on_plan=plans.append)
    assert manifest["complete"] and manifest["format"] == "geokd-decoder-cache"
    assert manifest["id_dtype"] == "int16" and manifest["topk"] == 5 and manifest["temperature"] == 1.5
    assert len(manifest["shards"]) == math.ceil(manifest["n_examples"] / 7) > 1
    # The plan is made before anything is written, and it is what was written (headers aside).
    assert plans[0]["expected_bytes"] >= manifest["bytes"] >= plans[0]["minimum_bytes"]
    live = _live(llama_dir, instruct_dir, request)
    assert sorted(live) == sorted(DecoderCache(tmp_path / "cache")._where)
    cache = DecoderCache(tmp_path / "cache")
    chosen = [sorted(live)[3], sorted(live)[0], sorted(live)[-1]]  # any order, across shards
    got = cache.lookup(chosen, [4, 2])
    (ids, values, tail) = zip(*[live[e][0] for e in chosen], strict=True)
    torch.testing.assert_close(got.ids, torch.cat(ids))
    torch.testing.assert_close(got.log_probs, torch.cat(values), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.log_tail, torch.cat(tail), rtol=1e-5, atol=1e-5)
    assert got.ids.dtype == torch.int64 and (got.log_probs.exp().sum(-1) + got.log_tail.exp() - 1).abs().max() < 1e-5
    for position, layer_index in ((0, 1), (1, 0)):  # layers come back in the order asked: 4, then 2
        want = torch.cat([live[e][1][layer_index] for e in chosen])
        torch.testing.assert_close(got.rows[position], want, rtol=1e-5, atol=1e-5)
    report = verify_decoder_cache(tmp_path / "cache")
    assert report["ok"], report["problems"]


def test_sizes_resume_and_refusals(llama_dir, instruct_dir, tmp_path):
    assert id_dtype(49_152) == torch.uint16 and id_dtype(32_000) == torch.int16 and id_dtype(151_936) == torch.int32
    size = decoder_cache_bytes(1000, 10, topk=64, vocab=49_152, dtype="bf16", layers=0, hidden=576,
                               features="tokens", shards=1)  # fmt: skip
    assert size["per_token_minimum"] == 64 * (2 + 2) + 2 and size["minimum"] == 1000 * 258
    request = _request(llama_dir, instruct_dir, tmp_path / "cache", dtype="bf16", layers="")
    first = build_decoder_cache(request)
    # Resume: a removed last shard is rewritten, the others are kept as they were.
    last = tmp_path / "cache" / first["shards"][-1]["file"]
    kept = (tmp_path / "cache" / first["shards"][0]["file"]).stat().st_mtime_ns
    last.unlink()
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    manifest["complete"] = False
    (tmp_path / "cache" / "manifest.json").write_text(json.dumps(manifest))
    plans = []
    again = build_decoder_cache(request, on_plan=plans.append)
    assert plans[0]["shards_kept"] == len(first["shards"]) - 1 and again["shards"] == first["shards"]
    assert (tmp_path / "cache" / first["shards"][0]["file"]).stat().st_mtime_ns == kept
    # Another setting into the same folder is refused, naming the field.
    with pytest.raises(GeokdError, match="another topk"):
        build_decoder_cache(_request(llama_dir, instruct_dir, tmp_path / "cache", dtype="bf16", layers="", topk=6))
    # A corrupt shard: verify lists it and the reader refuses it in one line.
    data = bytearray(last.read_bytes())
    data[-3] ^= 0xFF
    last.write_bytes(bytes(data))
    report = verify_decoder_cache(tmp_path / "cache")
    assert not report["ok"] and "SHA-256 mismatch" in report["problems"][0]
    with pytest.raises(GeokdError, match="fails its SHA-256 check"):
        DecoderCache(tmp_path / "cache")
    # No room: refused before anything is written.
    with pytest.raises(GeokdError, match="the cache needs about"):
        build_decoder_cache(_request(llama_dir, instruct_dir, tmp_path / "full"),
                            disk_usage=lambda _: type("U", (), {"free": 10})())  # fmt: skip
    assert not (tmp_path / "full").exists()


def test_stale_caches_are_refused_by_field(llama_dir, instruct_dir, tmp_path):
    manifest = build_decoder_cache(_request(llama_dir, instruct_dir, tmp_path / "cache", layers="2"))
    good = dict(data_fingerprint=manifest["data"]["fingerprint"], template="alpaca", max_prompt_length=48, max_length=64,
                features="tokens", teacher_layers=[2], temperature=1.5, tokenizer_hash=manifest["tokenizer_sha256"])  # fmt: skip
    check_decoder_cache_matches(manifest, **good)
    for change, message in (
        ({"data_fingerprint": "sha256:0"}, "data differs"),
        ({"max_length": 80}, "pass --max-length 64"),
        ({"temperature": 1.0}, "pass --temperature 1.5"),
        ({"teacher_layers": [3]}, "teacher layer 3 is not cached"),
        ({"features": "mean"}, "pass --features tokens"),
        ({"tokenizer_hash": "0" * 64}, "tokenizer differs"),
    ):
        with pytest.raises(GeokdError, match=message):
            check_decoder_cache_matches(manifest, **{**good, **change})


def test_geokd_cache_task_instruct_cli(llama_dir, instruct_dir, tmp_path):
    from typer.testing import CliRunner

    from geokd.cli import app

    runner = CliRunner()
    out = tmp_path / "cache"
    result = runner.invoke(app, ["cache", "--teacher", str(llama_dir), "--task", "instruct", "--data", str(instruct_dir),
                                 "--layers", "2", "--topk", "4", "--max-length", "64", "--max-prompt-length", "48",
                                 "--out", str(out), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "bytes per response token" in result.output and "decoder teacher cache (complete)" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["topk"] == 4 and manifest["layers"] == [2] and manifest["features"] == "tokens"
    verified = runner.invoke(app, ["cache", "--verify", str(out)])
    assert verified.exit_code == 0 and "shard(s) verified" in verified.output
    shard = out / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-8])
    broken = runner.invoke(app, ["cache", "--verify", str(out)])
    assert broken.exit_code == 2 and "failed verification" in broken.output
    bad = runner.invoke(app, ["cache", "--teacher", str(llama_dir), "--task", "instruct", "--data", str(instruct_dir),
                              "--topk", "0", "--out", str(tmp_path / "bad")])  # fmt: skip
    assert bad.exit_code == 2 and "--topk must be at least 1, got 0" in bad.output
    assert not (tmp_path / "bad").exists()


def _distill_config(teacher, data, out, **extra):
    from geokd.config import resolve_config

    flags = dict(teacher=str(teacher), student="truncate:2", task="instruct", data=str(data), out=str(out),
                 loss="procrustes", layers="1:2,2:4", max_steps=4, batch_size=4, lr=3e-3, seed=5, save_minutes=0,
                 max_length=64, max_prompt_length=48, temperature=1.5)  # fmt: skip
    flags.update(extra)
    return resolve_config("distill", flags=flags)


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


@pytest.mark.parametrize("features", ["tokens", "mean"])
def test_distill_from_a_full_vocabulary_cache_equals_the_live_teacher(llama_dir, instruct_dir, tmp_path, features):
    """k = V and fp32: top-k + tail KD is the full KD, so every per-step loss term of a cached run
    equals the live run's to 1e-5 (data order, masking, rows, the objective: all the same)."""
    from tinylm import VOCAB

    from geokd.engine import train

    build_decoder_cache(_request(llama_dir, instruct_dir, tmp_path / "cache", topk=len(VOCAB), features=features,
                                 batch_size=4))  # fmt: skip
    train(_distill_config(llama_dir, instruct_dir, tmp_path / "live", features=features))
    train(_distill_config(llama_dir, instruct_dir, tmp_path / "cached", features=features,
                          cache=str(tmp_path / "cache")))  # fmt: skip
    live, cached = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached, strict=True):
        for term in ("loss", "sft", "kd", "feature/procrustes/1->2", "feature/procrustes/2->4"):
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-6), (a["step"], term)
    # With a smaller k the KD term is the top-k + tail approximation: lower, but the same ballpark.
    build_decoder_cache(_request(llama_dir, instruct_dir, tmp_path / "cache8", topk=8, features=features, batch_size=4))
    train(_distill_config(llama_dir, instruct_dir, tmp_path / "cached8", features=features,
                          cache=str(tmp_path / "cache8")))  # fmt: skip
    first = _losses(tmp_path / "cached8")[0]
    assert 0 < first["kd"] <= live[0]["kd"] + 1e-6 and first["sft"] == pytest.approx(live[0]["sft"], rel=1e-5)


def test_distill_cache_refusals(llama_dir, instruct_dir, tmp_path):
    from geokd.engine import train

    build_decoder_cache(_request(llama_dir, instruct_dir, tmp_path / "cache", layers="2"))
    with pytest.raises(GeokdError, match="pass --temperature 1.5"):
        train(_distill_config(llama_dir, instruct_dir, tmp_path / "a", cache=str(tmp_path / "cache"), layers="1:2",
                              temperature=1.0))  # fmt: skip
    with pytest.raises(GeokdError, match="teacher layer 4 is not cached"):
        train(_distill_config(llama_dir, instruct_dir, tmp_path / "b", cache=str(tmp_path / "cache")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cached_top8_kd_equals_live_top8_kd(llama_dir, instruct_dir, tmp_path):
    """The KD term from an fp32 cache at k = 8 equals top-k KD against targets computed from the
    live teacher on the same batch, to 1e-5 (value and gradient)."""
    from geokd.losses.topk_kd import chunked_topk_kd

    request = _request(llama_dir, instruct_dir, tmp_path / "cache", topk=8, layers="")
    build_decoder_cache(request)
    cache = DecoderCache(tmp_path / "cache")
    teacher = decoder_lib.load_causal_lm(str(llama_dir))
    student = decoder_lib.load_causal_lm(str(llama_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    split = instruct.load_instruct_split(str(instruct_dir), "train")
    features, _ = instruct.tokenize_instruct(split, teacher.tokenizer, max_prompt_length=48, max_length=64)
    batch = instruct.make_instruct_collate(teacher.tokenizer)(features[:6])
    mask, _ = response_positions(batch["labels"])
    with torch.no_grad():
        t_hidden = _base_forward(teacher.model, batch, False).last_hidden_state[:, :-1][mask]
    live = topk_targets(t_hidden @ decoder_lib.output_head(teacher.model).weight.T, 8, temperature=1.5)
    cached = cache.lookup(batch["example_id"])
    head = decoder_lib.output_head(student.model)
    results = []
    for targets in (live, (cached.ids, cached.log_probs, cached.log_tail)):
        student.model.zero_grad()
        s_hidden = _base_forward(student.model, batch, False).last_hidden_state[:, :-1][mask]
        loss, _ = chunked_topk_kd(s_hidden, head, *targets, "forward", temperature=1.5, chunk_tokens=7)
        loss.backward()
        results.append((loss.detach(), head.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)
