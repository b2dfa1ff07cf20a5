"""Checkpoints that can be trusted (issue #10): no pickle, every file hashed, verified on resume.

    RUN/checkpoints/step-N/
        student/                  Hugging Face folder (config, tokenizer, model.safetensors)
        trainer_state.safetensors every tensor of the trainer state: objective (projection heads),
                                  optimizer moments, RNG states (uint8 / int64 tensors)
        trainer_state.json        everything else: scheduler, optimizer hyper-parameters, position,
                                  Python/NumPy RNG state, with each tensor replaced by its key
        checkpoint.json           written last: format, step, the run's config, teacher weights and
                                  data fingerprints, and the SHA-256 and size of every other file

Reading never unpickles: `safetensors.torch.load_file` and `json.loads` only. A checkpoint is
"intact" when `checkpoint.json` parses and every file it lists exists with its size and SHA-256;
`verify_checkpoint` names the first file that is not. A folder holding only a legacy
`trainer_state.pt` (a pickle) is refused, never loaded.

The state packing is generic: `pack(obj)` walks dicts, lists and tuples and moves every
`torch.Tensor` into a flat tensor dict; NumPy arrays, tuples and non-string dict keys are tagged
so `unpack` rebuilds exactly the same structure (floats survive JSON exactly: Python writes the
shortest repr that round-trips).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geokd.errors import GeokdError

FORMAT = 1
MANIFEST = "checkpoint.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"
_TAGS = frozenset({"__tensor__", "__ndarray__", "__tuple__", "__dict__"})


# ---------------------------------------------------------------------------------------------
# Packing nested state into JSON + tensors
# ---------------------------------------------------------------------------------------------


def pack(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `obj` into a JSON-serialisable structure and a flat {key: tensor} dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path or "root"
            tensors[key] = value.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not _TAGS.intersection(value):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in value.items()}
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path!r} in a checkpoint")

    return walk(obj, ""), tensors


def unpack(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild what `pack` split."""
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return np.asarray(tree["__ndarray__"], dtype=tree["dtype"])
        if "__tuple__" in tree:
            return tuple(unpack(v, tensors) for v in tree["__tuple__"])
        if "__dict__" in tree:
            return {k: unpack(v, tensors) for k, v in tree["__dict__"]}
        return {k: unpack(v, tensors) for k, v in tree.items()}
    return tree


# ---------------------------------------------------------------------------------------------
# Writing and verifying
# ---------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write the trainer state as trainer_state.safetensors + trainer_state.json into `folder`."""
    from safetensors.torch import save_file

    tree, tensors = pack(state)
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": "geokd-trainer-state"})
    (folder / STATE_JSON).write_text(json.dumps(tree), encoding="utf-8")


