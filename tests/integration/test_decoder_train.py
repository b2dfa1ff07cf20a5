"""Decoders through `geokd finetune` and `geokd distill` (issue #11): tiny causal LMs on a toy
instruction task in the MiniLLM format. Run directory and reload with plain transformers, every
KD kind and feature-row kind, response-only masking, token-weighted accumulation, the tokenizer
check, and bit-identical resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinylm import save_causal_lm, write_instruct_data
from toyglue import options
from typer.testing import CliRunner

from geokd.cli import app
from geokd.config import resolve_config
from geokd.engine import train

runner = CliRunner()


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory) -> Path:
    return write_instruct_data(tmp_path_factory.mktemp("instruct") / "toy")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_causal_lm(tmp_path_factory.mktemp("llama") / "teacher", "llama")


def _config(teacher, data, out, **extra):
    flags = dict(teacher=str(teacher), student="truncate:2", task="instruct", data=str(data), out=str(out),
                 loss="procrustes", max_steps=6, batch_size=8, lr=3e-3, seed=5, save_every=3, save_minutes=0,
                 max_length=64, max_prompt_length=48)  # fmt: skip
    flags.update(extra)
    return resolve_config("distill", flags=flags)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_instruct_defaults_and_validation():
    config = resolve_config("distill", flags={"task": "instruct"})
    assert (config.features, config.max_length, config.temperature) == ("tokens", 512, 1.0)
    assert resolve_config("distill", flags={"task": "sst2"}).features == "cls"
    from geokd import GeokdError

    with pytest.raises(GeokdError, match="no \\[CLS\\] row"):
        resolve_config("distill", flags={"task": "instruct", "features": "cls", "student": "s", "teacher": "t"}).validate()
    with pytest.raises(GeokdError, match="kd: must be one of"):
        resolve_config("distill", flags={"task": "instruct", "kd": "kl", "student": "s", "teacher": "t"}).validate()


def test_finetune_a_causal_lm_on_instructions(llama_dir, instruct_dir, tmp_path):
    out = tmp_path / "sft"
    result = runner.invoke(app, ["finetune", "--quiet", *options(model=llama_dir, task="instruct", data=instruct_dir,
                                 out=out, max_steps=12, batch_size=8, lr=5e-3, max_length=64, max_prompt_length=48,
                                 eval_generate=4, max_new_tokens=8)])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert {"sft", "loss"} <= set(records[0]) and "kd" not in records[0]
    assert records[-1]["sft"] < records[0]["sft"]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "instruct" and results["split"] == "dev"
    metrics = results["metrics"]
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert 0.0 <= metrics["rouge_l"] <= 100.0 and metrics["generated"] == 4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("kd", ["forward", "reverse", "jsd", "skew-forward", "skew-reverse", "tvd"])
def test_every_kd_kind_distils(llama_dir, instruct_dir, tmp_path, kd):
    out = tmp_path / kd
    train(_config(llama_dir, instruct_dir, out, kd=kd, loss="none", max_steps=3, save_every=None))
    records = _records(out)
    assert {"sft", "kd", "loss"} <= set(records[0])
    assert all(r["kd"] >= 0 for r in records)
    from geokd.losses.token_objective import TokenObjective

    assert TokenObjective("none", [], 32, 32, kd=kd).term_names() == ["sft", "kd"]
    assert TokenObjective("gram", [(1, 2)], 32, 32, alpha=1.0).term_names() == ["sft", "feature/gram/1->2"]


@pytest.mark.parametrize("features", ["tokens", "mean", "last"])
def test_feature_rows_of_each_kind(llama_dir, instruct_dir, tmp_path, features):
    out = tmp_path / features
    train(_config(llama_dir, instruct_dir, out, features=features, max_steps=2, save_every=None))
    record = _records(out)[0]
    assert [k for k in record if k.startswith("feature/")] == ["feature/procrustes/1->2", "feature/procrustes/2->4"]


def test_prompt_and_padding_never_enter_a_loss(llama_dir, instruct_dir, monkeypatch):
    """With the models' hidden states held fixed, changing a prompt token (the target of the
    position before it), a padding token, or the hidden state at a prompt position (other than the
    last one, which predicts the first response token) changes no term."""
    import geokd.workloads.decoder as decoder
    from geokd.runtime import resolve_runtime
    from geokd.workloads import build_workload

    config = _config(llama_dir, instruct_dir, "unused", features="tokens")
    work = build_workload(config, resolve_runtime("cpu"), lambda message: None)
    work.student.model.eval()
    batch = work.collate(work.train_features[:4])
    real = decoder._base_forward
    fixed: dict[int, object] = {}

    def frozen(model, batch, hidden):
        key = id(model)
        if key not in fixed:
            fixed[key] = real(model, batch, True)
        return fixed[key]

    monkeypatch.setattr(decoder, "_base_forward", frozen)
    reference = {k: float(v) for k, v in work.step(batch).terms.items()}
    labels = batch["labels"]
    prompt = (labels == -100) & (batch["attention_mask"] == 1)
    row = 0
    prompt_positions = prompt[row].nonzero().flatten()
    changed = dict(batch)
    changed["input_ids"] = batch["input_ids"].clone()
    changed["input_ids"][row, prompt_positions[1]] = 7  # a prompt token: the target of position 0
    padded = (batch["attention_mask"] == 0).nonzero()
    if len(padded):
        changed["input_ids"][padded[0, 0], padded[0, 1]] = 9
    assert {k: float(v) for k, v in work.step(changed).terms.items()} == reference
    for out in fixed.values():  # a prompt position's hidden state, before the last prompt token
        out.last_hidden_state[row, prompt_positions[0]] += 5.0
        for h in out.hidden_states:
            h[row, prompt_positions[0]] += 5.0
    assert {k: float(v) for k, v in work.step(changed).terms.items()} == reference
    # and a response position's target does count
    changed["labels"] = labels.clone()
    response = (labels[row] != -100).nonzero().flatten()
    changed["labels"][row, response[0]] = (labels[row, response[0]] + 1) % 90
    assert float(work.step(changed).terms["sft"]) != reference["sft"]


def test_micro_batches_weigh_their_response_tokens(llama_dir, instruct_dir, tmp_path):
    """--grad-accum 2 × 4 gives the same step loss, terms and gradient as one batch of 8 (no
    dropout in these configs), because each micro-batch weighs its share of the step's response
    tokens; weighting by examples would not. (Weights after Adam's first step are not compared:
    that step is lr·sign(g), so rounding-level gradient differences flip whole updates.)"""
    big = tmp_path / "big"
    acc = tmp_path / "acc"
    common = dict(loss="none", max_steps=1, save_every=None)
    train(_config(llama_dir, instruct_dir, big, batch_size=8, **common))
    train(_config(llama_dir, instruct_dir, acc, batch_size=4, grad_accum=2, **common))
    one, two = _records(big)[0], _records(acc)[0]
    for key in ("loss", "sft", "kd", "grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key  # (kd: a KL near 0, cancellation)


@pytest.mark.parametrize("loss", ["procrustes", "cka", "flexkd"])
def test_global_geometry_batch_over_response_token_rows(loss, llama_dir, instruct_dir, tmp_path):
    """--geometry-batch global (the default) for token rows: 2 micro-batches of 4 give one batch
    of 8's feature terms, loss and gradient norm; --geometry-batch micro gives other feature terms."""
    common = dict(loss=loss, layers="1:1,2:4", max_steps=1, save_every=None, flexkd_samples=16)
    train(_config(llama_dir, instruct_dir, tmp_path / "big", batch_size=8, **common))
    train(_config(llama_dir, instruct_dir, tmp_path / "acc", batch_size=4, grad_accum=2, **common))
    train(_config(llama_dir, instruct_dir, tmp_path / "micro", batch_size=4, grad_accum=2, geometry_batch="micro",
                  **common))  # fmt: skip
    one, two, micro = (_records(tmp_path / name)[0] for name in ("big", "acc", "micro"))
    features = [key for key in one if key.startswith("feature/")]
    assert len(features) == 2
    for key in ("loss", "sft", "kd", "grad_norm", *features):
        assert two[key] == pytest.approx(one[key], rel=2e-5, abs=1e-7), key  # (kd: a KL near 0, cancellation)
    assert max(abs(micro[key] - one[key]) for key in features) > 1e-4


