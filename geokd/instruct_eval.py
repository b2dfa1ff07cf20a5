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
from geokd import distributed
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
    teacher: str | None = None,
    layers: str | None = None,
    features: str | None = None,
    epsilon: float = 0.1,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Generate and score; returns the result dict with its `records` (pop them before writing
    the metrics JSON; `geokd.generation.write_generations_jsonl` writes them). With `teacher`, the
    result also holds the geometry report against it (`decoder_geometry_report`; layer map, rows
    and max length default to the run's)."""
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
    located, run_config, template, max_prompt_length = _locate(model, template, max_prompt_length)
    if data is None:
        if run_config is None or run_config.data is None:
            raise GeokdError("--data: pass the instruction file to evaluate on (e.g. dolly/eval.jsonl)")
        data, split = run_config.data, split or "dev"
    if Path(data).is_dir():
        eval_split = instruct.load_instruct_split(data, split or "eval", format=data_format)
    else:  # one file: the split is named by its folder and stem (dolly-eval, self-inst-eval)
        eval_split = instruct.read_instruct(data, format=data_format)
        eval_split = dataclasses.replace(eval_split, split=f"{Path(data).resolve().parent.name}-{eval_split.split}")
    if train_data is None and run_config is not None and run_config.data is not None:
        train_data = run_config.data
    contamination = None
    if train_data is not None:
        train_split = instruct.load_instruct_split(train_data, "train")
        contamination = {**instruct.contamination(eval_split, train_split), "train_source": train_split.source}
    if limit is not None:
        eval_split = dataclasses.replace(eval_split, examples=eval_split.examples[:limit])

    runtime = resolve_runtime(device)
    distributed.init(runtime.device)  # torchrun: the ranks split the prompts (evaluate_generations shard=True)
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
        shard=True,
    )
    metrics = {name: result["metrics"][name]["mean"] for name in METRIC_ORDER if name in result["metrics"]}
    geometry = None
    if teacher is not None:
        geometry = _run_geometry(loaded, located, run_config, teacher, eval_split, layers=layers, features=features,
                                 epsilon=epsilon, template=template, max_prompt_length=max_prompt_length,
                                 max_length=max_length, batch_size=batch_size, runtime=runtime,
                                 trust_remote_code=trust_remote_code)  # fmt: skip
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
        "geometry": geometry,
        "settings": {"device": str(runtime.device), "precision": runtime.reason, "batch_size": batch_size},
        "geokd_version": geokd.__version__,
        "elapsed_s": time.perf_counter() - started,
        "records": result["records"],
    }


def _locate(model: str, template: str | None, max_prompt_length: int | None) -> tuple[Any, Any, str, int]:
    """(located model, its run's config or None, prompt template, max prompt length): the given
    values, else the run's, else alpaca / 256."""
    from geokd.config import read_config
    from geokd.evaluate import _quiet_transformers, locate_model

    _quiet_transformers()
    located = locate_model(model)
    run_config = read_config(located.run_dir / "config.yaml") if located.run_dir is not None else None
    template = template or (run_config.template if run_config is not None else "alpaca")
    max_prompt_length = max_prompt_length or (run_config.max_prompt_length if run_config is not None else 256)
    return located, run_config, template, max_prompt_length


def _run_geometry(
    loaded: Any, located: Any, run_config: Any, teacher: str, split: Any, *, layers: str | None,
    features: str | None, epsilon: float, template: str, max_prompt_length: int, max_length: int | None,
    batch_size: int, runtime: Any, trust_remote_code: bool,
) -> dict[str, Any]:  # fmt: skip
    """`decoder_geometry_report` of a loaded model, its layer map, rows and max length defaulting to
    its run's (a run directory) or uniform / tokens / 512 (anything else)."""
    from geokd.flexkd import read_selections

    return decoder_geometry_report(
        loaded, teacher, split,
        layers=layers or (run_config.layers if run_config is not None else "uniform"),
        features=features or (run_config.features if run_config is not None else "tokens"),
        epsilon=epsilon, template=template, max_prompt_length=max_prompt_length,
        max_length=max_length or (run_config.max_length if run_config is not None else 512),
        batch_size=batch_size, runtime=runtime, trust_remote_code=trust_remote_code,
        student_spec=run_config.student if run_config is not None else None,
        flexkd_selections=read_selections(located.run_dir),
        teacher_blocks=(located.record or {}).get("teacher_blocks"),
    )  # fmt: skip


