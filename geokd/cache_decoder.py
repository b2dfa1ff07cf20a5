"""`geokd cache --task instruct`: a causal-LM teacher's outputs on instruction data, stored once for
any number of `distill --cache` runs (issue #12).

Stored per **response token** (the positions whose next token carries a label, EOS included:
exactly the rows the live token-KD term uses; prompt tokens are never stored):

* `topk_ids [t, k]`: the teacher's k most probable next tokens, in decreasing order, in the
  narrowest integer type that holds the vocabulary (int16 below 32,768 ids, uint16 below 65,536,
  else int32);
* `topk_logprobs [t, k]`: their log-probabilities under `softmax(z/τ)` (τ = `--temperature`);
* `log_tail [t]`: the log of the probability mass outside the top k (`geokd.losses.topk_kd`);
* `layer.L`: hidden states of the requested teacher layers, as the live feature losses read them:
  `tokens` (one row per response token, `[t, d]`), `mean` or `last` (one row per example).

Values and hidden states are in `--dtype` (bf16 by default). Per shard also `example_id [n]`
(int64) and `offsets [n + 1]` (int64; example i's token rows are `offsets[i]:offsets[i+1]`).
Shards hold `--shard-size` kept examples each (examples whose prompt is too long are dropped and
counted, as in training), in the order of the data file.

The manifest (`manifest.json`, format `geokd-decoder-cache`) records the teacher (path, SHA-256 of
its weights), the tokenizer hash, the data fingerprint, template, lengths, k, τ, dtype, layers,
features, the shared vocabulary, counts, bytes, and each finished shard's SHA-256. It is rewritten
after every shard, so an interrupted build resumes from the last complete shard; the total size is
computed before anything is written and the build is refused in one line when the disk cannot
hold it. Readers verify each shard's SHA-256 on first use (`DecoderCache`), `verify_decoder_cache`
checks every shard, and `check_decoder_cache_matches` refuses a cache that disagrees with a run.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import geokd
from geokd import distributed
from geokd.artifacts import LOCK_NAME, DirectoryLock, human_bytes
from geokd.cache import (
    DTYPES,
    MANIFEST,
    _write_manifest,
    all_shard_entries,
    check_cached_teacher,
    file_sha256,
    kept_shards,
    load_manifest_json,
    open_shard,
    own_shards,
    shard_name,
    shared_kept_count,
    tokenizer_sha256,
)
from geokd.errors import GeokdError

FORMAT = "geokd-decoder-cache"
FORMAT_VERSION = 1
SAFETENSORS_HEADER_SLACK = 1024  # bytes per shard for the JSON header (names, shapes, offsets)
_IDENTITY_KEYS = ("format", "format_version", "teacher", "tokenizer_sha256", "data", "split", "template",
                  "max_prompt_length", "max_length", "layers", "features", "dtype", "topk", "temperature",
                  "shard_size", "n_examples")  # fmt: skip


def id_dtype(vocab: int) -> torch.dtype:
    """The narrowest integer type holding token ids 0..vocab-1."""
    if vocab <= 2**15:
        return torch.int16
    if vocab <= 2**16:
        return torch.uint16
    return torch.int32


@dataclass(frozen=True)
class DecoderCacheRequest:
    teacher: str
    data: str
    out: str
    split: str = "train"
    layers: str = ""
    features: str = "tokens"
    dtype: str = "bf16"
    topk: int = 64
    temperature: float = 1.0
    template: str = "alpaca"
    format: str = "auto"
    max_prompt_length: int = 256
    max_length: int = 512
    batch_size: int = 8
    shard_size: int = 4096
    device: str = "auto"
    trust_remote_code: bool = False
    # Flex-KD scores of the cached layers (geokd.flexkd.score_into_cache): None = none; N examples
    # (0 = all), the task output whose gradient scores, the seed of the subset
    flexkd_samples: int | None = None
    flexkd_output: str = "prediction"
    flexkd_seed: int = 42

    def validate(self) -> None:
        from geokd.models.decoder import DECODER_FEATURES

        problems = []
        if self.features not in DECODER_FEATURES:
            problems.append(f"--features must be one of {', '.join(DECODER_FEATURES)} for --task instruct, got {self.features!r}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("topk", "max_prompt_length", "max_length", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0, got {self.temperature}")
        from geokd.cache import flexkd_problems

        problems += flexkd_problems(self.flexkd_samples, self.flexkd_output, bool(self.layers.strip()))
        if problems:
            raise GeokdError("; ".join(problems))


def decoder_cache_bytes(tokens: int, examples: int, *, topk: int, vocab: int, dtype: str, layers: int, hidden: int,
                        features: str, shards: int, token_ends: bool = False) -> dict[str, int]:  # fmt: skip
    """`{"minimum": ..., "expected": ...}`: the bytes the stored fields need (top-k ids and values
    and the tail per response token, plus the hidden rows), and that plus the bookkeeping (example
    ids, offsets, one safetensors header per shard, an upper bound)."""
    value = DTYPES[dtype].itemsize
    per_token = topk * (id_dtype(vocab).itemsize + value) + value
    rows = tokens if features == "tokens" else examples
    minimum = tokens * per_token + rows * layers * hidden * value + (tokens * 4 if token_ends else 0)
    bookkeeping = examples * 8 + (examples + shards) * 8 + shards * SAFETENSORS_HEADER_SLACK
    return {"minimum": minimum, "expected": minimum + bookkeeping, "per_token_minimum": per_token}


def read_decoder_manifest(path: str | Path) -> dict[str, Any]:
    file, manifest = load_manifest_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GeokdError(
            f"--cache: {str(file)!r} is not a decoder cache (format {manifest.get('format') if isinstance(manifest, dict) else None!r}); "
            "build one with geokd cache --task instruct"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GeokdError(
            f"--cache: decoder-cache format version {manifest.get('format_version')!r} in {str(file)!r}, this geokd reads "
            f"{FORMAT_VERSION}; rebuild the cache with this geokd"
        )
    return manifest


def is_decoder_cache(path: str | Path) -> bool:
    file = Path(path) / MANIFEST
    try:
        return json.loads(file.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def build_decoder_cache(
    request: DecoderCacheRequest,
    on_plan: Callable[[dict[str, Any]], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    disk_usage: Callable[[str], Any] = shutil.disk_usage,
) -> dict[str, Any]:
    """Write (or resume) the decoder cache of `request`; returns the final manifest."""
    from geokd.cache import parse_cache_layers
    from geokd.evaluate import _quiet_transformers, length_sorted_batches
    from geokd.losses.topk_kd import topk_targets
    from geokd.models import decoder as decoder_lib
    from geokd.runtime import resolve_runtime
    from geokd.tasks import instruct
    from geokd.workloads.decoder import _base_forward, response_positions

    request.validate()
    _quiet_transformers()
    out = Path(request.out)
    if out.exists() and not out.is_dir():
        raise GeokdError(f"--out: {str(out)!r} is a file; give a directory for the cache")
    split = instruct.load_instruct_split(request.data, request.split, format=request.format)
    teacher = decoder_lib.load_causal_lm(request.teacher, trust_remote_code=request.trust_remote_code)
    positions = getattr(teacher.config, "max_position_embeddings", None)
    if isinstance(positions, int) and request.max_length > positions:
        raise GeokdError(f"--max-length: {request.max_length} exceeds the teacher's {positions} positions; pass --max-length {positions} or less")
    layers = parse_cache_layers(request.layers, teacher.num_layers) if request.layers.strip() else ()
    features, stats = instruct.tokenize_instruct(split, teacher.tokenizer, template=request.template,
                                                 max_prompt_length=request.max_prompt_length,
                                                 max_length=request.max_length)  # fmt: skip
    vocab = max(teacher.tokenizer.get_vocab().values()) + 1
    if request.topk > vocab:
        raise GeokdError(f"--topk: {request.topk} exceeds the vocabulary of {vocab} tokens; choose at most {vocab}")
    counts = [sum(1 for label in f["labels"][1:] if label != -100) for f in features]
    # Token rows of a fast tokenizer also keep each response token's end offset in the response
    # text, so a student with another tokenizer can pool them into shared spans (--features spans).
    keep_ends = bool(layers) and request.features == "tokens" and bool(getattr(teacher.tokenizer, "is_fast", False))
    ends_by_example: dict[int, list[int]] = {}
    if keep_ends:
        from geokd.models.spans import response_token_ends

        texts = {e.example_id: e.response for e in split.examples}
        for f, n in zip(features, counts, strict=True):
            text = texts[f["example_id"]]
            ids = teacher.tokenizer(text, add_special_tokens=False)["input_ids"]
            ends_by_example[f["example_id"]] = response_token_ends(text, teacher.tokenizer, ids)[:n]
    hidden = int(teacher.config.hidden_size)
    n_shards = max(1, -(-len(features) // request.shard_size))
    size = decoder_cache_bytes(sum(counts), len(features), topk=request.topk, vocab=vocab, dtype=request.dtype,
                               layers=len(layers), hidden=hidden, features=request.features, shards=n_shards,
                               token_ends=keep_ends)  # fmt: skip
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "geokd_version": geokd.__version__,
        "teacher": teacher.source.to_dict(),
        "teacher_layers": teacher.num_layers,
        "hidden_size": hidden,
        "vocab": vocab,
        "tokenizer_sha256": tokenizer_sha256(teacher.tokenizer),
        "task": "instruct",
        "data": {"source": split.source, "fingerprint": split.fingerprint, "format": split.format},
        "split": request.split,
        "template": request.template,
        "max_prompt_length": request.max_prompt_length,
        "max_length": request.max_length,
        "layers": list(layers),
        "features": request.features,
        "dtype": request.dtype,
        "id_dtype": str(id_dtype(vocab)).removeprefix("torch."),
        "topk": request.topk,
        "temperature": request.temperature,
        "shard_size": request.shard_size,
        "n_examples": len(features),
        "n_tokens": sum(counts),
        "data_stats": stats,
        "token_ends": keep_ends,
        "bytes_minimum": size["minimum"],
        "bytes_per_token_minimum": size["per_token_minimum"],
    }
    runtime = resolve_runtime(request.device)
    distributed.init(runtime.device)  # torchrun: the ranks split the shards (geokd.cache.own_shards)
    world, rank = distributed.world_size(), distributed.rank()
    created = not out.exists()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "--out") if rank == 0 else contextlib.nullcontext():
        try:
            shards = kept_shards(out, header, _IDENTITY_KEYS, read_decoder_manifest) if rank == 0 else []
            done_bytes = sum((out / e["file"]).stat().st_size for e in shards)
            # (under torchrun rank 0 may not have created --out yet when another rank gets here)
            probe = out if out.exists() else next(p for p in out.resolve().parents if p.exists())
            free = disk_usage(str(probe)).free
            plan = {"examples": len(features), "tokens": sum(counts), "expected_bytes": size["expected"],
                    "minimum_bytes": size["minimum"], "free_bytes": free, "shards": n_shards,
                    "shards_kept": len(shards), "layers": list(layers), "warnings": list(teacher.warnings),
                    "data_stats": stats}  # fmt: skip
            if on_plan is not None and rank == 0:
                on_plan(plan)
            if size["expected"] - done_bytes > free:
                raise GeokdError(
                    f"--out: the cache needs about {human_bytes(size['expected'] - done_bytes)} more but {str(out)!r} has "
                    f"{human_bytes(free)} free; free space, choose another --out, or lower --topk, cache fewer --layers, "
                    "pooled --features or --dtype bf16"
                )
            kept_count = shared_kept_count(shards, runtime.device)
            out.mkdir(parents=True, exist_ok=True)
            model = teacher.model.to(runtime.device).eval()
            head = decoder_lib.output_head(model)
            collate = instruct.make_instruct_collate(teacher.tokenizer)
            dtype, ids_dtype = DTYPES[request.dtype], id_dtype(vocab)
            started = time.perf_counter()
            for index in own_shards(kept_count, n_shards):
                first, last = index * request.shard_size, min(len(features), (index + 1) * request.shard_size)
                local = features[first:last]
                local_counts = torch.tensor(counts[first:last], dtype=torch.long)
                offsets = torch.cat([torch.zeros(1, dtype=torch.long), local_counts.cumsum(0)])
                n_tokens = int(offsets[-1])
                top_ids = torch.empty(n_tokens, request.topk, dtype=torch.int32)  # narrowed when written
                top_values = torch.empty(n_tokens, request.topk, dtype=dtype)
                tail = torch.empty(n_tokens, dtype=dtype)
                n_rows = n_tokens if request.features == "tokens" else len(local)
                buffers = {layer: torch.empty(n_rows, hidden, dtype=dtype) for layer in layers}
                lengths = [len(f["input_ids"]) for f in local]
                with torch.inference_mode():
                    for batch_indices in length_sorted_batches(lengths, request.batch_size):
                        batch = collate([local[i] for i in batch_indices])
                        batch = {k: v.to(runtime.device) for k, v in batch.items()}
                        mask, _ = response_positions(batch["labels"])
                        with runtime.autocast():
                            output = _base_forward(model, batch, bool(layers))
                        final = output.last_hidden_state[:, :-1][mask].float()
                        where = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in batch_indices])
                        logits = _head_logits(final, head, vocab)
                        ids, values, log_tail = topk_targets(logits, request.topk, temperature=request.temperature)
                        top_ids[where] = ids.to("cpu", torch.int32)
                        top_values[where] = values.to("cpu", dtype)
                        tail[where] = log_tail.to("cpu", dtype)
                        if layers:
                            rows = decoder_lib.decoder_features(output.hidden_states, batch["labels"] != -100,
                                                                list(layers), request.features)  # fmt: skip
                            row_where = where if request.features == "tokens" else torch.as_tensor(batch_indices)
                            for layer, row in zip(layers, rows, strict=True):
                                buffers[layer][row_where] = row.to("cpu", dtype)
                        if on_batch is not None:
                            on_batch(len(batch_indices))
                tensors = {
                    "example_id": torch.tensor([f["example_id"] for f in local], dtype=torch.long),
                    "offsets": offsets,
                    "topk_ids": top_ids.to(ids_dtype),  # (uint16 has no index_put: filled as int32)
                    **({"token_ends": torch.tensor([e for f in local for e in ends_by_example[f["example_id"]]],
                                                   dtype=torch.int32)} if keep_ends else {}),  # fmt: skip
                    "topk_logprobs": top_values,
                    "log_tail": tail,
                    **{f"layer.{layer}": buffers[layer] for layer in layers},
                }
                shards.append(_write_decoder_shard(out, index, tensors, first, last, n_tokens))
                if world == 1:  # resumable after every shard (under torchrun only the final manifest)
                    _write_manifest(out, {**header, "complete": False, "shards": shards})
            if world > 1:
                def entry(index: int) -> dict[str, Any]:
                    first, last = index * request.shard_size, min(len(features), (index + 1) * request.shard_size)
                    return _decoder_shard_entry(out / shard_name(index), first, last, sum(counts[first:last]))

                gathered = all_shard_entries(shards, kept_count, n_shards, entry)
                if gathered is None:  # not rank 0: its shards are written
                    return {**header, "complete": True}
                shards = gathered
            manifest = {**header, "complete": True, "shards": shards, "seconds": time.perf_counter() - started,
                        "bytes": sum(e["bytes"] for e in shards)}  # fmt: skip
            if request.flexkd_samples is not None:
                from geokd import flexkd as flexkd_lib

                forward = flexkd_lib.decoder_forward(model, head, vocab, request.flexkd_output, runtime.autocast)
                manifest["flexkd"] = flexkd_lib.score_into_cache(
                    out, model, forward, features, collate, layers, samples=request.flexkd_samples,
                    output=request.flexkd_output, seed=request.flexkd_seed, batch_size=request.batch_size,
                    device=runtime.device,
                )  # fmt: skip
            _write_manifest(out, manifest)
            return manifest
        except BaseException:
            if created and not any(p.name != LOCK_NAME for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)
            raise


def _head_logits(hidden: torch.Tensor, head: torch.nn.Linear, vocab: int) -> torch.Tensor:
    """`head(hidden)[:, :vocab]` in float32, as the live KD term computes the teacher's logits."""
    weight = head.weight[:vocab].float()
    bias = None if head.bias is None else head.bias[:vocab].float()
    out = hidden @ weight.T
    return out if bias is None else out + bias


