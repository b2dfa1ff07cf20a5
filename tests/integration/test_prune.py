"""`--student prune:...` (issue #13): at full size the student is the teacher (same logits) for
BERT and every supported causal-LM family; pruning a constructed teacher to the heads, neurons
and blocks it uses leaves its output unchanged; embedding channels are ranked by activation;
shapes and grouped-query ratios are valid; a pruned run exports and reloads with plain
transformers; bad specs are one line."""

from __future__ import annotations

import json

import pytest
import torch
from tinylm import save_causal_lm
from toyglue import distill_pruned_decoder
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from geokd import GeokdError
from geokd.cli import app
from geokd.models import load_student
from geokd.models.decoder import load_causal_lm
from geokd.models.encoder import load_teacher
from geokd.models.students import parse_student_spec

runner = CliRunner()


def _batches(vocab: int, n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, 9:] = 0  # some padding: calibration counts only real tokens
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _logits(model, batches):
    with torch.no_grad():
        return [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]


def _close(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize(("family", "spec"), [
    *[(f, "prune:hidden=32,heads=4,kv_heads=2,intermediate=64,layers=4") for f in ("llama", "qwen2", "qwen3", "mistral")],
    ("gpt2", "prune:hidden=32,heads=4,intermediate=128,layers=4"),  # n_inner None: 4 x n_embd
    ("opt", "prune:hidden=32,heads=4,intermediate=64,layers=4"),
])  # fmt: skip
def test_full_size_prune_is_the_teacher_for_causal_lms(family, spec, tmp_path):
    teacher = load_causal_lm(str(save_causal_lm(tmp_path / family, family)))
    batches = _batches(teacher.config.vocab_size)
    student = load_student(spec, teacher, calibration=lambda: batches)
    assert student.init == "prune" and student.teacher_blocks == (0, 1, 2, 3)
    _close(_logits(student.model, batches), _logits(teacher.model, batches))


def test_full_size_prune_is_the_teacher_for_bert(teacher_dir):
    teacher = load_teacher(str(teacher_dir / "final"), num_labels=2)
    batches = _batches(teacher.config.vocab_size)
    student = load_student("prune:hidden=32,heads=4,intermediate=64,layers=4", teacher, calibration=lambda: batches)
    _close(_logits(student.model, batches), _logits(teacher.model, batches))


def test_pruning_a_constructed_llama_to_what_it_uses_keeps_its_output(tmp_path):
    """Key/value group 0 writes zeros (both its query heads output 0), only MLP neurons S are ever
    non-zero, and block 3 (1-based) adds nothing to the residual stream: prune to group 1, S and
    the other three blocks and the logits do not change."""
    teacher = load_causal_lm(str(save_causal_lm(tmp_path / "llama", "llama")))
    used = [1, 4, 9, 10, 17, 30, 41, 63]
    with torch.no_grad():
        for index, block in enumerate(teacher.model.model.layers):
            block.self_attn.v_proj.weight[:8].zero_()  # group 0: head width 8
            unused = [i for i in range(64) if i not in used]
            block.mlp.up_proj.weight[unused] = 0.0
            if index == 2:
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
    batches = _batches(teacher.config.vocab_size)
    student = load_student("prune:heads=2,kv_heads=1,intermediate=8,layers=3", teacher, calibration=lambda: batches)
    assert student.teacher_blocks == (0, 1, 3)  # depth=skip found the block that does nothing
    config = student.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 8)
    kept = student.model.model.layers[0]
    torch.testing.assert_close(kept.mlp.up_proj.weight, teacher.model.model.layers[0].mlp.up_proj.weight[used])
    torch.testing.assert_close(kept.self_attn.k_proj.weight, teacher.model.model.layers[0].self_attn.k_proj.weight[8:])
    _close(_logits(student.model, batches), _logits(teacher.model, batches))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_gpt2_and_opt_neurons_and_heads(family, tmp_path):
    """Only neurons S are ever non-zero: pruned to S the logits do not change. Then heads 0 and 2
    write zero values and channels 0..15 carry the activation: a prune to hidden=16, heads=2 keeps
    heads 1 and 3 in each of q, k and v (GPT-2's fused projection: one slice per third)."""
    teacher = load_causal_lm(str(save_causal_lm(tmp_path / family, family)))
    gpt2 = family == "gpt2"
    blocks = teacher.model.transformer.h if gpt2 else teacher.model.model.decoder.layers
    width = 128 if gpt2 else 64
    used = [2, 5, 7, 11, 30, 33, 50, 60]
    unused = [i for i in range(width) if i not in used]
    with torch.no_grad():
        for block in blocks:
            if gpt2:  # Conv1D weights are [in, out]
                block.mlp.c_fc.weight[:, unused] = 0.0
                block.mlp.c_fc.bias[unused] = -30.0  # GELU(-30) is 0 in float32
            else:
                block.fc1.weight[unused] = 0.0
                block.fc1.bias[unused] = -1.0  # ReLU
    batches = _batches(teacher.config.vocab_size)
    student = load_student("prune:intermediate=8", teacher, calibration=lambda: batches)
    _close(_logits(student.model, batches), _logits(teacher.model, batches))

    heads = [1, 3]
    rows = [h * 8 + r for h in heads for r in range(8)]
    with torch.no_grad():
        embeddings = teacher.model.get_input_embeddings().weight
        embeddings[:, :16] *= 50.0
        for block in blocks:
            for h in (0, 2):
                if gpt2:
                    block.attn.c_attn.weight[:, 64 + h * 8 : 64 + (h + 1) * 8] = 0.0
                    block.attn.c_attn.bias[64 + h * 8 : 64 + (h + 1) * 8] = 0.0
                else:
                    block.self_attn.v_proj.weight[h * 8 : (h + 1) * 8] = 0.0
                    block.self_attn.v_proj.bias[h * 8 : (h + 1) * 8] = 0.0
    student = load_student("prune:hidden=16,heads=2", teacher, calibration=lambda: batches)
    assert (student.model.config.hidden_size, student.model.config.num_attention_heads) == (16, 2)
    first_t = blocks[0]
    first_s = student.model.transformer.h[0] if gpt2 else student.model.model.decoder.layers[0]
    if gpt2:
        columns = [third * 32 + r for third in range(3) for r in rows]
        torch.testing.assert_close(first_s.attn.c_attn.weight, first_t.attn.c_attn.weight[:16][:, columns])
        torch.testing.assert_close(first_s.attn.c_proj.weight, first_t.attn.c_proj.weight[rows][:, :16])
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(first_s.self_attn, name).weight,
                                       getattr(first_t.self_attn, name).weight[rows][:, :16])  # fmt: skip
        torch.testing.assert_close(first_s.self_attn.out_proj.weight, first_t.self_attn.out_proj.weight[:16][:, rows])
    assert torch.isfinite(_logits(student.model, batches)[0]).all()


