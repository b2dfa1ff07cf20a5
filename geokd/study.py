"""`geokd study STUDY.yaml` (issue #16): a grid of distillation runs, executed in order and resumable,
then one report with honest statistics.

A study file declares tasks × students × losses × seeds (and optional sweeps of any run option, such
as `alpha` or `temperature`), the settings every run shares, and the baselines. `run_study` runs, in
order:

1. each task's teacher `finetune` once, unless the task names a `teacher`;
2. `cache` once per task (encoder tasks with `cache: true`), holding every teacher layer and the
   Flex-KD scores when a loss needs them; losses a cache cannot serve (the attention losses) and
   decoder tasks read the live teacher;
3. every student run (`distill`, from the cache where possible), plus with `finetune_baseline: true`
   the student trained on the task loss alone (`--loss none --alpha 1`);
4. the report (`build_report`): `STUDY/report.md` and `report.json`, one plot per task.

Every run is an ordinary run directory under `STUDY/`; one whose `results.json` exists is skipped,
and one that was interrupted resumes from its last checkpoint (`--resume auto`), so a study
continues where it stopped, across interruptions and machines. Each finished run's wall time is
kept in `RUN/study.json`.

Statistics per task (`build_report`): mean ± sample std over seeds of the task's primary metric for
each (student, loss, sweep point); against each baseline loss of the same student and sweep point,
the paired t-test when the seeds match (else Welch's), Holm-corrected over all the comparisons of
the task's table (Holm 1979: the k-th smallest of m p-values is multiplied by m − k + 1, then made
monotone; `holm`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geokd.errors import GeokdError

STUDY_KEYS = ("name", "tasks", "teacher_model", "teacher_settings", "students", "losses", "seeds", "sweep", "settings",
              "baselines", "finetune_baseline", "cache", "metric")  # fmt: skip
TASK_KEYS = ("data", "teacher", "settings", "teacher_settings", "metric", "evals", "eval_limit")
# Run options a study may not set: where runs go and how they resume are the study's business.
RESERVED = ("out", "resume", "teacher", "student", "task", "data", "loss", "seed", "cache", "mode")
ATTENTION = ("attn", "attn-relation")


@dataclass
class TaskSpec:
    name: str
    data: str
    teacher: str | None = None  # a fine-tuned teacher; None: fine-tune `teacher_model` first
    settings: dict[str, Any] = field(default_factory=dict)  # per-task run options (e.g. epochs)
    metric: str | None = None  # the metric the report ranks by (None: the task's primary)
    # --task instruct: generation evaluations of every finished run (and the teacher), name -> file,
    # greedy ROUGE-L on the first `eval_limit` prompts of each (None: all)
    evals: dict[str, str] = field(default_factory=dict)
    eval_limit: int | None = None
    teacher_settings: dict[str, Any] = field(default_factory=dict)  # this task's teacher fine-tune (over the study's)


@dataclass
class Study:
    name: str
    tasks: list[TaskSpec]
    students: list[str]
    losses: list[str]
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=lambda: ["none", "cka"])
    teacher_model: str | None = None
    teacher_settings: dict[str, Any] = field(default_factory=dict)
    finetune_baseline: bool = True
    cache: bool = True


# --------------------------------------------------------------------------------------------
# Reading a study file
# --------------------------------------------------------------------------------------------


def _expand(value: Any) -> Any:
    """`${VAR}` and `~` in strings (data folders are machine-specific)."""
    if isinstance(value, str):
        return os.path.expanduser(os.path.expandvars(value))
    return value


def _expand_task(task: dict[str, Any]) -> dict[str, Any]:
    """A task of a saved `study.json` with `${GEOKD_DATA}` and `~` expanded in its data folder,
    teacher and evaluation files (records write them portable: `_portable`)."""
    task = dict(task, data=_expand(task.get("data")), teacher=_expand(task.get("teacher")))
    if task.get("evals"):
        task["evals"] = [[name, _expand(file)] for name, file in task["evals"]]
    return task


def load_study(path: str | Path, quick: bool = False) -> Study:
    """Read and check a study file; every problem is reported at once in one GeokdError line."""
    from geokd.config import load_yaml, resolve_config
    from geokd.losses import feature_loss_names

    file = Path(path)
    raw = load_yaml(file, what="study")
    problems = [f"unknown key {key!r}" for key in raw if key not in STUDY_KEYS]
    tasks = []
    for name, entry in (raw.get("tasks") or {}).items():
        entry = entry or {}
        if not isinstance(entry, dict):
            problems.append(f"tasks.{name}: expected a mapping with data (and teacher, settings), got {entry!r}")
            continue
        problems += [f"tasks.{name}: unknown key {key!r}" for key in entry if key not in TASK_KEYS]
        if not entry.get("data"):
            problems.append(f"tasks.{name}: no data folder")
        evals = {str(k): _expand(v) for k, v in (entry.get("evals") or {}).items()}
        if evals and str(name) != "instruct":
            problems.append(f"tasks.{name}: evals (generation ROUGE-L) are for the instruct task")
        for clash in [e for e in evals if slug(e).lower() == "geometry"]:  # RUN/eval/study-geometry.json is the geometry report
            problems.append(f"tasks.{name}.evals: the name {clash!r} is taken by the geometry report; rename it")
        tasks.append(TaskSpec(str(name), _expand(entry.get("data", "")), _expand(entry.get("teacher")),
                              dict(entry.get("settings") or {}), entry.get("metric"), evals,
                              entry.get("eval_limit"), dict(entry.get("teacher_settings") or {})))  # fmt: skip
    if not tasks:
        problems.append("tasks: none declared")
    losses = [str(x) for x in raw.get("losses") or []]
    known = [*feature_loss_names(), "none"]
    problems += [f"losses: unknown loss {loss!r} (choose from {', '.join(known)})" for loss in losses if loss not in known]
    if not losses:
        problems.append("losses: none declared")
    students = [str(x) for x in raw.get("students") or []]
    if not students:
        problems.append("students: none declared")
    seeds = raw.get("seeds") or [1]
    if not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        problems.append(f"seeds: expected distinct integers, got {seeds!r}")
    sweep = raw.get("sweep") or {}
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        problems.append(f"sweep: expected option: [values, ...], got {sweep!r}")
        sweep = {}
    settings = dict(raw.get("settings") or {})
    for where, options in (("settings", settings), ("sweep", sweep), ("teacher_settings", raw.get("teacher_settings") or {}),
                           *((f"tasks.{t.name}.settings", t.settings) for t in tasks),
                           *((f"tasks.{t.name}.teacher_settings", t.teacher_settings) for t in tasks)):  # fmt: skip
        reserved = [k for k in RESERVED if k != "seed"] if where.endswith("teacher_settings") else RESERVED
        problems += [f"{where}: {key!r} is set by the study itself" for key in options if key in reserved]
    baselines = [str(x) for x in raw.get("baselines", ["none", "cka"]) or []]
    problems += [f"baselines: {b!r} is not one of the study's losses" for b in baselines if b not in losses]
    if any(t.teacher is None for t in tasks) and not raw.get("teacher_model"):
        problems.append("teacher_model: needed to fine-tune the teachers of tasks that name none")
    if problems:
        raise GeokdError(f"study {str(file)!r}: {'; '.join(problems)}")
    study = Study(name=str(raw.get("name") or file.stem), tasks=tasks, students=students, losses=losses,
                  seeds=[int(s) for s in seeds], settings=settings, sweep={k: list(v) for k, v in sweep.items()},
                  baselines=baselines, teacher_model=raw.get("teacher_model"),
                  teacher_settings=dict(raw.get("teacher_settings") or {}),
                  finetune_baseline=bool(raw.get("finetune_baseline", True)), cache=bool(raw.get("cache", True)))  # fmt: skip
    if quick:
        study = quick_variant(study)
    # Every run's options must be valid run options: check one resolved config per task and sweep point.
    for task in study.tasks:
        for point in sweep_points(study):
            try:
                resolve_config("distill", flags=_distill_flags(study, task, study.students[0], study.losses[0], point,
                                                               study.seeds[0], "teacher", Path("x"))).validate()  # fmt: skip
                if task.teacher is None:
                    resolve_config("finetune", flags={**study.teacher_settings, **task.teacher_settings,
                                                      "student": study.teacher_model,
                                                      "task": task.name, "data": task.data, "out": "x"}).validate()  # fmt: skip
            except GeokdError as error:
                raise GeokdError(f"study {str(file)!r}: tasks.{task.name}: {error}") from None
    return study


def quick_variant(study: Study) -> Study:
    """`--quick`: the first task, the first student, two losses (the first baseline and the first
    other loss), two seeds, a few steps: the plumbing in CI time."""
    losses = [study.baselines[0] if study.baselines else study.losses[0]]
    losses += [loss for loss in study.losses if loss not in losses][:1]
    from dataclasses import replace

    quick = {"max_steps": 4, "eval_every": None}  # over every level: a task's own settings must not undo it
    tasks = [replace(t, settings={**t.settings, **quick}, teacher_settings={**t.teacher_settings, "max_steps": 4})
             for t in study.tasks[:1]]  # fmt: skip
    return Study(name=f"{study.name}-quick", tasks=tasks, students=study.students[:1], losses=losses,
                 seeds=study.seeds[:2] if len(study.seeds) >= 2 else [*study.seeds, study.seeds[0] + 1],
                 settings={**study.settings, "max_steps": 4, "eval_every": None},
                 sweep={}, baselines=[b for b in study.baselines if b in losses], teacher_model=study.teacher_model,
                 teacher_settings={**study.teacher_settings, "max_steps": 4}, finetune_baseline=False,
                 cache=False)  # fmt: skip  (a cache reads the whole train split: not quick)


def sweep_points(study: Study) -> list[dict[str, Any]]:
    """Every combination of the sweep's values ([{}] without a sweep)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in study.sweep.items():
        points = [{**point, key: value} for point in points for value in values]
    return points


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    """A folder name for a student spec or sweep point: `prune:hidden=192,heads=6` ->
    `prune-hidden192-heads6`."""
    out = re.sub(r"[=]", "", text)
    out = re.sub(r"[^A-Za-z0-9_.+-]+", "-", out).strip("-")
    return out or "x"


