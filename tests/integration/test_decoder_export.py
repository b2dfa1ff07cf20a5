"""`geokd export` of a causal LM (issue #11): a folder that AutoModelForCausalLM and
pipeline("text-generation") load without geokd, with the generation config and chat template,
tied embeddings saved once, and a round trip on a probe prompt."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tinylm import CHAT_TEMPLATE, save_causal_lm
from typer.testing import CliRunner

from geokd.cli import app
from geokd.export import export_model, verify_export

runner = CliRunner()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_causal_lm_export_loads_without_geokd(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    source = save_causal_lm(tmp_path / "model", family)
    out = tmp_path / "export"
    info = export_model(str(source), str(out))
    assert info["causal_lm"] is True and info["check"]["max_abs_logit_diff"] == 0.0
    assert {"config.json", "generation_config.json", "model.safetensors", "geokd.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    ids = torch.tensor([[4, 5, 6, 7, 37, 38]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    generator = pipeline("text-generation", model=str(out))
    text = generator("Below is an instruction", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("Below is an instruction")
    assert "AutoModelForCausalLM" in (out / "README.md").read_text()
    assert verify_export(out)["ok"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    if model.config.tie_word_embeddings:  # tied: the embedding matrix is stored once
        assert not any(k.startswith("lm_head") for k in keys), sorted(keys)[:5]


def test_single_file_causal_export_and_check(tmp_path):
    source = save_causal_lm(tmp_path / "model", "qwen3")
    out = tmp_path / "student.safetensors"
    result = runner.invoke(app, ["export", str(source), "--out", str(out), "--format", "safetensors"])
    assert result.exit_code == 0, result.output
    assert verify_export(out)["ok"]
    info = json.loads((tmp_path / "model" / "config.json").read_text())
    assert info["architectures"] == ["Qwen3ForCausalLM"]
    check = runner.invoke(app, ["export", "--check", str(out)])
    assert check.exit_code == 0, check.output


def test_a_changed_export_fails_its_check(tmp_path):
    from safetensors.torch import load_file, save_file

    source = save_causal_lm(tmp_path / "model", "llama")
    out = tmp_path / "export"
    export_model(str(source), str(out))
    weights = load_file(str(out / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    assert not verify_export(out)["ok"]