def instruct_geometry(
    model: str, teacher: str, data: str, *, split: str = "dev", limit: int | None = None,
    layers: str | None = None, features: str | None = None, epsilon: float = 0.1, batch_size: int = 16,
    device: str = "auto", trust_remote_code: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The geometry report of a causal-LM model (a run, its final/, an export or a model folder)
    against its teacher on the first `limit` examples of an instruction split (prompt + reference
    response), without generating: what `geokd study` reports for each row's median run."""
    from geokd.models.decoder import load_causal_lm
    from geokd.runtime import resolve_runtime
    from geokd.tasks import instruct

    if limit is not None and limit < 1:
        raise GeokdError(f"--limit: must be at least 1, got {limit}")
    located, run_config, template, max_prompt_length = _locate(model, None, None)
    examples = instruct.load_instruct_split(data, split)
    if limit is not None:
        examples = dataclasses.replace(examples, examples=examples.examples[:limit])
    runtime = resolve_runtime(device)
    loaded = load_causal_lm(located.load, trust_remote_code=trust_remote_code)
    report = _run_geometry(loaded, located, run_config, teacher, examples, layers=layers, features=features,
                           epsilon=epsilon, template=template, max_prompt_length=max_prompt_length,
                           max_length=None, batch_size=batch_size, runtime=runtime,
                           trust_remote_code=trust_remote_code)  # fmt: skip
    return {"split": examples.split + (f"-first{limit}" if limit is not None else ""), "n_examples": len(examples.examples),
            "geometry": report}  # fmt: skip


def _decoder_rows(
    loaded: Any, split: Any, layers: list[int], *, features: str, template: str, max_prompt_length: int,
    max_length: int, batch_size: int, runtime: Any,
) -> dict[int, list[Any]]:  # fmt: skip
    """{example id: [rows of each layer in `layers`]}: the prompt + reference response read through
    the model's own tokenizer; response-token rows, their mean, or the last prompt token."""
    import torch

    from geokd.models.decoder import decoder_features
    from geokd.tasks import instruct

    tokenized, _ = instruct.tokenize_instruct(split, loaded.tokenizer, template=template,
                                              max_prompt_length=max_prompt_length, max_length=max_length)  # fmt: skip
    collate = instruct.make_instruct_collate(loaded.tokenizer)
    model = loaded.model.to(runtime.device).eval()
    rows: dict[int, list[Any]] = {}
    with torch.inference_mode():
        for first in range(0, len(tokenized), batch_size):
            chunk = tokenized[first : first + batch_size]
            batch = {k: v.to(runtime.device) for k, v in collate(chunk).items()}
            with runtime.autocast():
                out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_hidden_states=True)  # fmt: skip
            response = batch["labels"] != -100
            per_layer = decoder_features(out.hidden_states, response, layers, features,
                                         attention_mask=batch["attention_mask"])  # fmt: skip
            counts = response.sum(dim=1).tolist() if features == "tokens" else [1] * len(chunk)
            start = 0
            for feature, count in zip(chunk, counts, strict=True):
                rows[feature["example_id"]] = [r[start : start + count].float().cpu() for r in per_layer]
                start += count
    return rows


def decoder_geometry_report(
    student: Any, teacher_name: str, split: Any, *, layers: str, features: str, epsilon: float,
    template: str, max_prompt_length: int, max_length: int, batch_size: int, runtime: Any,
    trust_remote_code: bool = False, student_spec: str | None = None, flexkd_selections: dict | None = None,
    teacher_blocks: list[int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The geometry of a causal-LM student against a causal-LM teacher on instruction data, per
    mapped layer pair, in the same form as the encoder report (`geokd.evaluate.geometry_report`):
    `tokens` rows (one per response token; the models must share the tokenizer), `mean` (one row
    per example: the mean over its response tokens) or `last` (the last prompt token). Only examples
    both models keep (prompt within `max_prompt_length` in each tokenizer) are compared."""
    import torch

    from geokd.evaluate import (
        constant_rows,
        flexkd_entry,
        geometry_distances,
        preserved_pairs,
        undefined_note,
    )
    from geokd.models import parse_layer_map
    from geokd.models.decoder import check_same_tokenizer, load_causal_lm

    teacher = load_causal_lm(teacher_name, trust_remote_code=trust_remote_code)
    if features == "tokens":
        check_same_tokenizer(teacher, student)
    from geokd.models.students import copied_blocks

    copied_from = (getattr(student, "teacher_blocks", None) or (tuple(teacher_blocks) if teacher_blocks else None)
                   or copied_blocks(student_spec, teacher.num_layers))  # fmt: skip
    pairs = parse_layer_map(layers, student.num_layers, teacher.num_layers, copied_from)
    common = dict(features=features, template=template, max_prompt_length=max_prompt_length,
                  max_length=max_length, batch_size=batch_size, runtime=runtime)  # fmt: skip
    s_rows = _decoder_rows(student, split, sorted({s for s, _ in pairs}), **common)
    t_rows = _decoder_rows(teacher, split, sorted({t for _, t in pairs}), **common)
    s_index = {layer: i for i, layer in enumerate(sorted({s for s, _ in pairs}))}
    t_index = {layer: i for i, layer in enumerate(sorted({t for _, t in pairs}))}
    shared = [i for i in sorted(s_rows) if i in t_rows]
    if not shared:
        raise GeokdError("--geometry: no example is kept by both models (prompts over --max-prompt-length)")
    entries = []
    for s_layer, t_layer in pairs:
        s = torch.cat([s_rows[i][s_index[s_layer]] for i in shared])
        t = torch.cat([t_rows[i][t_index[t_layer]] for i in shared])
        if s.shape[0] != t.shape[0]:
            raise GeokdError(
                f"--geometry: {s.shape[0]} student rows but {t.shape[0]} teacher rows at {s_layer}:{t_layer}; "
                "token rows need the same tokenizer: use --features mean or last"
            )
        counts = preserved_pairs(s, t, epsilon)
        entries.append({
            "student_layer": s_layer, "teacher_layer": t_layer, **geometry_distances(s, t),
            "undefined": undefined_note(constant_rows(s), constant_rows(t)), **counts,
            "preserved_fraction": counts["preserved_pairs"] / counts["teacher_pairs"] if counts["teacher_pairs"] else None,
            **flexkd_entry(flexkd_selections, s_layer, t_layer, s, t),
        })  # fmt: skip
    return {
        "teacher": teacher.source.to_dict(),
        "split": split.split,
        "n_examples": len(shared),
        "n_rows": int(sum(s_rows[i][0].shape[0] for i in shared)),
        "features": features,
        "layers": layers,
        "epsilon": epsilon,
        "layer_pairs": entries,
        "grid": None,
    }
