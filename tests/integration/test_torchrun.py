"""`torchrun --nproc_per_node 2 -m geokd distill` on CPU/gloo (issue #14): the two ranks read
their shards of every global batch, gather the feature rows for the batch-geometry losses and
average their gradients, so the run equals one process reading the same global batches: per-step
losses and final weights, for logit KD and every feature loss. Only rank 0 writes.

Marked `distributed`: each case starts two processes (about 10 s on 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toyglue import options

from geokd.config import resolve_config
from geokd.engine import train
from geokd.losses.registry import row_loss_names

pytestmark = pytest.mark.distributed


def _flags(teacher: Path, glue_dir: Path, out: Path, **extra) -> dict:
    flags = dict(teacher=str(teacher), student="truncate:2", task="sst2", data=str(glue_dir), out=str(out),
                 layers="1:2,2:4", features="tokens", max_steps=3, batch_size=16, lr=2e-3, seed=5,
                 flexkd_samples=64)  # fmt: skip
    return {**flags, **extra}


def _cli_flags(flags: dict) -> list[str]:
    """options() with booleans as switches (--shard-teacher / --no-shard-teacher)."""
    switches = [f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in flags.items() if isinstance(v, bool)]
    return [*options(**{k: v for k, v in flags.items() if not isinstance(v, bool)}), *switches]


def torchrun(flags: dict, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GEOKD_DIST_TIMEOUT": "120"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "geokd", "distill", "--quiet", *_cli_flags(flags)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def geokd_cli(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m geokd ARGS`, under `torchrun --nproc_per_node NPROC` when NPROC > 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GEOKD_DIST_TIMEOUT": "120"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "-m", "geokd", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _compare(one: Path, two: Path) -> None:
    a_records, b_records = _records(one), _records(two)
    assert [r["step"] for r in a_records] == [r["step"] for r in b_records] == [1, 2, 3]
    for a, b in zip(a_records, b_records, strict=True):
        for name in a:
            if name.startswith(("loss", "task", "kl", "feature/", "grad_norm")):
                assert b[name] == pytest.approx(a[name], rel=2e-5, abs=1e-6), name
    a, b = (load_file(str(run / "final" / "model.safetensors")) for run in (one, two))
    # Attention key biases have a zero true gradient: Adam turns their rounding noise into ±lr.
    compared = [key for key in a if not key.endswith("attention.self.key.bias")]
    for key in compared:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=5e-5, msg=lambda m, key=key: f"{key}: {m}")


# The runs compared with one process, all trained by ONE torchrun launch (a driver calling the
# engine once per configuration): starting two Python processes costs more than a tiny run.
INVARIANCE_CASES = {
    **{f"ddp-{loss}": {"loss": loss} for loss in ["none", *sorted(row_loss_names())]},
    # 2 ranks x --grad-accum 2 x global micro-batches of 8 against one process with batches of 16:
    # the rows are gathered over ranks and micro-batches alike (--geometry-batch global)
    "ddp-accumulation": {"loss": "procrustes", "batch_size": 8, "grad_accum": 2},
    # --strategy fsdp: each student block sharded with FSDP2 (and the teacher's), the rest replicated
    **{f"fsdp-{loss}": {"loss": loss, "strategy": "fsdp", "shard_teacher": True, "save_every": 2}
       for loss in ("procrustes", "proj", "flexkd")},
}  # fmt: skip
# What the one-process run changes: the batch of the accumulation case, the strategy of fsdp.
SINGLE = {"ddp-accumulation": {"batch_size": 16, "grad_accum": 1}}


@pytest.fixture(scope="module")
def two_rank_runs(quiet_teacher, glue_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two-ranks")
    configs = [_flags(quiet_teacher, glue_dir, root / name, **extra) for name, extra in INVARIANCE_CASES.items()]
    (root / "configs.json").write_text(json.dumps(configs))
    driver = root / "driver.py"
    driver.write_text(
        "import json, sys\n"
        "from geokd.config import resolve_config\n"
        "from geokd.engine import train\n"
        "from geokd.distributed import leave\n"
        "for flags in json.load(open(sys.argv[1])):\n"
        "    train(resolve_config('distill', flags=flags))\n"
        "leave(0)\n"  # as every geokd command ends: no gloo teardown abort once the work is done
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GEOKD_DIST_TIMEOUT": "120"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(driver), str(root / "configs.json")], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("case", list(INVARIANCE_CASES))
def test_two_ranks_equal_one_process(case, two_rank_runs, quiet_teacher, glue_dir, tmp_path):
    """Per-step terms and final weights of the 2-rank run against one process reading the same
    global batches: logit KD and every feature loss, with accumulation, and under FSDP."""
    extra = {**INVARIANCE_CASES[case], **SINGLE.get(case, {}), "strategy": "ddp", "shard_teacher": False}
    train(resolve_config("distill", flags=_flags(quiet_teacher, glue_dir, tmp_path / "one", **extra)))
    two = two_rank_runs / case
    _compare(tmp_path / "one", two)
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    if case.startswith("fsdp"):  # checkpoints and final/ hold whole tensors, in the ordinary format
        checkpoint = load_file(str(two / "checkpoints" / "step-2" / "student" / "model.safetensors"))
        final = load_file(str(two / "final" / "model.safetensors"))
        assert checkpoint.keys() == final.keys()
        assert all(final[key].shape == value.shape for key, value in load_file(
            str(tmp_path / "one" / "final" / "model.safetensors")).items())  # fmt: skip


def test_finetune_on_two_ranks_equals_one_process(base_dir, glue_dir, tmp_path):
    """`torchrun ... geokd finetune`: the same loop, the task loss only (dropout off)."""
    model = tmp_path / "base"
    shutil.copytree(base_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    flags = dict(model=str(model), task="sst2", data=str(glue_dir), max_steps=3, batch_size=16, lr=3e-3,
                 seed=0, out=str(tmp_path / "two"))  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GEOKD_DIST_TIMEOUT": "120"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "geokd", "finetune", "--quiet", *_cli_flags(flags)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = {**{k: v for k, v in flags.items() if k != "model"}, "student": str(model), "out": str(tmp_path / "one")}
    train(resolve_config("finetune", flags=one))
    for a, b in zip(_records(tmp_path / "one"), _records(tmp_path / "two"), strict=True):
        for name in ("loss", "task", "grad_norm"):
            assert b[name] == pytest.approx(a[name], rel=2e-5), name


def test_only_rank_zero_writes_and_prints(quiet_teacher, glue_dir, tmp_path):
    out = tmp_path / "run"
    flags = _flags(quiet_teacher, glue_dir, out, loss="gram", save_every=2)
    flags.pop("flexkd_samples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "geokd", "distill", *options(**flags)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert output.count("layer map") == 1, output[-3000:]  # one run summary, from rank 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # one writer: no doubled records
    assert {p.name for p in out.iterdir()} == {"checkpoints", "config.yaml", "env.json", "final",
                                               "metrics.jsonl", "results.json"}  # fmt: skip
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]


def _straight_and_cut(straight: dict, tmp_path: Path) -> Path:
    """Run `straight` on 2 ranks and the same into tmp_path/b with a step-2 checkpoint, then make b
    lose everything after that checkpoint (final/, step-4, results): a run to resume."""
    cut = {**straight, "out": str(tmp_path / "b"), "save_every": 2}
    for flags in (straight, cut):
        done = torchrun(flags)
        assert done.returncode == 0, done.stderr[-3000:]
    return _lose_after_step_two(tmp_path / "b")


def _lose_after_step_two(run: Path) -> Path:
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-4")
    (run / "results.json").unlink()
    return run


def test_resume_of_a_two_rank_run_is_bit_identical(teacher_dir, glue_dir, tmp_path):
    """A 2-rank run that lost everything after its step-2 checkpoint resumes, still with 2 ranks,
    to the uninterrupted run's weights and records, bit for bit (CPU), dropout on: each rank's
    masks come from a stream seeded by (seed, step, rank)."""
    straight = _flags(teacher_dir / "final", glue_dir, tmp_path / "a", loss="procrustes", max_steps=4)
    b = _straight_and_cut(straight, tmp_path)
    cut = {**straight, "out": str(b), "save_every": 2}
    done = torchrun({**cut, "resume": "auto"})
    assert done.returncode == 0, done.stderr[-3000:]
    first = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    again = load_file(str(b / "final" / "model.safetensors"))
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert [r["loss"] for r in _records(tmp_path / "a")] == [r["loss"] for r in _records(b)]


@pytest.mark.parametrize("strategy, loss", [("ddp", "procrustes"), ("fsdp", "procrustes"), ("ddp", "attn-relation")])
def test_a_decoder_on_two_ranks_equals_one_process(strategy, loss, tmp_path):
    """Token rows and token-weighted micro-batches: each rank's terms weigh its share of the global
    batch's response tokens, and the Procrustes rows of both ranks are one batch. With fsdp the
    blocks of student and teacher are sharded; the heads the KD term reads stay whole.
    attn-relation is not gathered: its per-query mean on each rank, weighted by the rank's response
    tokens, is the global mean (issue #15)."""
    from tinylm import save_causal_lm, write_instruct_data

    teacher = save_causal_lm(tmp_path / "llama", "llama", initializer_range=0.3)
    data = write_instruct_data(tmp_path / "toy")
    flags = dict(teacher=str(teacher), student="truncate:2", task="instruct", data=str(data), loss=loss,
                 layers="1:1,2:4", max_steps=3, batch_size=8, lr=3e-3, seed=5, max_length=64,
                 max_prompt_length=48, out=str(tmp_path / "two"), strategy=strategy,
                 shard_teacher=strategy == "fsdp")  # fmt: skip
    done = torchrun(flags)
    assert done.returncode == 0, done.stderr[-3000:]
    train(resolve_config("distill", flags={**flags, "out": str(tmp_path / "one"), "strategy": "ddp",
                                           "shard_teacher": False}))  # fmt: skip
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        for name in ("loss", "sft", "kd", "grad_norm", f"feature/{loss}/1->1", f"feature/{loss}/2->4"):
            assert b[name] == pytest.approx(a[name], rel=2e-5), name


def test_cache_on_two_ranks_equals_one_process(teacher_dir, glue_dir, tmp_path):
    """`geokd cache` under torchrun: the ranks split the shards, rank 0 writes the manifest after a
    barrier; the shards are byte-identical to one process's and the cache verifies."""
    args = ["cache", "--teacher", str(teacher_dir / "final"), "--task", "sst2", "--data", str(glue_dir),
            "--layers", "2,4", "--features", "tokens", "--shard-size", "20", "--dtype", "fp32", "--quiet"]
    for name, nproc in (("two", 2), ("one", 1)):
        done = geokd_cli([*args, "--out", str(tmp_path / name)], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two"))
    assert b["complete"] and len(b["shards"]) == len(a["shards"]) == 7  # 128 examples, 20 a shard
    assert [s["sha256"] for s in b["shards"]] == [s["sha256"] for s in a["shards"]]
    verify = geokd_cli(["cache", "--verify", str(tmp_path / "two")])
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_decoder_cache_on_two_ranks_equals_one_process(tmp_path):
    from tinylm import save_causal_lm, write_instruct_data

    teacher = save_causal_lm(tmp_path / "llama", "llama")
    data = write_instruct_data(tmp_path / "toy")
    args = ["cache", "--teacher", str(teacher), "--task", "instruct", "--data", str(data), "--layers", "1,2",
            "--topk", "8", "--shard-size", "10", "--dtype", "fp32", "--max-length", "64", "--max-prompt-length", "48",
            "--quiet"]
    for name, nproc in (("two", 2), ("one", 1)):
        done = geokd_cli([*args, "--out", str(tmp_path / name)], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two"))
    assert b["complete"] and len(b["shards"]) == len(a["shards"]) == 5  # 48 examples, 10 a shard
    assert [s["sha256"] for s in b["shards"]] == [s["sha256"] for s in a["shards"]]
    assert [s["n_rows"] for s in b["shards"]] == [s["n_rows"] for s in a["shards"]]


def test_generation_eval_on_two_ranks_equals_one_process(tmp_path):
    """`geokd eval --task instruct` under torchrun: the ranks split the prompts and rank 0 scores
    and writes every continuation; greedy and seeded sampling give one process's generations."""
    from tinylm import save_causal_lm, write_instruct_data

    model = save_causal_lm(tmp_path / "llama", "llama")
    data = write_instruct_data(tmp_path / "toy")
    for decoding in ("greedy", "sample"):
        args = ["eval", str(model), "--task", "instruct", "--data", str(data / "dev.jsonl"), "--decoding", decoding,
                "--max-new-tokens", "6", "--batch-size", "4", "--quiet",
                *(["--gen-seeds", "1,2"] if decoding == "sample" else [])]  # fmt: skip
        for name, nproc in (("two", 2), ("one", 1)):
            done = geokd_cli([*args, "--json", str(tmp_path / f"{decoding}-{name}.json")], nproc)
            assert done.returncode == 0, done.stderr[-3000:]
        a, b = (json.loads((tmp_path / f"{decoding}-{name}.json").read_text()) for name in ("one", "two"))
        assert a["n_examples"] == b["n_examples"] == 12
        assert a["metrics"]["rouge_l"] == pytest.approx(b["metrics"]["rouge_l"], abs=1e-9)
        lines = [(tmp_path / f"{decoding}-{name}.generations.jsonl").read_text().splitlines() for name in ("one", "two")]
        assert [json.loads(x)["prediction"] for x in lines[0]] == [json.loads(x)["prediction"] for x in lines[1]]


def test_eval_on_two_ranks_equals_one_process(quiet_teacher, glue_dir, tmp_path):
    """`geokd eval --geometry` under torchrun: each rank forwards every second batch, the logits
    and pooled rows are gathered, rank 0 writes the same report one process writes."""
    run = tmp_path / "run"
    train(resolve_config("distill", flags=_flags(quiet_teacher, glue_dir, run, loss="gram", max_steps=2)))
    args = ["eval", str(run / "final"), "--geometry", "--teacher", str(quiet_teacher), "--batch-size", "8"]
    two = geokd_cli([*args, "--json", str(tmp_path / "two.json"), "--quiet"], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1  # rank 0 only
    one = geokd_cli([*args, "--json", str(tmp_path / "one.json"), "--quiet"])
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert a["n_examples"] == b["n_examples"] == 48
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, abs=1e-12), key
    for pa, pb in zip(a["geometry"]["layer_pairs"], b["geometry"]["layer_pairs"], strict=True):
        for key, value in pa.items():
            if isinstance(value, float):
                assert pb[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("command", ["cache", "export"])
def test_commands_that_do_not_shard_refuse_torchrun(command, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from geokd.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = {"cache": ["cache", "--verify", str(tmp_path / "c")],
            "export": ["export", str(tmp_path), "--out", str(tmp_path / "e")]}  # fmt: skip
    result = CliRunner().invoke(app, args[command])
    assert result.exit_code == 2
    name = {"cache": "cache --verify/--info"}.get(command, command)
    assert f"geokd {name} does not run under torchrun yet (WORLD_SIZE=2)" in result.output
    assert not (tmp_path / "c").exists() and not (tmp_path / "e").exists()


def test_sigterm_stops_both_ranks_after_the_same_step_with_one_checkpoint(quiet_teacher, glue_dir, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    flags = _flags(quiet_teacher, glue_dir, out, loss="gram", max_steps=400, save_minutes=0)
    flags.pop("flexkd_samples")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GEOKD_DIST_TIMEOUT": "120"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "geokd", "distill", "--quiet", *options(**flags)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    steps = [r["step"] for r in _records(out)]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [f"step-{steps[-1]}"], (checkpoints, steps, stderr[-2000:])
    assert 3 <= steps[-1] < 400 and not (out / "final").exists()
    assert "resume" in stderr


def test_an_fsdp_checkpoint_resumes_in_one_process(quiet_teacher, glue_dir, tmp_path):
    """The checkpoint of a 2-rank FSDP run holds whole tensors in the ordinary format: one process
    resumes it (another world size and strategy) and ends where the FSDP run ends."""
    straight = _flags(quiet_teacher, glue_dir, tmp_path / "a", loss="procrustes", strategy="fsdp", max_steps=4)
    b = _straight_and_cut(straight, tmp_path)
    cut = {**straight, "out": str(b), "save_every": 2}
    train(resolve_config("distill", flags={**cut, "resume": "auto"}))  # one process, strategy ignored
    first = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    again = load_file(str(b / "final" / "model.safetensors"))
    for key in first:
        if not key.endswith("attention.self.key.bias"):
            torch.testing.assert_close(again[key], first[key], rtol=1e-3, atol=5e-5)
    # and back: 2 FSDP ranks resume the same checkpoint
    _lose_after_step_two(b)
    done = torchrun({**cut, "resume": "auto"})
    assert done.returncode == 0, done.stderr[-3000:]
    again = load_file(str(b / "final" / "model.safetensors"))
    for key in first:
        if not key.endswith("attention.self.key.bias"):
            torch.testing.assert_close(again[key], first[key], rtol=1e-3, atol=5e-5)


def test_fsdp_option_errors(quiet_teacher, glue_dir, tmp_path):
    from geokd.errors import GeokdError

    with pytest.raises(GeokdError, match="shard_teacher: shards the teacher's blocks with FSDP2; add --strategy fsdp"):
        resolve_config("distill", flags=_flags(quiet_teacher, glue_dir, tmp_path / "x", shard_teacher=True)).validate()
    with pytest.raises(GeokdError, match="strategy: must be ddp .* got 'zero3'"):
        resolve_config("distill", flags=_flags(quiet_teacher, glue_dir, tmp_path / "x", strategy="zero3")).validate()
    done = torchrun(_flags(quiet_teacher, glue_dir, tmp_path / "run", strategy="fsdp", precision="fp16"))
    assert done.returncode != 0
    assert "--strategy fsdp: fp16 loss scaling over sharded gradients is not supported yet" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_failing_rank_stops_the_job_and_rank_zero_says_so_in_one_line(quiet_teacher, glue_dir, tmp_path):
    """Rank 1 fails at its second step (patched in its process only); rank 0, blocked in the next
    collective, stops with one line pointing at rank 1's error instead of a gloo traceback."""
    flags = _flags(quiet_teacher, glue_dir, tmp_path / "run", loss="gram", max_steps=50)
    flags.pop("flexkd_samples")
    script = tmp_path / "fail_on_rank_one.py"
    script.write_text(
        "import os, sys\n"
        "import geokd.engine as engine\n"
        "from geokd.errors import GeokdError\n"
        "real = engine._synced_record\n"
        "def failing(terms, grad_norm, counts, step, run_dir, overflow_ok=False):\n"
        "    if os.environ['RANK'] == '1' and step == 2:\n"
        "        raise GeokdError('simulated failure on rank 1')\n"
        "    return real(terms, grad_norm, counts, step, run_dir, overflow_ok)\n"
        "engine._synced_record = failing\n"
        "from geokd.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GEOKD_DIST_TIMEOUT": "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "distill", "--quiet", *_cli_flags(flags)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: simulated failure on rank 1" in done.stderr
    assert "error: rank 0: another rank of this torchrun job stopped or stopped answering" in done.stderr, \
        done.stderr[-3000:]  # fmt: skip
    assert "[rank0]: Traceback" not in done.stderr
    assert not (tmp_path / "run" / "final").exists()
