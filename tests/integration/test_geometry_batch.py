"""`--geometry-batch global` (issue #14): with `--grad-accum`, the batch-level feature losses are
evaluated over the rows of the whole step, so 4 micro-batches of 8 take the step of one batch of
32 for every feature loss; `micro` (each micro-batch's own geometry) does not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from geokd.config import resolve_config
from geokd.engine import train
from geokd.losses.registry import row_loss_names


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(teacher: Path, glue_dir: Path, out: Path, **extra) -> tuple[dict, dict[str, torch.Tensor]]:
    flags = dict(teacher=str(teacher), student="truncate:2", task="sst2", data=str(glue_dir), out=str(out),
                 layers="1:2,2:4", features="tokens", max_steps=2, lr=2e-3, seed=5, save_every=None,
                 flexkd_samples=64)  # fmt: skip
    train(resolve_config("distill", flags={**flags, **extra}))
    return _records(out), load_file(str(out / "final" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # Adam divides by |g|, so a gradient entry that is rounding noise moves by up to lr (2e-3):
    # the tolerance is 2.5% of lr; the gradient itself is compared tightly below.
    # Attention key biases have an exactly-zero true gradient (softmax is shift-invariant), and
    # Adam's first step turns their rounding noise into ±lr updates: they are not comparable.
    compared = [key for key in a if not key.endswith("attention.self.key.bias")]
    assert len(compared) > 10
    for key in compared:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=5e-5, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("loss", sorted(row_loss_names()))
def test_global_geometry_batch_equals_one_big_batch(loss, quiet_teacher, glue_dir, tmp_path):
    big, big_weights = _run(quiet_teacher, glue_dir, tmp_path / "big", loss=loss, batch_size=32)
    acc, acc_weights = _run(quiet_teacher, glue_dir, tmp_path / "acc", loss=loss, batch_size=8, grad_accum=4)
    assert len(big) == len(acc) == 2
    for one, four in zip(big, acc, strict=True):
        assert set(one) == set(four)
        for name in one:
            if name.startswith(("feature/", "loss", "task", "kl")):
                assert four[name] == pytest.approx(one[name], rel=2e-5, abs=1e-6), (loss, name)
    _assert_same_weights(big_weights, acc_weights)


def test_micro_geometry_batch_is_each_micro_batch_alone(quiet_teacher, glue_dir, tmp_path):
    """`micro` is the cheaper, different objective: the mean of four micro-batch geometries is
    not the geometry of their union (so the first step's Procrustes term differs)."""
    big, _ = _run(quiet_teacher, glue_dir, tmp_path / "big", loss="procrustes", batch_size=32, max_steps=1)
    micro, _ = _run(quiet_teacher, glue_dir, tmp_path / "micro", loss="procrustes", batch_size=8, grad_accum=4,
                    geometry_batch="micro", max_steps=1)  # fmt: skip
    name = "feature/procrustes/1->2"
    assert abs(micro[0][name] - big[0][name]) > 1e-3
    # The task and KL terms are per-example means: the same either way.
    assert micro[0]["task"] == pytest.approx(big[0]["task"], rel=1e-5)


def test_geometry_batch_is_validated(quiet_teacher, glue_dir, tmp_path):
    from geokd.errors import GeokdError

    with pytest.raises(GeokdError, match="geometry_batch: must be global .* got 'all'"):
        _run(quiet_teacher, glue_dir, tmp_path / "bad", loss="gram", geometry_batch="all")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("loss", ["procrustes", "gram", "cka", "proj"])
def test_global_step_gradient_is_the_big_batch_gradient(loss, quiet_teacher, glue_dir):
    """The gradient itself (student and projection heads), before any optimizer: the engine's
    three-phase step over 4 micro-batches against one backward over their union."""
    from geokd.engine import _global_geometry_step
    from geokd.runtime import resolve_runtime
    from geokd.workloads import build_workload

    config = resolve_config("distill", flags=dict(
        teacher=str(quiet_teacher), student="truncate:2", task="sst2", data=str(glue_dir), out="unused",
        layers="1:2,2:4", features="tokens", loss=loss, batch_size=32))  # fmt: skip
    runtime = resolve_runtime("cpu")
    work = build_workload(config, runtime, lambda message: None)
    params = [p for p in [*work.student.model.parameters(), *work.objective.parameters()] if p.requires_grad]
    features = work.train_features[:32]
    big = work.collate(features)
    work.step(big).total.backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    micro = [work.collate(features[i : i + 8]) for i in range(0, 32, 8)]
    weights = [work.size(b) / 32 for b in micro]
    terms = _global_geometry_step(work, micro, weights, runtime.device, torch.amp.GradScaler("cpu", enabled=False))
    assert terms["loss"] == pytest.approx(float(work.step(big).total.detach()), rel=1e-5)
    assert sum(1 for g in expected if g.abs().sum() > 0) > 10
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)


def test_cls_rows_with_a_left_padding_tokenizer_are_refused_before_training(quiet_teacher, glue_dir, tmp_path):
    """The [CLS] row is position 0: a tokenizer that pads on the left is refused once, from its
    configuration, instead of by a per-batch mask check (a host sync on a GPU)."""
    from geokd.errors import GeokdError

    teacher = tmp_path / "left"
    shutil.copytree(quiet_teacher, teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    (teacher / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    with pytest.raises(GeokdError, match="pads on the left; use --features mean"):
        _run(teacher, glue_dir, tmp_path / "run", loss="gram", features="cls", student="truncate:2")
