"""The training loop shared by `geokd finetune` and `geokd distill` (issue #3).

One readable function, `train(config)`: resolve the runtime, load data and models, build the
objective, then step. Explicit gradient accumulation, inline evaluation and checkpoint blocks, a
pure `distill_step()` that unit tests can call. No callbacks, no Trainer subclass.

Run directory (every file written atomically, write then rename):

    RUN/config.yaml            resolved config
    RUN/env.json               versions, device, precision, world size, data/model provenance
    RUN/metrics.jsonl          one JSON object per logged step: step, epoch, loss, every term, lr, throughput
    RUN/checkpoints/step-N/    student, objective (projection heads), optimizer, scheduler, RNG, data position
    RUN/final/                 Hugging Face folder: config, tokenizer, model.safetensors
    RUN/results.json           final dev metrics {"task", "split", "metrics": {...}}

Resume (`--resume auto|PATH`) restores everything in a checkpoint, including the position inside the
epoch's shuffled order, so a resumed run reaches the same final weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import geokd
from geokd import checkpoints as ckpt
from geokd import distributed
from geokd.artifacts import (
    LOCK_NAME,
    DirectoryLock,
    atomic_dir,
    atomic_path,
    disk_full_error,
    is_disk_full,
    write_json,
)
from geokd.config import RunConfig, read_config, save_config
from geokd.errors import GeokdError
from geokd.evaluate import predict
from geokd.export import reset_tokenizer_state
from geokd.losses.objective import LossOutput, Objective
from geokd.runtime import Runtime, resolve_runtime
from geokd.workloads import build_workload
from geokd.workloads.encoder import distill_step  # noqa: F401  (public: tests call it)


def _current_key_format() -> dict[str, bool]:
    import inspect

    from transformers import PreTrainedModel

    params = inspect.signature(PreTrainedModel.save_pretrained).parameters
    return {"save_original_format": False} if "save_original_format" in params else {}


_CURRENT_KEY_FORMAT = _current_key_format()

# Config keys that may differ between an interrupted run and its resumption.
_RESUMABLE_DIFFERENCES = {
    "resume", "eval_every", "save_every", "save_minutes", "keep_checkpoints", "device", "out", "compile",
    "activation_checkpointing", "precision", "strategy", "shard_teacher",
}  # fmt: skip
# Keys holding a path: the same file or folder given another way (relative, absolute, via a
# symlink) is the same value.
_PATH_KEYS = {"teacher", "student", "data", "cache"}


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped a run cleanly: the current optimizer step finished and a
    checkpoint was written. Exit status 128 + signal (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, run_dir: Path):
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, run_dir
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (nothing to save)"
        super().__init__(
            f"{name} received: stopped after step {step}, {where}; resume with the same command plus "
            f"--resume auto (--out {run_dir})"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopSignals:
    """While active, SIGTERM and SIGINT only set `received`: the training loop finishes its
    optimizer step, checkpoints and raises RunInterrupted. A second signal acts as usual (the
    previous handler is restored after the first)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(sig)
                if previous is signal.SIG_IGN:  # e.g. `cmd &` in a script: the signal stays ignored
                    continue
                self._previous[sig] = previous
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    metrics: dict[str, float]
    final_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so a resumed run
    replays exactly the batches an uninterrupted run would have seen."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=gen).tolist()


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak learning rate, then linear decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _accumulate(terms: dict[str, torch.Tensor], output: LossOutput, weight: float) -> None:
    """Add a micro-batch's total and terms, weighted, to the step's on-device sums (no host sync)."""
    for name, value in (("loss", output.total.detach()), *output.terms.items()):
        terms[name] = terms[name] + value * weight if name in terms else value * weight