def test_channels_are_ranked_by_activation_and_shapes_stay_valid(tmp_path):
    """Embedding channels 0..7 are scaled up 50x: a prune to 8 channels keeps exactly them, and the
    student is a valid grouped-query model that runs and generates."""
    teacher = load_causal_lm(str(save_causal_lm(tmp_path / "qwen3", "qwen3")))
    with torch.no_grad():
        teacher.model.model.embed_tokens.weight[:, :8] *= 50.0
    batches = _batches(teacher.config.vocab_size)
    student = load_student("prune:hidden=8,heads=2,intermediate=16,layers=2,depth=uniform", teacher,
                           calibration=lambda: batches)  # fmt: skip
    torch.testing.assert_close(student.model.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight[:, :8])
    assert student.hidden_channels == tuple(range(8))  # what Flex-KD pairs each student channel with
    config = student.model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 2, 1, 8)
    assert student.teacher_blocks == (1, 3)  # uniform: truncate:2's blocks
    out = student.model.generate(batches[0]["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 15)


@pytest.mark.parametrize(("spec", "message"), [
    ("prune:", "nothing to prune"),
    ("prune:hidden=x", "hidden must be an integer"),
    ("prune:width=3", "unknown key 'width'"),
    ("prune:depth=random,layers=2", "depth must be skip or uniform"),
])  # fmt: skip
def test_bad_prune_specs(spec, message):
    with pytest.raises(GeokdError, match=message):
        parse_student_spec(spec)


def test_prune_specs_that_do_not_fit_the_teacher(teacher_dir, tmp_path):
    bert = load_teacher(str(teacher_dir / "final"), num_labels=2)
    with pytest.raises(GeokdError, match="hidden=16 needs heads=2"):
        load_student("prune:hidden=16", bert, calibration=lambda: [])
    llama = load_causal_lm(str(save_causal_lm(tmp_path / "llama", "llama")))
    with pytest.raises(GeokdError, match="exceeds the teacher's 32"):
        load_student("prune:hidden=64", llama, calibration=lambda: [])
    with pytest.raises(GeokdError, match="kv_heads <= 2"):
        load_student("prune:heads=4,kv_heads=4", llama, calibration=lambda: [])


def test_a_pruned_decoder_distils_exports_and_reloads(tmp_path):
    result, run = distill_pruned_decoder(tmp_path, "procrustes", max_steps=3)
    teacher, data = tmp_path / "teacher", tmp_path / "data"  # written by distill_pruned_decoder
    assert result.exit_code == 0, result.output
    results = json.loads((run / "results.json").read_text())
    assert results["init_metrics"]["loss"] > 0 and "loss" in results["metrics"]  # the untrained pruned student
    blocks = json.loads((run / "final" / "geokd.json").read_text())["teacher_blocks"]
    assert len(blocks) == 2 and blocks == sorted(blocks)  # the blocks depth=skip kept, recorded for read-back
    report = tmp_path / "geometry.json"
    result = runner.invoke(app, ["eval", str(run), "--task", "instruct", "--data", str(data / "dev.jsonl"), "--limit",
                                 "4", "--max-new-tokens", "4", "--geometry", "--teacher", str(teacher), "--layers",
                                 "copied", "--features", "mean", "--json", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    pairs = [(e["student_layer"], e["teacher_layer"]) for e in json.loads(report.read_text())["geometry"]["layer_pairs"]]
    assert pairs == [(1, blocks[0] + 1), (2, blocks[1] + 1)]
    export = tmp_path / "export"
    assert runner.invoke(app, ["export", str(run), "--out", str(export)]).exit_code == 0
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    assert reloaded.config.hidden_size == 16 and reloaded.config.num_hidden_layers == 2
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, final(ids).logits)