def write_manifest(folder: Path, step: int, record: dict[str, Any]) -> None:
    """Hash every file under `folder` and write checkpoint.json (the last file of a checkpoint)."""
    files = {
        str(p.relative_to(folder)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": FORMAT, "step": step, **record, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def read_manifest(checkpoint: Path) -> dict[str, Any]:
    """checkpoint.json of `checkpoint`, or a GeokdError naming what is wrong with it."""
    path = checkpoint / MANIFEST
    if not path.is_file():
        if (checkpoint / LEGACY_STATE).is_file():
            raise GeokdError(
                f"--resume: {str(checkpoint)!r} holds a pickled trainer_state.pt (an older geokd format or a "
                "foreign file); geokd never unpickles checkpoints, so it was not read; start a new run"
            )
        raise GeokdError(
            f"--resume: {str(checkpoint)!r} is not a complete geokd checkpoint (no {MANIFEST}); "
            "pass a checkpoints/step-N folder written by geokd, or --resume auto"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GeokdError(f"--resume: {str(path)!r} is damaged (not valid JSON)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise GeokdError(f"--resume: {str(path)!r} is damaged (no file list)")
    if manifest.get("format") != FORMAT:
        raise GeokdError(
            f"--resume: {str(path)!r} has checkpoint format {manifest.get('format')!r}, this geokd reads "
            f"format {FORMAT}; resume with the geokd version that wrote it"
        )
    return manifest


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Check every file of `checkpoint` against its recorded size and SHA-256; return the manifest
    or raise a GeokdError naming the first damaged or missing file."""
    manifest = read_manifest(checkpoint)
    for name in (STATE_TENSORS, STATE_JSON, "student/model.safetensors"):
        if name not in manifest["files"]:
            raise GeokdError(f"--resume: {str(checkpoint / MANIFEST)!r} does not list {name}; it is damaged")
    for name, expected in manifest["files"].items():
        parts = Path(name).parts
        if not isinstance(expected, dict) or Path(name).is_absolute() or ".." in parts or not parts:
            raise GeokdError(f"--resume: {str(checkpoint / MANIFEST)!r} is damaged (bad entry {name!r})")
        path = checkpoint / name
        if not path.is_file():
            raise GeokdError(f"--resume: checkpoint file {str(path)!r} is missing")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            raise GeokdError(
                f"--resume: checkpoint file {str(path)!r} is damaged ({size} bytes, {expected.get('bytes')} written)"
            )
        if file_sha256(path) != expected.get("sha256"):
            raise GeokdError(
                f"--resume: checkpoint file {str(path)!r} is damaged (its SHA-256 differs from the one recorded "
                "when it was written)"
            )
    return manifest


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a verified checkpoint (safetensors + JSON; nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(checkpoint / STATE_TENSORS))
        tree = json.loads((checkpoint / STATE_JSON).read_text(encoding="utf-8"))
        return unpack(tree, tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GeokdError(
            f"--resume: the trainer state in {str(checkpoint)!r} cannot be read ({type(exc).__name__})"
        ) from None


def step_of(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/step-N folders, oldest first."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def newest_intact(run_dir: Path, warn: Callable[[str], None]) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that verifies, warning about each newer one skipped. When checkpoints
    exist but none is intact, that is an error (restarting would silently discard the run)."""
    checkpoints = list_checkpoints(run_dir)
    skipped: list[str] = []
    for checkpoint in reversed(checkpoints):
        try:
            manifest = verify_checkpoint(checkpoint)
        except GeokdError as exc:
            skipped.append(f"{checkpoint.name} ({str(exc).removeprefix('--resume: ')})")
            continue
        if skipped:
            warn(f"--resume auto: skipped damaged checkpoint(s) {'; '.join(skipped)}; resuming from {checkpoint}")
        return checkpoint, manifest
    if checkpoints:
        raise GeokdError(
            f"--resume auto: no intact checkpoint in {str(run_dir / 'checkpoints')!r}: {'; '.join(skipped)}; "
            "move the damaged checkpoints away to start over"
        )
    return None, None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what an interrupted or disk-full save left behind (`.step-N.tmp`, `.final.tmp`):
    never a complete checkpoint, and in the way of the next save."""
    stale = [*(run_dir / "checkpoints").glob(".step-*.tmp"), *run_dir.glob(".final.tmp")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def prune(run_dir: Path, keep: int | None, newest: Path) -> list[Path]:
    """Keep `newest` (the checkpoint just completed) and the `keep - 1` newest others (None: keep
    all); call only once `newest` is complete. Returns what was removed."""
    if keep is None:
        return []
    others = [p for p in list_checkpoints(run_dir) if p != newest]
    removed = others[: max(0, len(others) - (keep - 1))]
    for path in removed:
        shutil.rmtree(path)
    return removed


def quarantine_newer(run_dir: Path, resumed: Path) -> list[Path]:
    """Move checkpoints newer than the one resumed from (damaged ones that `--resume auto`
    skipped, or an abandoned future of an explicit `--resume PATH`) to `checkpoints/skipped-step-N`,
    so they are never resumed from or counted by `--keep-checkpoints`, yet nothing is deleted."""
    step = step_of(resumed)
    moved = []
    for path in list_checkpoints(run_dir):
        if step is not None and (step_of(path) or 0) > step:
            target = path.with_name(f"skipped-{path.name}")
            if target.exists():
                shutil.rmtree(target)
            path.rename(target)
            moved.append(target)
    return moved
