"""`geokd cache`: run the teacher once, store exactly what the losses need, and let any number of
student runs read it (issue #5).

Layout of a cache directory:

    CACHE/manifest.json          what the cache holds and where it came from (below)
    CACHE/shard-00000.safetensors
    CACHE/shard-00001.safetensors ...

Shard k holds the examples with ids `[k·S, (k+1)·S)` (S = `shard_size`, example id = the row's
position in its split, `geokd.data.Example.example_id`), in id order:

* `example_id [n_k]` int64;
* `logits [n_k, C]` float32 (unless `--no-logits`);
* pooled rows (`cls`, `mean`): `layer.L [n_k, d]` in the cache dtype, one row per example;
* token rows (`tokens`): `layer.L [t_k, d]`, only the non-padding tokens of the shard's examples,
  example after example, and `offsets [n_k + 1]` int64: example i's rows are
  `offsets[i]:offsets[i+1]` (ragged, never a padded `[N, T, d]`).

`manifest.json` records the format version, the geokd version, the teacher (path or id, revision
and commit, SHA-256 of its weights), a hash of its tokenizer, task, data source and fingerprint,
split, max length, layers (Hugging Face `hidden_states` indexing), pooling, dtype, whether logits
are stored, the teacher's depth and width, the number of examples and tokens, and one entry per
finished shard with its example range, row count and SHA-256. It is rewritten (atomically) after
every shard, so an interrupted `geokd cache` resumes from the last complete shard; `complete` is
true once every shard is written. A full disk while writing a shard or the manifest is one line
with the path and the free space: the temporary is removed and the shards and manifest written
before stay valid, so the same command resumes once there is room. Temporaries left by a killed
or failed run (`.shard-*.tmp*`, `.manifest.json.*.tmp*`) are removed by the next run.

The teacher's logits are in the task's label order: `load_teacher` matches the teacher's label
names to the task's and reorders its head (see geokd.models, "Teacher labels"); `build_cache`
hands its warnings (generic `LABEL_i` names) to `on_plan` as `plan["warnings"]`.

Reading (`TeacherCache`) memory-maps the shards (`safetensors.safe_open`) and reads one example's
rows at a time, in any order; each shard's SHA-256 is checked the first time it is opened.
`check_cache_matches` refuses a cache that disagrees with a run, naming the field and the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from geokd.artifacts import LOCK_NAME, DirectoryLock, atomic_path, disk_full_as_error, human_bytes, write_json
from geokd.errors import GeokdError
from geokd.models import FEATURES

FORMAT = "geokd-teacher-cache"
# 2: logits are in the task's label order (teachers are re-indexed by label name, issue #10);
# a version-1 cache of a teacher whose head was ordered differently holds permuted logits.
FORMAT_VERSION = 2
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MANIFEST = "manifest.json"
# Manifest keys that define what a cache holds: a resumed `geokd cache` must agree on all of them.
_IDENTITY_KEYS = (
    "format",
    "format_version",
    "teacher",
    "tokenizer_sha256",
    "task",
    "data",
    "split",
    "max_length",
    "layers",
    "features",
    "dtype",
    "logits",
    "shard_size",
    "n_examples",
)


@dataclass(frozen=True)
class CacheRequest:
    """What `geokd cache` is asked to write."""

    teacher: str
    task: str
    out: str
    data: str | None = None
    split: str = "train"
    layers: str = "all"
    features: str = "cls"
    dtype: str = "bf16"
    logits: bool = True
    max_length: int = 128
    batch_size: int = 64
    shard_size: int = 4096
    text_fields: str | None = None
    label_field: str | None = None
    device: str = "auto"
    trust_remote_code: bool = False
    # Flex-KD scores of the cached layers (geokd.flexkd.score_into_cache): None = none; N examples
    # (0 = all), the task output whose gradient scores, the seed of the subset
    flexkd_samples: int | None = None
    flexkd_output: str = "prediction"
    flexkd_seed: int = 42

    def validate(self) -> None:
        problems = []
        if self.features not in FEATURES:
            problems.append(f"--features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_length", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        problems += flexkd_problems(self.flexkd_samples, self.flexkd_output, self.layers.strip() not in ("", "none"))
        if self.flexkd_samples is not None and not self.logits:
            problems.append("--flexkd-samples scores the teacher's classifier output: drop --no-logits")
        if problems:
            raise GeokdError("; ".join(problems))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def flexkd_problems(samples: int | None, output: str, has_layers: bool) -> list[str]:
    """What is wrong with a cache request's Flex-KD options (both cache kinds)."""
    problems = []
    if samples is not None and samples < 0:
        problems.append(f"--flexkd-samples must be >= 0 (0: every example), got {samples}")
    from geokd.config import FLEXKD_OUTPUTS

    if output not in FLEXKD_OUTPUTS:
        problems.append(f"--flexkd-output must be prediction or label, got {output!r}")
    if samples is not None and not has_layers:
        problems.append("--flexkd-samples scores the cached hidden states: pass --layers")
    return problems


