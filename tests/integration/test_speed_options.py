"""The speed options of issue #14 change no number: `--activation-checkpointing` and `--compile`
give the step losses and weights of a plain run (dropout off), and keep checkpoints and exports in
the ordinary key format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from geokd.config import resolve_config
from geokd.engine import train
from geokd.errors import GeokdError


def _run(teacher: Path, glue_dir: Path, out: Path, **extra) -> tuple[list[dict], dict[str, torch.Tensor]]:
    flags = dict(teacher=str(teacher), student="truncate:2", task="sst2", data=str(glue_dir), out=str(out),
                 loss="procrustes", layers="1:2,2:4", features="tokens", max_steps=3, batch_size=16, lr=2e-3,
                 seed=5, save_every=2)  # fmt: skip
    train(resolve_config("distill", flags={**flags, **extra}))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(str(out / "final" / "model.safetensors"))


def _assert_same(a: tuple, b: tuple) -> None:
    for one, two in zip(a[0], b[0], strict=True):
        for name in ("loss", "task", "kl", "feature/procrustes/1->2", "grad_norm"):
            assert two[name] == pytest.approx(one[name], rel=1e-5), name
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        if not key.endswith("attention.self.key.bias"):  # zero true gradient: Adam amplifies noise
            torch.testing.assert_close(b[1][key], a[1][key], rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_changes_no_number(quiet_teacher, glue_dir, tmp_path):
    plain = _run(quiet_teacher, glue_dir, tmp_path / "plain")
    checkpointed = _run(quiet_teacher, glue_dir, tmp_path / "ckpt", activation_checkpointing=True)
    _assert_same(plain, checkpointed)
    saved = load_file(str(tmp_path / "ckpt" / "checkpoints" / "step-2" / "student" / "model.safetensors"))
    assert saved.keys() == plain[1].keys()


def test_activation_checkpointing_with_the_global_geometry_batch(quiet_teacher, glue_dir, tmp_path):
    """The first pass runs without a graph; non-reentrant checkpointing allows that."""
    plain = _run(quiet_teacher, glue_dir, tmp_path / "plain", batch_size=8, grad_accum=2)
    checkpointed = _run(quiet_teacher, glue_dir, tmp_path / "ckpt", batch_size=8, grad_accum=2,
                        activation_checkpointing=True)  # fmt: skip
    _assert_same(plain, checkpointed)


def test_speed_options_may_change_on_resume(quiet_teacher, glue_dir, tmp_path):
    _run(quiet_teacher, glue_dir, tmp_path / "run", max_steps=2)
    shutil.rmtree(tmp_path / "run" / "final")
    (tmp_path / "run" / "results.json").unlink()
    _run(quiet_teacher, glue_dir, tmp_path / "run", max_steps=2, resume="auto", activation_checkpointing=True)


@pytest.mark.slow
def test_compile_changes_no_number(quiet_teacher, glue_dir, tmp_path):
    """torch.compile on CPU (inductor needs a C++ compiler; minutes of compilation: slow tier)."""
    plain = _run(quiet_teacher, glue_dir, tmp_path / "plain")
    try:
        compiled = _run(quiet_teacher, glue_dir, tmp_path / "compiled", compile=True)
    except GeokdError:
        raise
    except Exception as exc:  # no compiler toolchain on this machine
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {str(exc)[:200]}")
    _assert_same(plain, compiled)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_forward_passes_on_cpu(precision, quiet_teacher, glue_dir, tmp_path):
    """--precision bf16/fp16 (CPU autocast; fp16 adds dynamic loss scaling): the first step's
    terms agree with float32 to half precision, and the losses stay float32 and finite."""
    plain = _run(quiet_teacher, glue_dir, tmp_path / "fp32")
    half = _run(quiet_teacher, glue_dir, tmp_path / precision, precision=precision)
    for name in ("loss", "task", "kl", "feature/procrustes/1->2"):
        assert half[0][0][name] == pytest.approx(plain[0][0][name], rel=3e-2, abs=2e-4), name
    env = json.loads((tmp_path / precision / "env.json").read_text())
    assert f"--precision {precision}" in json.dumps(env)


def test_fp16_loss_scaler_state_is_checkpointed_and_resume_is_bit_identical(quiet_teacher, glue_dir, tmp_path):
    straight = _run(quiet_teacher, glue_dir, tmp_path / "a", precision="fp16", max_steps=4)
    _run(quiet_teacher, glue_dir, tmp_path / "b", precision="fp16", max_steps=4)
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["scaler"]["scale"] > 0
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-4")
    (tmp_path / "b" / "results.json").unlink()
    resumed = _run(quiet_teacher, glue_dir, tmp_path / "b", precision="fp16", max_steps=4, resume="auto")
    for key in straight[1]:
        assert torch.equal(straight[1][key], resumed[1][key]), key


def test_precision_is_validated(quiet_teacher, glue_dir, tmp_path):
    with pytest.raises(GeokdError, match="precision: must be auto, fp32, bf16 or fp16, got 'fp8'"):
        _run(quiet_teacher, glue_dir, tmp_path / "bad", precision="fp8")
    assert not (tmp_path / "bad").exists()