def _point_name(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in point.items())


@dataclass
class Step:
    """One thing the study does: fine-tune a teacher, build a cache, or train one run."""

    kind: str  # "teacher", "cache" or "run"
    task: str
    path: Path  # the run directory or cache folder
    flags: dict[str, Any] = field(default_factory=dict)
    label: dict[str, Any] = field(default_factory=dict)  # student, loss, point, seed (runs)

    @property
    def done(self) -> bool:
        if self.kind == "cache":
            return (self.path / "manifest.json").is_file()
        return (self.path / "results.json").is_file()


def _uses_cache(study: Study, loss: str) -> bool:
    return study.cache and loss not in ATTENTION


def _teacher_path(study: Study, task: TaskSpec, root: Path) -> str:
    return task.teacher if task.teacher else str(root / "teachers" / task.name / "final")


def _distill_flags(study: Study, task: TaskSpec, student: str, loss: str, point: dict[str, Any], seed: int,
                   teacher: str, out: Path, cache: Path | None = None) -> dict[str, Any]:  # fmt: skip
    # keep_checkpoints 1 unless the study says otherwise: a study holds many runs
    flags = {"keep_checkpoints": 1, **study.settings, **task.settings, **point, "teacher": teacher, "student": student,
             "task": task.name, "data": task.data, "loss": loss, "seed": seed, "out": str(out)}  # fmt: skip
    if cache is not None:
        flags["cache"] = str(cache)
    return flags


def plan_study(study: Study, root: Path) -> list[Step]:
    """Every step of the study in execution order (teachers, caches, runs)."""
    from geokd.tasks import is_instruct_task

    steps: list[Step] = []
    for task in study.tasks:
        if task.teacher is None:
            flags = {**study.teacher_settings, **task.teacher_settings, "student": study.teacher_model,
                     "task": task.name, "data": task.data,
                     "out": str(root / "teachers" / task.name)}  # fmt: skip
            steps.append(Step("teacher", task.name, root / "teachers" / task.name, flags))
    for task in study.tasks:
        teacher = _teacher_path(study, task, root)
        encoder = not is_instruct_task(task.name)
        cache = None
        if encoder and any(_uses_cache(study, loss) for loss in study.losses):
            cache = root / "caches" / task.name
            settings = {**study.settings, **task.settings}
            flags = {"teacher": teacher, "task": task.name, "data": task.data, "out": str(cache), "layers": "all",
                     "features": settings.get("features", "cls"), "max_length": int(settings.get("max_length", 128)),
                     "flexkd_samples": (int(settings.get("flexkd_samples", 1024)) if "flexkd" in study.losses else None),
                     "flexkd_output": settings.get("flexkd_output", "prediction")}  # fmt: skip
            steps.append(Step("cache", task.name, cache, flags))
        for student in study.students:
            for point in sweep_points(study):
                group = root / "runs" / task.name / slug(student)
                losses = [(loss, loss) for loss in study.losses]
                if study.finetune_baseline:
                    losses.append(("finetune-only", "none"))
                for name, loss in losses:
                    folder = group / (slug(name) + (f"-{slug(_point_name(point))}" if point else ""))
                    for seed in study.seeds:
                        out = folder / f"seed-{seed}"
                        use_cache = cache if _uses_cache(study, loss) and encoder else None
                        flags = _distill_flags(study, task, student, loss, point, seed, teacher, out, use_cache)
                        if name == "finetune-only":
                            flags["alpha"] = 1.0  # γ·task + 0·feature + 0·KD: the task loss alone
                        label = {"student": student, "loss": name, "point": point, "seed": seed}
                        steps.append(Step("run", task.name, out, flags, label))
    return steps


ONLY_KEYS = ("task", "student", "loss", "seed")


def parse_only(items: list[str] | None) -> dict[str, list[str]]:
    """`--only KEY=VALUE` (repeatable; values of one key are alternatives, different keys must all
    match): the part of a study to run. KEY is task, student, loss or seed; a student matches by its
    spec (`prune:hidden=192,...`), its folder name, or its kind (`prune`); `loss=finetune-only`
    selects the fine-tune-only baseline."""
    only: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in ONLY_KEYS or not value:
            raise GeokdError(f"--only: expected KEY=VALUE with KEY one of {', '.join(ONLY_KEYS)}, got {item!r} "
                             "(e.g. --only task=mrpc --only loss=none)")  # fmt: skip
        only.setdefault(key, []).append(value)
    return only


def _matches(step: Step, only: dict[str, list[str]]) -> bool:
    if "task" in only and step.task not in only["task"]:
        return False
    if step.kind != "run":
        return True
    label = step.label
    if "student" in only:
        student = str(label["student"])
        if not any(v in (student, slug(student), student.split(":")[0]) for v in only["student"]):
            return False
    if "loss" in only and label["loss"] not in only["loss"]:
        return False
    return "seed" not in only or str(label["seed"]) in only["seed"]


def select_steps(study: Study, steps: list[Step], only: dict[str, list[str]]) -> list[Step]:
    """The steps of one part of a study (`--only`): its runs, and the teachers and caches they need.
    A selection that matches no run is an error naming what the study declares."""
    if not only:
        return steps
    runs = [s for s in steps if s.kind == "run" and _matches(s, only)]
    if not runs:
        raise GeokdError(f"--only {' '.join(f'{k}={v}' for k, vs in only.items() for v in vs)}: matches none of the "
                         f"study's runs (tasks {', '.join(t.name for t in study.tasks)}; students "
                         f"{', '.join(study.students)}; losses {', '.join(study.losses)}"
                         f"{', finetune-only' if study.finetune_baseline else ''}; seeds "
                         f"{', '.join(map(str, study.seeds))})")  # fmt: skip
    caches = {s.flags.get("cache") for s in runs}
    tasks = {s.task for s in runs}
    kept = [s for s in steps if s.kind == "teacher" and s.task in tasks]
    kept += [s for s in steps if s.kind == "cache" and str(s.path) in caches]
    return kept + runs


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


# Options that say where things are or how a run keeps its books: they may differ between the study
# file and a finished run (the study moved machines, a data folder moved) without changing the run.
BOOKKEEPING = ("out", "resume", "teacher", "data", "cache", "keep_checkpoints", "save_minutes", "save_every", "device")


def _drift(step: Step) -> list[str]:
    """What a finished (or started) run or teacher recorded in its config.yaml that the study now
    plans differently: `option: recorded -> planned`. Empty when they agree or nothing is recorded."""
    import yaml

    from geokd.config import resolve_config

    saved_file = step.path / "config.yaml"
    if step.kind == "cache" or not saved_file.is_file():
        return []
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    mode = "finetune" if step.kind == "teacher" else "distill"
    planned = resolve_config(mode, flags=step.flags).to_dict()
    return [f"{key}: {saved.get(key)!r} -> {planned[key]!r}" for key in step.flags
            if key not in BOOKKEEPING and key in planned and saved.get(key) != planned[key]]  # fmt: skip


def planned_steps(study: Study, root: Path, only: dict[str, list[str]] | None = None) -> list[Step]:
    """The steps `run_study` and `dry_run` work on: the plan, cut to the `only` part, checked
    against the options finished runs recorded (`check_recorded`)."""
    steps = select_steps(study, plan_study(study, root), only or {})
    check_recorded(steps, root)
    return steps


def check_recorded(steps: list[Step], root: Path) -> None:
    """Refuse to skip (or resume) a run whose recorded options differ from what the study now asks:
    its results would be reported under settings it was not trained with. One line naming the first
    few, and what to do."""
    stale = [(step, drift) for step in steps if (drift := _drift(step))]
    if stale:
        shown = "; ".join(f"{step.path.relative_to(root) if step.path.is_relative_to(root) else step.path} "
                          f"({', '.join(drift[:3])})" for step, drift in stale[:3])  # fmt: skip
        raise GeokdError(f"study: {len(stale)} run(s) in {str(root)!r} were trained with other options than the study "
                         f"file now asks: {shown}; restore the study file, or move those runs away to train them again")  # fmt: skip