def _write_decoder_shard(out: Path, index: int, tensors: dict[str, torch.Tensor], first: int, last: int,
                         n_tokens: int) -> dict[str, Any]:  # fmt: skip
    from safetensors.torch import save_file

    from geokd.artifacts import atomic_path, disk_full_as_error

    target = out / shard_name(index)
    with disk_full_as_error(target, "a cache shard"), atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    return _decoder_shard_entry(target, first, last, n_tokens)


def _decoder_shard_entry(path: Path, first: int, last: int, n_tokens: int) -> dict[str, Any]:
    return {"file": path.name, "first_example": first, "n_examples": last - first, "n_rows": n_tokens,
            "bytes": path.stat().st_size, "sha256": file_sha256(path)}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class CachedTargets:
    """What a batch reads from a decoder cache: top-k targets for its response tokens (batch order,
    example after example) and one tensor per requested layer (token rows or one row per example)."""

    ids: torch.Tensor  # [N, k] int64
    log_probs: torch.Tensor  # [N, k] float32
    log_tail: torch.Tensor  # [N] float32
    rows: list[torch.Tensor]
    counts: list[int]  # response tokens per example, in batch order (they sum to N)


class DecoderCache:
    """Read access to a finished decoder cache, by example id, with each shard's SHA-256 checked
    the first time it is opened."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_decoder_manifest(self.path)
        if not self.manifest.get("complete"):
            raise GeokdError(
                f"--cache: {str(self.path)!r} is incomplete ({len(self.manifest.get('shards', []))} shard(s) written); "
                "finish it by running the same geokd cache command again"
            )
        self.layers = tuple(self.manifest["layers"])
        self.features = self.manifest["features"]
        self._handles: dict[int, Any] = {}
        self._where: dict[int, tuple[int, int]] = {}
        self._offsets: dict[int, torch.Tensor] = {}
        for index in range(len(self.manifest["shards"])):
            handle = self._shard(index)
            for local, example in enumerate(handle.get_tensor("example_id").tolist()):
                self._where[int(example)] = (index, local)

    @property
    def example_ids(self) -> set[int]:
        """The ids of the examples the cache holds (those the teacher's tokenisation kept)."""
        return set(self._where)

    def _shard(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = open_shard(self.path, self.manifest["shards"][index])
            self._handles[index] = handle
            self._offsets[index] = handle.get_tensor("offsets")
        return handle

    def token_ends(self, example: int) -> list[int]:
        """The end offsets (in the response text) of an example's cached response tokens (caches
        of token rows written with a fast tokenizer; `manifest["token_ends"]`)."""
        if not self.manifest.get("token_ends"):
            raise GeokdError(
                "--cache: this cache has no token offsets (it was written without token rows or with a slow tokenizer); "
                "rebuild it with --features tokens and --layers for --features spans"
            )
        index, local = self._where[example]
        offsets = self._offsets[index]
        return self._shard(index).get_slice("token_ends")[int(offsets[local]) : int(offsets[local + 1])].tolist()

    def lookup(self, example_ids: torch.Tensor | Sequence[int], layers: Sequence[int] = ()) -> CachedTargets:
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise GeokdError(
                f"--cache: teacher layer {missing[0]} is not in the cache (it holds {list(self.layers)}); rebuild it with "
                "--layers covering the teacher layers of the layer map"
            )
        ids = [int(i) for i in (example_ids.tolist() if isinstance(example_ids, torch.Tensor) else example_ids)]
        counts: list[int] = []
        parts: dict[str, list[torch.Tensor]] = {"topk_ids": [], "topk_logprobs": [], "log_tail": []}
        rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in dict.fromkeys(layers)}
        for example in ids:
            if example not in self._where:
                raise GeokdError(
                    f"--cache: example {example} is not in the cache; the data or its --max-prompt-length does not match it"
                )
            index, local = self._where[example]
            handle, offsets = self._shard(index), self._offsets[index]
            start, stop = int(offsets[local]), int(offsets[local + 1])
            counts.append(stop - start)
            for name in parts:
                parts[name].append(handle.get_slice(name)[start:stop])
            for layer in rows:
                window = (start, stop) if self.features == "tokens" else (local, local + 1)
                rows[layer].append(handle.get_slice(f"layer.{layer}")[window[0] : window[1]])
        joined = {layer: torch.cat(chunks).float() for layer, chunks in rows.items()}
        return CachedTargets(
            ids=torch.cat(parts["topk_ids"]).long(),
            log_probs=torch.cat(parts["topk_logprobs"]).float(),
            log_tail=torch.cat(parts["log_tail"]).float(),
            rows=[joined[layer] for layer in layers],
            counts=counts,
        )


def verify_decoder_cache(path: str | Path) -> dict[str, Any]:
    """Every shard against the manifest: present, SHA-256, tensor names, example count, token rows."""
    from safetensors import safe_open

    folder = Path(path)
    manifest = read_decoder_manifest(folder)
    problems = []
    if not manifest.get("complete"):
        problems.append(f"incomplete: {len(manifest.get('shards', []))} shard(s) written; rerun geokd cache")
    report = []
    for entry in manifest.get("shards", []):
        file = folder / entry["file"]
        status = "ok"
        if not file.is_file():
            status = "missing"
        elif file_sha256(file) != entry["sha256"]:
            status = "SHA-256 mismatch"
        else:
            with safe_open(str(file), framework="pt") as handle:
                wanted = {"example_id", "offsets", "topk_ids", "topk_logprobs", "log_tail"}
                wanted |= {f"layer.{layer}" for layer in manifest["layers"]}
                wanted |= {"token_ends"} if manifest.get("token_ends") else set()
                names = set(handle.keys())
                if wanted - names:
                    status = f"lacks {', '.join(sorted(wanted - names))}"
                else:
                    offsets = handle.get_tensor("offsets")
                    n_ids = handle.get_slice("example_id").get_shape()[0]
                    top = handle.get_slice("topk_ids").get_shape()
                    if n_ids != entry["n_examples"] or int(offsets[-1]) != entry["n_rows"] or top != [entry["n_rows"], manifest["topk"]]:
                        status = "row counts disagree with the manifest"
        if status != "ok":
            problems.append(f"{entry['file']}: {status}")
        report.append({**entry, "status": status})
    from geokd.cache import verify_flexkd

    problems += verify_flexkd(folder, manifest)
    return {"ok": not problems, "path": str(folder), "shards": report, "problems": problems}


def check_decoder_cache_matches(
    manifest: dict[str, Any], *, data_fingerprint: str, template: str, max_prompt_length: int, max_length: int,
    features: str, teacher_layers: Sequence[int], temperature: float, tokenizer_hash: str | None,
    teacher_sha256: str | None = None, teacher_name: str | None = None,
) -> None:  # fmt: skip
    """Refuse a decoder cache that disagrees with a run; the message names the field and the fix."""

    def refuse(field: str, cached: Any, run: Any, fix: str) -> GeokdError:
        return GeokdError(f"--cache: {field} differs: the cache has {cached!r}, this run {run!r}; {fix}")

    rebuild = "rebuild the cache for this run (geokd cache --task instruct) or pass the matching option"
    if manifest["split"] != "train":
        raise refuse("split", manifest["split"], "train", "distillation reads the train split: cache --split train")
    if manifest["data"]["fingerprint"] != data_fingerprint:
        raise refuse("data", manifest["data"]["fingerprint"], data_fingerprint,
                     "the training data changed since the cache was written; " + rebuild)  # fmt: skip
    for field, run, option in (("template", template, "--template"), ("max_prompt_length", max_prompt_length,
                               "--max-prompt-length"), ("max_length", max_length, "--max-length"),
                               ("temperature", temperature, "--temperature")):  # fmt: skip
        if manifest[field] != run:
            raise refuse(field, manifest[field], run, f"pass {option} {manifest[field]}")
    if teacher_layers and features == "spans":  # spans pool the cached token rows by their offsets
        if manifest["features"] != "tokens" or not manifest.get("token_ends"):
            raise refuse("features", manifest["features"], "spans",
                         "--features spans pools cached token rows: rebuild the cache with --features tokens")  # fmt: skip
    elif teacher_layers and manifest["features"] != features:
        raise refuse("features", manifest["features"], features, f"pass --features {manifest['features']}")
    missing = [layer for layer in teacher_layers if layer not in manifest["layers"]]
    if missing:
        raise refuse("layers", manifest["layers"], list(teacher_layers),
                     f"teacher layer {missing[0]} is not cached; cache it or choose --layers within the cache")  # fmt: skip
    if tokenizer_hash is not None and manifest["tokenizer_sha256"] != tokenizer_hash:  # None: cross-tokenizer rows
        raise refuse("tokenizer", manifest["tokenizer_sha256"][:12], tokenizer_hash[:12],
                     "the student must tokenise like the teacher the cache was written with")  # fmt: skip
    check_cached_teacher(manifest, teacher_sha256, teacher_name)
