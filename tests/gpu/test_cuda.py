"""CUDA checks (issue #14), marked `gpu` and skipped without CUDA. Run them with
`.venv/bin/python -m pytest -m gpu tests/gpu` on a machine with one GPU (two for the DDP case).
**No GPU has run these yet.**"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toyglue import options

from geokd.config import resolve_config
from geokd.engine import train
from geokd.losses import cka, gram, procrustes
from geokd.losses._core import nuclear_norm_and_polar

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("fn", [procrustes, gram, cka])
def test_geometry_losses_on_bf16_features_match_float32(fn):
    """Features from a bf16-autocast forward: the losses upcast and agree with float32 to bf16's
    input precision (about 3 significant digits)."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(512, 384, generator=gen), torch.randn(512, 768, generator=gen)
    reference = fn(s.to(CUDA), t.to(CUDA)).item()
    low = fn(s.to(CUDA, torch.bfloat16), t.to(CUDA, torch.bfloat16))
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(reference, rel=2e-2)


@pytest.mark.parametrize("method", ["eigh", "svd32"])
def test_nuclear_norm_methods_on_cuda_match_the_cpu_float64_svd(method):
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(384, 768, generator=gen)
    value, polar = nuclear_norm_and_polar(m.to(CUDA), method)
    sigma = torch.linalg.svdvals(m.double())
    assert value.item() == pytest.approx(sigma.sum().item(), rel=1e-5)
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    torch.testing.assert_close(polar.double().cpu(), u @ vh, atol=1e-4, rtol=0)


def _flags(teacher_dir: Path, glue_dir: Path, out: Path, **extra) -> dict:
    flags = dict(teacher=str(teacher_dir / "final"), student="truncate:2", task="sst2", data=str(glue_dir),
                 out=str(out), loss="procrustes", layers="1:2,2:4", features="tokens", max_steps=3, batch_size=16,
                 lr=2e-3, seed=5, save_every=None)  # fmt: skip
    return {**flags, **extra}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_bf16_cuda_run_matches_a_float32_cpu_run(teacher_dir, glue_dir, tmp_path):
    train(resolve_config("distill", flags=_flags(teacher_dir, glue_dir, tmp_path / "cpu", device="cpu")))
    train(resolve_config("distill", flags=_flags(teacher_dir, glue_dir, tmp_path / "gpu", device="cuda")))
    cpu, gpu = _records(tmp_path / "cpu")[0], _records(tmp_path / "gpu")[0]  # the first step: same weights
    for name in ("loss", "task", "kl", "feature/procrustes/1->2"):
        assert gpu[name] == pytest.approx(cpu[name], rel=3e-2), name
    env = json.loads((tmp_path / "gpu" / "env.json").read_text())
    assert "bf16" in json.dumps(env) or "float32" in json.dumps(env)


def test_compile_and_activation_checkpointing_on_cuda(teacher_dir, glue_dir, tmp_path):
    train(resolve_config("distill", flags=_flags(teacher_dir, glue_dir, tmp_path / "plain", device="cuda")))
    train(resolve_config("distill", flags=_flags(teacher_dir, glue_dir, tmp_path / "fast", device="cuda",
                                                 compile=True, activation_checkpointing=True)))  # fmt: skip
    plain, fast = _records(tmp_path / "plain")[0], _records(tmp_path / "fast")[0]
    assert fast["loss"] == pytest.approx(plain["loss"], rel=2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_match_one_gpu(teacher_dir, glue_dir, tmp_path):
    flags = _flags(teacher_dir, glue_dir, tmp_path / "two")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GEOKD_DIST_TIMEOUT": "300"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "geokd",
               "distill", "--quiet", *options(**flags)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    train(resolve_config("distill", flags={**flags, "out": str(tmp_path / "one")}))
    for one, two in zip(_records(tmp_path / "one"), _records(tmp_path / "two"), strict=True):
        for name in ("loss", "task", "kl", "feature/procrustes/1->2"):
            assert two[name] == pytest.approx(one[name], rel=3e-2), name
