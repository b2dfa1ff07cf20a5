"""Tiny causal language models and an offline tokenizer for the decoder tests (issue #11).

`make_tokenizer()` builds a word-level fast tokenizer in code (no download; note that a saved qwen2
folder reloads it as `Qwen2Tokenizer`, which cannot read a word-level vocabulary: use qwen3): the special tokens
`<pad>`, `<s>`, `</s>`, `<unk>`, the MiniLLM template's words and a small filler vocabulary, with
a chat template. `make_causal_lm(family)` returns a randomly initialised model of each supported
family (llama, qwen2, qwen3, mistral, gpt2, opt) sized for CPU tests, and `save_causal_lm` writes
model + tokenizer into a folder that `AutoModelForCausalLM.from_pretrained` loads offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
# The words of the alpaca/MiniLLM prompt template and of the chat template, so prompts tokenise
# into known ids; everything else is filler the tests compose sentences from.
TEMPLATE_WORDS = (
    "Below is an instruction that describes a task , paired with an input provides further context . "
    "Write a response appropriately completes the request ### Instruction : Input Response user "
    "assistant system <|im_start|> <|im_end|>"
).split()
FILLER = [f"w{i}" for i in range(60)]
VOCAB = list(dict.fromkeys(SPECIAL + TEMPLATE_WORDS + FILLER))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "opt")


def make_tokenizer(padding_side: str = "right"):
    """A word-level PreTrainedTokenizerFast over VOCAB (whitespace split, newlines dropped)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side=padding_side,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_bpe_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained in code on the template and filler words (so it splits
    them differently from `make_tokenizer`: e.g. `w17` -> `w`, `17`), with the same special tokens
    at the same ids: a genuinely different tokenizer for the cross-tokenizer tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    corpus = [" ".join(TEMPLATE_WORDS)] + [" ".join(FILLER[i : i + 6]) for i in range(0, len(FILLER), 3)]
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_config(family: str, vocab_size: int = len(VOCAB), layers: int = 4, hidden: int = 32, **extra):
    """A tiny config of `family`: 4 blocks, width 32, 4 query heads (2 key/value heads where the
    family has grouped-query attention), tied embeddings where the family ties them by default."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "qwen2", "qwen3", "mistral"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
        kwargs = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=family in ("llama", "qwen2", "qwen3"))  # fmt: skip
        if family == "qwen3":
            kwargs["head_dim"] = hidden // 4
        return cls(**common, **kwargs, **extra)
    if family == "gpt2":
        return GPT2Config(**common, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **extra)
    if family == "opt":
        return OPTConfig(**common, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
                         **extra)  # fmt: skip
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def make_causal_lm(family: str, seed: int = 0, **config_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(family, **config_kwargs)).eval()


def save_causal_lm(folder: str | Path, family: str = "llama", seed: int = 0, tokenizer: str = "word",
                   **config_kwargs) -> Path:  # fmt: skip
    """Write a tiny random causal LM of `family` and the test tokenizer (`word`, or `bpe`:
    `make_bpe_tokenizer`) into `folder`."""
    folder = Path(folder)
    tok = make_bpe_tokenizer() if tokenizer == "bpe" else make_tokenizer()
    if tokenizer == "bpe":
        config_kwargs.setdefault("vocab_size", len(tok))
    model = make_causal_lm(family, seed=seed, **config_kwargs)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_instruct_data(folder: str | Path, n_train: int = 48, n_dev: int = 12, seed: int = 0) -> Path:
    """A learnable toy instruction task in the MiniLLM format: the response repeats the
    instruction's filler words in reverse; every third example has an input block."""
    import json
    import random

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            words = rng.sample(FILLER, rng.randint(2, 5))
            rows.append({"instruction": " ".join(words), "input": "w0 w1" if i % 3 == 0 else "",
                         "output": " ".join(reversed(words))})  # fmt: skip
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder
