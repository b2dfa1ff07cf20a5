"""`geokd cache` and `geokd distill --cache` on tiny models (issue #5): distilling from the cache
reproduces distilling with the live teacher, token-level caches handle mixed lengths, stale or
corrupt caches are refused with the field named, and an interrupted cache resumes."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from toyglue import VOCAB, options
from typer.testing import CliRunner

from geokd import GeokdError
from geokd.cache import CacheRequest, TeacherCache, build_cache, file_sha256, verify_cache
from geokd.cli import app

runner = CliRunner()


def _cache(teacher_dir, glue_dir, out, **kwargs) -> Path:
    args = {"teacher": teacher_dir / "final", "task": "sst2", "data": glue_dir, "layers": "2,4", "features": "cls",
            "dtype": "fp32", "shard_size": 50, "out": out, **kwargs}  # fmt: skip
    result = runner.invoke(app, ["cache", "--quiet", *options(**args)])
    assert result.exit_code == 0, result.output
    return Path(out)


def _distill(teacher_dir, glue_dir, out, *extra: str, **kwargs):
    args = {"teacher": teacher_dir / "final", "student": "truncate:2", "task": "sst2", "data": glue_dir,
            "loss": "procrustes", "layers": "1:2,2:4", "max_steps": 6, "batch_size": 16, "seed": 3, "out": out,
            **kwargs}  # fmt: skip
    return runner.invoke(app, ["distill", "--quiet", *options(**args), *extra])


def _losses(run: Path) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in r.items() if k in ("loss", "task", "kl") or k.startswith("feature/")}
        for r in records
    ]


def _assert_same_run(live: Path, cached: Path, rtol: float) -> None:
    a, b = _losses(live), _losses(cached)
    assert len(a) == len(b) == 6 and a[0].keys() == b[0].keys()
    for x, y in zip(a, b, strict=True):
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=rtol, abs=rtol), (key, x[key], y[key])
    wa, wb = (
        load_file(live / "final" / "model.safetensors"),
        load_file(cached / "final" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=10 * rtol, atol=10 * rtol)


@pytest.fixture(scope="module")
def live_run(teacher_dir, glue_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("live") / "run"
    result = _distill(teacher_dir, glue_dir, out)
    assert result.exit_code == 0, result.output
    return out


def test_cache_layout_and_manifest(teacher_dir, glue_dir, tmp_path):
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_examples"] == 128 and manifest["layers"] == [2, 4]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert [s["n_examples"] for s in manifest["shards"]] == [50, 50, 28]
    assert manifest["teacher"]["weights_sha256"] and manifest["tokenizer_sha256"]
    assert manifest["data"]["fingerprint"].startswith("sha256:") and manifest["split"] == "train"
    shard = load_file(cache / "shard-00001.safetensors")
    assert shard["example_id"].tolist() == list(range(50, 100))
    assert shard["layer.2"].shape == (50, 32) and shard["layer.2"].dtype == torch.float32
    assert shard["logits"].shape == (50, 2)
    assert verify_cache(cache)["ok"]
    info = runner.invoke(app, ["cache", "--info", str(cache)])
    assert info.exit_code == 0 and "128 / " in info.output


def test_distill_from_an_fp32_cache_matches_the_live_teacher(teacher_dir, glue_dir, live_run, tmp_path):
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache")
    out = tmp_path / "cached"
    result = _distill(teacher_dir, glue_dir, out, cache=cache)
    assert result.exit_code == 0, result.output
    _assert_same_run(live_run, out, rtol=1e-5)
    env = json.loads((out / "env.json").read_text())
    assert env["teacher"]["cache"] == str(cache)


def test_a_pretrained_student_distils_from_the_cache_without_a_teacher(
    teacher_dir, glue_dir, base_dir, tmp_path
):
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache")
    result = runner.invoke(app, ["distill", "--quiet", *options(student=base_dir, task="sst2", data=glue_dir,
                                 cache=cache, layers="2:2", max_steps=2, batch_size=16, out=tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_token_level_cache_reproduces_the_live_token_loss(teacher_dir, glue_dir, tmp_path):
    live = tmp_path / "live"
    assert _distill(teacher_dir, glue_dir, live, features="tokens").exit_code == 0
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache", features="tokens")
    shard = load_file(cache / "shard-00000.safetensors")
    lengths = (shard["offsets"][1:] - shard["offsets"][:-1]).tolist()
    assert len(set(lengths)) > 3 and shard["layer.2"].shape[0] == sum(lengths)  # ragged: no padding stored
    out = tmp_path / "cached"
    result = _distill(teacher_dir, glue_dir, out, features="tokens", cache=cache)
    assert result.exit_code == 0, result.output
    _assert_same_run(live, out, rtol=1e-5)


def test_bf16_cache_is_close_to_the_live_teacher(teacher_dir, glue_dir, live_run, tmp_path):
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache", dtype="bf16")
    shard = load_file(cache / "shard-00000.safetensors")
    assert shard["layer.2"].dtype == torch.bfloat16 and shard["logits"].dtype == torch.float32
    out = tmp_path / "cached"
    assert _distill(teacher_dir, glue_dir, out, cache=cache).exit_code == 0
    first_live, first_cached = _losses(live_run)[0], _losses(out)[0]
    for key in first_live:  # bf16 keeps ~3 significant digits of the features
        assert first_cached[key] == pytest.approx(first_live[key], rel=2e-2, abs=2e-3), key


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"max_length": 64}, "max_length differs"),
        ({"features": "mean"}, "features (pooling) differs"),
        ({"layers": "1:1,2:4"}, "layers differs"),
        ({"alpha": 0.5, "loss": "none"}, None),  # logits are cached: fine
    ],
)
def test_stale_caches_are_refused_with_the_field_named(teacher_dir, glue_dir, tmp_path, extra, fragment):
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache")
    result = _distill(teacher_dir, glue_dir, tmp_path / "run", cache=cache, **{"max_steps": 1, **extra})
    if fragment is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2, result.output
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_other_data_teacher_and_missing_logits_are_refused(teacher_dir, glue_dir, base_dir, tmp_path):
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache")
    other_data = tmp_path / "SST-2"
    shutil.copytree(glue_dir, other_data)
    with open(other_data / "train.tsv", "a") as handle:
        handle.write("good w1 w2\t1\n")
    result = _distill(teacher_dir, glue_dir, tmp_path / "a", cache=cache, data=other_data, max_steps=1)
    assert result.exit_code == 2 and "data differs" in result.output
    other_teacher = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir / "final", other_teacher)
    weights = load_file(other_teacher / "model.safetensors")
    weights["classifier.bias"] = weights["classifier.bias"] + 1.0
    from safetensors.torch import save_file

    save_file(weights, other_teacher / "model.safetensors", metadata={"format": "pt"})
    result = _distill(teacher_dir, glue_dir, tmp_path / "b", cache=cache, teacher=other_teacher, max_steps=1)
    assert result.exit_code == 2 and "teacher differs" in result.output, result.output
    no_logits = tmp_path / "no-logits"
    args = options(teacher=teacher_dir / "final", task="sst2", data=glue_dir, layers="2,4", out=no_logits)
    assert runner.invoke(app, ["cache", "--quiet", "--no-logits", *args]).exit_code == 0
    result = _distill(teacher_dir, glue_dir, tmp_path / "c", cache=no_logits, max_steps=1)
    assert result.exit_code == 2 and "logits are not in the cache" in result.output
    result = _distill(teacher_dir, glue_dir, tmp_path / "d", cache=no_logits, max_steps=1, alpha=1.0)
    assert result.exit_code == 0, result.output  # a feature-only objective needs no logits


def test_a_corrupted_shard_is_detected(teacher_dir, glue_dir, tmp_path):
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache")
    shard = cache / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify = runner.invoke(app, ["cache", "--verify", str(cache)])
    assert verify.exit_code == 2 and "shard-00001.safetensors: SHA-256 mismatch" in verify.output
    result = _distill(teacher_dir, glue_dir, tmp_path / "run", cache=cache, max_steps=20)
    assert result.exit_code == 2 and "shard-00001.safetensors fails its SHA-256 check" in result.output


def test_an_interrupted_cache_resumes_from_the_last_complete_shard(teacher_dir, glue_dir, tmp_path):
    request = CacheRequest(teacher=str(teacher_dir / "final"), task="sst2", data=str(glue_dir), layers="2,4",
                           dtype="fp32", shard_size=50, batch_size=16, out=str(tmp_path / "cache"))  # fmt: skip
    seen = []

    def stop_in_second_shard(k: int) -> None:
        seen.append(k)
        if sum(seen) > 60:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(request, on_batch=stop_in_second_shard)
    partial = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 1
    first_shard = (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns
    with pytest.raises(GeokdError, match="incomplete"):
        TeacherCache(tmp_path / "cache")
    plans = []
    manifest = build_cache(request, on_plan=plans.append)
    assert plans[0]["shards_kept"] == 1 and manifest["complete"] and len(manifest["shards"]) == 3
    assert (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns == first_shard
    straight = build_cache(CacheRequest(**{**vars(request), "out": str(tmp_path / "straight")}))
    assert [s["sha256"] for s in straight["shards"]] == [s["sha256"] for s in manifest["shards"]]
    # A different request into the same folder is refused, naming what differs.
    with pytest.raises(GeokdError, match="another layers"):
        build_cache(CacheRequest(**{**vars(request), "layers": "1,2"}))


def test_a_cache_that_would_not_fit_is_refused_before_writing(teacher_dir, glue_dir, tmp_path):
    request = CacheRequest(teacher=str(teacher_dir / "final"), task="sst2", data=str(glue_dir), layers="all",
                           features="tokens", dtype="fp32", out=str(tmp_path / "cache"))  # fmt: skip
    with pytest.raises(GeokdError, match="needs about .* free"):
        build_cache(request, disk_usage=lambda path: SimpleNamespace(free=1000))
    assert not (tmp_path / "cache").exists()


def test_a_student_that_tokenises_differently_is_refused(teacher_dir, glue_dir, base_dir, tmp_path):
    from transformers import BertTokenizer

    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache")
    student = tmp_path / "student"
    shutil.copytree(base_dir, student)
    for name in os.listdir(student):
        if name.startswith(("tokenizer", "vocab", "special_tokens")):
            (student / name).unlink()
    vocab = list(VOCAB)
    vocab[10], vocab[11] = vocab[11], vocab[10]  # same size, two words swapped: other token ids
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(student)
    result = runner.invoke(app, ["distill", "--quiet", *options(student=student, task="sst2", data=glue_dir,
                                 cache=cache, layers="2:2", max_steps=1, out=tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 2 and "tokenizer differs" in result.output, result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--task", "sst2", "--out", "x"], "--teacher missing"),
        (["--teacher", "t", "--task", "sst2", "--out", "x", "--dtype", "int8"], "--dtype must be one of"),
        (["--verify", "a", "--info", "b"], "pass one of them"),
        (["--info", "."], "has no manifest.json"),
    ],
)
def test_cache_cli_errors_are_one_line(args, fragment):
    result = runner.invoke(app, ["cache", "--quiet", *args])
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_layers_and_an_incomplete_cache_for_distill(teacher_dir, glue_dir, tmp_path):
    result = runner.invoke(app, ["cache", "--quiet", *options(teacher=teacher_dir / "final", task="sst2",
                                 data=glue_dir, layers="2,9", out=tmp_path / "c")])  # fmt: skip
    assert result.exit_code == 2 and "layer 9 is out of range" in result.output
    assert not (tmp_path / "c").exists()
    cache = _cache(teacher_dir, glue_dir, tmp_path / "ok")
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    result = _distill(teacher_dir, glue_dir, tmp_path / "run", cache=cache, max_steps=1)
    assert result.exit_code == 2 and "is incomplete" in result.output


def test_a_teacher_layer_shared_by_two_pairs_is_read_once(teacher_dir, glue_dir, tmp_path):
    cache = _cache(teacher_dir, glue_dir, tmp_path / "cache")
    reader = TeacherCache(cache)
    _, (a, b) = reader.lookup([0, 1, 60], [4, 4])
    assert a.shape == (3, 32) and torch.equal(a, b)
    live = tmp_path / "live"
    assert _distill(teacher_dir, glue_dir, live, layers="1:4,2:4").exit_code == 0
    cached = tmp_path / "cached"
    result = _distill(teacher_dir, glue_dir, cached, layers="1:4,2:4", cache=cache)
    assert result.exit_code == 0, result.output
    _assert_same_run(live, cached, rtol=1e-5)


def test_a_run_killed_mid_shard_leaves_a_temp_file_that_does_not_block_resume(
    teacher_dir, glue_dir, tmp_path
):
    out = tmp_path / "cache"
    out.mkdir()
    (out / ".shard-00000.safetensors.abc.tmp.safetensors").write_bytes(b"half")  # what SIGKILL leaves
    _cache(teacher_dir, glue_dir, out)
    assert not list(out.glob(".*")) and verify_cache(out)["ok"]


def _disk_full(kind: str) -> BaseException:
    if kind == "oserror":
        return OSError(errno.ENOSPC, "No space left on device")
    from safetensors import SafetensorError

    return SafetensorError(  # how the Rust writer reports it
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    )


def _error_line(result, *fragments: str) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _cache_args(teacher_dir, glue_dir, out) -> list[str]:
    return ["cache", "--quiet", *options(teacher=teacher_dir / "final", task="sst2", data=glue_dir, layers="2,4",
                                         dtype="fp32", shard_size=50, out=out)]  # fmt: skip


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_while_writing_a_shard_keeps_the_finished_shards(
    teacher_dir, glue_dir, tmp_path, monkeypatch, kind
):
    import safetensors.torch

    out = tmp_path / "cache"
    real_save_file = safetensors.torch.save_file
    calls = []

    def full_on_second_shard(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a partial file
            raise _disk_full(kind)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_on_second_shard)
    result = runner.invoke(app, _cache_args(teacher_dir, glue_dir, out))
    _error_line(result, str(out / "shard-00001.safetensors"), "free", "no space left")
    monkeypatch.undo()
    left = sorted(p.name for p in out.iterdir())
    assert left == ["manifest.json", "shard-00000.safetensors"]  # no temporary
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    assert file_sha256(out / "shard-00000.safetensors") == manifest["shards"][0]["sha256"]
    rerun = runner.invoke(app, _cache_args(teacher_dir, glue_dir, out))
    assert rerun.exit_code == 0 and "1 kept from an earlier run" in rerun.output, rerun.output
    assert verify_cache(out)["ok"] and not list(out.glob(".*"))


def test_a_full_disk_while_writing_the_manifest_keeps_the_previous_one(
    teacher_dir, glue_dir, tmp_path, monkeypatch
):
    out = tmp_path / "cache"
    real_write_text = Path.write_text
    calls = []

    def full_on_second_manifest(self, data, *args, **kwargs):
        if self.name.startswith(".manifest.json."):
            calls.append(self)
            if len(calls) == 2:
                real_write_text(self, data[:20], *args, **kwargs)
                raise _disk_full("oserror")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_on_second_manifest)
    result = runner.invoke(app, _cache_args(teacher_dir, glue_dir, out))
    _error_line(result, str(out / "manifest.json"), "free")
    monkeypatch.undo()
    assert not list(out.glob(".*"))  # the manifest's temporary is gone
    manifest = json.loads((out / "manifest.json").read_text())  # the previous manifest, intact
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    (out / ".manifest.json.x1y2.tmp.json").write_text('{"half')  # what a kill leaves
    assert runner.invoke(app, _cache_args(teacher_dir, glue_dir, out)).exit_code == 0
    assert verify_cache(out)["ok"] and not list(out.glob(".*"))