def _synced_record(
    terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, counts: dict[str, float], step: int, run_dir: Path,
    overflow_ok: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """The step's one host synchronisation: every logged term and the gradient norm come to the
    host together, and a non-finite one stops the run before the optimizer update, so no NaN
    reaches the weights or a checkpoint. Under torchrun the same vector is summed over the ranks
    first (one all-reduce): each rank's terms carry the weight W·share, so the sum over ranks / W is
    the global mean; `counts` (tokens read, a stop signal seen) are summed."""
    device = terms["loss"].device
    world = distributed.world_size()
    names = [*terms, "grad_norm"]
    vector = torch.stack([*(v.float() for v in terms.values()), grad_norm.float().to(device)])
    vector = torch.cat([vector, torch.tensor(list(counts.values()), dtype=torch.float32, device=device)])
    values = distributed.all_reduce_sum(vector).tolist()
    record = {name: value / world for name, value in zip(names, values, strict=False)}
    summed = dict(zip(counts, values[len(names) :], strict=True))
    # With fp16 loss scaling an overflowing gradient is routine: the scaler skips that update.
    bad = [name for name, value in record.items() if not math.isfinite(value) and not (overflow_ok and name == "grad_norm")]
    if bad:
        latest = latest_checkpoint(run_dir)
        kept = f"the last checkpoint, {latest}, is kept" if latest else "no checkpoint was written yet"
        raise GeokdError(
            f"non-finite loss at step {step} (terms: {', '.join(bad)}); training stopped and "
            f"{kept}; lower --lr or check the data"
        )
    return record, summed


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = ckpt.list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    student: nn.Module,
    tokenizer: Any,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: dict[str, int],
    record: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None,
    full: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically: a temporary directory (student, trainer state as
    safetensors + JSON, then checkpoint.json with every file's SHA-256) renamed into place. On any
    failure the temporary is removed; a full disk is one GeokdError naming the path and free space.
    `full`: the student's and the optimizer's state gathered whole (--strategy fsdp), written in the
    ordinary format, so any world size and strategy resumes from it."""
    final = run_dir / "checkpoints" / f"step-{step}"
    with atomic_dir(final, f"checkpoint step-{step}") as tmp:
        # Current key names (not an old checkpoint's LayerNorm.gamma/beta), so load_weights matches.
        student.save_pretrained(tmp / "student", safe_serialization=True, **_CURRENT_KEY_FORMAT,
                                **({"state_dict": full[0]} if full is not None else {}))  # fmt: skip
        tokenizer.save_pretrained(tmp / "student")
        ckpt.write_state(
            tmp,
            {
                "objective": objective.state_dict(),
                "optimizer": full[1] if full is not None else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                **({"scaler": scaler} if scaler is not None else {}),
                "position": dict(position, step=step),
                "geokd_version": geokd.__version__,
            },
        )
        ckpt.write_manifest(tmp, step, {"geokd_version": geokd.__version__, **(record or {})})
    return final


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of `checkpoint`, verified file by file first (never unpickled)."""
    ckpt.verify_checkpoint(checkpoint)
    return ckpt.read_state(checkpoint)


def env_info(runtime: Runtime, extra: dict[str, Any]) -> dict[str, Any]:
    import transformers

    return {
        "geokd": geokd.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(runtime.device),
        "precision": runtime.reason,
        "world_size": runtime.world_size,
        "cuda": torch.version.cuda,
        **extra,
    }


class MetricsLog:
    """Appends one JSON object per line; flushed every write so a crash loses nothing logged."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.exists():  # resume: drop lines past the checkpoint
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if record.get("step", 0) <= truncate_after_step:
                    kept.append(line)
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def batches(
    order: list[int], start: int, batch_size: int, features: list[dict[str, Any]], collate: Callable,
    rank: int = 0, world: int = 1,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:  # fmt: skip
    """Yield (index of the batch's first example in `order`, examples in the global batch, this
    rank's collated shard) from `start` on. Under torchrun each rank collates its contiguous shard
    of the global batch (geokd.distributed.shard); a global batch with fewer examples than ranks
    (only possible as an epoch's last) is skipped, so no rank is idle; a single process would read it."""
    for first in range(start, len(order), batch_size):
        chosen = order[first : first + batch_size]
        if len(chosen) < world:
            continue
        yield first, len(chosen), collate([features[i] for i in distributed.shard(chosen, rank, world)])


def _same_value(name: str, saved: Any, current: Any) -> bool:
    if saved == current:
        return True
    if name in _PATH_KEYS and isinstance(saved, str) and isinstance(current, str):
        a, b = Path(saved).expanduser(), Path(current).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def check_resume_config(saved: RunConfig, current: RunConfig, where: str = "the run directory") -> None:
    diffs = [
        f"{name} ({getattr(saved, name)!r} in the run, {getattr(current, name)!r} now)"
        for name in saved.to_dict()
        if name not in _RESUMABLE_DIFFERENCES and not _same_value(name, getattr(saved, name), getattr(current, name))
    ]
    if diffs:
        raise GeokdError(
            f"--resume: {where} was made with a different config: {'; '.join(diffs)}; "
            "resume with the same options or start a new --out"
        )


def resolve_resume(
    config: RunConfig, run_dir: Path, warn: Callable[[str], None] = _warn_stderr
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its verified manifest. `auto` takes the newest intact
    checkpoint (warning about damaged newer ones) and says so when there is none; an explicit
    path must verify."""
    if config.resume is None:
        return None, None
    if config.resume == "auto":
        checkpoint, manifest = ckpt.newest_intact(run_dir, warn)
        if checkpoint is None:
            warn(f"--resume auto: no checkpoint in {str(run_dir / 'checkpoints')!r}; starting from step 0")
        return checkpoint, manifest
    checkpoint = Path(config.resume)
    return checkpoint, ckpt.verify_checkpoint(checkpoint)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _global_geometry_step(
    work: Any, batches: list[dict[str, torch.Tensor]], weights: list[float], device: torch.device,
    scaler: torch.amp.GradScaler,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """One optimizer step's gradients with the feature losses over the rows of all its
    micro-batches (`--geometry-batch global`), in the style of GradCache (Gao et al., 2021):

    1. each micro-batch runs forward without a graph and keeps only its mapped feature rows
       (S_i for the student, T_i for the teacher);
    2. the feature terms F = α·Σ_pairs L(S, T) are evaluated on the concatenated rows S = [S_1; ...]
       and differentiated once: g_i = ∂F/∂S_i (projection heads get their gradient here);
    3. each micro-batch runs forward again with a graph, from the same RNG state (same dropout
       masks), and backpropagates w_i·(task_i + KD_i) + ⟨S_i, g_i⟩.

    Since ∂F/∂θ = Σ_i ⟨g_i, ∂S_i/∂θ⟩, the gradient is the one-big-batch gradient (tested). The
    cost is one extra forward of both models per micro-batch; memory holds one micro-batch's
    graph plus the step's feature rows. Returns the step's logged terms, on the device."""
    objective = work.objective
    states = []
    with objective.collecting(features_only=True) as first, torch.no_grad():
        for batch in batches:
            states.append(_rng_state(device))
            work.step(batch)
    pairs = len(objective.layer_pairs)
    counts = [rows[0][0].shape[0] for rows in first]  # rows per micro-batch (the same for every pair)
    student_rows = [torch.cat([rows[0][p] for rows in first]).float().requires_grad_(True) for p in range(pairs)]
    teacher_rows = [torch.cat([rows[1][p] for rows in first]) for p in range(pairs)]
    del first
    feature_terms: dict[str, torch.Tensor] = {}
    features = objective.add_feature_terms(student_rows[0].new_zeros(()), feature_terms, student_rows, teacher_rows)
    scaler.scale(features).backward()  # row gradients carry the loss scale (fp16) into phase 3
    row_grads = [rows.grad.split(counts) for rows in student_rows]  # type: ignore[union-attr]
    terms_sum: dict[str, torch.Tensor] = {}
    with objective.collecting(features_only=False) as again:
        for index, (batch, weight, state) in enumerate(zip(batches, weights, states, strict=True)):
            _set_rng_state(state, device)
            output = work.step(batch)
            rows = again[-1][0]
            surrogate = sum((rows[p].float() * row_grads[p][index]).sum() for p in range(pairs))
            (scaler.scale(output.total * weight) + surrogate).backward()
            again.clear()
            _accumulate(terms_sum, output, weight)
    terms_sum["loss"] = terms_sum["loss"] + features.detach()
    terms_sum.update({name: value.detach() for name, value in feature_terms.items()})
    return terms_sum


def total_optimizer_steps(n_examples: int, batch_size: int, grad_accum: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes: micro-batches rounded up, then grouped by grad_accum."""
    micro_batches = math.ceil(n_examples / batch_size) * epochs
    return max(1, math.ceil(micro_batches / grad_accum))


def _is_run_dir(path: Path) -> bool:
    """A folder geokd wrote: a readable geokd config.yaml or env.json, a checkpoint with its
    manifest, or (--finetune-teacher stopped early) a teacher/ run. A `checkpoints/` folder of
    another tool is not enough."""
    try:
        env = json.loads((path / "env.json").read_text(encoding="utf-8"))
        if isinstance(env, dict) and "geokd" in env:
            return True
    except (OSError, ValueError):
        pass
    if (path / "config.yaml").is_file():
        try:
            read_config(path / "config.yaml")
            return True
        except GeokdError:
            pass
    if any((c / ckpt.MANIFEST).is_file() for c in ckpt.list_checkpoints(path)):
        return True
    return (path / "teacher").is_dir() and _is_run_dir(path / "teacher")


def _contents(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


def _check_out_dir(config: RunConfig, holds: str, is_run: Callable[[Path], bool] = _is_run_dir) -> Path:
    """`--out` must name a directory that is new or empty, unless resuming; `--resume auto` is
    accepted on a new or empty directory or a geokd run, never on another non-empty folder.
    Creates nothing."""
    if not config.out:
        raise GeokdError("--out: no run directory given; pass --out RUN_DIR")
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise GeokdError(f"--out: {str(run_dir)!r} is a file; give a directory")
    contents = _contents(run_dir)
    if config.resume is None and contents:
        raise GeokdError(
            f"--out: {str(run_dir)!r} already holds {holds}; pass --resume auto to continue or choose a new --out"
        )
    if config.resume is not None and contents and not is_run(run_dir):
        shown = ", ".join(sorted(contents)[:3]) + (", ..." if len(contents) > 3 else "")
        raise GeokdError(
            f"--out: {str(run_dir)!r} is not a geokd run (no config.yaml or checkpoints/, but it holds {shown}), "
            "so there is nothing to resume and geokd will not write into it; choose a new --out"
        )
    return run_dir


def prepare_run_dir(config: RunConfig) -> Path:
    """Check `--out` (see `_check_out_dir`) and the saved config when resuming. Creates nothing.
    Under torchrun only rank 0 checks (the others would race with what it writes)."""
    if os.environ.get("RANK", "0") != "0":
        return Path(config.out)  # type: ignore[arg-type]
    run_dir = _check_out_dir(config, "a run")
    if config.resume is not None and (run_dir / "config.yaml").exists():
        check_resume_config(read_config(run_dir / "config.yaml"), config)
    return run_dir


@contextlib.contextmanager
def claim_run_dir(config: RunConfig, holds: str = "a run") -> Iterator[Path]:
    """Create `--out` (if new), hold its lock for the block and re-check it under the lock (another
    process may have written it meanwhile). If the block fails before writing anything into a
    directory this call created, the directory is removed again."""
    run_dir = Path(config.out)  # type: ignore[arg-type]
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeokdError(f"--out: cannot create {str(run_dir)!r} ({exc.strerror}); choose another --out") from None
    # One writer per directory; under torchrun only rank 0 writes, so only rank 0 locks. Losing
    # the lock never cleans up: the directory is the winner's.
    main = os.environ.get("RANK", "0") == "0"
    with DirectoryLock(run_dir, "--out") if main else contextlib.nullcontext():
        try:
            if main:
                _check_out_dir(config, holds)
            yield run_dir
        except BaseException:
            if main and created and not _contents(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def write_results(
    run_dir: Path, task: str, split: str, metrics: dict[str, float], extra: dict[str, Any]
) -> None:
    write_json(run_dir / "results.json", {"task": task, "split": split, "metrics": metrics, **extra})


def save_final(model: nn.Module, tokenizer: Any, final_dir: Path, provenance: dict[str, Any],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Write the Hugging Face folder (config, tokenizer, model.safetensors) plus geokd.json
    provenance (with the SHA-256 of the weights, checked by `geokd eval`) into a temporary
    directory, then rename it into place. `state_dict`: the weights gathered whole (--strategy
    fsdp), so `final/` is always one ordinary folder."""
    from geokd.models import weights_sha256

    # follow the umask: a deployable model is readable by the group that deploys it
    with atomic_dir(final_dir, "the final model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        reset_tokenizer_state(tokenizer)  # no run-time truncation/padding baked into tokenizer.json
        tokenizer.save_pretrained(tmp)
        record = {"geokd_version": geokd.__version__, **provenance, "weights_sha256": weights_sha256(tmp)}
        write_json(tmp / "geokd.json", record)


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load `model.safetensors` from a checkpoint's student folder into `model` (strict: every key
    must match, so a checkpoint from another architecture is refused)."""
    from safetensors.torch import load_file

    path = directory / "model.safetensors"
    if not path.is_file():
        raise GeokdError(
            f"--resume: {str(directory)!r} has no model.safetensors; the checkpoint is incomplete"
        )
    from geokd.models import check_safetensors

    check_safetensors(path, "--resume")
    state = load_file(str(path))
    current = model.state_dict()  # under --strategy fsdp the blocks' entries are shards (DTensors)
    state = {k: distributed.shard_like(v, current[k]) if k in current else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. output embeddings) are saved once; anything else missing is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise GeokdError(
            f"--resume: checkpoint {str(directory)!r} does not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same --student"
        )


def evaluate(
    model: nn.Module,
    features: list[dict[str, Any]],
    collate: Callable,
    runtime: Runtime,
    task: Any,
    batch_size: int,
) -> dict[str, float]:
    """Task metrics of `model` on tokenised examples: length-sorted batches under inference mode
    (`geokd.evaluate.predict`), predictions in the examples' order."""
    from geokd.tasks import compute_metrics

    logits = predict(model, features, collate, runtime, batch_size).logits  # [n, C]
    predictions = logits[:, 0] if task.is_regression else logits.argmax(dim=-1)
    labels = np.asarray([f["labels"] for f in features])
    return compute_metrics(task, predictions.numpy(), labels)


def _finetune_teacher_first(config: RunConfig, run_dir: Path, progress: Callable | None) -> RunConfig:
    """`--finetune-teacher`: fine-tune the head-less teacher on the task inside RUN/teacher (reused
    on resume), then distil from RUN/teacher/final."""
    teacher_run = run_dir / "teacher"
    if not (teacher_run / "final" / "config.json").is_file():
        teacher_config = RunConfig(
            mode="finetune",
            student=config.teacher,
            task=config.task,
            data=config.data,
            text_fields=config.text_fields,
            label_field=config.label_field,
            max_length=config.max_length,
            epochs=config.epochs,
            max_steps=config.max_steps,
            lr=config.lr,
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
            seed=config.seed,
            device=config.device,
            trust_remote_code=config.trust_remote_code,
            out=str(teacher_run),
            resume="auto" if teacher_run.exists() else None,
        )
        try:
            train(teacher_config, progress=progress)
        except RunInterrupted as stop:  # resume the whole command, not the inner teacher run
            raise RunInterrupted(stop.signum, stop.step, stop.checkpoint, run_dir) from None
    return dataclasses.replace(config, teacher=str(teacher_run / "final"))


def _check_checkpoint_matches(
    manifest: dict[str, Any], config: RunConfig, record: dict[str, Any], checkpoint: Path
) -> None:
    """A checkpoint carries the config, teacher weights and data fingerprint it was made with:
    resuming with other options (even when config.yaml is gone), another teacher or other data
    is refused."""
    from geokd.config import config_from_dict

    where = f"checkpoint {str(checkpoint)!r}"
    if isinstance(manifest.get("config"), dict):
        check_resume_config(config_from_dict(manifest["config"], where), config, where)
    saved_sha, current_sha = manifest.get("teacher_sha256"), record["teacher_sha256"]
    if saved_sha and current_sha and saved_sha != current_sha:
        raise GeokdError(
            f"--resume: the teacher's weights differ from the ones {where} was trained with "
            f"(sha256 {saved_sha[:12]}... then, {current_sha[:12]}... now); pass the same teacher or start a new --out"
        )
    saved_data = manifest.get("data_fingerprint")
    if saved_data and saved_data != record["data_fingerprint"]:
        raise GeokdError(
            f"--resume: the training data differ from the data {where} was trained on "
            f"({saved_data[:19]} then, {record['data_fingerprint'][:19]} now); pass the same --data or start a new --out"
        )


def train(
    config: RunConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune (mode="finetune") or distil (mode="distill") according to `config`.

    `on_start` receives a summary (config, models with parameter counts, layer mapping, device and
    precision with the reason, data sizes, steps) before the first step; `progress` receives every
    logged record; `on_warning` each warning line (default: stderr).

    Everything that can be checked (config, data, models, layer map, cache) is checked before
    `--out` is created; the run directory is then locked for the whole run. SIGTERM/SIGINT finish
    the current optimizer step, write a checkpoint and raise `RunInterrupted`."""
    import transformers

    config.validate()
    # geokd prints its own summary; transformers' load reports and bars would bury it.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warn = on_warning or _warn_stderr
    runtime = resolve_runtime(config.device, config.precision)
    distributed.init(runtime.device)
    if not runtime.is_main:  # one voice: rank 0 prints the summary, the progress and the warnings
        progress, on_start, warn = None, None, lambda message: None
    if config.data is not None and Path(config.data).is_file():
        raise GeokdError(
            f"--data: {config.data!r} is a single file, so train and dev would be the same rows; pass a "
            "folder holding train and dev files (train.tsv/dev.tsv, or train/dev .csv/.jsonl)"
        )
    run_dir = prepare_run_dir(config)
    try:
        with contextlib.ExitStack() as claim:
            return _train(config, runtime, run_dir, claim, progress, on_start, warn)
    except Exception as exc:  # a full disk anywhere else (metrics.jsonl, env.json, results.json)
        if not isinstance(exc, GeokdError) and is_disk_full(exc):
            raise disk_full_error(run_dir, "the run") from None
        raise


def _speed_options(config: RunConfig, model: nn.Module) -> None:
    """--activation-checkpointing and --compile, applied in place (state-dict keys, checkpoints
    and exports are unchanged)."""
    if config.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise GeokdError(
                f"--activation-checkpointing: {type(model).__name__} does not support it; drop the flag"
            )
        # Non-reentrant checkpointing works under no_grad passes and with inputs that need no grad.
        # transformers 5 renamed the method (the old name warns until v6).
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.compile:
        model.compile()  # nn.Module.compile: the forward is compiled on first use, the keys stay


def _shard_optimizer_state(state: dict[str, Any], params: list[nn.Parameter]) -> dict[str, Any]:
    """An optimizer state saved whole (the ordinary checkpoint format), cut to this rank's shards
    of the parameters FSDP shards (--strategy fsdp resuming from any checkpoint)."""
    shards = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        shards[index] = {
            key: distributed.shard_like(value, param)
            if torch.is_tensor(value) and value.shape == param.shape
            else value
            for key, value in entry.items()
        }
    return {**state, "state": shards}


def _prepare_flexkd(config: RunConfig, work: Any, run_dir: Path, resumed: bool,
                    warn: Callable[[str], None], write: bool = True) -> dict[str, Any] | None:  # fmt: skip
    """`--loss flexkd`: fill the objective's teacher selections before the first step (a resumed
    run has them from its checkpoint); the summary the run prints and env.json records."""
    from geokd import flexkd as flexkd_lib

    if not flexkd_lib.selections(work.objective):
        return None
    if resumed:
        return {"reused": True, "from": "checkpoint"}
    if work.score_flexkd is None:  # the workloads refuse these settings first; a guard
        raise GeokdError("--loss flexkd: the scoring pass needs a live teacher; pass --teacher (not --cache)")
    indices = flexkd_lib.sample_indices(len(work.train_features), config.flexkd_samples, config.seed)
    meta = {"basis": config.flexkd_basis, "output": config.flexkd_output, "samples": config.flexkd_samples,
            "examples": len(indices), "seed": config.seed, "teacher_sha256": work.teacher_sha256,
            "data_fingerprint": work.data_fingerprint, "features": config.features, "max_length": config.max_length,
            "teacher_layers": sorted({t for _, t in work.layer_pairs})}  # fmt: skip
    origin = getattr(work.student, "hidden_channels", None)  # a prune: student: pair each channel with its own
    return flexkd_lib.prepare(work.objective, run_dir, meta, lambda: work.score_flexkd(indices), warn, write, origin)


def _train(
    config: RunConfig,
    runtime: Runtime,
    run_dir: Path,
    claim: contextlib.ExitStack,
    progress: Callable[[dict[str, Any]], None] | None,
    on_start: Callable[[dict[str, Any]], None] | None,
    warn: Callable[[str], None],
) -> TrainResult:
    from geokd import models as models_lib

    requested = config
    claimed = False
    if config.mode == "distill" and config.finetune_teacher:  # the teacher run lives inside --out
        claim.enter_context(claim_run_dir(config))
        claimed = True
        config = _finetune_teacher_first(config, run_dir, progress)
    seed_everything(config.seed)
    work = build_workload(config, runtime, warn)  # data, models, layer map, cache: all checked here
    student, tokenizer, objective = work.student, work.tokenizer, work.objective
    train_features, teacher_info, layer_pairs = work.train_features, work.teacher_info, work.layer_pairs

    _speed_options(config, student.model)
    # --strategy fsdp under torchrun: FSDP2 per transformer block (geokd.distributed.shard_blocks);
    # the optimizer is built below, over the sharded parameters.
    fsdp = config.strategy == "fsdp" and runtime.world_size > 1
    if fsdp:
        if runtime.grad_scaling:
            raise GeokdError(
                "--strategy fsdp: fp16 loss scaling over sharded gradients is not supported yet; use --precision "
                "bf16 or fp32, or --strategy ddp"
            )
        distributed.shard_blocks(student.model)
        if config.shard_teacher and work.teacher_model is not None:
            distributed.shard_blocks(work.teacher_model)

    # Optimisation
    total_steps = config.max_steps or total_optimizer_steps(
        len(train_features), config.batch_size, config.grad_accum, config.epochs
    )
    params = [p for p in [*student.model.parameters(), *objective.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total_steps))
    # fp16 forward passes: dynamic loss scaling (a step whose gradients overflow is skipped and the
    # scale halved; bf16 and float32 need none).
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.grad_scaling)

    # Everything is checked: now the run directory is created (if new) and locked.
    if not claimed:
        claim.enter_context(claim_run_dir(config))
    if runtime.is_main:
        for stale in ckpt.remove_stale_temporaries(run_dir):
            warn(f"removed {stale}, left behind by an interrupted save")
    distributed.barrier()  # the other ranks read the run directory only once rank 0 has settled it
    checkpoint_record = {
        "config": requested.to_dict(),
        "teacher_sha256": work.teacher_sha256,
        "data_fingerprint": work.data_fingerprint,
    }
    step, epoch, cursor = 0, 0, 0
    checkpoint, manifest = resolve_resume(config, run_dir, warn)
    if checkpoint is not None:
        assert manifest is not None
        _check_checkpoint_matches(manifest, requested, checkpoint_record, checkpoint)
        state = ckpt.read_state(checkpoint)
        load_weights(student.model, checkpoint / "student")
        try:
            objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(_shard_optimizer_state(state["optimizer"], params) if fsdp else state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler.is_enabled() and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            step, epoch, cursor = (
                int(state["position"]["step"]),
                int(state["position"]["epoch"]),
                int(state["position"]["cursor"]),
            )
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise GeokdError(
                f"--resume: the trainer state of checkpoint {str(checkpoint)!r} does not fit this run: it was written "
                f"with another loss, layer map or model, or it is damaged ({type(exc).__name__}); resume with the "
                "options of that run"
            ) from None
        if checkpoint.parent == run_dir / "checkpoints" and runtime.is_main:
            for moved in ckpt.quarantine_newer(run_dir, checkpoint):
                warn(f"moved {moved.name.removeprefix('skipped-')} (newer than the checkpoint resumed from) to {moved}")
    flexkd_summary = _prepare_flexkd(config, work, run_dir, checkpoint is not None, warn, runtime.is_main)
    if runtime.is_main:
        save_config(requested, run_dir / "config.yaml")
    if on_start is not None:
        on_start(
            {
                "config": config.to_dict(),
                "student": {
                    "name": config.student,
                    "parameters": models_lib.count_parameters(student.model),
                    "layers": student.num_layers,
                    "hidden": student.config.hidden_size,
                },
                "teacher": None
                if teacher_info is None
                else {k: v for k, v in teacher_info.items() if k != "source"},
                "layer_pairs": layer_pairs,
                "device": str(runtime.device),
                "precision": runtime.reason,
                "train_examples": len(train_features),
                "dev_examples": work.dev_examples,
                "total_steps": total_steps,
                "resumed_from": str(checkpoint) if checkpoint is not None else None,
                "flexkd": flexkd_summary,
                "attention": work.attention_note,
            }
        )
    if runtime.is_main:
        write_json(
            run_dir / "env.json",
            env_info(
                runtime,
                {
                    "task": work.task,
                    "student": student.source.to_dict(),
                    "teacher": teacher_info["source"] if teacher_info is not None else None,
                    "teacher_parameters": teacher_info["parameters"] if teacher_info is not None else None,
                    "student_parameters": models_lib.count_parameters(student.model),
                    "data": work.data,
                    "layer_pairs": layer_pairs,
                    "train_examples": len(train_features),
                    "dev_examples": work.dev_examples,
                    "total_steps": total_steps,
                    "flexkd": flexkd_summary,
                    "attention": work.attention_note,
                },
            ),
        )
    log = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=step) if runtime.is_main else None

    def position() -> dict[str, int]:
        return {"epoch": epoch, "cursor": cursor}

    def checkpoint_now() -> Path | None:
        # --strategy fsdp: every rank takes part in gathering the shards (a collective), rank 0 writes
        full = (distributed.full_state(student.model.state_dict()), distributed.full_state(optimizer.state_dict())) \
            if fsdp else None  # fmt: skip
        if not runtime.is_main:
            return None
        path = save_checkpoint(
            run_dir, step, student.model, tokenizer, objective, optimizer, scheduler, position(), checkpoint_record,
            scaler.state_dict() if scaler.is_enabled() else None, full,
        )  # fmt: skip
        ckpt.prune(run_dir, config.keep_checkpoints, newest=path)  # only now that it is complete
        return path

    # A pruned student is a model before any training: its dev metrics are part of the result
    # (Minitron reports them), kept in init_eval.json so a resumed run still has them.
    init_path = run_dir / "init_eval.json"
    if getattr(student, "init", None) == "prune" and step == 0 and (runtime.is_main or fsdp):
        init_metrics = work.evaluate()  # under fsdp every rank runs the sharded forward
        if runtime.is_main:
            write_json(init_path, {"step": 0, "split": work.dev_split, "metrics": init_metrics})
    order = epoch_order(len(train_features), config.seed, epoch)
    shard = (runtime.rank, runtime.world_size)
    stream = batches(order, cursor, config.batch_size, train_features, work.collate, *shard)
    stop = claim.enter_context(_StopSignals())
    last_saved_step, last_save_time = step, time.monotonic()
    last_checkpoint: Path | None = checkpoint
    window_start, window_examples, window_tokens = time.perf_counter(), 0, 0
    # --geometry-batch global: the batch-level feature losses see the rows of all the step's
    # micro-batches (only needed, and only paid for, when there are several and a feature loss).
    global_geometry = (
        config.geometry_batch == "global" and config.grad_accum > 1 and bool(getattr(objective, "layer_pairs", None))
        and getattr(objective, "batch_level", True)  # attention losses are per-query means
    )
    while step < total_steps:
        # Draw the step's micro-batches first, so each is weighted by its share of the step's
        # examples (an epoch's short last batch counts for what it holds): sums and counts, never
        # an average of averages.
        if runtime.world_size > 1:
            # Dropout draws from a stream of its own per rank and step: the shards get independent
            # masks, and a resumed run draws the same ones without any rank's RNG state saved.
            torch.manual_seed(((config.seed * 1_000_003 + step) * 4099 + runtime.rank) % 2**63)
        micro_batches = []
        step_examples = 0
        for _ in range(config.grad_accum):
            try:
                first, count, batch = next(stream)
            except StopIteration:
                epoch, cursor = epoch + 1, 0
                order = epoch_order(len(train_features), config.seed, epoch)
                stream = batches(order, 0, config.batch_size, train_features, work.collate, *shard)
                first, count, batch = next(stream)
            cursor = first + count
            step_examples += count
            micro_batches.append(batch)
        # A micro-batch weighs its share of the step's examples (encoders) or response tokens
        # (decoders), over all ranks: the step's loss is a sum over the step divided by its count.
        # Under torchrun the weight is multiplied by the world size, which the gradient average
        # divides out again.
        sizes = [work.size(batch) for batch in micro_batches]
        step_size = sum(sizes)
        if runtime.world_size > 1:
            # (on the device: nccl reduces CUDA tensors only)
            step_size = int(distributed.all_reduce_sum(torch.tensor([float(step_size)], device=runtime.device)).item())
        weights = [runtime.world_size * size / max(1, step_size) for size in sizes]
        # Pinned host memory and asynchronous copies on CUDA: the copy overlaps the work queued before.
        cuda = runtime.device.type == "cuda"
        on_device = [
            {k: (v.pin_memory() if cuda else v).to(runtime.device, non_blocking=cuda) for k, v in batch.items()}
            for batch in micro_batches
        ]
        if global_geometry:
            terms_sum = _global_geometry_step(work, on_device, weights, runtime.device, scaler)
        else:
            terms_sum = {}
            for batch, weight in zip(on_device, weights, strict=True):
                output = work.step(batch)
                scaler.scale(output.total * weight).backward()
                _accumulate(terms_sum, output, weight)
        window_examples += step_examples
        # Tokens the models read (prompt and response, padding excluded; all ranks): the
        # throughput that compares across tasks and sequence lengths.
        tokens = sum(int(batch["attention_mask"].sum()) for batch in micro_batches if "attention_mask" in batch)
        distributed.average_gradients(params)
        scaler.unscale_(optimizer)  # a no-op without fp16; clipping sees true gradients
        if fsdp:
            grad_norm = distributed.clip_grad_norm(params, config.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        # Whether a checkpoint is due by wall time is decided by all ranks together (fsdp saves are
        # collectives); so is a stop signal.
        time_due = bool(config.save_minutes) and time.monotonic() - last_save_time >= 60.0 * config.save_minutes
        counts = {"tokens": float(tokens), "stop": float(stop.received is not None), "due": float(time_due)}
        synced, summed = _synced_record(terms_sum, grad_norm, counts, step + 1, run_dir,
                                        overflow_ok=scaler.is_enabled())  # the one host sync  # fmt: skip
        window_tokens += int(summed["tokens"])
        # A signal seen by any rank stops every rank after this same step (torchrun signals them
        # all, but not at the same instant).
        stopping = summed["stop"] > 0
        scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - window_start
        record = {
            "step": step,
            "epoch": epoch + cursor / max(1, len(train_features)),
            **{name: value for name, value in synced.items() if name != "grad_norm"},
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": synced["grad_norm"],
            "examples_per_s": window_examples / max(elapsed, 1e-9),
            "tokens_per_s": window_tokens / max(elapsed, 1e-9),
        }
        window_start, window_examples, window_tokens = time.perf_counter(), 0, 0
        if runtime.is_main or fsdp:
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                record["eval"] = work.evaluate()
            if runtime.is_main:
                log.write(record)  # type: ignore[union-attr]
        due = bool(config.save_every) and step % config.save_every == 0  # type: ignore[operator]
        due = due or summed["due"] > 0
        if due or stopping:
            last_checkpoint = checkpoint_now() or last_checkpoint
            last_saved_step, last_save_time = step, time.monotonic()
        if progress is not None:
            progress({**record, "total_steps": total_steps})
        # One process also stops for a signal that arrived during the save or the progress call;
        # ranks stop together, on the flag they all reduced.
        if stopping or (runtime.world_size == 1 and stop.received is not None):
            if last_saved_step != step:
                last_checkpoint = checkpoint_now() or last_checkpoint
                last_saved_step = step
            raise RunInterrupted(stop.received or signal.SIGTERM, step, last_checkpoint, run_dir)

    def stop_if_signalled() -> None:  # after the last step: keep the trained weights, then stop
        signalled = stop.received is not None
        if runtime.world_size > 1:  # the ranks decide together (a checkpoint under fsdp is a collective)
            flag = torch.tensor([float(signalled)], device=runtime.device)
            signalled = bool(distributed.all_reduce_sum(flag).item() > 0)
        if signalled:
            saved = checkpoint_now() if last_saved_step != step else last_checkpoint
            raise RunInterrupted(stop.received or signal.SIGTERM, step, saved or last_checkpoint, run_dir)

    stop_if_signalled()
    # Rank 0 evaluates and writes; under torchrun the other ranks are done.
    metrics, other_splits = work.final_evaluate() if runtime.is_main or fsdp else ({}, {})
    stop_if_signalled()  # a signal during the final evaluation is not lost
    final_dir = run_dir / "final"
    full_weights = distributed.full_state(student.model.state_dict()) if fsdp else None  # a collective
    if runtime.is_main:
        save_final(
            student.model,
            tokenizer,
            final_dir,
            {
                "config": config.to_dict(),
                "task": work.task,
                "split": work.dev_split,
                "metrics": metrics,
                "steps": step,
                # the teacher block each student block was copied from (truncate:, prune:): what
                # `--layers copied` pairs with when the model is read back (a prune: student's
                # blocks depend on its calibration, so the spec alone cannot say)
                "teacher_blocks": list(getattr(student, "teacher_blocks", None) or []) or None,
                # a prune: student's teacher channel per hidden channel (its calibration chose them)
                "hidden_channels": list(getattr(student, "hidden_channels", None) or []) or None,
            },
            full_weights,
        )
        extra_results = {"steps": step, "geokd_version": geokd.__version__, **work.extra_results}
        if init_path.is_file():
            extra_results["init_metrics"] = json.loads(init_path.read_text(encoding="utf-8"))["metrics"]
        if other_splits:
            extra_results["other_splits"] = other_splits
        write_results(run_dir, work.task, work.dev_split, metrics, extra_results)
    return TrainResult(run_dir=run_dir, steps=step, metrics=metrics, final_dir=final_dir)


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1,2,3` -> [1, 2, 3]: distinct non-negative integers, in the order given."""
    items = [item.strip() for item in text.split(",")]
    bad = [item for item in items if not item.isdigit()]
    if not items or bad:
        raise GeokdError(
            f"--seeds: expected comma-separated non-negative integers such as 1,2,3, got {text!r}"
        )
    seeds = [int(item) for item in items]
    if len(set(seeds)) != len(seeds):
        raise GeokdError(
            f"--seeds: seed {next(s for s in seeds if seeds.count(s) > 1)} is repeated in {text!r}"
        )
    return seeds


def _is_seeds_dir(path: Path) -> bool:
    return any(_is_run_dir(p) for p in path.glob("seed-*")) or _is_run_dir(path / "teacher")


def train_seeds(
    config: RunConfig,
    seeds: list[int],
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_seed: Callable[[int, int, Path, bool], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> list[TrainResult]:
    """Run one configuration once per seed, into `OUT/seed-K/` (issue #4).

    With `--finetune-teacher`, the teacher is fine-tuned once (in `OUT/teacher`, with the first
    seed) and shared, so the seeds vary the student only. With `--resume auto`, a seed whose run
    already finished (has results.json) is kept as it is and the others are resumed or started.
    `on_seed(index, seed, run_dir, skipped)` is told before each seed."""
    config.validate()
    if config.resume not in (None, "auto"):
        raise GeokdError(
            f"--resume: with --seeds only 'auto' is accepted (each seed resumes its own run), got {config.resume!r}"
        )
    root = _check_out_dir(config, "runs", is_run=_is_seeds_dir)
    created = not root.exists()
    try:
        return _train_seeds(config, seeds, root, progress, on_start, on_seed, on_warning)
    except BaseException:
        if created and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        raise


def _train_seeds(config, seeds, root, progress, on_start, on_seed, on_warning) -> list[TrainResult]:
    if config.mode == "distill" and config.finetune_teacher:
        config = _finetune_teacher_first(dataclasses.replace(config, seed=seeds[0]), root, progress)
        config = dataclasses.replace(config, finetune_teacher=False)
    results = []
    for index, seed in enumerate(seeds):
        run_dir = root / f"seed-{seed}"
        finished = config.resume == "auto" and (run_dir / "results.json").is_file()
        if on_seed is not None:
            on_seed(index, seed, run_dir, finished)
        if finished:
            saved = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
            check_resume_config(read_config(run_dir / "config.yaml"), dataclasses.replace(config, seed=seed))
            results.append(
                TrainResult(
                    run_dir=run_dir,
                    steps=saved.get("steps", 0),
                    metrics=saved["metrics"],
                    final_dir=run_dir / "final",
                )
            )
            continue
        seed_config = dataclasses.replace(config, seed=seed, out=str(run_dir))
        try:
            results.append(train(seed_config, progress=progress, on_start=on_start, on_warning=on_warning))
        except RunInterrupted as stop:  # resume with the same --seeds command and the root --out
            raise RunInterrupted(stop.signum, stop.step, stop.checkpoint, root) from None
    return results


__all__ = [
    "MetricsLog",
    "evaluate",
    "train",
    "TrainResult",
    "parse_seeds",
    "train_seeds",
    "batches",
    "distill_step",
    "env_info",
    "epoch_order",
    "latest_checkpoint",
    "linear_schedule",
    "load_trainer_state",
    "prepare_run_dir",
    "resolve_resume",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "total_optimizer_steps",
    "write_results",
]
