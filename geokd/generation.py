"""Generation and its evaluation for decoder LLMs: the MiniLLM instruction-following protocol
(issue #11, "Evaluation"). Library functions; `geokd eval --task instruct` wires them to the data
reader and the CLI. Everything here takes plain prompts (token ids) and references (strings).

* `generate(model, tokenizer, prompts, ...)` decodes up to `max_new_tokens` new tokens for each
  prompt and returns one `GenerationOutput` per prompt, **in input order**.
  - Batching: prompts are sorted by length (longest first) and packed so that each batch holds at
    most `batch_size` rows and at most `batch_tokens` tokens of rows × (longest prompt +
    `max_new_tokens`), the KV cache of a batch included. Prompts are **left-padded**; the
    attention mask hides the padding and position ids count real tokens only
    (`cumsum(mask) - 1`, 0 on padding), as `transformers`' own `generate` builds them. They are
    passed explicitly to every family: Llama/Qwen/Mistral (RoPE) and GPT-2 would otherwise number
    positions from the padded start, and OPT's own fallback numbers them the same way.
  - The prompt is encoded once (the prefill keeps only the last position's logits), then one
    token per step with the KV cache. A row stops at its first EOS token; finished rows leave the
    batch (their cache rows are dropped), so a batch slows down to its longest *remaining* answer
    only. Everything runs under `torch.inference_mode()` with the model in eval mode (restored
    afterwards).
  - `decoding="greedy"`: the arg-max token (lowest id on ties), as `model.generate(do_sample=False)`.
    Batched greedy output equals per-example greedy output (tested on several tiny families and
    asserted by `bench/generate.py` on a real model); the only possible difference is a flip at an
    exact-to-rounding tie, because a batch's matrix products round differently from a single row's.
  - `decoding="sample"`: softmax(logits / temperature), optionally restricted to the `top_k` most
    likely tokens (0 = off) and to the smallest nucleus of probability ≥ `top_p` (1.0 = off). The
    MiniLLM protocol is temperature 1, top-k 0, top-p 1 (pure ancestral sampling).
* **Seeding (sampling).** Every example has its own random stream: a CPU `torch.Generator` seeded
  from SHA-256 of (`seed`, the example's id), which draws one uniform number per generated token;
  the token is the inverse CDF of the (filtered) distribution at that number, in float64. So an
  example's sample depends only on (seed, example id, its own next-token distributions), never on
  which other examples share its batch, the batch size, the batch order, or the global torch RNG
  (which is not touched). *Guaranteed:* the same seed, ids, model, prompts, settings and machine
  give bit-identical output. *Not guaranteed:* identical samples across batch plans (other
  `batch_size`/`batch_tokens`, other prompt sets) or devices: the logits then differ in their last
  bits and a uniform number that falls within rounding of a CDF boundary can pick the neighbouring
  token (rare, about 1e-6 per token in float32); after that the example's continuation diverges.
  Samples are not the ones `model.generate(do_sample=True)` draws (it uses the global RNG).
* **Text.** `GenerationOutput.token_ids` are the new tokens without the EOS; `text` is their
  decoding with `skip_special_tokens=True`, stripped of surrounding white space (MiniLLM strips
  its responses before scoring). `n_new_tokens` counts every token generated, the EOS included.

Metrics, exactly as MiniLLM's evaluation (`minillm/rouge_metric.py` and `evaluate_main.py` in
microsoft/LMOps, which adapt Super-NaturalInstructions' scorer) computes them:

* `rouge_l(prediction, references)`: `rouge_score.rouge_scorer.RougeScorer(["rougeL"],
  use_stemmer=True).score(target=reference, prediction=prediction).fmeasure`, the maximum over the
  references, × 100. MiniLLM applies no normalisation of its own before the scorer (only the
  `.strip()` of the response, which `generate` also does); the scorer itself lower-cases, replaces
  every character outside [a-z0-9] by a space, splits on white space and Porter-stems tokens
  longer than 3 characters (so non-ASCII letters are dropped). An empty prediction (or one with no
  [a-z0-9] token) scores 0, as does an empty reference; it is not an error and is counted in
  `n_empty`. The corpus score is the plain mean over examples (MiniLLM then rounds to 4 decimals;
  geokd does not round).
* `exact_match(prediction, references)`: 100.0 if the normalised prediction equals any normalised
  reference, else 0.0; normalisation = lower-case, delete every ASCII punctuation character
  (`string.punctuation`), collapse white space runs to one space and strip (SQuAD's
  normalisation without article removal, as MiniLLM/Super-NaturalInstructions use it).
* Response length: mean new tokens per response (EOS excluded; MiniLLM re-encodes the decoded
  text, which gives the same count up to tokenizer round-trip effects) and mean words
  (white-space split).

`evaluate_generations(...)` runs `generate` once (greedy) or once per generation seed (sampling;
the protocol's seeds are 10, 20, 30, 40, 50), scores each run, and reports each metric's mean and
sample standard deviation (ddof = 1; `null` for a single run) over the runs, with tokens/s, wall
times and the decoding settings. `write_generations_jsonl` writes its per-example records
atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import statistics
import string
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from geokd import distributed
from geokd.errors import GeokdError

DECODINGS = ("greedy", "sample")
MINILLM_GEN_SEEDS = (10, 20, 30, 40, 50)
Decoding = Literal["greedy", "sample"]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationOutput:
    """One prompt's continuation: the new token ids (EOS excluded), their text (decoded with
    `skip_special_tokens=True`, stripped), the number of tokens generated (EOS included) and
    whether it stopped at EOS (False: it reached `max_new_tokens`)."""

    token_ids: list[int]
    text: str
    n_new_tokens: int
    stopped_at_eos: bool = False


def example_seed(seed: int, example_id: Any) -> int:
    """The 63-bit seed of one example's sampling stream: SHA-256 of `"{seed}:{example_id}"`.
    Stable across runs, processes and machines (Python's `hash` of a string is not)."""
    digest = hashlib.sha256(f"geokd-sample:{int(seed)}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generation_batches(
    lengths: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    batch_tokens: int | None = None,
) -> list[list[int]]:
    """Batches of prompt indices, longest prompt first. A batch holds at most `batch_size` rows
    and, when `batch_tokens` is given, at most `batch_tokens` // (its longest prompt +
    `max_new_tokens`) rows (at least one). Every index appears exactly once."""
    if batch_size < 1:
        raise GeokdError(f"batch_size must be at least 1, got {batch_size}")
    if batch_tokens is not None and batch_tokens < 1:
        raise GeokdError(f"batch_tokens must be at least 1, got {batch_tokens} (leave it out for no limit)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    result, start = [], 0
    while start < len(order):
        size = batch_size
        if batch_tokens is not None:
            width = lengths[order[start]] + max_new_tokens  # the batch's longest: the order is descending
            size = max(1, min(size, batch_tokens // width))
        result.append(order[start : start + size])
        start += size
    return result


def _eos_ids(model: torch.nn.Module, tokenizer: Any, eos_token_id: int | Iterable[int] | None) -> set[int]:
    candidates: Any = eos_token_id
    if candidates is None:
        config = getattr(model, "generation_config", None)
        candidates = getattr(config, "eos_token_id", None)
    if candidates is None:
        candidates = getattr(model.config, "eos_token_id", None)
    if candidates is None and tokenizer is not None:
        candidates = getattr(tokenizer, "eos_token_id", None)
    if candidates is None:
        return set()
    if isinstance(candidates, int):
        return {candidates}
    return {int(c) for c in candidates}


def _pad_id(model: torch.nn.Module, tokenizer: Any, eos: set[int]) -> int:
    """Any valid id: padded positions are masked out and never attended to."""
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if isinstance(value, int) and value >= 0:
            return value
    return min(eos) if eos else 0


def _position_limit(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] float32 -> temperature-scaled logits with filtered-out tokens at -inf."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        drop_sorted = before >= top_p  # the smallest prefix with mass >= top_p stays (never empty)
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sample(logits: torch.Tensor, generators: Sequence[torch.Generator], temperature: float, top_k: int,
            top_p: float) -> torch.Tensor:  # fmt: skip
    """One token per row by inverse CDF at a uniform number from each row's own generator."""
    probs = _filter_logits(logits.float(), temperature, top_k, top_p).softmax(dim=-1).double()
    cdf = probs.cumsum(dim=-1)  # [B, V]
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    target = (uniform.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # [B, 1], below the total mass
    token = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # first index with cdf > target
    return token.clamp_(max=logits.shape[-1] - 1)


class _Stepper:
    """Calls the model the same way for every family: explicit position ids, the KV cache under
    the name this transformers version uses, only the last position's logits."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.takes_positions = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params

    def __call__(self, input_ids, attention_mask, position_ids, cache):
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": True}
        if self.takes_positions:
            kwargs["position_ids"] = position_ids
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1, :], new_cache


def _generate_batch(
    step: _Stepper,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos: set[int],
    pad_id: int,
    device: torch.device,
    choose: Callable[[torch.Tensor, list[int]], torch.Tensor],
) -> list[tuple[list[int], bool]]:
    """Decode one batch; returns (new tokens without EOS, stopped at EOS) per row, in batch order.
    `choose(logits [b, V], rows)` picks the next token of each active row (`rows`: their batch
    positions)."""
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).clamp_(min=0)
    eos_tensor = torch.as_tensor(sorted(eos), dtype=torch.long, device=device) if eos else None

    logits, cache = step(ids, mask, positions, None)
    positions = positions[:, -1:]
    can_shrink = hasattr(cache, "batch_select_indices")
    rows = list(range(n))  # the batch row of each row of the cache (finished rows leave it)
    tokens: list[list[int]] = [[] for _ in range(n)]
    stopped = [False] * n
    for index in range(max_new_tokens):
        chosen = choose(logits, rows)  # [len(rows)]
        hit = (
            torch.isin(chosen, eos_tensor)
            if eos_tensor is not None
            else torch.zeros_like(chosen, dtype=torch.bool)
        )
        for row, token, is_eos in zip(
            rows, chosen.tolist(), hit.tolist(), strict=True
        ):  # the one host sync per step
            if stopped[row]:  # only with a cache that cannot shrink: the row already ended
                continue
            if is_eos:
                stopped[row] = True
            else:
                tokens[row].append(token)
        keep = [k for k, row in enumerate(rows) if not stopped[row]]
        if index == max_new_tokens - 1 or not keep:
            break
        next_ids = chosen.unsqueeze(-1)
        if can_shrink and len(keep) < len(rows):  # drop finished rows from the batch and its cache
            select = torch.as_tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(select)
            mask, positions, next_ids = mask[select], positions[select], next_ids[select]
            rows = [rows[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions = positions + 1
        logits, cache = step(next_ids, mask, positions, cache)
    return [(tokens[row], stopped[row]) for row in range(n)]


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    decoding: Decoding = "greedy",
    seed: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 16,
    batch_tokens: int | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    example_ids: Sequence[Any] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[GenerationOutput]:
    """Continue every prompt (a list of token ids, special tokens included as the model expects
    them) by up to `max_new_tokens` tokens; see the module docstring for batching, decoding and
    seeding. Returns one `GenerationOutput` per prompt in input order.

    `eos_token_id` (an id or several) defaults to the model's generation config, then its config,
    then the tokenizer. `example_ids` (default: the prompts' positions) name each example's
    sampling stream. `autocast()` (optional) wraps every forward pass (e.g. a bf16 autocast on
    CUDA). `on_batch(examples, new_tokens)` is told the size and the number of generated tokens
    (EOS included) of each finished batch, for a progress bar with tokens/s."""
    if decoding not in DECODINGS:
        raise GeokdError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    if max_new_tokens < 1:
        raise GeokdError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if decoding == "sample":
        if seed is None:
            raise GeokdError("decoding='sample' needs a seed (the MiniLLM protocol uses 10, 20, 30, 40, 50)")
        if not temperature > 0:
            raise GeokdError(f"temperature must be positive, got {temperature}; use decoding='greedy' for 0")
        if top_k < 0:
            raise GeokdError(f"top_k must be 0 (off) or positive, got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise GeokdError(f"top_p must be in (0, 1], got {top_p} (1.0 = off)")
    n = len(prompts)
    if example_ids is None:
        example_ids = list(range(n))
    elif len(example_ids) != n:
        raise GeokdError(f"{len(example_ids)} example ids for {n} prompts; give one id per prompt")
    prompts = [list(map(int, p)) for p in prompts]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise GeokdError(
            f"prompt {empty[0]} (of {len(empty)} empty ones) has no tokens; every prompt needs one"
        )
    if n == 0:
        return []
    limit = _position_limit(model.config)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise GeokdError(
            f"the longest prompt has {longest} tokens and max_new_tokens is {max_new_tokens}: {longest + max_new_tokens} "
            f"positions, but the model has {limit}; lower max_new_tokens or drop prompts over {limit - max_new_tokens} tokens"
        )
    eos = _eos_ids(model, tokenizer, eos_token_id)
    pad_id = _pad_id(model, tokenizer, eos)
    device = next(model.parameters()).device
    step = _Stepper(model)
    plan = generation_batches([len(p) for p in prompts], max_new_tokens, batch_size, batch_tokens)
    results: list[tuple[list[int], bool] | None] = [None] * n
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in plan:
                if decoding == "greedy":

                    def choose(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
                        return logits.argmax(dim=-1)

                else:
                    generators = [
                        torch.Generator().manual_seed(example_seed(seed, example_ids[i]))  # type: ignore[arg-type]
                        for i in batch
                    ]

                    def choose(logits: torch.Tensor, rows: list[int], generators=generators) -> torch.Tensor:
                        return _sample(logits, [generators[r] for r in rows], temperature, top_k, top_p)

                with autocast() if autocast is not None else contextlib.nullcontext():
                    outs = _generate_batch(
                        step, [prompts[i] for i in batch], max_new_tokens=max_new_tokens, eos=eos,
                        pad_id=pad_id, device=device, choose=choose,
                    )  # fmt: skip
                for i, out in zip(batch, outs, strict=True):
                    results[i] = out
                if on_batch is not None:
                    on_batch(len(batch), sum(len(t) + int(s) for t, s in outs))
    finally:
        model.train(was_training)
    outputs = []
    for item in results:
        assert item is not None
        tokens, stopped = item
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip() if tokenizer is not None else ""
        outputs.append(GenerationOutput(tokens, text, len(tokens) + int(stopped), stopped))
    return outputs


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:  # pragma: no cover - depends on the environment
            raise GeokdError(
                "ROUGE-L needs the rouge-score package: pip install rouge-score (the MiniLLM protocol's scorer)"
            ) from None
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


def _as_references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise GeokdError("an example has no reference; give at least one reference string per example")
    bad = [r for r in refs if not isinstance(r, str)]
    if bad:
        raise GeokdError(f"references must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
    return refs


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure × 100 of `prediction`, the best over `references` (see the module
    docstring for the scorer's tokenisation); 0 for an empty prediction."""
    scorer = _rouge_scorer()
    return 100.0 * max(
        scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure
        for reference in _as_references(references)
    )


def normalize_answer(text: str) -> str:
    """Lower-case, delete ASCII punctuation, collapse white space (MiniLLM's exact-match
    normalisation: SQuAD's, keeping articles)."""
    table = str.maketrans("", "", string.punctuation)
    return " ".join(text.lower().translate(table).split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """100.0 when the normalised prediction equals a normalised reference, else 0.0."""
    mine = normalize_answer(prediction)
    return 100.0 if any(mine == normalize_answer(r) for r in _as_references(references)) else 0.0


def score_generations(
    predictions: Sequence[str],
    references_list: Sequence[str | Sequence[str]],
    *,
    token_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Corpus metrics of one run: `rouge_l` and `exact_match` (means of the per-example scores,
    0-100), `mean_words`, `mean_tokens` (when `token_counts`, the new tokens without EOS, are
    given), `n_examples` and `n_empty` (predictions with no text)."""
    if len(predictions) != len(references_list):
        raise GeokdError(
            f"{len(predictions)} predictions for {len(references_list)} reference lists; give one of each per example"
        )
    if token_counts is not None and len(token_counts) != len(predictions):
        raise GeokdError(f"{len(token_counts)} token counts for {len(predictions)} predictions")
    n = len(predictions)
    if n == 0:
        raise GeokdError("no predictions to score")
    rouge = [rouge_l(p, r) for p, r in zip(predictions, references_list, strict=True)]
    em = [exact_match(p, r) for p, r in zip(predictions, references_list, strict=True)]
    result: dict[str, Any] = {
        "rouge_l": sum(rouge) / n,
        "exact_match": sum(em) / n,
        "mean_words": sum(len(p.split()) for p in predictions) / n,
        "mean_tokens": (sum(token_counts) / n) if token_counts is not None else None,
        "n_examples": n,
        "n_empty": sum(1 for p in predictions if not p.strip()),
        "per_example_rouge_l": rouge,
    }
    return result


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof = 1; None for fewer than two values)."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "values": values,
    }


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

SUMMARY_METRICS = ("rouge_l", "exact_match", "mean_tokens", "mean_words", "tokens_per_s")


def evaluate_generations(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    references: Sequence[str | Sequence[str]],
    example_ids: Sequence[Any] | None = None,
    *,
    decoding: Decoding = "greedy",
    gen_seeds: Sequence[int] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 16,
    batch_tokens: int | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    prompt_texts: Sequence[str] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    shard: bool = False,
) -> dict[str, Any]:
    """Generate for every prompt and score against its references (a string or a list).

    `shard=True` under torchrun: rank r generates prompts r, r+W, ... and the continuations of all
    ranks are gathered (as JSON bytes), so every rank scores the whole set. Sampling seeds are per
    example (`example_seed`), so the samples do not depend on the split; the generation time is
    the slowest rank's.

    Greedy runs once (`gen_seeds` must be None). Sampling runs once per seed of `gen_seeds`
    (default: MiniLLM's 10, 20, 30, 40, 50). Returns a JSON-ready dict:

    * `metrics`: for each of rouge_l, exact_match, mean_tokens, mean_words and tokens_per_s,
      `{"mean", "std", "values"}` over the runs (std: sample std, None for one run);
    * `per_seed`: one entry per run (`seed` None for greedy) with its metrics, `n_new_tokens`
      (EOS included), `n_stopped_at_eos`, `generate_s`, `tokens_per_s`;
    * `decoding`: the settings; `n_examples`; `elapsed_s`;
    * `records`: one dict per example and run (example_id, seed, prompt, prediction, references,
      rouge_l, n_new_tokens, stopped_at_eos), for `write_generations_jsonl`. Callers that write
      the metrics JSON pop it first.

    Model identity and the data fingerprint are the caller's (the CLI knows where both came from).
    """
    started = time.perf_counter()
    n = len(prompts)
    if n == 0:
        raise GeokdError("no examples to evaluate; the data is empty (or --limit is 0)")
    if len(references) != n:
        raise GeokdError(
            f"{len(references)} references for {n} prompts; give one reference (or list) per prompt"
        )
    if example_ids is None:
        example_ids = list(range(n))
    if len(example_ids) != n:
        raise GeokdError(f"{len(example_ids)} example ids for {n} prompts; give one id per prompt")
    if prompt_texts is not None and len(prompt_texts) != n:
        raise GeokdError(f"{len(prompt_texts)} prompt texts for {n} prompts")
    refs = [_as_references(r) for r in references]
    if decoding == "greedy":
        if gen_seeds is not None:
            raise GeokdError(
                "generation seeds only apply to decoding='sample'; greedy decoding is deterministic"
            )
        seeds: list[int | None] = [None]
    elif decoding == "sample":
        seeds = list(MINILLM_GEN_SEEDS if gen_seeds is None else gen_seeds)
        if not seeds:
            raise GeokdError("decoding='sample' needs at least one generation seed (MiniLLM: 10,20,30,40,50)")
        if len(set(seeds)) != len(seeds):
            raise GeokdError(f"generation seeds repeat: {seeds}; each seed once")
    else:
        raise GeokdError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
    texts = list(prompt_texts) if prompt_texts is not None else [
        tokenizer.decode(list(p), skip_special_tokens=False) for p in prompts
    ]  # fmt: skip

    per_seed, records = [], []
    for seed in seeds:
        tic = time.perf_counter()
        mine = list(range(distributed.rank(), n, distributed.world_size())) if shard else list(range(n))
        outputs = generate(
            model, tokenizer, [prompts[i] for i in mine], max_new_tokens=max_new_tokens, decoding=decoding,
            seed=seed, temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size,
            batch_tokens=batch_tokens, eos_token_id=eos_token_id, example_ids=[example_ids[i] for i in mine],
            autocast=autocast, on_batch=on_batch,
        )  # fmt: skip
        seconds = time.perf_counter() - tic
        if shard and distributed.world_size() > 1:
            outputs, seconds = _gathered_outputs(mine, outputs, seconds, n, next(model.parameters()).device)
        predictions = [o.text for o in outputs]
        scores = score_generations(predictions, refs, token_counts=[len(o.token_ids) for o in outputs])
        rouge = scores.pop("per_example_rouge_l")
        new_tokens = sum(o.n_new_tokens for o in outputs)
        per_seed.append({
            "seed": seed,
            **scores,
            "n_new_tokens": new_tokens,
            "n_stopped_at_eos": sum(o.stopped_at_eos for o in outputs),
            "generate_s": seconds,
            "tokens_per_s": new_tokens / max(seconds, 1e-9),
        })  # fmt: skip
        for i, out in enumerate(outputs):
            records.append({
                "example_id": example_ids[i],
                "seed": seed,
                "prompt": texts[i],
                "prediction": out.text,
                "references": refs[i],
                "rouge_l": rouge[i],
                "n_new_tokens": out.n_new_tokens,
                "stopped_at_eos": out.stopped_at_eos,
            })  # fmt: skip
    return {
        "n_examples": n,
        "metrics": {name: mean_std([run[name] for run in per_seed]) for name in SUMMARY_METRICS},
        "per_seed": per_seed,
        "decoding": {
            "decoding": decoding,
            "gen_seeds": None if decoding == "greedy" else seeds,
            "temperature": temperature if decoding == "sample" else None,
            "top_k": top_k if decoding == "sample" else None,
            "top_p": top_p if decoding == "sample" else None,
            "max_new_tokens": max_new_tokens,
            "eos_token_id": sorted(_eos_ids(model, tokenizer, eos_token_id)),
            "batch_size": batch_size,
            "batch_tokens": batch_tokens,
            "batching": "length-sorted, left-padded, KV cache; finished rows leave the batch",
            "seeding": "per example: torch.Generator seeded from sha256(seed, example_id)",
            "metric": "rouge-score rougeL F-measure, Porter stemmer, best over references, x100 (MiniLLM)",
        },
        "records": records,
        "elapsed_s": time.perf_counter() - started,
    }


def _gathered_outputs(mine: list[int], outputs: list[GenerationOutput], seconds: float, n: int,
                      device: torch.device) -> tuple[list[GenerationOutput], float]:  # fmt: skip
    """Every rank's continuations back in prompt order, and the slowest rank's generation time."""
    parts = distributed.gather_json(
        {"index": mine, "seconds": seconds, "outputs": [dataclasses.asdict(o) for o in outputs]}, device
    )
    merged: list[GenerationOutput | None] = [None] * n
    for part in parts:
        for index, output in zip(part["index"], part["outputs"], strict=True):
            merged[index] = GenerationOutput(**output)
    assert all(o is not None for o in merged)
    return merged, max(part["seconds"] for part in parts)  # type: ignore[return-value]


def write_generations_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept), atomically: readers never see a
    half-written file."""
    from geokd.artifacts import atomic_path

    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
    return target


__all__ = [
    "DECODINGS",
    "MINILLM_GEN_SEEDS",
    "GenerationOutput",
    "evaluate_generations",
    "exact_match",
    "example_seed",
    "generate",
    "generation_batches",
    "mean_std",
    "normalize_answer",
    "rouge_l",
    "score_generations",
    "write_generations_jsonl",
]