def _resume(path: Path) -> str | None:
    return "auto" if path.exists() else None


def run_step(step: Step, resumed: bool = False) -> float:
    """Execute one step (resuming it if it was interrupted: `resumed`, then its wall time is
    partial and recorded as such); returns its wall time in seconds."""
    from geokd.config import resolve_config
    from geokd.engine import train

    started = time.perf_counter()
    if step.kind == "cache":
        from geokd.cache import CacheRequest, build_cache

        build_cache(CacheRequest(**step.flags))
    else:
        mode = "finetune" if step.kind == "teacher" else "distill"
        train(resolve_config(mode, flags={**step.flags, "resume": _resume(step.path)}))
    seconds = time.perf_counter() - started
    if step.kind != "cache" and _rank_zero():
        record = {"seconds": seconds, "resumed": resumed, "label": step.label}
        (step.path / "study.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return seconds


class StudyInterrupted(Exception):
    """A signal stopped `geokd study`: the runs in progress finished their optimizer step and
    checkpointed (the engine's signal handling, in the study's process or in its `--jobs` workers);
    the same command resumes them. Exit status 128 + signal."""

    def __init__(self, signum: int, root: Path, in_progress: list[str]):
        import signal

        self.signum = signum
        where = f"{len(in_progress)} run(s) in progress checkpointed ({', '.join(in_progress)})" if in_progress else \
            "no run was in progress"  # fmt: skip
        super().__init__(f"{signal.Signals(signum).name} received: the study stopped, {where}; run the same "
                         f"geokd study command (--out {root}) to resume")  # fmt: skip

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _WorkerStop(Exception):
    """SIGTERM reached a `--jobs` worker before its run's training loop took the signal over."""


_WORKER = {"in_run": False, "stopped": False, "orphaned": False}


def _worker_init(parent: int) -> None:
    """A `--jobs` worker. Ctrl-C reaches the study alone (which stops its workers once, by SIGTERM:
    a second signal would make the engine's handler give way mid-checkpoint). SIGTERM while training
    is the engine's (finish the step, checkpoint); while loading a run it abandons the run (nothing
    trained yet); idle, it only marks the worker stopped: it takes no further run, and stays until
    the pool shuts down (a worker that exits would break the pool, which then signals the others a
    second time). A worker whose study is gone (killed outright) stops its run the same way and
    exits, instead of training on unseen into a directory the next `geokd study` would train too."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_term(signum: int, frame: Any) -> None:
        _WORKER["stopped"] = True
        if _WORKER["in_run"]:
            raise _WorkerStop(signum)

    signal.signal(signal.SIGTERM, on_term)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        _WORKER["orphaned"] = True
        if not _WORKER["in_run"]:
            os._exit(143)
        os.kill(os.getpid(), signal.SIGTERM)  # the run checkpoints, then `_run_in_worker` exits

    threading.Thread(target=watch, name="geokd-study-parent", daemon=True).start()


def _run_in_worker(step: Step, threads: int, resumed: bool) -> float | None:
    """One run in a `--jobs` worker: its wall time, or None when a signal stopped it (checkpointed)
    or the study was stopping before it began."""
    import sys

    import torch

    from geokd.engine import RunInterrupted

    if _WORKER["stopped"]:
        return None
    torch.set_num_threads(threads)
    _WORKER["in_run"] = True
    try:
        return run_step(step, resumed)
    except RunInterrupted as stop:  # the study's own line says how to resume: not the run's `--resume auto`
        import signal

        saved = f"checkpoint {stop.checkpoint.name}" if stop.checkpoint is not None else "no checkpoint yet"
        print(f"stopped: {signal.Signals(stop.signum).name} received: {step.path} stopped after step {stop.step} "
              f"({saved})", file=sys.stderr, flush=True)  # fmt: skip
        _WORKER["stopped"] = True
        return None
    except _WorkerStop:
        _WORKER["stopped"] = True
        return None
    finally:
        _WORKER["in_run"] = False
        if _WORKER["orphaned"]:
            sys.stdout.flush()
            os._exit(143)


def _steps_done(step: Step) -> int:
    """The optimizer steps an interrupted run has behind it (its last logged step), 0 if none."""
    metrics = step.path / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    last = 0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            last = max(last, int(json.loads(line).get("step") or 0))
        except (ValueError, AttributeError):
            continue  # a line cut by a kill
    return last


def _step_cost_key(step: Step) -> tuple[tuple[str, ...], ...]:
    """The groups whose measured seconds per optimizer step stand in for this run's, most specific first."""
    student, loss = slug(str(step.label.get("student", ""))), str(step.label.get("loss", ""))
    return ((step.task, student, loss), (student, loss), (loss,))


def _finished_step_seconds(runs: Path) -> list[tuple[Step, float]]:
    """Each finished run under a study's `runs/` folder (runs/TASK/STUDENT/LOSS/seed-K) with its wall
    seconds per optimizer step (loading and evaluation included), the run as a `Step` carrying its
    task and label. A resumed run is left out (its wall time covers part of the run only), as is one
    whose records cannot be read (cut by a kill)."""
    found = []
    for done in sorted(runs.glob("*/*/*/seed-*/study.json")):
        try:
            record = json.loads(done.read_text(encoding="utf-8"))
            finished = json.loads((done.parent / "results.json").read_text(encoding="utf-8")).get("steps")
            seconds = float(record["seconds"]) / int(finished)
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
        if record.get("resumed"):
            continue
        task = done.relative_to(runs).parts[0]
        found.append((Step("run", task, done.parent, label=record.get("label") or {}), seconds))
    return found


def dispatch_order(steps: list[Step]) -> list[Step]:
    """The `--jobs` runs, longest first (longest-processing-time scheduling), so that the part's last
    minutes are not one long run on a worker's share of the cores while the other workers idle.

    A run's expected time is its remaining optimizer steps times the seconds per step measured on
    finished runs of this study folder of the same task, student and loss (else the same student and
    loss in another task, else the same loss, else the median over all finished runs), and twice that
    median for a run that reads the live teacher rather than the cache, when nothing of its kind has
    finished. Ties keep the plan's order. Only the order changes; every run still runs once."""
    measured: dict[tuple[str, ...], list[float]] = {}
    for runs in sorted({step.path.parents[3] for step in steps}):  # STUDY/runs (runs/TASK/STUDENT/LOSS/seed-K)
        for run, seconds in _finished_step_seconds(runs):
            for group in _step_cost_key(run):
                measured.setdefault(group, []).append(seconds)
    pooled = [v for group, values in measured.items() if len(group) == 1 for v in values]
    base = float(np.median(pooled)) if pooled else 1.0

    def per_step(step: Step) -> float:
        for group in _step_cost_key(step):
            if group in measured:
                return float(np.median(measured[group]))
        return base * (1.0 if step.flags.get("cache") else 2.0)

    costs = []
    try:
        for index, step in enumerate(steps):
            remaining = max(1, _optimizer_steps(step) - _steps_done(step))
            costs.append((-remaining * per_step(step), index))
    except (GeokdError, OSError, ValueError):
        return list(steps)  # a run the estimate cannot size: its own start reports why; keep the plan's order
    return [steps[index] for _, index in sorted(costs)]


def _forward_stop() -> Any:
    """While the study waits on its `--jobs` workers: the engine's stop-signal handling (the first
    SIGTERM or SIGINT is remembered in `received`, a second acts as usual), and that first signal
    cancels the runs not yet handed to a worker (`futures`) and is forwarded to the workers as one
    SIGTERM (each run finishes its step and checkpoints)."""
    import multiprocessing

    from geokd.engine import _StopSignals

    class ForwardStop(_StopSignals):
        def __init__(self) -> None:
            super().__init__()
            self.futures: list[Any] = []

        def _handle(self, signum: int, frame: Any) -> None:
            super()._handle(signum, frame)
            for future in self.futures:
                future.cancel()
            for child in multiprocessing.active_children():
                child.terminate()

    return ForwardStop()


def run_study(study: Study, root: Path, on_step: Callable[[int, int, Step, bool], None] | None = None,
              on_done: Callable[[Step, float], None] | None = None, jobs: int = 1,
              only: dict[str, list[str]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run every step not already done, in order, then write the report. `on_step(index, total,
    step, skipped)` is told before each step, `on_done(step, seconds)` after each one that ran.
    `jobs > 1`: teachers and caches first, one at a time; then the student runs `jobs` at a time in
    worker processes, the CPU threads split between them. `only` (`parse_only`): run one part of the
    study; the report still covers every finished run of the folder."""
    import signal

    from geokd.engine import RunInterrupted

    if jobs < 1:
        raise GeokdError(f"--jobs: must be at least 1, got {jobs}")
    steps = planned_steps(study, root, only)  # before anything is written
    root.mkdir(parents=True, exist_ok=True)
    if _rank_zero():
        _write_spec(study, root)
    pending: list[Step] = []
    for index, step in enumerate(steps):
        skipped = step.done
        if on_step is not None:
            on_step(index, len(steps), step, skipped)
        if skipped:
            continue
        if jobs > 1 and step.kind == "run":
            pending.append(step)
            continue
        try:
            seconds = run_step(step, _was_started(step))
        except RunInterrupted as stop:
            raise StudyInterrupted(stop.signum, root, [_run_name(root, step)]) from None
        if on_done is not None:
            on_done(step, seconds)
    if pending:
        import concurrent.futures
        import multiprocessing

        import torch

        # Fixed for a run's whole life, not raised when the other workers fall idle: SVD-based losses
        # round differently on another thread count, and a run's numbers must not depend on scheduling.
        threads = max(1, torch.get_num_threads() // jobs)
        context = multiprocessing.get_context("spawn")
        stop = _forward_stop()
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                                    initargs=(os.getpid(),)) as pool, stop:  # fmt: skip
            futures = {pool.submit(_run_in_worker, step, threads, _was_started(step)): step
                       for step in dispatch_order(pending)}  # fmt: skip
            stop.futures = list(futures)
            stopped, halted = [], False
            for future in concurrent.futures.as_completed(futures):
                if future.cancelled():
                    continue
                seconds = future.result()
                if seconds is None:  # a signal stopped this run, or its worker, before it began
                    halted = True
                    if _was_started(futures[future]):
                        stopped.append(_run_name(root, futures[future]))
                elif on_done is not None:
                    on_done(futures[future], seconds)
        if stop.received is not None or halted:
            raise StudyInterrupted(stop.received or signal.SIGTERM, root, sorted(stopped))
    if not _rank_zero():
        return {"study": study.name, "tasks": {}}
    generation_evals(study, root)
    return build_report(root)


def _run_name(root: Path, step: Step) -> str:
    return step.path.relative_to(root).as_posix() if step.path.is_relative_to(root) else str(step.path)


def _eval_file(run: Path, name: str) -> Path:
    return run / "eval" / f"study-{slug(name)}.json"


def _generations_file(eval_file: Path) -> Path:
    return eval_file.with_name(eval_file.stem + ".generations.jsonl")


def generation_evals(study: Study, root: Path) -> None:
    """Greedy ROUGE-L of every finished run of an instruct task (and of its teacher, in
    `STUDY/teachers/TASK-eval/`) on each of the task's `evals` files; done once, kept in the run."""
    from geokd.artifacts import write_json
    from geokd.generation import write_generations_jsonl
    from geokd.instruct_eval import evaluate_instruct_model

    for task in study.tasks:
        if not task.evals:
            continue
        new_tokens = int({**study.settings, **task.settings}.get("max_new_tokens", 128))
        targets = [Path(s.path) for s in plan_study(study, root) if s.kind == "run" and s.task == task.name and s.done]
        teacher = _teacher_path(study, task, root)
        for name, file in task.evals.items():
            for run in [*targets, None]:
                out = _eval_file(run, name) if run is not None else root / "teachers" / f"{task.name}-eval" / f"{slug(name)}.json"
                if out.is_file() and _generations_file(out).is_file():
                    continue  # (one without its per-prompt file, from an older geokd, is scored again)
                result = evaluate_instruct_model(str(run) if run is not None else teacher, file, limit=task.eval_limit,
                                                 max_new_tokens=new_tokens)  # fmt: skip
                records = result.pop("records", [])
                out.parent.mkdir(parents=True, exist_ok=True)
                # each prompt's generation and ROUGE-L first: the report pairs runs over prompts
                write_generations_jsonl(_generations_file(out), records)
                write_json(out, result)


def _was_started(step: Step) -> bool:
    """An interrupted run (a run directory without results.json, with a checkpoint)."""
    return any((step.path / "checkpoints").glob("step-*")) if step.path.exists() else False


def _rank_zero() -> bool:
    """Under torchrun every rank runs every step (each run uses the process group); rank 0 alone
    writes the study's own records and the report."""
    return int(os.environ.get("RANK", "0")) == 0


def _write_spec(study: Study, root: Path) -> None:
    """`STUDY/study.json`: the resolved study, so `--report` needs nothing else."""
    from dataclasses import asdict

    from geokd.artifacts import write_json

    spec = asdict(study)
    for task in spec["tasks"]:  # a list of pairs: JSON objects are written with sorted keys
        task["evals"] = [[name, file] for name, file in task["evals"].items()]
    path = root / "study.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved["tasks"] = [_expand_task(task) for task in saved.get("tasks") or []]
        changed = [k for k in ("tasks", "students", "losses", "settings", "sweep") if saved.get(k) != spec.get(k)]
        if changed and any(root.glob("runs/*/*/*/seed-*/results.json")):
            # finished runs stay valid (each records its own config); the report groups by config
            spec["previous"] = {k: saved.get(k) for k in changed}
    write_json(path, spec)


# --------------------------------------------------------------------------------------------
# The dry run
# --------------------------------------------------------------------------------------------


def dry_run(study: Study, root: Path, only: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The plan without running it: steps (done and to do), estimated time and disk.

    Time: for each run to do, its optimizer steps at the seconds per step measured by the study's
    finished runs (their wall time over their steps, loading and evaluation included); without one,
    by a 3-step probe run of the first distill configuration (in a temporary folder, deleted after):
    its steps' own times (`metrics.jsonl`) give the seconds per step, and the rest of its wall time
    (loading the models and data, the final evaluation) is added once per run. Disk: each run's
    final model (its parameters in float32) plus one checkpoint with AdamW state (3× that), and the
    caches' expected bytes."""
    steps = planned_steps(study, root, only)
    todo = [s for s in steps if not s.done]
    seconds_per_step, seconds_per_run, source = _measured_step_seconds(root, steps)
    total_seconds = 0.0
    for step in todo:
        total_seconds += _optimizer_steps(step) * seconds_per_step + (seconds_per_run if step.kind == "run" else 0.0)
    generation_seconds, generation_pending, generation_source = _generation_estimate(study, root, steps)
    return {
        "study": study.name,
        "steps": len(steps),
        "done": len(steps) - len(todo),
        "to_do": {kind: sum(1 for s in todo if s.kind == kind) for kind in ("teacher", "cache", "run")},
        "runs": sum(1 for s in steps if s.kind == "run"),
        "seconds_per_optimizer_step": seconds_per_step,
        "seconds_per_run_overhead": seconds_per_run,
        "throughput_source": source,
        "estimated_seconds": total_seconds,
        # instruct tasks: greedy generation of every run (and the teacher) on each eval set, after the runs
        "generation_evals_to_do": generation_pending,
        "generation_seconds": generation_seconds,
        "generation_source": generation_source,
        "estimated_disk_bytes": _disk_estimate(todo, root),
    }


def _generation_estimate(study: Study, root: Path, steps: list[Step]) -> tuple[float, int, str]:
    """(seconds, evaluations to do, where the time comes from) for the generation evaluations of the
    selected runs and their teachers: each evaluation to do at the median time of this study's
    finished ones (the teacher's own when it has one, a larger model than its students)."""
    pending: list[tuple[str, bool]] = []  # (task, is the teacher)
    for task in study.tasks:
        if not task.evals:
            continue
        runs = [s for s in steps if s.kind == "run" and s.task == task.name]
        for name in task.evals:
            pending += [(task.name, False) for s in runs if not _eval_file(s.path, name).is_file()]
            if runs and not (root / "teachers" / f"{task.name}-eval" / f"{slug(name)}.json").is_file():
                pending.append((task.name, True))
    if not pending:
        return 0.0, 0, "none to do"

    def elapsed(files: list[Path]) -> list[float]:
        return [float(json.loads(f.read_text(encoding="utf-8"))["elapsed_s"]) for f in files]

    students = elapsed(sorted(f for f in root.glob("runs/*/*/*/seed-*/eval/study-*.json")
                              if _generations_file(f).is_file()))  # (not study-geometry.json)
    teachers = elapsed(sorted(root.glob("teachers/*-eval/*.json")))
    if not students:
        return float("nan"), len(pending), "unknown until one run of this study has been scored"
    student_s = float(np.median(students))
    teacher_s = float(np.median(teachers)) if teachers else student_s
    seconds = sum(teacher_s if is_teacher else student_s for _, is_teacher in pending)
    return seconds, len(pending), f"median of {len(students)} finished evaluation(s) of this study"


def _optimizer_steps(step: Step) -> int:
    flags = step.flags
    if step.kind == "cache":
        return 0
    if flags.get("max_steps"):
        return int(flags["max_steps"])
    from geokd.config import resolve_config

    config = resolve_config("finetune" if step.kind == "teacher" else "distill", flags=flags)
    examples = _train_examples(config)
    per_step = config.batch_size * config.grad_accum
    return math.ceil(examples * config.epochs / per_step)


def _train_examples(config: Any) -> int:
    from geokd.tasks import is_instruct_task

    data = Path(config.data or ".")
    if is_instruct_task(config.task):
        file = data / "train.jsonl"
        return sum(1 for line in file.read_text(encoding="utf-8").splitlines() if line.strip()) if file.is_file() else 0
    for name in ("train.tsv", "train.csv", "train.jsonl"):
        if (data / name).is_file():
            return max(0, len((data / name).read_text(encoding="utf-8").splitlines()) - (name != "train.jsonl"))
    return 0


def _measured_step_seconds(root: Path, steps: list[Step]) -> tuple[float, float, str]:
    """(seconds per optimizer step, seconds per run besides its steps, where they come from)."""
    selected = {step.path for step in steps if step.kind == "run" and step.done}
    timings = [seconds for run, seconds in _finished_step_seconds(root / "runs") if run.path in selected]
    if timings:
        return float(np.median(timings)), 0.0, f"median of {len(timings)} finished run(s) of this study"
    probe = next((s for s in steps if s.kind == "run"), None)
    if probe is None or not all((p.done or p.kind == "run") for p in steps if p.kind in ("teacher", "cache")):
        return float("nan"), float("nan"), "unknown: the teachers (and caches) must exist before a probe run can measure a step"
    import tempfile

    from geokd.config import resolve_config
    from geokd.engine import train

    with tempfile.TemporaryDirectory() as folder:
        flags = {k: v for k, v in probe.flags.items() if k != "cache"}
        flags.update(out=str(Path(folder) / "probe"), max_steps=3, eval_every=None, save_minutes=0)
        config = resolve_config("distill", flags=flags)
        started = time.perf_counter()
        train(config)
        wall = time.perf_counter() - started
        step_seconds = probe_step_seconds(Path(folder) / "probe" / "metrics.jsonl", config.batch_size * config.grad_accum)
        per_step = float(np.median(step_seconds[1:] or step_seconds))  # the first step also warms up
        return per_step, max(0.0, wall - sum(step_seconds)), "a 3-step probe run"


def probe_step_seconds(metrics: Path, examples_per_step: int) -> list[float]:
    """Each optimizer step's wall seconds, from a run's `metrics.jsonl` (its examples over the
    examples/s logged for the step)."""
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [examples_per_step / r["examples_per_s"] for r in records if r.get("examples_per_s")]


def _disk_estimate(todo: list[Step], root: Path) -> int:
    """Bytes the remaining steps write, an upper bound: each run's final weights plus one
    checkpoint with the AdamW moments (4× the teacher's weights files, a student being no larger),
    and 64 MiB per cache (a GLUE task's [CLS] rows of every layer: bench/cache.py)."""
    total = 0
    sizes: dict[str, int] = {}
    for step in todo:
        if step.kind == "cache":
            total += 64 * 2**20
            continue
        name = str(step.flags.get("teacher") or step.flags.get("student") or "")
        if name not in sizes:
            folder = Path(name)
            files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
            sizes[name] = sum(f.stat().st_size for f in files) or 100 * 2**20  # not there yet: 100 MiB
        total += 4 * sizes[name]
    return total


# --------------------------------------------------------------------------------------------
# Records: a study without its weights
# --------------------------------------------------------------------------------------------

RECORDS_FILE = "records.json"
RUN_RECORD_FILES = ("study.json", "results.json", "config.yaml", "metrics.jsonl", "env.json")
COMPRESSED = ("/metrics.jsonl",)  # gzip-compressed in the records (`NAME.gz`, reproducible bytes): logs dominate
TEACHER_RECORD_FILES = ("results.json", "config.yaml")  # kept as teachers/TASK-eval/teacher-FILE
PORTABLE_PATHS = "paths inside the study folder are relative to it; ${GEOKD_DATA} is the data root it ran with"


def _record_sources(root: Path) -> list[tuple[Path, str]]:
    """(source file, path inside the records) of everything `export_records` keeps: the study's
    spec, each finished run's records and evaluations (never its model or checkpoints), each
    teacher's results and config and its generation evaluations. Unfinished runs are left out."""
    sources = [(root / "study.json", "study.json")]
    for results in sorted(root.glob("runs/*/*/*/seed-*/results.json")):
        run = results.parent
        rel = run.relative_to(root).as_posix()
        sources += [(run / name, f"{rel}/{name}") for name in RUN_RECORD_FILES if (run / name).is_file()]
        sources += [(f, f"{rel}/eval/{f.name}") for f in sorted((run / "eval").glob("*")) if f.is_file()]
    for teacher in sorted(p for p in (root / "teachers").glob("*") if p.is_dir() and not p.name.endswith("-eval")):
        sources += [(teacher / name, f"teachers/{teacher.name}-eval/teacher-{name}") for name in TEACHER_RECORD_FILES
                    if (teacher / "results.json").is_file() and (teacher / name).is_file()]  # fmt: skip
    for evals in sorted((root / "teachers").glob("*-eval")):
        sources += [(f, f"teachers/{evals.name}/{f.name}") for f in sorted(evals.glob("*"))
                    if f.is_file() and not f.name.startswith("teacher-")]  # fmt: skip
    return sources


def _portable(text: str, root: Path) -> str:
    """A record's text without this machine's layout (records go into git and to other machines):
    paths inside the study folder become relative to it (the folder itself `.`), and paths under
    `$GEOKD_DATA` become `${GEOKD_DATA}/...`, which `_expand_task` expands again when a study is
    read. Longer prefixes first, so a data root inside the study folder (or the reverse) is right."""
    prefixes = {str(root.resolve()): "", str(root.absolute()): ""}
    if data := os.environ.get("GEOKD_DATA"):
        prefixes |= {str(Path(data).resolve()): "${GEOKD_DATA}", str(Path(data).absolute()): "${GEOKD_DATA}"}
    for prefix in sorted(prefixes, key=len, reverse=True):
        if prefix in ("", "/"):
            continue
        replacement = prefixes[prefix]
        escaped = re.escape(prefix)
        if replacement:  # ${GEOKD_DATA}/glue/RTE and ${GEOKD_DATA} itself
            text = re.sub(escaped + r"(?=/|[\"'\s]|$)", lambda _, r=replacement: r, text)
        else:  # STUDY/teachers/x -> teachers/x, STUDY -> .
            text = re.sub(escaped + "/", "", text)
            text = re.sub(escaped + r"(?=[\"'\s]|$)", ".", text)
    return text


def export_records(root: Path, out: Path) -> dict[str, Any]:
    """`geokd study --records STUDY --out DIR`: the study's weight-free records (`_record_sources`)
    in DIR, with `records.json` (SHA-256 of every file, the source, the geokd version). Small enough
    for git (a few MB for a GLUE study), and enough for `geokd study --report DIR`; copied into a new
    study folder, the study continues there: finished runs are skipped (their recorded options are
    still checked against the study file), teachers and caches are rebuilt when a new part needs them.
    DIR is replaced only when it is absent, empty or an earlier records folder; written atomically."""
    import gzip

    import geokd
    from geokd.artifacts import atomic_dir, write_json
    from geokd.cache import file_sha256

    root, out = Path(root), Path(out)
    if not (root / "study.json").is_file():
        raise GeokdError(f"study --records: {str(root)!r} holds no study.json; pass the folder a study wrote")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RECORDS_FILE).is_file())):
        raise GeokdError(f"study --records: --out {str(out)!r} exists and is not a records folder; give a new or empty "
                         "folder (an earlier records folder is replaced)")  # fmt: skip
    if out.resolve() == root.resolve() or out.resolve().is_relative_to(root.resolve()):
        raise GeokdError(f"study --records: --out {str(out)!r} is inside the study folder; give a folder outside it")
    if not out.parent.is_dir():
        raise GeokdError(f"study --records: directory {str(out.parent)!r} does not exist; create it first")
    sources = _record_sources(root)
    files = {}
    with atomic_dir(out, "study records") as tmp:
        for source, rel in sources:
            if rel.endswith(COMPRESSED):
                rel += ".gz"
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            text = _portable(source.read_text(encoding="utf-8"), root).encode("utf-8")
            if rel.endswith(".gz"):
                with gzip.GzipFile(target, "wb", compresslevel=9, mtime=0) as dst:
                    dst.write(text)
            else:
                target.write_bytes(text)
            files[rel] = file_sha256(target)
        runs = len({str(Path(rel).parent) for rel in files if rel.startswith("runs/") and rel.endswith("/results.json")})
        write_json(tmp / RECORDS_FILE, {"kind": "geokd-study-records", "geokd_version": geokd.__version__,
                                         "source": root.resolve().name, "paths": PORTABLE_PATHS, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                         "runs": runs, "files": files})  # fmt: skip
    return {"runs": runs, "files": len(files), "bytes": sum((out / rel).stat().st_size for rel in files)}


def check_records(root: Path) -> None:
    """A study folder holding `records.json` (records exported, or copied into a study folder to
    continue it): every recorded file still present must hash as recorded, or the report would mix
    edited or foreign results in. One line naming the first few, then exit 2."""
    from geokd.cache import file_sha256

    manifest = root / RECORDS_FILE
    if not manifest.is_file():
        return
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        raise GeokdError(f"study: {str(manifest)!r} is not a geokd records manifest; remove it or export the records "
                         "again") from None  # fmt: skip
    changed = [rel for rel, digest in files.items() if (root / rel).is_file() and file_sha256(root / rel) != digest
               and rel != "study.json"]  # fmt: skip
    if changed:
        raise GeokdError(f"study: {len(changed)} recorded file(s) in {str(root)!r} differ from {RECORDS_FILE}: "
                         f"{', '.join(changed[:3])}; restore them from the records, or remove {RECORDS_FILE} to accept them")  # fmt: skip


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (None stays None and does not count in m)."""
    indexed = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _primary_metric(task: str, runs: list[Any], requested: str | None) -> str:
    from geokd.tasks import get_task, is_instruct_task

    if requested:
        return requested
    if is_instruct_task(task):
        return "rouge_l" if all("rouge_l" in r.metrics for r in runs) else "loss"
    return get_task(task).primary_metric


def _seed_map(runs: list[Any], metric: str) -> dict[int, float]:
    return {int(r.seed): float(r.metrics[metric]) for r in runs if metric in r.metrics and r.seed is not None}


def _test(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    from geokd.compare import paired_test, welch_test

    va, vb = np.array(list(a.values())), np.array(list(b.values()))
    out: dict[str, Any] = {"difference": float(va.mean() - vb.mean()) if len(va) and len(vb) else None}
    common = sorted(set(a) & set(b))
    if len(common) >= 2 and set(a) == set(b):
        test = paired_test(np.array([a[s] for s in common]), np.array([b[s] for s in common]))
        out.update(test="paired t", p=test.get("p"))
    elif len(va) >= 2 and len(vb) >= 2:
        out.update(test="Welch", p=welch_test(va, vb).get("p"))
    else:
        out.update(test=None, p=None)
    return out


def _is_instruct(task: str) -> bool:
    from geokd.tasks import is_instruct_task

    return is_instruct_task(task)


GEOMETRY_EXAMPLES = 512  # dev examples the median run's geometry report reads (a bound on its cost)
DECODER_GEOMETRY_EXAMPLES = 128  # the same for instruct tasks (each example is a prompt + response)


def _median_geometry(root: Path, task: dict[str, Any], rows: list[dict[str, Any]],
                     runs_by_group: dict[tuple[str, str, str], list[Any]], metric: str) -> None:  # fmt: skip
    """`row["geometry"]`: the geometry report (`geokd eval --geometry`, the run's own layer map,
    one row per dev example) of the row's median run (the lower median by metric), per mapped layer
    pair: Procrustes, CKA distance, the share of the teacher's ε-orthogonal pairs kept. Encoders:
    the run's pooling (`cls` for `tokens` runs) on the first GEOMETRY_EXAMPLES dev examples;
    instruct tasks: the run's `mean` or `last` rows (`mean` over response tokens for `tokens` runs)
    on the first DECODER_GEOMETRY_EXAMPLES dev examples, read with their reference responses.
    Cached in `RUN/eval/study-geometry.json`."""
    from geokd.artifacts import write_json

    teacher = task["teacher"] or str(root / "teachers" / task["name"] / "final")
    instruct = _is_instruct(task["name"])
    for row in rows:
        runs = sorted(runs_by_group[(row["student"], row["loss"], row["point"])], key=lambda r: r.metrics.get(metric, 0.0))
        median = Path(runs[(len(runs) - 1) // 2].path)
        cached = median / "eval" / "study-geometry.json"
        if not cached.is_file() and not (median / "final").is_dir():  # from records: no model to measure
            row["geometry"] = None
            continue
        if not cached.is_file():
            config = yaml_config(median)
            layers = config.get("layers") if config.get("loss") not in ("none", None) else "uniform"
            if instruct:
                from geokd.instruct_eval import instruct_geometry

                features = config.get("features") if config.get("features") in ("mean", "last") else "mean"
                result = instruct_geometry(str(median), teacher, task["data"], limit=DECODER_GEOMETRY_EXAMPLES,
                                           layers=layers, features=features)  # fmt: skip
            else:
                from geokd.evaluate import evaluate_model

                features = config.get("features") if config.get("features") in ("cls", "mean") else "cls"
                result = evaluate_model(str(median), teacher=teacher, geometry=True, limit=GEOMETRY_EXAMPLES,
                                        layers=layers, features=features)  # fmt: skip
            pairs = [{"pair": f"{e['student_layer']}->{e['teacher_layer']}", "procrustes": e.get("procrustes"),
                      "cka_distance": e.get("cka_distance"), "preserved_fraction": e.get("preserved_fraction")}
                     for e in result["geometry"]["layer_pairs"]]  # fmt: skip
            cached.parent.mkdir(exist_ok=True)
            write_json(cached, {"seed": runs[(len(runs) - 1) // 2].seed, "examples": result["n_examples"],
                                "features": features, "layer_pairs": pairs})  # fmt: skip
        row["geometry"] = json.loads(cached.read_text(encoding="utf-8"))


def yaml_config(run: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}


def build_report(root: Path, geometry: bool = True) -> dict[str, Any]:
    """Rebuild `STUDY/report.md`, `report.json` and `plots/TASK.png` from the finished runs alone
    (with `geometry`, each row's median run gets its geometry report, computed once and cached)."""
    from geokd.artifacts import write_json
    from geokd.compare import load_run

    root = Path(root)
    spec_file = root / "study.json"
    if not spec_file.is_file():
        raise GeokdError(f"study --report: {str(root)!r} holds no study.json; pass the folder a study wrote")
    check_records(root)
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    tasks_out = {}
    lines = [f"# Study {spec['name']}", "",
             f"Students {', '.join(f'`{s}`' for s in spec['students'])}; losses {', '.join(spec['losses'])}; "
             f"seeds {', '.join(map(str, spec['seeds']))}"
             + (f"; sweep {spec['sweep']}" if spec["sweep"] else "") + f". Baselines: {', '.join(spec['baselines'])}.",
             ""]  # fmt: skip
    for task in map(_expand_task, spec["tasks"]):  # the report keeps the spec as saved (portable in records)
        name = task["name"]
        runs_by_group: dict[tuple[str, str, str], list[Any]] = {}
        walls: dict[tuple[str, str, str], list[float]] = {}
        for record in sorted((root / "runs" / name).glob("*/*/seed-*/study.json")):
            run_dir = record.parent
            if not (run_dir / "results.json").is_file():
                continue
            label = json.loads(record.read_text(encoding="utf-8"))
            key = (label["label"]["student"], label["label"]["loss"], _point_name(label["label"]["point"]))
            runs_by_group.setdefault(key, []).append(load_run(run_dir))
            if not label.get("resumed"):
                walls.setdefault(key, []).append(float(label["seconds"]))
        all_runs = [r for group in runs_by_group.values() for r in group]
        if not all_runs:
            lines += [f"## {name}", "", "No finished runs yet.", ""]
            continue
        evals = [name for name, _ in task.get("evals") or []]
        for run in all_runs:  # generation evaluations: `rouge_l:NAME` next to the run's own metrics
            for eval_name in evals:
                file = _eval_file(Path(run.path), eval_name)
                if file.is_file():
                    run.metrics[f"rouge_l:{eval_name}"] = json.loads(file.read_text(encoding="utf-8"))["metrics"]["rouge_l"]
        metrics = [f"rouge_l:{e}" for e in evals] or [_primary_metric(name, all_runs, task.get("metric"))]
        if evals and all("loss" in r.metrics for r in all_runs):
            metrics.append("loss")  # instruct tasks: the dev response loss (nats per token, lower is better) too
        section: dict[str, Any] = {}
        for metric in metrics:
            teacher = _teacher_score(root, task, metric)
            trivial = _trivial_score(task, metric)
            rows = _rows(runs_by_group, walls, metric, spec)
            if geometry and metric == metrics[0]:
                _median_geometry(root, task, rows, runs_by_group, metric)
            plot = _plot_task(root, name if metric == metrics[0] else f"{name}-{slug(metric)}", metric, rows, teacher,
                              trivial)  # fmt: skip
            curves = _curves(root, name, metric, rows, runs_by_group, teacher, trivial)
            section[metric] = {"metric": metric, "teacher": teacher, "trivial": trivial, "rows": rows, "plot": plot,
                               "curves_plot": curves}  # fmt: skip
            lines += _task_lines(name, metric, teacher, rows, spec["baselines"], plot, trivial)
            if metric == metrics[0] and (drift := _teacher_drift(root, task)):
                lines += [drift, ""]
            if metric.startswith("rouge_l:"):
                lines += _prompt_lines(_prompt_tests(rows, runs_by_group, metric.split(":", 1)[1]))
            lines += _curve_lines(name, metric, rows, curves)
            lines += _geometry_lines(rows)
        tasks_out[name] = {**section[metrics[0]], "metrics": section}
    report = {"study": spec["name"], "tasks": tasks_out, "spec": spec,
              "statistics": {"std": "sample (ddof = 1)", "tests": "paired t-test (scipy.stats.ttest_rel) when both groups "
                             "ran the same seeds, else Welch (scipy.stats.ttest_ind, equal_var=False); two-sided",
                             "correction": "Holm over every comparison of a task's table"}}  # fmt: skip
    write_json(root / "report.json", report)
    (root / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def _rows(runs_by_group: dict[tuple[str, str, str], list[Any]], walls: dict[tuple[str, str, str], list[float]],
          metric: str, spec: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """One table of the report: a row per (student, loss, sweep point), its tests against the
    baselines, Holm-corrected over the table."""
    rows = []
    for (student, loss, point), runs in runs_by_group.items():
        values = _seed_map(runs, metric)
        arr = np.array(list(values.values()))
        row = {"student": student, "loss": loss, "point": point, "n": len(arr),
               "mean": float(arr.mean()) if len(arr) else None,
               "std": float(arr.std(ddof=1)) if len(arr) >= 2 else None, "per_seed": values,
               "wall_seconds": float(np.mean(walls[(student, loss, point)])) if walls.get((student, loss, point)) else None,
               "versus": {}}  # fmt: skip
        for base in _bases(loss, spec["baselines"]):
            if (student, base, point) not in runs_by_group:
                continue
            row["versus"][base] = _test(values, _seed_map(runs_by_group[(student, base, point)], metric))
        rows.append(row)
    comparisons = [(row, base) for row in rows for base in row["versus"]]
    adjusted = holm([row["versus"][base]["p"] for row, base in comparisons])
    for (row, base), p in zip(comparisons, adjusted, strict=True):
        row["versus"][base]["p_holm"] = p
    order = {loss: i for i, loss in enumerate([*spec["losses"], "finetune-only"])}
    rows.sort(key=lambda r: (spec["students"].index(r["student"]) if r["student"] in spec["students"] else 99,
                             r["point"], order.get(r["loss"], 99)))  # fmt: skip
    return rows


def _bases(loss: str, baselines: list[str]) -> list[str]:
    """The baselines a row is tested against: all of them for a non-baseline loss; for a baseline
    itself only the baselines listed before it, so that each pair of baselines is one comparison
    (cka against none), not two (and not counted twice in Holm's family)."""
    if loss in baselines:
        return baselines[: baselines.index(loss)]
    return list(baselines)


def _prompt_scores(run: Any, eval_name: str) -> dict[Any, float] | None:
    file = _generations_file(_eval_file(Path(run.path), eval_name))
    if not file.is_file():
        return None
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["example_id"]: float(r["rouge_l"]) for r in rows}


def _prompt_tests(rows: list[dict[str, Any]], runs_by_group: dict[tuple[str, str, str], list[Any]],
                  eval_name: str) -> list[dict[str, Any]]:  # fmt: skip
    """Each row against each of its baselines, paired over prompts: every prompt's ROUGE-L averaged
    over the seeds both rows ran, then the mean difference, its bootstrap 95% CI, the paired t and
    Wilcoxon p (`geokd.compare.paired_items`), Holm over the table (on the paired t p). Seeds are
    few and runs are noisy, prompts many: this asks whether the two training recipes, averaged over
    their seeds, answer the same prompts differently well. `row["versus_prompts"]` holds each."""
    from geokd.compare import paired_items

    tests = []
    for row in rows:
        row["versus_prompts"] = {}
        mine = {r.seed: _prompt_scores(r, eval_name) for r in runs_by_group[(row["student"], row["loss"], row["point"])]}
        for base in row["versus"]:
            theirs = {r.seed: _prompt_scores(r, eval_name) for r in runs_by_group[(row["student"], base, row["point"])]}
            seeds = sorted(s for s in set(mine) & set(theirs) if mine[s] is not None and theirs[s] is not None)
            if not seeds:
                continue
            prompts = sorted(set.intersection(*(set(mine[s]) & set(theirs[s]) for s in seeds)))
            if len(prompts) < 2:
                continue
            a = np.array([np.mean([mine[s][p] for s in seeds]) for p in prompts])
            b = np.array([np.mean([theirs[s][p] for s in seeds]) for p in prompts])
            test = {**paired_items(a, b), "seeds": seeds}
            row["versus_prompts"][base] = test
            tests.append({"row": row, "base": base, **test})
    for test, p in zip(tests, holm([t["p_paired_t"] for t in tests]), strict=True):
        test["row"]["versus_prompts"][test["base"]]["p_holm"] = test["p_holm"] = p
    return tests


def _prompt_lines(tests: list[dict[str, Any]]) -> list[str]:
    if not tests:
        return []
    lines = ["Paired over prompts (each prompt's ROUGE-L averaged over the seeds both rows ran; bootstrap 95% CI "
             "of the mean difference; paired t, Holm over this table; Wilcoxon signed-rank):", "",
             "| student | loss | vs | seeds | prompts | Δ | 95% CI | p (t) | p Holm | p (Wilcoxon) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in tests:
        row, ci = t["row"], t["ci95"]
        label = row["loss"] + (f" {row['point']}" if row["point"] else "")
        lines.append(f"| `{row['student']}` | {label} | {t['base']} | {len(t['seeds'])} | {t['n']} | "
                     f"{t['difference']:+.2f} | " + (f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-")
                     + f" | {_fmt(t['p_paired_t'], '.3g')} | {_fmt(t['p_holm'], '.3g')} | {_fmt(t['p_wilcoxon'], '.3g')} |")  # fmt: skip
    return [*lines, ""]


def _teacher_score(root: Path, task: dict[str, Any], metric: str) -> float | None:
    if metric.startswith("rouge_l:"):  # the teacher's generation evaluation (generation_evals)
        file = root / "teachers" / f"{task['name']}-eval" / f"{slug(metric.split(':', 1)[1])}.json"
        return float(json.loads(file.read_text(encoding="utf-8"))["metrics"]["rouge_l"]) if file.is_file() else None
    teacher = Path(task["teacher"]) if task.get("teacher") else root / "teachers" / task["name"] / "final"
    if task.get("teacher") and not teacher.is_dir():  # a hub id or package alias: no results of its own
        return None
    recorded = root / "teachers" / f"{task['name']}-eval" / "teacher-results.json"  # from a records folder
    for results in (teacher.parent / "results.json", teacher / "results.json", recorded):
        if results.is_file():
            value = json.loads(results.read_text(encoding="utf-8")).get("metrics", {}).get(metric)
            return float(value) if value is not None else None
    return None


def _teacher_drift(root: Path, task: dict[str, Any]) -> str | None:
    """When a study continued from records re-trained its teacher: a note if the new teacher's dev
    metrics differ from the recorded one's (then the recorded runs learned from another teacher)."""
    recorded = root / "teachers" / f"{task['name']}-eval" / "teacher-results.json"
    live = root / "teachers" / task["name"] / "results.json"
    if task.get("teacher") or not (recorded.is_file() and live.is_file()):
        return None
    old, new = (json.loads(f.read_text(encoding="utf-8")).get("metrics", {}) for f in (recorded, live))
    differ = [k for k in sorted(set(old) & set(new)) if not math.isclose(float(old[k]), float(new[k]), rel_tol=1e-6)]
    if not differ:
        return None
    return ("**The teacher was fine-tuned again and differs from the recorded one** ("
            + ", ".join(f"{k} {float(old[k]):.4f} → {float(new[k]):.4f}" for k in differ[:3])
            + "): runs from the records learned from the recorded teacher, new runs from this one.")


def _trivial_score(task: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """What a predictor that ignores its input scores on the dev split: the training split's
    majority class (classification), or the training mean (regression, whose correlations are 0
    by `compute_metrics`' convention). None for instruct tasks or data that cannot be read here."""
    from collections import Counter

    from geokd.data import load_split
    from geokd.tasks import compute_metrics, get_task

    if _is_instruct(task["name"]):
        return None
    try:
        spec = get_task(task["name"])
        train = load_split(spec, task["data"], "train")
        dev = load_split(spec, task["data"], spec.dev_split)
    except (GeokdError, OSError, ValueError):
        return None
    labels = np.array([example.label for example in dev.examples])
    train_labels = [example.label for example in train.examples]
    if spec.is_regression:
        predictions, what = np.full(len(labels), float(np.mean(train_labels))), "a constant (the training mean)"
    else:
        majority = Counter(train_labels).most_common(1)[0][0]
        predictions, what = np.full(len(labels), majority), f"the majority class ({spec.label_names[majority]})"
    value = compute_metrics(spec, predictions, labels).get(metric)
    return None if value is None else {"value": float(value), "predictor": what}


def _curve(run: Any, metric: str) -> list[tuple[float, float]]:
    """(epoch, dev metric) of every evaluation during a run (`eval_every`, from its metrics.jsonl),
    then the final one (results.json) at the last logged epoch."""
    file = Path(run.path) / "metrics.jsonl"
    packed = file.with_name(file.name + ".gz")  # a run from a study's records (`export_records`)
    text = file.read_text(encoding="utf-8") if file.is_file() else read_gzip_text(packed) if packed.is_file() else None
    points: list[tuple[float, float]] = []
    last = None
    if text is not None:
        for line in text.splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("epoch") is None:
                continue
            last = round(float(record["epoch"]), 2)
            value = (record.get("eval") or {}).get(metric)
            if value is not None:
                points.append((last, float(value)))
    final = run.metrics.get(metric)
    if final is not None and last is not None and (not points or points[-1][0] < last):
        points.append((last, float(final)))
    return points


def read_gzip_text(path: Path) -> str:
    import gzip

    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    except (OSError, EOFError) as exc:
        raise GeokdError(f"study: {str(path)!r} is not readable gzip ({exc}); restore it from the records") from None


def _curves(root: Path, name: str, metric: str, rows: list[dict[str, Any]],
            runs_by_group: dict[tuple[str, str, str], list[Any]], teacher: float | None,
            trivial: dict[str, Any] | None) -> str | None:  # fmt: skip
    """Each row's dev metric during training, averaged over its seeds at each evaluated epoch
    (`row["curve"]`: [[epoch, mean, n], ...]); with any row evaluated more than once, a plot
    `plots/TASK-curves.png`."""
    for row in rows:
        by_epoch: dict[float, list[float]] = {}
        for run in runs_by_group[(row["student"], row["loss"], row["point"])]:
            for epoch, value in _curve(run, metric):
                by_epoch.setdefault(epoch, []).append(value)
        row["curve"] = [[epoch, float(np.mean(v)), len(v)] for epoch, v in sorted(by_epoch.items())]
    if not any(len(row["curve"]) >= 2 for row in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for row in rows:
        if row["curve"]:
            label = f"{row['loss']} {row['student'].split(':')[0]}" + (f" {row['point']}" if row["point"] else "")
            ax.plot([c[0] for c in row["curve"]], [c[1] for c in row["curve"]], marker="o", markersize=3, label=label)
    if teacher is not None:
        ax.axhline(teacher, color="C3", linestyle="--", linewidth=1, label="teacher")
    if trivial is not None:
        ax.axhline(trivial["value"], color="0.4", linestyle=":", linewidth=1, label="trivial")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(f"{name}: dev {metric} during training (mean over seeds)", fontsize=9)
    ax.legend(loc="best", fontsize=7)
    return _save_figure(fig, root, f"{name}-curves")


def _curve_lines(name: str, metric: str, rows: list[dict[str, Any]], plot: str | None) -> list[str]:
    if plot is None:
        return []
    epochs = sorted({c[0] for row in rows for c in row["curve"]})
    lines = [f"Dev {metric} during training (mean over seeds, by epoch):", "",
             "| student | loss | sweep | " + " | ".join(f"{e:g}" for e in epochs) + " |", "|" + "---|" * (3 + len(epochs))]  # fmt: skip
    for row in rows:
        values = {c[0]: c[1] for c in row["curve"]}
        lines.append(f"| `{row['student']}` | {row['loss']} | {row['point'] or ''} | "
                     + " | ".join(_fmt(values.get(e)) for e in epochs) + " |")  # fmt: skip
    return [*lines, "", f"![{name} curves]({plot})", ""]


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _task_lines(name: str, metric: str, teacher: float | None, rows: list[dict[str, Any]], baselines: list[str],
                plot: str | None, trivial: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    head = ["student", "loss", "sweep", "n", f"{metric} mean ± std"]
    for base in baselines:
        head += [f"Δ vs {base}", f"p vs {base} (Holm)"]
    head.append("wall / run")
    floor = "" if trivial is None else f" Trivial predictor ({trivial['predictor']}): {_fmt(trivial['value'])}."
    what = " Dev response loss, nats per token: lower is better." if metric == "loss" else ""
    lines = [f"## {name} ({metric})", "", f"Teacher: {_fmt(teacher)}.{floor}{what}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for row in rows:
        cells = [f"`{row['student']}`", row["loss"], row["point"] or "", str(row["n"]),
                 f"{_fmt(row['mean'])} ± {_fmt(row['std'])}"]  # fmt: skip
        for base in baselines:
            versus = row["versus"].get(base)
            if versus is None:
                cells += ["", ""]
            else:
                cells += [_fmt(versus["difference"], "+.4f"),
                          f"{_fmt(versus['p'], '.3f')} ({_fmt(versus.get('p_holm'), '.3f')}, {versus['test'] or 'n < 2'})"]  # fmt: skip
        cells.append("–" if row["wall_seconds"] is None else f"{row['wall_seconds'] / 60:.1f} min")
        lines.append("| " + " | ".join(cells) + " |")
    if any(row["wall_seconds"] is None for row in rows):
        lines += ["", "Wall / run: the mean over the row's runs that trained in one go; – where every run was resumed "
                      "from a checkpoint (its wall time covers part of the run only)."]  # fmt: skip
    if plot:
        lines += ["", f"![{name}]({plot})"]
    return [*lines, ""]


def _geometry_lines(rows: list[dict[str, Any]]) -> list[str]:
    with_geometry = [r for r in rows if r.get("geometry")]
    if not with_geometry:
        return []
    first = with_geometry[0]["geometry"]
    rows_are = f", {first['features']} rows" if first.get("features") else ""
    lines = [f"Geometry of each row's median run against the teacher ({first['examples']} dev examples{rows_are}; "
             "distances: 0 = same geometry; kept = share of the teacher's ε-orthogonal pairs, ε = 0.1, still "
             "ε-orthogonal):", "",
             "| student | loss | sweep | seed | layer pair | procrustes | cka_distance | kept |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in with_geometry:
        for pair in row["geometry"]["layer_pairs"]:
            lines.append(f"| `{row['student']}` | {row['loss']} | {row['point'] or ''} | {row['geometry']['seed']} | {pair['pair']} | "
                         f"{_fmt(pair['procrustes'])} | {_fmt(pair['cka_distance'])} | "
                         f"{_fmt(pair['preserved_fraction'], '.1%')} |")  # fmt: skip
    return [*lines, ""]


def _plot_task(root: Path, name: str, metric: str, rows: list[dict[str, Any]], teacher: float | None,
               trivial: dict[str, Any] | None = None) -> str | None:  # fmt: skip
    """Per-seed points, the mean and its 95% t-interval for every row; the teacher and the trivial predictor as
    lines. A sweep point's settings go one per line under its row, so a two-key sweep stays readable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from scipy import stats
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(rows) + 1.5), 3.6))
    for x, row in enumerate(rows):
        values = list(row["per_seed"].values())
        ax.scatter([x] * len(values), values, s=14, color="0.55", zorder=2)
        if row["mean"] is not None:
            half = None
            if row["std"] is not None and row["n"] >= 2:
                half = stats.t.ppf(0.975, row["n"] - 1) * row["std"] / math.sqrt(row["n"])
            ax.errorbar([x], [row["mean"]], yerr=None if half is None else [[half], [half]], fmt="o", color="C0",
                        capsize=4, zorder=3)  # fmt: skip
    if teacher is not None:
        ax.axhline(teacher, color="C3", linestyle="--", linewidth=1, label="teacher")
    shown = [v for row in rows for v in row["per_seed"].values() if v is not None] + ([teacher] if teacher is not None else [])
    lo, hi = (min(shown), max(shown)) if shown else (0.0, 0.0)
    # a floor far under every point (STS-B's constant predictor at 0 under Spearman 0.8) would squash
    # the rows into one line: keep the axis on the points and name the floor in the legend instead
    far = trivial is not None and shown and trivial["value"] < lo - 2 * max(hi - lo, 1e-3)
    if trivial is not None:
        label = f"trivial ({trivial['value']:.3f}, below the axis)" if far else "trivial"
        ax.axhline(trivial["value"], color="0.4", linestyle=":", linewidth=1, label=label)
    if far:
        pad = 0.15 * max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    if teacher is not None or trivial is not None:
        ax.legend(loc="best", fontsize=8)
    labels = [f"{r['loss']}\n{r['student'].split(':')[0]}" + ("".join(f"\n{p}" for p in r["point"].split(",")) if r["point"] else "")
              for r in rows]  # fmt: skip
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{name}: per-seed {metric}, mean and 95% t-interval", fontsize=9)
    return _save_figure(fig, root, name)


def _save_figure(fig: Any, root: Path, name: str) -> str:
    """`STUDY/plots/NAME.png`; returns its path relative to the study, as report.md links it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    (root / "plots").mkdir(exist_ok=True)
    fig.savefig(root / "plots" / f"{name}.png", dpi=120)
    plt.close(fig)
    return f"plots/{name}.png"
