"""Trustworthy runs (issue #10): no code execution from checkpoints, verified checkpoints with
fallback, graceful stops (real subprocesses), the output directory belongs to one run, full disks,
resume checks, plain output without a terminal. Each test fails on the code before the issue."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toyglue import options
from typer.testing import CliRunner

from geokd import GeokdError
from geokd.artifacts import DirectoryLock
from geokd.checkpoints import pack, unpack, verify_checkpoint
from geokd.cli import app
from geokd.config import resolve_config
from geokd.engine import train

runner = CliRunner()


def _config(teacher_dir, glue_dir, out, **extra):
    flags = dict(teacher=str(teacher_dir / "final"), student="truncate:2", task="sst2", data=str(glue_dir),
                 out=str(out), loss="procrustes", max_steps=8, batch_size=16, lr=2e-3, seed=3, save_every=4,
                 save_minutes=0)  # fmt: skip
    flags.update(extra)
    return resolve_config("distill", flags=flags)


def _args(teacher_dir, glue_dir, out, **extra):
    base = dict(teacher=teacher_dir / "final", student="truncate:2", task="sst2", data=glue_dir, out=out,
                loss="procrustes", max_steps=8, batch_size=16, lr=2e-3, seed=3, save_every=4,
                save_minutes=0)  # fmt: skip
    base.update(extra)
    return ["distill", "--quiet", *options(**{k: v for k, v in base.items() if v is not None})]


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _final_error_line(result) -> str:
    """An error during training: the summary came first, then exactly one error line, last."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.output
    assert "Traceback" not in result.output
    return lines[-1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def straight(teacher_dir, glue_dir, tmp_path_factory) -> Path:
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8: the reference."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(_config(teacher_dir, glue_dir, out))
    return out


# ---------------------------------------------------------------------------------------------
# 1. No pickle
# ---------------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_trainer_state_is_safetensors_and_json_with_exact_round_trip(straight):
    step = straight / "checkpoints" / "step-4"
    names = {p.name for p in step.iterdir()}
    assert {"student", "trainer_state.safetensors", "trainer_state.json", "checkpoint.json"} <= names
    assert "trainer_state.pt" not in names
    import numpy as np

    state = {"a": (1, 2.5, None), 3: [torch.arange(4), np.arange(3, dtype=np.uint32)], "s": "x"}
    tree, tensors = pack(state)
    back = unpack(json.loads(json.dumps(tree)), tensors)
    assert back["a"] == (1, 2.5, None) and back["s"] == "x"
    assert torch.equal(back[3][0], torch.arange(4)) and back[3][1].dtype == np.uint32


def test_a_planted_pickle_never_runs(straight, teacher_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    marker = tmp_path / "marker"
    for step in ("step-4", "step-8"):
        folder = run / "checkpoints" / step
        for name in ("checkpoint.json", "trainer_state.safetensors", "trainer_state.json"):
            (folder / name).unlink(missing_ok=True)
        torch.save({"rng": _Exploit(marker)}, folder / "trainer_state.pt")  # torch.load would run it
    for resume in ("auto", str(run / "checkpoints" / "step-8")):
        result = runner.invoke(app, [*_args(teacher_dir, glue_dir, run), "--resume", resume])
        assert not marker.exists(), "the pickle in the checkpoint was executed"
        line = _one_error_line(result)
        assert "trainer_state.pt" in line and "never unpickles" in line


# ---------------------------------------------------------------------------------------------
# 2. trust_remote_code only from the command line
# ---------------------------------------------------------------------------------------------


def test_trust_remote_code_is_never_taken_from_a_recipe_or_set(teacher_dir, glue_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trust_remote_code: true\nalpha: 0.7\n")
    for extra in (["--config", str(recipe)], ["--set", "trust_remote_code=true"]):
        result = runner.invoke(app, [*_args(teacher_dir, glue_dir, tmp_path / "r"), *extra])
        assert "--trust-remote-code" in _one_error_line(result)
        assert not (tmp_path / "r").exists()
    config = resolve_config("distill", file=recipe, flags={"trust_remote_code": True})
    assert config.trust_remote_code is True and config.alpha == 0.7
    assert resolve_config("distill", overrides=["trust_remote_code=false"]).trust_remote_code is False
    for command in ("finetune", "distill", "cache", "eval", "export", "demo"):
        help_text = runner.invoke(app, [command, "--help"]).output
        assert "--trust-remote-code" in help_text, command


# ---------------------------------------------------------------------------------------------
# 3. Verified checkpoints, fallback to the newest intact one
# ---------------------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        middle = len(data) - 17  # a byte of tensor data, far from the header
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :])
    elif how == "header":
        path.write_bytes(b"\xff" * 8 + data[8:])


@pytest.mark.parametrize(
    "file, how",
    [
        ("student/model.safetensors", "flipped"),
        ("student/model.safetensors", "truncated"),
        ("trainer_state.safetensors", "empty"),
        ("trainer_state.safetensors", "header"),
        ("trainer_state.json", "truncated"),
    ],
)
def test_damaged_checkpoint_is_named_and_auto_falls_back(straight, teacher_dir, glue_dir, tmp_path, file, how):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "final")
    (run / "results.json").unlink()
    damaged = run / "checkpoints" / "step-8" / file
    _damage(damaged, how)
    with pytest.raises(GeokdError, match="damaged"):
        verify_checkpoint(run / "checkpoints" / "step-8")
    result = runner.invoke(app, [*_args(teacher_dir, glue_dir, run), "--resume", str(damaged.parents[0 if "/" not in file else 1])])
    assert str(damaged) in _one_error_line(result)
    result = runner.invoke(app, [*_args(teacher_dir, glue_dir, run), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert "skipped damaged checkpoint(s) step-8" in result.output and "resuming from" in result.output
    _assert_same_weights(run / "final", straight / "final")  # resumed at step 4: the same run


def test_no_intact_checkpoint_is_an_error_not_a_silent_restart(straight, teacher_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for step in ("step-4", "step-8"):
        _damage(run / "checkpoints" / step / "trainer_state.safetensors", "truncated")
    before = (run / "metrics.jsonl").read_text()
    line = _one_error_line(runner.invoke(app, [*_args(teacher_dir, glue_dir, run), "--resume", "auto"]))
    assert "no intact checkpoint" in line and "step-4" in line and "step-8" in line
    assert (run / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------------
# 4, 5. --keep-checkpoints; a run always has something to resume from
# ---------------------------------------------------------------------------------------------


def test_keep_checkpoints_removes_older_ones_only_after_a_newer_one_is_complete(
    teacher_dir, glue_dir, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    train(_config(teacher_dir, glue_dir, run, save_every=2, keep_checkpoints=2))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-6", "step-8"]

    import geokd.checkpoints as ckpt

    real = ckpt.write_state

    def fail_at_six(folder, state):
        if state["position"]["step"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(folder, state)

    monkeypatch.setattr(ckpt, "write_state", fail_at_six)
    with pytest.raises(GeokdError, match="no space left"):
        train(_config(teacher_dir, glue_dir, tmp_path / "full", save_every=2, keep_checkpoints=1))
    kept = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert kept == ["step-4"], kept  # step-4 stays: step-6 never completed
    verify_checkpoint(tmp_path / "full" / "checkpoints" / "step-4")


def test_wall_clock_checkpoints_by_default(teacher_dir, glue_dir, tmp_path):
    assert resolve_config("distill").save_minutes == 10.0 and resolve_config("distill").save_every is None
    run = tmp_path / "run"
    train(_config(teacher_dir, glue_dir, run, save_every=None, save_minutes=1e-9, max_steps=3))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]


def test_resume_auto_without_a_checkpoint_says_so(teacher_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, [*_args(teacher_dir, glue_dir, run, save_every=None, max_steps=2), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert "no checkpoint in" in result.output and "starting from step 0" in result.output


# ---------------------------------------------------------------------------------------------
# 6. SIGTERM / SIGINT / SIGKILL on a real subprocess
# ---------------------------------------------------------------------------------------------


def _spawn(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "geokd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_sigint_default,
    )


def _sigint_default() -> None:
    """Give the child a terminal's SIGINT: a shell's background job (`cmd &`) inherits it ignored,
    and geokd keeps an ignored signal ignored (test_an_ignored_signal_stays_ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_handled():
    """The test process handles SIGINT as under a terminal (KeyboardInterrupt), even when the suite
    was started as a background job with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_for_steps(run: Path, proc: subprocess.Popen, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the run did not reach the step in time")


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_checkpoints_and_says_how_to_resume(teacher_dir, glue_dir, tmp_path, sig, code):
    run = tmp_path / "run"
    long_run = _args(teacher_dir, glue_dir, run, max_steps=100_000, save_every=None)
    proc = _spawn(long_run)
    try:
        _wait_for_steps(run, proc, 3)
        # While it runs, the directory belongs to it: a second writer fails naming its PID.
        second = subprocess.run(  # a timeout, not a hang, if the lock ever stops working
            [sys.executable, "-m", "geokd", *long_run, "--resume", "auto"], capture_output=True, text=True, timeout=120
        )
        lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, lines
        assert f"PID {proc.pid}" in lines[0] and "in use" in lines[0]
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == code, (stdout, stderr)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("stopped: ") and "--resume auto" in lines[0], stderr
        last = _steps(run)[-1]["step"]
        checkpoint = run / "checkpoints" / f"step-{last}"
        assert str(checkpoint) in lines[0]
        verify_checkpoint(checkpoint)
    finally:  # a failed assertion or timeout must not leave a 100,000-step run behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The checkpoint is the state of an uninterrupted run at that step.
    reference = tmp_path / "reference"
    with pytest.raises(_Stop):
        train(_config(teacher_dir, glue_dir, reference, max_steps=100_000, save_every=last), progress=_stop_at(last))
    _assert_same_weights(checkpoint / "student", reference / "checkpoints" / f"step-{last}" / "student")


class _Stop(Exception):
    pass


def _stop_at(step: int):
    def progress(record: dict) -> None:
        if record["step"] >= step:
            raise _Stop

    return progress


def test_sigkill_then_resume_auto_reaches_the_uninterrupted_weights(teacher_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    args = _args(teacher_dir, glue_dir, run, max_steps=120, save_every=10)
    proc = _spawn(args)
    _wait_for_steps(run, proc, 25)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists()
    resumed = runner.invoke(app, [*args, "--resume", "auto"])
    assert resumed.exit_code == 0, resumed.output
    reference = tmp_path / "reference"
    train(_config(teacher_dir, glue_dir, reference, max_steps=120, save_every=10))
    _assert_same_weights(run / "final", reference / "final")
    assert [r["loss"] for r in _steps(run)] == [r["loss"] for r in _steps(reference)]


# ---------------------------------------------------------------------------------------------
# 7, 15. Resume checks: the checkpoint's own config; paths and teacher weights, not text
# ---------------------------------------------------------------------------------------------


def test_resume_without_config_yaml_still_refuses_other_options(straight, teacher_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "config.yaml").unlink()
    for flag, value, name in (("--lr", "0.1", "lr"), ("--seed", "9", "seed"), ("--batch-size", "8", "batch_size")):
        result = runner.invoke(app, [*_args(teacher_dir, glue_dir, run), flag, value, "--resume", "auto"])
        line = _one_error_line(result)
        assert "different config" in line and name in line


def test_resume_compares_resolved_paths_and_teacher_weights(teacher_dir, glue_dir, tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir / "final", teacher)
    run = tmp_path / "run"
    with pytest.raises(_Stop):
        train(_config(teacher_dir, glue_dir, run, teacher=str(teacher.resolve()), save_every=2), progress=_stop_at(3))
    monkeypatch.chdir(tmp_path)
    relative = _args(teacher_dir, glue_dir, run, save_every=2)
    relative[relative.index("--teacher") + 1] = "teacher"
    relative[relative.index("--data") + 1] = os.path.relpath(glue_dir, tmp_path)
    result = runner.invoke(app, [*relative, "--resume", "auto"])
    assert result.exit_code == 0, result.output
    # The same path with other weights in it is another teacher.
    shutil.rmtree(run / "final")
    (run / "results.json").unlink()
    weights = load_file(str(teacher / "model.safetensors"))
    weights = {k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}
    from safetensors.torch import save_file

    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    line = _one_error_line(runner.invoke(app, [*relative, "--resume", "auto"]))
    assert "teacher's weights differ" in line


# ---------------------------------------------------------------------------------------------
# 8, 9, 16. The output directory belongs to one run
# ---------------------------------------------------------------------------------------------


def test_resume_auto_refuses_a_directory_that_is_not_a_run(teacher_dir, glue_dir, tmp_path):
    folder = tmp_path / "mine"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "notes.txt").write_text("keep me")
    (folder / "data.csv").write_text("a,b\n")
    line = _one_error_line(runner.invoke(app, [*_args(teacher_dir, glue_dir, folder), "--resume", "auto"]))
    assert "not a geokd run" in line
    assert (folder / "final" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv", "final"]


def test_a_held_lock_refuses_a_second_writer_naming_the_pid(teacher_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with DirectoryLock(run, "test"):
        line = _one_error_line(runner.invoke(app, _args(teacher_dir, glue_dir, run)))
        assert f"PID {os.getpid()}" in line
    assert runner.invoke(app, _args(teacher_dir, glue_dir, run, max_steps=1)).exit_code == 0


def test_a_cache_being_written_cannot_be_written_by_a_second_process(teacher_dir, glue_dir, tmp_path):
    out = tmp_path / "cache"
    args = ["cache", "--quiet", *options(teacher=teacher_dir / "final", task="sst2", data=glue_dir, layers="2,4",
                                         out=out)]  # fmt: skip
    out.mkdir()
    with DirectoryLock(out, "test"):
        line = _one_error_line(runner.invoke(app, args))
        assert f"PID {os.getpid()}" in line and "in use" in line
    assert not (out / "manifest.json").exists()
    assert runner.invoke(app, args).exit_code == 0
    # once it is written, a second cache with other settings is refused, not mixed in
    other = runner.invoke(app, [*args, "--layers", "1,3"])
    assert "another" in _one_error_line(other)
    bad = tmp_path / "new-cache"
    _one_error_line(runner.invoke(app, [*args[:-2], "--out", str(bad), "--layers", "99"]))
    assert not bad.exists()  # bad input creates nothing


@pytest.mark.parametrize("bad", [["--layers", "9:9"], ["--teacher", "/no/such/teacher"], ["--max-length", "1000"]])
def test_bad_input_creates_no_run_directory(teacher_dir, glue_dir, tmp_path, bad):
    out = tmp_path / "deep" / "run"
    _one_error_line(runner.invoke(app, [*_args(teacher_dir, glue_dir, out), *bad]))
    assert not (tmp_path / "deep").exists()
    _one_error_line(runner.invoke(app, [*_args(teacher_dir, glue_dir, out), "--seeds", "1,2", *bad]))
    assert not (tmp_path / "deep").exists()


# ---------------------------------------------------------------------------------------------
# 13. Full disk during a checkpoint or the final save
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_full_disk_is_one_line_and_leaves_no_temporaries(teacher_dir, glue_dir, tmp_path, monkeypatch, where):
    import geokd.checkpoints as ckpt
    import geokd.engine as engine

    real_state, real_json = ckpt.write_state, engine.write_json

    def state_full(folder, state):
        if state["position"]["step"] == 8:
            (folder / "trainer_state.safetensors").write_bytes(b"half")
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        real_state(folder, state)

    def json_full(path, obj):
        if Path(path).name == "geokd.json":
            Path(path).write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_json(path, obj)

    if where == "checkpoint":
        monkeypatch.setattr(ckpt, "write_state", state_full)
    else:
        monkeypatch.setattr(engine, "write_json", json_full)
    run = tmp_path / "run"
    line = _final_error_line(runner.invoke(app, _args(teacher_dir, glue_dir, run)))
    assert "no space left" in line and "free" in line and str(run) in line
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    verify_checkpoint(run / "checkpoints" / "step-4")
    assert not (run / "final").exists()
    monkeypatch.undo()
    # A stale temporary (what a full disk or a kill mid-save leaves) does not block the resume.
    (run / "checkpoints" / ".step-8.tmp" / "student").mkdir(parents=True)
    result = runner.invoke(app, [*_args(teacher_dir, glue_dir, run), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert not (run / "checkpoints" / ".step-8.tmp").exists()
    assert (run / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 17, 19, 20. Output without a terminal, finetune's summary, file permissions
# ---------------------------------------------------------------------------------------------


def test_output_without_a_terminal_is_not_wrapped_or_cut(teacher_dir, glue_dir, tmp_path):
    long_dir = tmp_path / ("a-rather-long-directory-name-" * 3)
    shutil.copytree(teacher_dir / "final", long_dir)
    result = runner.invoke(app, _args(teacher_dir, glue_dir, tmp_path / "run", teacher=long_dir, max_steps=1))
    assert result.exit_code == 0, result.output
    assert any(str(long_dir) in line for line in result.output.splitlines())  # one line, not wrapped
    assert "procrustes" in result.output and "procrus…" not in result.output
    assert "…" not in result.output


def test_log_format_json_is_one_object_per_line(teacher_dir, glue_dir, tmp_path):
    result = runner.invoke(app, [*_args(teacher_dir, glue_dir, tmp_path / "run", max_steps=3), "--log-format", "json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["start", "step", "step", "step", "finished"]
    assert events[1]["step"] == 1 and "loss" in events[1] and "feature/procrustes/1->2" in events[1]
    assert events[-1]["metrics"]["accuracy"] >= 0


def test_finetune_summary_shows_only_finetune_keys(base_dir, glue_dir, tmp_path):
    result = runner.invoke(
        app, ["finetune", *options(model=base_dir, task="sst2", data=glue_dir, out=tmp_path / "run", max_steps=1)]
    )
    assert result.exit_code == 0, result.output
    summary = result.output.split("device ")[0]
    for key in ("temperature", "alpha", "gamma", "features", "layers", "loss ", "student", "teacher"):
        assert key not in summary, key
    assert "model" in summary and "lr" in summary


def test_final_and_checkpoint_files_follow_the_umask(teacher_dir, glue_dir, tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        train(_config(teacher_dir, glue_dir, run, max_steps=2, save_every=2))
    finally:
        os.umask(old)
    for path in [*(run / "final").iterdir(), *(run / "checkpoints" / "step-2").rglob("*")]:
        expected = 0o755 if path.is_dir() else 0o644
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))


# ---------------------------------------------------------------------------------------------
# Review findings: planted lock symlinks, lost lock races, look-alike run folders, fallback with
# --keep-checkpoints, stops inside --finetune-teacher / --seeds / the final evaluation, crafted state
# ---------------------------------------------------------------------------------------------


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious user data")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".geokd.lock").symlink_to(victim)
    with pytest.raises(GeokdError, match="lock file"):
        with DirectoryLock(run, "--out"):
            pass
    assert victim.read_text() == "precious user data"


def test_losing_the_lock_never_removes_the_winners_directory(teacher_dir, glue_dir, tmp_path, monkeypatch):
    import geokd.engine as engine

    out = tmp_path / "run"

    class Lost(DirectoryLock):  # the winner created the folder a moment ago and holds its lock
        def __enter__(self):
            raise GeokdError(f"--out: {str(out)!r} is in use by another geokd process (PID 1)")

    monkeypatch.setattr(engine, "DirectoryLock", Lost)
    with pytest.raises(GeokdError, match="in use"):
        train(_config(teacher_dir, glue_dir, out))
    assert out.is_dir()


def test_resume_auto_refuses_another_tools_checkpoints_folder(teacher_dir, glue_dir, tmp_path):
    folder = tmp_path / "project"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "epoch=3.ckpt").write_bytes(b"lightning")
    (folder / "final").mkdir()
    (folder / "final" / "report.pdf").write_bytes(b"%PDF")
    line = _one_error_line(runner.invoke(app, [*_args(teacher_dir, glue_dir, folder), "--resume", "auto"]))
    assert "not a geokd run" in line
    assert (folder / "final" / "report.pdf").read_bytes() == b"%PDF"
    seeds = tmp_path / "seeds"
    (seeds / "seed-notes").mkdir(parents=True)
    (seeds / "teacher").mkdir()
    line = _one_error_line(runner.invoke(app, [*_args(teacher_dir, glue_dir, seeds, seed=None), "--seeds", "1", "--resume", "auto"]))
    assert "not a geokd run" in line


def test_fallback_with_keep_checkpoints_keeps_the_new_intact_checkpoint(teacher_dir, glue_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(_Stop):  # checkpoints at 4 and 8, stopped before the final save
        train(_config(teacher_dir, glue_dir, run, max_steps=12), progress=_stop_at(8))
    _damage(run / "checkpoints" / "step-8" / "trainer_state.safetensors", "truncated")
    warnings: list[str] = []
    with pytest.raises(_Stop):  # resumes at 4, checkpoints at 6, stops at 7
        train(_config(teacher_dir, glue_dir, run, max_steps=12, save_every=2, keep_checkpoints=1, resume="auto"),
              progress=_stop_at(7), on_warning=warnings.append)  # fmt: skip
    assert any("skipped damaged checkpoint(s) step-8" in w for w in warnings)
    assert any("skipped-step-8" in w for w in warnings)
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-6"]
    verify_checkpoint(run / "checkpoints" / "step-6")
    assert (run / "checkpoints" / "skipped-step-8").is_dir()  # moved aside, not deleted


def _signal_self_at(step: int, sig: int = signal.SIGTERM):
    def progress(record: dict) -> None:
        if record["step"] == step:
            os.kill(os.getpid(), sig)

    return progress


def test_a_stop_in_the_teacher_phase_resumes_the_whole_command(base_dir, glue_dir, tmp_path):
    from geokd.engine import RunInterrupted

    out = tmp_path / "run"
    config = resolve_config("distill", flags=dict(teacher=str(base_dir), student="truncate:2", task="sst2",
                            data=str(glue_dir), out=str(out), max_steps=4, batch_size=16, lr=3e-3,
                            finetune_teacher=True, save_minutes=0))  # fmt: skip
    with pytest.raises(RunInterrupted) as info:
        train(config, progress=_signal_self_at(2))
    assert info.value.run_dir == out and info.value.exit_code == 143
    assert "--out " + str(out) in str(info.value) and (out / "teacher" / "checkpoints" / "step-2").is_dir()
    result = train(dataclasses.replace(config, resume="auto"))
    assert result.steps == 4 and (out / "teacher" / "final").is_dir() and (out / "final").is_dir()


def test_a_stop_inside_seeds_names_the_root(teacher_dir, glue_dir, tmp_path, sigint_handled):
    from geokd.engine import RunInterrupted, train_seeds

    out = tmp_path / "seeds"
    config = _config(teacher_dir, glue_dir, out, max_steps=4)
    with pytest.raises(RunInterrupted) as info:
        train_seeds(config, [1, 2], progress=_signal_self_at(2, signal.SIGINT))
    assert info.value.run_dir == out and info.value.exit_code == 130
    results = train_seeds(dataclasses.replace(config, resume="auto"), [1, 2])
    assert [r.steps for r in results] == [4, 4]


def test_a_signal_during_the_final_evaluation_is_not_lost(teacher_dir, glue_dir, tmp_path, monkeypatch):
    import geokd.engine as engine
    from geokd.engine import RunInterrupted

    real = engine.evaluate

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", signalled)
    run = tmp_path / "run"
    with pytest.raises(RunInterrupted) as info:
        train(_config(teacher_dir, glue_dir, run, max_steps=6, save_every=4))
    assert info.value.step == 6 and info.value.checkpoint == run / "checkpoints" / "step-6"
    assert not (run / "final").exists()


def test_an_ignored_signal_stays_ignored():
    from geokd.engine import _StopSignals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received is None
    finally:
        signal.signal(signal.SIGINT, previous)


def _rehash(checkpoint: Path) -> None:
    """Re-write checkpoint.json for edited files: what a crafted checkpoint would do."""
    from geokd.checkpoints import write_manifest

    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    record = {k: v for k, v in manifest.items() if k not in ("format", "step", "files")}
    (checkpoint / "checkpoint.json").unlink()
    write_manifest(checkpoint, manifest["step"], record)


@pytest.mark.parametrize("edit", ["rng", "position", "files"])
def test_a_crafted_but_hash_consistent_checkpoint_is_one_line(straight, teacher_dir, glue_dir, tmp_path, edit):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    checkpoint = run / "checkpoints" / "step-8"
    state_path = checkpoint / "trainer_state.json"
    state = json.loads(state_path.read_text())
    if edit == "rng":
        state["rng"]["python"] = [1, 2]
    elif edit == "position":
        state["position"] = {"step": "x"}
    state_path.write_text(json.dumps(state))
    _rehash(checkpoint)
    if edit == "files":
        manifest = json.loads((checkpoint / "checkpoint.json").read_text())
        manifest["files"]["../../../../etc/hostname"] = {"sha256": "0", "bytes": 1}
        (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))
    line = _one_error_line(runner.invoke(app, [*_args(teacher_dir, glue_dir, run), "--resume", str(checkpoint)]))
    assert str(checkpoint) in line


def test_json_log_lines_are_strict_json():
    import contextlib
    import io

    from geokd.cli import _json_line

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        _json_line("finished", metrics={"pearson": float("nan"), "spearman": 0.5}, values=[float("inf")])
    record = json.loads(buffer.getvalue(), parse_constant=lambda name: pytest.fail(f"non-standard {name}"))
    assert record["metrics"] == {"pearson": None, "spearman": 0.5} and record["values"] == [None]
