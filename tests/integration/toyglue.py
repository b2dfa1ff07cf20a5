"""The toy task and tiny models the integration tests share: a sentiment task in the GLUE SST-2
layout whose label is carried by one word, and a head-less 4-layer, 32-wide BERT."""

from __future__ import annotations

import random

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "fine", "nice"]
NEGATIVE = ["bad", "awful", "poor", "sad"]
FILLER = [f"w{i}" for i in range(40)]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER


def sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, rng.randint(3, 9))
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def options(**kwargs) -> list[str]:
    """`options(max_steps=4)` -> ["--max-steps", "4"]."""
    args = []
    for key, value in kwargs.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def distill_pruned_decoder(tmp_path, loss: str, max_steps: int):
    """`geokd distill` of a 2-block, 16-wide `prune:` student of a tiny Llama on toy instruct data,
    into `tmp_path / "run"`; returns the CLI result and the run directory."""
    from tinylm import save_causal_lm, write_instruct_data
    from typer.testing import CliRunner

    from geokd.cli import app

    teacher = save_causal_lm(tmp_path / "teacher", "llama")
    data = write_instruct_data(tmp_path / "data")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["distill", *options(
        teacher=teacher, student="prune:hidden=16,heads=2,intermediate=32,layers=2", task="instruct", data=data,
        out=run, loss=loss, layers="copied", max_steps=max_steps, batch_size=6, lr=3e-3, seed=1, save_minutes=0,
        max_length=96, max_prompt_length=64, prune_samples=12)])  # fmt: skip
    return result, run
