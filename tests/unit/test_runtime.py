"""Runtime resolution on a CPU-only machine (the CUDA branch is exercised by the gpu tier)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from geokd import GeokdError
from geokd.runtime import resolve_runtime


def test_cpu_runtime_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runtime = resolve_runtime("auto")
    if runtime.device.type == "cpu":
        assert runtime.autocast_dtype is None and "float32" in runtime.reason
    runtime = resolve_runtime("cpu")
    assert runtime.device == torch.device("cpu") and runtime.reason.startswith("--device cpu")
    assert runtime.is_main and runtime.world_size == 1


def test_ranks_come_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    runtime = resolve_runtime("cpu")
    assert runtime.rank == 1 and runtime.world_size == 2 and not runtime.is_main


def test_unavailable_cuda_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GeokdError, match="CUDA is not available on this machine; use --device cpu"):
        resolve_runtime("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runtime_uses_bf16_autocast_when_supported():
    runtime = resolve_runtime("auto")
    assert runtime.device.type == "cuda"
    if torch.cuda.is_bf16_supported():
        assert runtime.autocast_dtype == torch.bfloat16


@pytest.mark.parametrize("world", ["1", "2"])
def test_leave_flushes_and_exits_with_the_code(world):
    """`distributed.leave` ends a torchrun rank with os._exit (no interpreter teardown): what was
    printed still reaches the pipe, and the exit status is the one asked for."""
    script = "import sys\nfrom geokd.distributed import leave\nprint('work done')\nsys.stderr.write('bye')\nleave(3)\n"
    env = {**os.environ, "WORLD_SIZE": world}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (3, "work done\n", "bye")
