"""`geokd eval MODEL --task instruct --data FILE`: generation evaluation of a causal LM on the
MiniLLM / DistiLLM protocol (issue #11).

The model is a run directory (its `final/`; template, prompt length and training data come from
the run's record), a run's `final/`, an export, a model folder, a Hub id, an alias or a `.gguf`
file. The data is one instruction file in any supported format (or a folder and `--split`). Each
prompt is rendered with the template and tokenised exactly as in training (prompts longer than
`--max-prompt-length` are dropped and counted), then `geokd.generation.evaluate_generations`
generates (batched, left-padded, KV cache, length-sorted) and scores ROUGE-L (rouge-score's
rougeL with the Porter stemmer, best over the references, ×100), exact match and response length:
once for `--decoding greedy`, once per `--gen-seeds` seed for `--decoding sample` (MiniLLM:
temperature 1, top-k 0, top-p 1, seeds 10..50; reported as the mean ± sample std over seeds).

The result JSON records the model's identity (path or id, weights SHA-256, parameters, the run's
own record), the data (source, format, SHA-256 fingerprint), the decoding settings, the train/eval
contamination count (eval examples whose normalised instruction and input also occur in the
training data: the run's train split, or `--train-data`), the counts of dropped prompts, and the
elapsed time. The generations go to a JSONL file next to it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import geokd
from geokd.errors import GeokdError

METRIC_ORDER = ("rouge_l", "exact_match", "mean_tokens", "mean_words", "tokens_per_s")


def evaluate_instruct_model(
    model: str,
    data: str | None,
    *,
    split: str | None = None,
    data_format: str = "auto",
    template: str | None = None,
    max_prompt_length: int | None = None,
    max_new_tokens: int = 256,
    decoding: str = "greedy",
    gen_seeds: Sequence[int] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "auto",
    trust_remote_code: bool = False,
    train_data: str | None = None,
    on_total: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate and score; returns the result dict with its `records` (pop them before writing
    the metrics JSON; `geokd.generation.write_generations_jsonl` writes them)."""
    from geokd.config import read_config
    from geokd.evaluate import _quiet_transformers, locate_model
    from geokd.generation import evaluate_generations
    from geokd.models import count_parameters, weights_sha256
    from geokd.models.decoder import load_causal_lm
    from geokd.runtime import resolve_runtime
    from geokd.tasks import instruct

    if decoding not in ("greedy", "sample"):
        raise GeokdError(f"--decoding: expected greedy or sample, got {decoding!r}")
    if decoding == "greedy" and gen_seeds:
        raise GeokdError("--gen-seeds: greedy decoding is deterministic; pass --decoding sample to use seeds")
    if limit is not None and limit < 1:
        raise GeokdError(f"--limit: must be at least 1, got {limit}")
    if max_new_tokens < 1:
        raise GeokdError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    started = time.perf_counter()
    _quiet_transformers()
    located = locate_model(model)
    run_config = read_config(located.run_dir / "config.yaml") if located.run_dir is not None else None
    template = template or (run_config.template if run_config is not None else "alpaca")
    max_prompt_length = max_prompt_length or (run_config.max_prompt_length if run_config is not None else 256)
    if data is None:
        if run_config is None or run_config.data is None:
            raise GeokdError("--data: pass the instruction file to evaluate on (e.g. dolly/eval.jsonl)")
        data, split = run_config.data, split or "dev"
    eval_split = instruct.load_instruct_split(data, split or "eval", format=data_format) if Path(
        data
    ).is_dir() else instruct.load_instruct_split(data, format=data_format)
    if train_data is None and run_config is not None and run_config.data is not None:
        train_data = run_config.data
    contamination = None
    if train_data is not None:
        train_split = instruct.load_instruct_split(train_data, "train")
        contamination = {**instruct.contamination(eval_split, train_split), "train_source": train_split.source}
    if limit is not None:
        eval_split = dataclasses.replace(eval_split, examples=eval_split.examples[:limit])

    runtime = resolve_runtime(device)
    loaded = load_causal_lm(located.load, trust_remote_code=trust_remote_code)
    for_generation = instruct.tokenize_prompts(
        eval_split, loaded.tokenizer, template=template, max_prompt_length=max_prompt_length
    )
    prompts, stats = for_generation
    if on_total is not None:
        on_total(len(prompts) * (len(gen_seeds or (10, 20, 30, 40, 50)) if decoding == "sample" else 1))
    model_obj = loaded.model.to(runtime.device).eval()
    seeds = (tuple(gen_seeds) if gen_seeds else (10, 20, 30, 40, 50)) if decoding == "sample" else None
    result = evaluate_generations(
        model_obj,
        loaded.tokenizer,
        [f["input_ids"] for f in prompts],
        [eval_split.examples[f["example_id"]].references for f in prompts],
        [f["example_id"] for f in prompts],
        decoding=decoding,  # type: ignore[arg-type]
        gen_seeds=seeds,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        autocast=runtime.autocast,
        on_batch=(lambda done, total: on_batch(done)) if on_batch is not None else None,
    )
    metrics = {name: result["metrics"][name]["mean"] for name in METRIC_ORDER if name in result["metrics"]}
    folder = Path(located.load)
    return {
        "task": "instruct",
        "split": eval_split.split + (f"-first{limit}" if limit is not None else ""),
        "n_examples": len(prompts),
        "primary_metric": "rouge_l",
        "metrics": metrics,
        "metrics_spread": result["metrics"],
        "per_seed": result["per_seed"],
        "decoding": result["decoding"],
        "model": {
            "given": model,
            "path_or_id": loaded.source.path_or_id,
            "kind": loaded.source.kind,
            "weights_sha256": loaded.source.weights_sha256
            or (weights_sha256(folder) if folder.is_dir() else None),
            "parameters": count_parameters(model_obj),
            "run_dir": str(located.run_dir) if located.run_dir is not None else None,
            "record": located.record,
        },
        "data": {"source": eval_split.source, "format": eval_split.format, "fingerprint": eval_split.fingerprint},
        "prompts": {"template": template, "max_prompt_length": max_prompt_length, **stats},
        "contamination": contamination,
        "settings": {"device": str(runtime.device), "precision": runtime.reason, "batch_size": batch_size},
        "geokd_version": geokd.__version__,
        "elapsed_s": time.perf_counter() - started,
        "records": result["records"],
    }
