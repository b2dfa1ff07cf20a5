"""Session fixtures for the integration tests: the toy GLUE folder, a head-less tiny BERT, and a
teacher fine-tuned from it through the CLI (built once, shared by every integration module)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from toyglue import VOCAB, options, sentence
from transformers import BertConfig, BertModel, BertTokenizer
from typer.testing import CliRunner

from geokd.cli import app


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    """A toy sentiment task in the SST-2 TSV layout: the label is carried by one word."""
    root = tmp_path_factory.mktemp("glue") / "SST-2"
    root.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 128), ("dev", 48)):
        labels = [i % 2 for i in range(n)]
        lines = ["sentence\tlabel"] + [f"{sentence(rng, y)}\t{y}" for y in labels]
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A head-less 4-layer, 32-wide BERT with its tokenizer (a 'pretrained encoder')."""
    folder = tmp_path_factory.mktemp("base")
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(VOCAB)})
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def teacher_dir(base_dir, glue_dir, tmp_path_factory) -> Path:
    """A finished `geokd finetune` run of the base model on the toy task (dev accuracy > 0.8)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    result = CliRunner().invoke(
        app,
        ["finetune", "--quiet", *options(model=base_dir, task="sst2", data=glue_dir, out=out, max_steps=60,
                                          batch_size=16, lr=3e-3, seed=0, save_every=30, eval_every=30)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def quiet_teacher(teacher_dir, tmp_path_factory) -> Path:
    """The toy teacher's final/ with dropout off (a truncate: student inherits its config): runs
    compared across batch shapes, ranks or options must draw no dropout masks."""
    import json
    import shutil

    teacher = tmp_path_factory.mktemp("quiet") / "teacher"
    shutil.copytree(teacher_dir / "final", teacher)
    config = json.loads((teacher / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (teacher / "config.json").write_text(json.dumps(config))
    return teacher
