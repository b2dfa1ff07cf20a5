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