def test_resume_is_bit_identical_for_a_decoder_run(llama_dir, instruct_dir, tmp_path):
    straight = train(_config(llama_dir, instruct_dir, tmp_path / "a"))

    class Stop(Exception):
        pass

    def stop_at_four(record):
        if record["step"] == 4:
            raise Stop

    with pytest.raises(Stop):
        train(_config(llama_dir, instruct_dir, tmp_path / "b"), progress=stop_at_four)
    resumed = train(_config(llama_dir, instruct_dir, tmp_path / "b", resume="auto"))
    assert resumed.steps == straight.steps == 6
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in _records(tmp_path / "a")] == [r["loss"] for r in _records(tmp_path / "b")]


def test_a_student_with_another_tokenizer_is_refused_before_anything_runs(llama_dir, instruct_dir, tmp_path):
    other = tmp_path / "other"
    save_causal_lm(other, "llama", seed=1)
    vocab = json.loads((other / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {("qq" if w == "w5" else w): i for w, i in vocab["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--quiet", *options(teacher=llama_dir, student=other, task="instruct",
                                 data=instruct_dir, out=out, max_steps=1, max_length=64, max_prompt_length=48)])  # fmt: skip
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "tokenizer" in lines[0] and not out.exists()


def test_eval_instruct_end_to_end_and_compare_on_rouge_l(llama_dir, instruct_dir, tmp_path):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["finetune", "--quiet", "--seeds", "1,2", *options(
        model=llama_dir, task="instruct", data=instruct_dir, out=runs, max_steps=3, batch_size=8, lr=5e-3,
        max_length=64, max_prompt_length=48, eval_generate=3, max_new_tokens=4)])  # fmt: skip
    assert result.exit_code == 0, result.output
    compare = json.loads((runs / "compare.json").read_text())
    assert compare["metric"] == "rouge_l"
    eval_file = instruct_dir / "dev.jsonl"
    out_json = tmp_path / "eval.json"
    evaluated = runner.invoke(app, ["eval", str(runs / "seed-1"), "--data", str(eval_file), "--json", str(out_json),
                                    "--max-new-tokens", "4", "--limit", "5"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads(out_json.read_text())
    assert record["task"] == "instruct" and record["n_examples"] == 5 and record["primary_metric"] == "rouge_l"
    assert record["split"] == "toy-dev-first5"  # the file's folder and stem: two eval files never collide
    assert (runs / "seed-1" / "eval" / "instruct-toy-dev-first5.json").is_file()
    assert 0.0 <= record["metrics"]["rouge_l"] <= 100.0
    assert record["contamination"]["count"] == 0 and record["data"]["fingerprint"].startswith("sha256:")
    assert record["model"]["run_dir"] == str(runs / "seed-1") and record["decoding"]["decoding"] == "greedy"
    generations = [json.loads(line) for line in Path(record["generations"]).read_text().splitlines()]
    assert len(generations) == 5 and {"prediction", "references", "rouge_l"} <= set(generations[0])
    # sampling: the MiniLLM protocol, mean ± std over generation seeds
    sampled = runner.invoke(app, ["eval", str(llama_dir), "--task", "instruct", "--data", str(eval_file),
                                  "--decoding", "sample", "--gen-seeds", "10,20", "--max-new-tokens", "4",
                                  "--limit", "4", "--json", str(tmp_path / "s.json")])  # fmt: skip
    assert sampled.exit_code == 0, sampled.output
    record = json.loads((tmp_path / "s.json").read_text())
    assert len(record["per_seed"]) == 2 and record["contamination"] is None
    bad = runner.invoke(app, ["eval", str(llama_dir), "--task", "instruct", "--data", str(eval_file),
                              "--gen-seeds", "1,2"])  # fmt: skip
    assert bad.exit_code == 2 and "--decoding sample" in bad.output


def test_max_length_beyond_the_models_positions_is_one_line(llama_dir, instruct_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--quiet", *options(teacher=llama_dir, student="truncate:2",
                                 task="instruct", data=instruct_dir, out=out, max_steps=1)])  # fmt: skip
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--max-length: 512 tokens exceeds the 256" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("features", ["tokens", "mean", "last"])
def test_eval_geometry_of_a_decoder_student(llama_dir, instruct_dir, tmp_path, features):
    run = tmp_path / "student"
    train(_config(llama_dir, instruct_dir, run, max_steps=2, save_every=None))
    out_json = tmp_path / "geo.json"
    result = runner.invoke(app, ["eval", str(run), "--data", str(instruct_dir / "dev.jsonl"), "--geometry",
                                 "--teacher", str(llama_dir), "--features", features, "--max-new-tokens", "2",
                                 "--json", str(out_json)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cka_distance" in result.output
    report = json.loads(out_json.read_text())["geometry"]
    assert [(e["student_layer"], e["teacher_layer"]) for e in report["layer_pairs"]] == [(1, 2), (2, 4)]
    assert report["features"] == features and report["n_examples"] == 12
    if features != "tokens":
        assert report["n_rows"] == 12
    entry = report["layer_pairs"][0]
    assert 0.0 < entry["procrustes"] <= 2.0 and entry["cka_distance"] is not None
    # a model against itself: the same rows, so every distance is ~0 and every pair is preserved
    same = runner.invoke(app, ["eval", str(llama_dir), "--task", "instruct", "--data", str(instruct_dir / "dev.jsonl"),
                               "--geometry", "--teacher", str(llama_dir), "--features", features, "--layers", "2:2",
                               "--max-new-tokens", "2", "--max-length", "64", "--max-prompt-length", "48",
                               "--json", str(tmp_path / "same.json")])  # fmt: skip
    assert same.exit_code == 0, same.output
    (pair,) = json.loads((tmp_path / "same.json").read_text())["geometry"]["layer_pairs"]
    assert pair["procrustes"] < 1e-4 and pair["gram"] < 1e-3 and pair["cka_distance"] < 1e-5
    assert pair["preserved_fraction"] in (None, 1.0)