def verify_flexkd(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """A cache's Flex-KD scores against its manifest (file present, SHA-256)."""
    entry = manifest.get("flexkd")
    if not entry:
        return []
    path = folder / entry["file"]
    if not path.is_file():
        return [f"{entry['file']}: missing"]
    return [] if file_sha256(path) == entry["sha256"] else [f"{entry['file']}: SHA-256 mismatch"]


def parse_cache_layers(text: str, num_layers: int) -> tuple[int, ...]:
    """`"2,4,6"` -> (2, 4, 6); `"all"` -> every block output 1..L. Hugging Face `hidden_states`
    indexing (0 = embeddings); sorted, without repeats."""
    if text.strip() == "all":
        return tuple(range(1, num_layers + 1))
    items = [item.strip() for item in text.split(",")]
    if not items or not all(item.isdigit() for item in items):
        raise GeokdError(
            f"--layers: expected 'all' or comma-separated layer indices such as 2,4,6, got {text!r}"
        )
    layers = sorted({int(item) for item in items})
    bad = [layer for layer in layers if layer > num_layers]
    if bad:
        raise GeokdError(
            f"--layers: layer {bad[0]} is out of range for a teacher with {num_layers} blocks; use 0..{num_layers} "
            "(0 = embeddings)"
        )
    return tuple(layers)


def tokenizer_sha256(tokenizer: Any) -> str:
    """A hash of what decides the token ids: the full tokenizer definition (vocabulary, normaliser,
    pre-tokeniser, post-processor, special tokens) of a fast tokenizer, or the vocabulary and special
    tokens of a slow one. The class name and the run-time truncation/padding state are left out, so
    BERT and DistilBERT tokenizers built from one vocabulary agree, before and after use."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        text = json.dumps(definition, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(text.encode())
    digest.update(json.dumps(sorted(tokenizer.all_special_tokens)).encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def expected_bytes(
    lengths: Sequence[int],
    n_layers: int,
    hidden: int,
    dtype: str,
    features: str,
    num_labels: int,
    logits: bool,
) -> int:
    """Bytes the cache's tensors will take (headers aside): rows × layers × d × dtype size, plus
    logits (float32), example ids and, for token rows, offsets."""
    rows = sum(lengths) if features == "tokens" else len(lengths)
    size = rows * n_layers * hidden * DTYPES[dtype].itemsize + len(lengths) * 8
    if logits:
        size += len(lengths) * num_labels * 4
    if features == "tokens":
        size += (len(lengths) + 1) * 8
    return size


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _identity(manifest: dict[str, Any], key: str) -> str:
    """The comparable form of a manifest field: the teacher by its weights hash (else its path or
    id), the data by its fingerprint, so the same cache may be resumed from another directory."""
    value = manifest.get(key)
    if key == "teacher" and isinstance(value, dict):
        value = value.get("weights_sha256") or value.get("path_or_id")
    elif key == "data" and isinstance(value, dict):
        value = value.get("fingerprint")
    return json.dumps(value, sort_keys=True)


def load_manifest_json(path: str | Path) -> tuple[Path, Any]:
    """`(file, parsed JSON)` of the manifest of the cache folder `path`; a missing folder or file,
    or unreadable JSON, is one GeokdError line (the format is the caller's to check)."""
    folder = Path(path)
    file = folder / MANIFEST
    if not folder.is_dir():
        raise GeokdError(f"--cache: {str(folder)!r} is not a directory; pass the folder geokd cache wrote")
    if not file.is_file():
        raise GeokdError(f"--cache: {str(folder)!r} has no {MANIFEST}; pass the folder geokd cache wrote")
    try:
        return file, json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GeokdError(f"--cache: {str(file)!r} is unreadable ({exc}); rebuild the cache") from None


def open_shard(folder: Path, entry: dict[str, Any]) -> Any:
    """A `safe_open` handle on the manifest entry's shard, after checking that it exists and
    matches its SHA-256 (one GeokdError line otherwise)."""
    from safetensors import safe_open

    path = folder / entry["file"]
    if not path.is_file():
        raise GeokdError(f"--cache: shard {entry['file']} is missing from {str(folder)!r}; rebuild the cache")
    if file_sha256(path) != entry["sha256"]:
        raise GeokdError(
            f"--cache: shard {entry['file']} fails its SHA-256 check (the file changed or is corrupt); "
            "rebuild the cache (or run geokd cache --verify to list every bad shard)"
        )
    return safe_open(str(path), framework="pt")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the cache at `path` (a directory), checked for format and version."""
    file, manifest = load_manifest_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GeokdError(f"--cache: {str(file)!r} is not a geokd teacher-cache manifest; rebuild the cache")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GeokdError(
            f"--cache: format version {manifest.get('format_version')!r} in {str(file)!r}, this geokd reads "
            f"{FORMAT_VERSION}; rebuild the cache with this geokd"
        )
    return manifest


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def build_cache(
    request: CacheRequest,
    on_plan: Callable[[dict[str, Any]], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    disk_usage: Callable[[str], Any] = shutil.disk_usage,
) -> dict[str, Any]:
    """Write (or resume) the cache described by `request`; returns the final manifest.

    `on_plan(info)` is told the plan before any shard is written: examples, tokens, expected
    bytes, free bytes, shards to write and shards kept from an earlier, interrupted run."""
    from geokd import data as data_lib
    from geokd import models as models_lib
    from geokd.evaluate import _quiet_transformers, check_max_length, length_sorted_batches
    from geokd.models import extract_features
    from geokd.runtime import resolve_runtime
    from geokd.tasks import get_task

    request.validate()
    _quiet_transformers()
    out = Path(request.out)
    if out.exists() and not out.is_dir():
        raise GeokdError(f"--out: {str(out)!r} is a file; give a directory for the cache")
    spec = get_task(request.task, text_fields=request.text_fields, label_field=request.label_field)
    if not spec.glue and request.split != "train":  # a custom task's labels come from its train split
        spec = data_lib.load_split(spec, request.data, "train").task
    split = data_lib.load_split(spec, request.data, request.split)
    spec = split.task
    loader = models_lib.load_teacher if request.logits else models_lib.load_model
    teacher = loader(
        request.teacher,
        num_labels=spec.num_labels if request.logits else None,
        id2label=(spec.id2label or None) if request.logits else None,
        trust_remote_code=request.trust_remote_code,
    )
    check_max_length(teacher, request.max_length)
    layers = parse_cache_layers(request.layers, teacher.num_layers)
    features = data_lib.tokenize_examples(split, teacher.tokenizer, request.max_length)
    lengths = [len(f["input_ids"]) for f in features]
    ids = [f["example_id"] for f in features]
    if ids != list(range(len(ids))):
        raise GeokdError("cache: example ids are not 0..n-1 in order; the split was filtered or reordered")
    hidden = int(teacher.config.hidden_size)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "geokd_version": geokd.__version__,
        "teacher": teacher.source.to_dict(),
        "teacher_layers": teacher.num_layers,
        "hidden_size": hidden,
        "num_labels": int(teacher.config.num_labels) if request.logits else None,
        "tokenizer_sha256": tokenizer_sha256(teacher.tokenizer),
        "task": spec.name,
        "label_names": list(spec.label_names),
        "data": {"source": split.source, "fingerprint": split.fingerprint},
        "split": split.split,
        "max_length": request.max_length,
        "layers": list(layers),
        "features": request.features,
        "dtype": request.dtype,
        "logits": request.logits,
        "shard_size": request.shard_size,
        "n_examples": len(features),
        "n_tokens": sum(lengths),
    }
    # Everything is checked: create --out if new and hold its lock while writing (one writer; under
    # torchrun rank 0 holds it for the job, and the ranks split the shards between them).
    runtime = resolve_runtime(request.device)
    distributed.init(runtime.device)
    world, rank = distributed.world_size(), distributed.rank()
    created = not out.exists()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "--out") if rank == 0 else contextlib.nullcontext():  # losing it never cleans up
        try:
            shards = kept_shards(out, header, _IDENTITY_KEYS, read_manifest) if rank == 0 else []
            n_shards = max(1, -(-len(features) // request.shard_size))
            total = expected_bytes(lengths, len(layers), hidden, request.dtype, request.features,
                                   int(teacher.config.num_labels), request.logits)  # fmt: skip
            done_bytes = sum((out / e["file"]).stat().st_size for e in shards)
            probe = out if out.exists() else next(p for p in out.resolve().parents if p.exists())
            free = disk_usage(str(probe)).free
            plan = {
                "examples": len(features),
                "tokens": sum(lengths),
                "expected_bytes": total,
                "free_bytes": free,
                "shards": n_shards,
                "shards_kept": len(shards),
                "layers": list(layers),
                "warnings": list(teacher.warnings),
            }
            if on_plan is not None and rank == 0:
                on_plan(plan)
            if total - done_bytes > free:
                raise GeokdError(
                    f"--out: the cache needs about {human_bytes(total - done_bytes)} more but {str(probe)!r} has {human_bytes(free)} "
                    "free; free space, choose another --out, or cache fewer --layers, pooled --features or --dtype bf16"
                )
            kept_count = shared_kept_count(shards, runtime.device)
            out.mkdir(parents=True, exist_ok=True)
            model = teacher.model.to(runtime.device).eval()
            collate = data_lib.make_collate_fn(teacher.tokenizer, spec)
            dtype = DTYPES[request.dtype]
            started = time.perf_counter()
            for index in own_shards(kept_count, n_shards):
                first, last = index * request.shard_size, min(len(features), (index + 1) * request.shard_size)
                local = features[first:last]
                counts = torch.tensor([len(f["input_ids"]) for f in local], dtype=torch.long)
                offsets = torch.cat(
                    [torch.zeros(1, dtype=torch.long), counts.cumsum(0)]
                )  # example i: offsets[i]:[i+1]
                tokens = request.features == "tokens"
                n_rows = int(offsets[-1]) if tokens else len(local)
                # Shard buffers in example order; each batch's rows are copied straight to their place.
                buffers = {layer: torch.empty(n_rows, hidden, dtype=dtype) for layer in layers}
                logits_buffer = torch.empty(len(local), int(teacher.config.num_labels))
                with torch.inference_mode():
                    for batch_indices in length_sorted_batches(counts.tolist(), request.batch_size):
                        batch = collate([local[i] for i in batch_indices])
                        inputs = {
                            k: v.to(runtime.device) for k, v in batch.items() if k not in ("labels", "example_id")
                        }
                        with runtime.autocast():
                            output = model(**inputs, output_hidden_states=True)
                        rows = extract_features(
                            output.hidden_states, inputs["attention_mask"], list(layers), request.features
                        )
                        # tokens: the batch's rows are example after example (right padding), so example i's
                        # rows go to offsets[i]:offsets[i+1]; pooled: row k goes to batch_indices[k].
                        where = (
                            torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in batch_indices])
                            if tokens
                            else torch.as_tensor(batch_indices)
                        )
                        for layer, row in zip(layers, rows, strict=True):
                            if row.shape[0] != where.shape[0]:
                                raise RuntimeError(
                                    f"cache: {row.shape[0]} rows for {where.shape[0]} places in layer {layer}"
                                )
                            buffers[layer][where] = row.to("cpu", dtype)
                        logits_buffer[torch.as_tensor(batch_indices)] = output.logits.float().cpu()
                        if on_batch is not None:
                            on_batch(len(batch_indices))
                tensors: dict[str, torch.Tensor] = {"example_id": torch.arange(first, last, dtype=torch.long)}
                if request.logits:
                    tensors["logits"] = logits_buffer
                for layer in layers:
                    tensors[f"layer.{layer}"] = buffers[layer]
                if tokens:
                    tensors["offsets"] = offsets
                shards.append(_write_shard(out, index, tensors, first, last))
                if world == 1:  # resumable after every shard (under torchrun only the final manifest)
                    _write_manifest(out, {**header, "complete": False, "shards": shards})
            if world > 1:
                def entry(index: int) -> dict[str, Any]:
                    first = index * request.shard_size
                    return _shard_entry(out / shard_name(index), first, min(len(features), first + request.shard_size))

                gathered = all_shard_entries(shards, kept_count, n_shards, entry)
                if gathered is None:  # not rank 0: its shards are written
                    return {**header, "complete": True}
                shards = gathered
            manifest = {**header, "complete": True, "shards": shards, "seconds": time.perf_counter() - started}
            if request.flexkd_samples is not None:
                from geokd import flexkd as flexkd_lib

                forward = flexkd_lib.encoder_forward(model, request.flexkd_output, runtime.autocast)
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


def kept_shards(out: Path, header: dict[str, Any], identity_keys: Sequence[str],
                read: Callable[[Path], dict[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
    """Prepare `out` for (re)writing a cache described by `header`: remove temporaries left by a
    killed run or a full disk, and return the finished, intact shards of an earlier run (a prefix,
    checked against their SHA-256). An earlier cache that differs in any `identity_keys` field, or
    a non-empty folder holding no cache, is one GeokdError line."""
    for pattern in (".shard-*.tmp*", f".{MANIFEST}.*.tmp*"):
        for stale in out.glob(pattern) if out.is_dir() else ():
            stale.unlink()
    shards: list[dict[str, Any]] = []
    if (out / MANIFEST).is_file():
        previous = read(out)
        differ = [k for k in identity_keys if _identity(previous, k) != _identity(header, k)]
        if differ:
            raise GeokdError(
                f"--out: {str(out)!r} holds a cache made with another {', '.join(differ)}; choose a new --out or "
                "delete that folder"
            )
        for entry in previous.get("shards", []):
            path = out / entry["file"]
            if not (path.is_file() and file_sha256(path) == entry["sha256"]):
                break
            shards.append(entry)
    elif out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise GeokdError(f"--out: {str(out)!r} is not empty and holds no cache; choose a new --out")
    return shards


def shared_kept_count(shards: list[dict[str, Any]], device: torch.device) -> int:
    """How many intact shards rank 0 kept from an earlier run, told to every torchrun rank (a
    collective: the other ranks also wait here until rank 0 settled the folder and the space)."""
    if distributed.world_size() == 1:
        return len(shards)
    return int(distributed.all_reduce_sum(torch.tensor([len(shards)], device=device)).item())


def own_shards(kept: int, n_shards: int) -> range:
    """The shard indices this rank writes: every W-th after the kept ones (all of them for one process)."""
    return range(kept + distributed.rank(), n_shards, distributed.world_size())


def all_shard_entries(shards: list[dict[str, Any]], kept: int, n_shards: int,
                      entry: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]] | None:  # fmt: skip
    """After every rank wrote its shards (a barrier): rank 0's manifest entries for all of them,
    read back from the files; None on the other ranks."""
    distributed.barrier()
    if distributed.rank() != 0:
        return None
    return shards[:kept] + [entry(index) for index in range(kept, n_shards)]


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    with disk_full_as_error(out / MANIFEST, "the cache manifest"):  # the previous manifest stays
        write_json(out / MANIFEST, manifest)


def _write_shard(
    out: Path, index: int, tensors: dict[str, torch.Tensor], first: int, last: int
) -> dict[str, Any]:
    from safetensors.torch import save_file

    target = out / shard_name(index)
    with disk_full_as_error(target, "a cache shard"), atomic_path(target) as tmp:  # tmp removed on error
        # One metadata key: safetensors writes metadata from a hash map, so several keys come out in
        # varying order and identical shards would hash differently.
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    return _shard_entry(target, first, last)


def _shard_entry(path: Path, first: int, last: int) -> dict[str, Any]:
    """The manifest entry of a written shard (also for the shards other torchrun ranks wrote)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        rows = next(handle.get_slice(k).get_shape()[0] for k in handle.keys() if k.startswith("layer."))
    return {
        "file": path.name,
        "first_example": first,
        "n_examples": last - first,
        "n_rows": int(rows),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
    }


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class TeacherCache:
    """Read access to a finished cache: `lookup(example_ids, layers)` returns the teacher's logits
    (`[B, C]` float32, or None) and, per requested layer, `[B, d]` rows (pooled) or the examples'
    token rows concatenated in batch order (`tokens`), as float32."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            done = len(self.manifest.get("shards", []))
            raise GeokdError(
                f"--cache: {str(self.path)!r} is incomplete ({done} shard(s) written); finish it by running the same "
                "geokd cache command again"
            )
        self.layers = tuple(self.manifest["layers"])
        self.features = self.manifest["features"]
        self.shard_size = int(self.manifest["shard_size"])
        self._handles: dict[int, Any] = {}
        self._offsets: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.manifest["n_examples"])

    def _shard(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = open_shard(self.path, self.manifest["shards"][index])
            self._handles[index] = handle
            if self.features == "tokens":
                self._offsets[index] = handle.get_tensor("offsets")
        return handle

    def lookup(
        self, example_ids: torch.Tensor | Sequence[int], layers: Sequence[int]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise GeokdError(
                f"--cache: layer {missing[0]} is not in the cache (it holds {list(self.layers)}); rebuild it with "
                "--layers covering the teacher layers of the layer map"
            )
        ids = [
            int(i) for i in (example_ids.tolist() if isinstance(example_ids, torch.Tensor) else example_ids)
        ]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise GeokdError(
                f"--cache: example id {bad[0]} is outside the cache's 0..{len(self) - 1}; the data does not match it"
            )
        wanted = list(dict.fromkeys(layers))  # a layer several pairs share is read once
        slices: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
        logits = []
        for example in ids:
            index, local = divmod(example, self.shard_size)
            handle = self._shard(index)
            if self.features == "tokens":
                offsets = self._offsets[index]
                start, stop = int(offsets[local]), int(offsets[local + 1])
            else:
                start, stop = local, local + 1
            for layer in wanted:
                slices[layer].append(handle.get_slice(f"layer.{layer}")[start:stop])
            if self.manifest["logits"]:
                logits.append(handle.get_slice("logits")[local : local + 1])
        joined = {layer: torch.cat(slices[layer]).float() for layer in wanted}
        rows = [joined[layer] for layer in layers]
        return (torch.cat(logits).float() if logits else None), rows


def verify_cache(path: str | Path) -> dict[str, Any]:
    """Check every shard of a cache against the manifest: present, SHA-256, tensor names, example
    ids, and row counts (per layer; token offsets). Returns `{"ok": bool, "shards": [...],
    "problems": [...]}`."""
    from safetensors import safe_open

    folder = Path(path)
    manifest = read_manifest(folder)
    problems = []
    if not manifest.get("complete"):
        problems.append(f"incomplete: {len(manifest.get('shards', []))} shard(s) written; rerun geokd cache")
    expected_shards = max(1, -(-int(manifest["n_examples"]) // int(manifest["shard_size"])))
    if manifest.get("complete") and len(manifest["shards"]) != expected_shards:
        problems.append(f"the manifest lists {len(manifest['shards'])} shards, {expected_shards} expected")
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
                names = set(handle.keys())
                wanted = {f"layer.{layer}" for layer in manifest["layers"]} | {"example_id"}
                wanted |= {"logits"} if manifest["logits"] else set()
                wanted |= {"offsets"} if manifest["features"] == "tokens" else set()
                ids = handle.get_tensor("example_id") if "example_id" in names else None
                if wanted - names:
                    status = f"lacks {', '.join(sorted(wanted - names))}"
                elif ids is None or ids.tolist() != list(
                    range(entry["first_example"], entry["first_example"] + entry["n_examples"])
                ):
                    status = "example ids out of place"
                else:
                    rows = {handle.get_slice(f"layer.{layer}").get_shape()[0] for layer in manifest["layers"]}
                    offsets = handle.get_tensor("offsets") if manifest["features"] == "tokens" else None
                    if rows != {entry["n_rows"]} or (
                        offsets is not None and int(offsets[-1]) != entry["n_rows"]
                    ):
                        status = f"row counts {sorted(rows)} disagree with the manifest's {entry['n_rows']}"
        if status != "ok":
            problems.append(f"{entry['file']}: {status}")
        report.append({**entry, "status": status})
    problems += verify_flexkd(folder, manifest)
    return {"ok": not problems, "path": str(folder), "shards": report, "problems": problems}


def _where(name: str) -> str:
    """A model name as the manifest records it: an existing directory resolved, else the id."""
    from geokd.models import resolve_model_name

    target = resolve_model_name(name)
    path = Path(target).expanduser()
    return str(path.resolve()) if path.exists() else target


def check_cache_matches(
    manifest: dict[str, Any],
    *,
    task: str,
    data_fingerprint: str,
    max_length: int,
    features: str,
    teacher_layers: Sequence[int],
    needs_logits: bool,
    tokenizer_hash: str,
    teacher_sha256: str | None,
    teacher_name: str | None,
) -> None:
    """Refuse a cache that disagrees with a distillation run; the message names the field."""

    def refuse(field: str, cached: Any, run: Any, fix: str) -> GeokdError:
        return GeokdError(f"--cache: {field} differs: the cache has {cached!r}, this run {run!r}; {fix}")

    rebuild = "rebuild the cache for this run (geokd cache) or pass the matching options"
    if manifest["split"] != "train":
        raise refuse(
            "split", manifest["split"], "train", "distillation reads the train split: cache --split train"
        )
    if manifest["task"] != task:
        raise refuse("task", manifest["task"], task, rebuild)
    if manifest["data"]["fingerprint"] != data_fingerprint:
        raise refuse("data", manifest["data"]["fingerprint"], data_fingerprint,
                     "the training data changed since the cache was written; " + rebuild)  # fmt: skip
    if manifest["max_length"] != max_length:
        raise refuse(
            "max_length", manifest["max_length"], max_length, f"pass --max-length {manifest['max_length']}"
        )
    if teacher_layers and manifest["features"] != features:  # rows are read only for feature pairs
        raise refuse(
            "features (pooling)", manifest["features"], features, f"pass --features {manifest['features']}"
        )
    missing = [layer for layer in teacher_layers if layer not in manifest["layers"]]
    if missing:
        raise refuse("layers", manifest["layers"], list(teacher_layers),
                     f"teacher layer {missing[0]} is not cached; cache it or choose --layers within the cache")  # fmt: skip
    if needs_logits and not manifest["logits"]:
        raise GeokdError(
            "--cache: logits are not in the cache (written with --no-logits) but the objective has a KL term "
            "(alpha < 1); rebuild with --logits or pass --alpha 1"
        )
    if manifest["tokenizer_sha256"] != tokenizer_hash:
        raise refuse("tokenizer", manifest["tokenizer_sha256"][:12], tokenizer_hash[:12],
                     "the student must tokenise like the teacher the cache was written with")  # fmt: skip
    check_cached_teacher(manifest, teacher_sha256, teacher_name)


def check_cached_teacher(manifest: dict[str, Any], teacher_sha256: str | None, teacher_name: str | None) -> None:
    """Refuse a cache written by another teacher than the run's `--teacher` (by weights hash when
    both are known, else by resolved name); nothing to check without a `--teacher`."""

    def refuse(field: str, cached: Any, run: Any, fix: str) -> GeokdError:
        return GeokdError(f"--cache: {field} differs: the cache has {cached!r}, this run {run!r}; {fix}")

    cached_teacher = manifest["teacher"]
    if teacher_name is not None and (teacher_sha256 is None or cached_teacher.get("weights_sha256") is None):
        given = _where(teacher_name)
        if given != cached_teacher.get("path_or_id"):  # no hashes to compare: the names must agree
            raise refuse(
                "teacher",
                cached_teacher.get("path_or_id"),
                given,
                "pass the teacher the cache was written with",
            )
    if teacher_sha256 is not None and cached_teacher.get("weights_sha256") not in (None, teacher_sha256):
        raise refuse("teacher", f"{cached_teacher['path_or_id']} (sha256 {cached_teacher['weights_sha256'][:12]})",
                     f"{teacher_name} (sha256 {teacher_sha256[:12]})", "pass the teacher the cache was written with")  # fmt: skip
