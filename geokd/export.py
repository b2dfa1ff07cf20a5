"""`geokd export`: the deployable student and nothing else (issue #6).

* `hf` (default): a Hugging Face folder (config.json, tokenizer files, `model.safetensors`) that
  `AutoModelForSequenceClassification.from_pretrained(DIR)` (a classifier) or
  `AutoModelForCausalLM.from_pretrained(DIR)` and `pipeline("text-generation")` (a causal LM, with
  its generation config and chat template) load without geokd, plus a `README.md` model card and
  `geokd.json` provenance.
* `safetensors`: one `.safetensors` file whose metadata header carries the provenance (`geokd`,
  JSON) and the model config (`config`, JSON), so it describes itself.

The weights come from the run's `final/` (or a checkpoint's `student/`) loaded into the model
class, so only the model's own parameters are exported: projection heads and any other loss state
live in the checkpoints' trainer state and never reach an export. Tied weights are saved once
(`save_pretrained` / `safetensors.torch.save_model`). Everything is written into a temporary
path next to `--out` and renamed on success; a non-empty `--out` is replaced only with `--force`.
Every file and folder an export writes gets the permissions of the user's umask (0644/0755 with
022), not the 0600 of safetensors' writer.

Safety (issue #10): `--out` may not be the source or lie inside it (the run directory, its
`final/`, the model folder exported; compared as resolved paths, so symlinks do not hide it), may
not contain the source, and may not be `/` or the home directory (or an ancestor of it): `--force`
would delete them. A full disk while writing is one line with the path and the free space; the
temporary is removed and an existing `--out` is untouched. A temporary or `.NAME.old-export` left
by a killed export never blocks the next one; an `.old-export` whose `--out` is gone (killed
between the two renames of the swap) is put back first, so the last complete export survives.
Reading an export (`--check`, the round trip) checks its safetensors structure first and never
reads a pickled `.bin`.

Round trip: the export records a probe batch's logits from the source model (float32) in its
provenance (a causal LM: the next-token logits at each probe text's last token, all compared at
export time, the top 64 per text recorded); `verify_export` (`geokd export --check`) recomputes them with the exported model and
compares, exactly for fp32 and to the dtype's tolerance for fp16/bf16.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

import geokd
from geokd.artifacts import disk_full_as_error, follow_umask
from geokd.errors import GeokdError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("hf", "safetensors")
# Largest |logit difference| accepted by --check, per export dtype (fp32: bit-exact).
TOLERANCE = {"fp32": 0.0, "fp16": 5e-2, "bf16": 2e-1}
PROBE_TEXTS = (
    "the film is a charming , funny and often moving journey .",
    "a dull , lifeless script that never finds its footing .",
    "It rained all day, so the match was postponed until Sunday.",
    "The committee approved the budget after a short debate.",
)


def _resolve_source(source: str, checkpoint: str) -> tuple[Path, Path | None]:
    """(model folder, run directory or None) for a run directory, a run's final/, or a model folder."""
    path = Path(source).expanduser()
    if not path.exists():
        raise GeokdError(f"export: {source!r} does not exist; pass a run directory or a model folder")
    if (path / "config.yaml").is_file() and not (path / "config.json").is_file():  # a run directory
        if checkpoint == "final":
            folder = path / "final"
        else:
            if not re.fullmatch(r"step-\d+", checkpoint):
                raise GeokdError(f"--checkpoint: expected final or step-N, got {checkpoint!r}")
            folder = path / "checkpoints" / checkpoint / "student"
        if not (folder / "config.json").is_file():
            have = (
                sorted(p.name for p in (path / "checkpoints").iterdir())
                if (path / "checkpoints").is_dir()
                else []
            )
            raise GeokdError(
                f"--checkpoint: {checkpoint!r} is not in run {source!r} (no {folder.relative_to(path)}/config.json); "
                f"choose final or one of: {', '.join(have) or 'none (no checkpoints were saved)'}"
            )
        if checkpoint != "final":  # a checkpoint is exported only when every file matches its SHA-256
            from geokd.checkpoints import verify_checkpoint

            try:
                verify_checkpoint(folder.parent)
            except GeokdError as exc:
                raise GeokdError("--checkpoint: " + str(exc).removeprefix("--resume: ")) from None
        return folder, path
    if checkpoint != "final":
        raise GeokdError(
            f"--checkpoint {checkpoint!r} needs a run directory, got the model folder {source!r}"
        )
    if not (path / "config.json").is_file():
        raise GeokdError(f"export: {source!r} has no config.json; pass a run directory or a model folder")
    run_dir = path.parent if path.name == "final" and (path.parent / "config.yaml").is_file() else None
    return path, run_dir


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# A causal LM's probe records the top logits of each probe text's last position (a full vocabulary
# row per text would make geokd.json megabytes); the round trip at export time compares them all.
PROBE_TOP_K = 64


def is_causal_lm(config: Any) -> bool:
    """True for a causal language model's config (or config dict): an architecture transformers maps
    to causal language modelling (`*ForCausalLM`, `GPT2LMHeadModel`, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = (config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)) or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())  # GPT2LMHeadModel, LlamaForCausalLM, ...
    return any(str(name) in causal or str(name).endswith("ForCausalLM") for name in architectures)


def _auto_class(config: Any):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if is_causal_lm(config) else AutoModelForSequenceClassification


def _probe_inputs(tokenizer: Any) -> dict[str, torch.Tensor]:
    # A tokenizer without a pad token (GPT-2 style) probes one text, so nothing needs padding.
    texts = list(PROBE_TEXTS) if tokenizer.pad_token_id is not None else list(PROBE_TEXTS[:1])
    encoded = dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    reset_tokenizer_state(tokenizer)
    return encoded


def reset_tokenizer_state(tokenizer: Any) -> None:
    """Calling a fast tokenizer leaves truncation/padding switched on in its backend, and
    `save_pretrained` would bake them into tokenizer.json (cutting inputs for users of the plain
    `tokenizers` library or other runtimes). Switch them off before saving."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, C] class logits, or for a causal LM the next-token logits [B, V] at each text's last
    real token (left or right padding)."""
    with torch.inference_mode():
        logits = model(**inputs).logits.float()
    if logits.dim() == 3:
        mask = inputs["attention_mask"]
        positions = torch.arange(mask.shape[1]).expand_as(mask)
        last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
        logits = logits[torch.arange(logits.shape[0]), last]
    return logits


def _record_logits(logits: torch.Tensor) -> Any:
    if logits.shape[-1] <= PROBE_TOP_K * 4:
        return logits.tolist()
    values, ids = logits.topk(PROBE_TOP_K, dim=-1)
    return {"top_ids": ids.tolist(), "top_values": values.tolist()}


def _recorded_diff(got: torch.Tensor, recorded: Any) -> float:
    if isinstance(recorded, dict):  # a causal LM's top-k record
        ids = torch.tensor(recorded["top_ids"])
        return float((got.gather(-1, ids) - torch.tensor(recorded["top_values"])).abs().max())
    return float((got - torch.tensor(recorded)).abs().max())


def provenance(folder: Path, run_dir: Path | None, loaded: Any, dtype: str, fmt: str) -> dict[str, Any]:
    """What the export records about itself: source, run config and metrics, teacher, sizes."""
    from geokd.models import count_parameters

    record = _read_json(folder / "geokd.json") or {}
    config = record.get("config") or {}
    env = _read_json(run_dir / "env.json") if run_dir is not None else None
    results = _read_json(run_dir / "results.json") if run_dir is not None else None
    return {
        "geokd_version": geokd.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": fmt,
        "dtype": dtype,
        "source": {
            "folder": str(folder.resolve()),
            "run_dir": str(run_dir.resolve()) if run_dir else None,
            "weights_sha256": loaded.source.weights_sha256,
        },  # fmt: skip
        "mode": config.get("mode"),
        "task": record.get("task") or config.get("task"),
        "teacher": (env or {}).get("teacher")
        or ({"path_or_id": config["teacher"]} if config.get("teacher") else None),
        "objective": {
            k: config.get(k) for k in ("loss", "alpha", "gamma", "temperature", "layers", "features")
        }
        if config.get("mode") == "distill"
        else None,
        "layer_pairs": (env or {}).get("layer_pairs"),
        "metrics": (results or {}).get("metrics") or record.get("metrics"),
        "split": (results or {}).get("split") or record.get("split"),
        "parameters": count_parameters(loaded.model),
        "teacher_parameters": (env or {}).get("teacher_parameters"),
        "model_type": getattr(loaded.config, "model_type", None),
        "causal_lm": is_causal_lm(loaded.config),
        "id2label": {str(k): v for k, v in (loaded.config.id2label or {}).items()},
    }


def model_card(info: dict[str, Any]) -> str:
    """README.md for an `hf` export."""
    causal = info.get("causal_lm", False)
    kind = "instruction following" if causal else "sequence classification"
    lines = [
        f"# {info['model_type'] or 'model'} for {info['task'] or kind} (geokd export)",
        "",
    ]
    if info["mode"] == "distill":
        lines.append(
            "Distilled with geokd (geometry-aware knowledge distillation) from a fine-tuned teacher."
        )
    else:
        lines.append("Fine-tuned with geokd.")
    rows = [("task", info["task"]), ("parameters", f"{info['parameters']:,}")]
    if info["teacher"]:
        rows.append(("teacher", info["teacher"].get("path_or_id") or info["teacher"].get("name")))
    if info["teacher_parameters"]:
        share = info["parameters"] / info["teacher_parameters"]
        rows.append(("teacher parameters", f"{info['teacher_parameters']:,} (student is {share:.1%} of it)"))
    if info["objective"]:
        obj = info["objective"]
        rows += [
            ("feature loss", obj["loss"]),
            ("α / γ / τ", f"{obj['alpha']} / {obj['gamma']} / {obj['temperature']}"),
            ("layers", f"{obj['layers']} -> {info['layer_pairs']}" if info["layer_pairs"] else obj["layers"]),
            ("feature rows", obj["features"]),
        ]
    for name, value in (info["metrics"] or {}).items():
        rows.append((f"{info['split'] or 'dev'} {name}", f"{value:.4f}"))
    rows += [
        ("dtype", info["dtype"]),
        *([] if causal else [("labels", json.dumps(info["id2label"]))]),
        ("geokd", info["geokd_version"]),
    ]
    lines += ["", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    usage = (
        [
            "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
            'model = AutoModelForCausalLM.from_pretrained("PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            'generate = pipeline("text-generation", model="PATH")',
        ]
        if causal
        else [
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            'model = AutoModelForSequenceClassification.from_pretrained("PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        ]
    )
    lines += [
        "```python",
        *usage,
        "```",
        "",
        "`geokd.json` holds the full provenance, including the logits of a probe batch that",
        "`geokd export --check PATH` recomputes.",
        "",
    ]
    return "\n".join(lines)


def check_out(out: Path, force: bool, fmt: str) -> None:
    if fmt == "safetensors":
        if out.suffix != ".safetensors":
            raise GeokdError(
                f"--out: the safetensors format writes one file; give a path ending in .safetensors, got {str(out)!r}"
            )
        if out.is_dir():
            raise GeokdError(f"--out: {str(out)!r} is a directory; give a .safetensors file path")
        if out.exists() and not force:
            raise GeokdError(f"--out: {str(out)!r} exists; pass --force to replace it")
    else:
        if out.exists() and not out.is_dir():
            raise GeokdError(f"--out: {str(out)!r} is a file; give a directory for the hf format")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise GeokdError(
                f"--out: {str(out)!r} is not empty; pass --force to replace it, or choose another --out"
            )
    parent = out.resolve().parent
    if not parent.is_dir():
        raise GeokdError(f"--out: directory {str(parent)!r} does not exist; create it first")


def check_not_source(out: Path, folder: Path, run_dir: Path | None) -> None:
    """Refuse an `--out` that `--force` would wipe together with what is being exported: the source
    itself or a path inside it, a folder that contains it, `/`, or the home directory (or above)."""
    resolved = out.expanduser().resolve()  # follows symlinks in --out and its parents
    try:
        home: Path | None = Path.home().resolve()
    except (RuntimeError, KeyError, OSError):  # no home directory to protect
        home = None
    if resolved == Path(resolved.anchor) or (home is not None and home.is_relative_to(resolved)):
        what = (
            "the file-system root" if resolved == Path(resolved.anchor) else "your home directory or above it"
        )
        raise GeokdError(
            f"--out: {str(out)!r} is {what}; an export replaces its --out, so give a new folder of its own, "
            "e.g. --out ./export"
        )
    sources = list(dict.fromkeys(p.resolve() for p in (folder, run_dir) if p is not None))
    for source in sorted(sources, key=lambda p: resolved != p):  # "is the source" first
        if resolved.is_relative_to(source):
            where = "is" if resolved == source else "lies inside"
            raise GeokdError(
                f"--out: {str(out)!r} {where} the source being exported ({str(source)!r}), which writing the "
                "export would delete; choose an --out outside it, e.g. a sibling folder"
            )
    for source in sources:
        if source.is_relative_to(resolved):
            raise GeokdError(
                f"--out: {str(out)!r} contains the source being exported ({str(source)!r}), which replacing it "
                "would delete; choose an --out outside it, e.g. a sibling folder"
            )


def _temporaries(target: Path) -> tuple[Path, Path]:
    """(the temporary an export is written to, the place an existing --out is moved aside to)."""
    tmp = target.with_name(f".{target.stem}.tmp-export{target.suffix}")  # keeps .safetensors last
    return tmp, target.with_name(f".{target.name}.old-export")


def recover_stale(target: Path) -> None:
    """Clear what a killed or failed export left next to `target`: the temporary is removed; an
    `.old-export` is put back when `target` is missing (the kill fell between the two renames of
    the swap, so it is the last complete export), and removed otherwise."""
    tmp, old = _temporaries(target)
    if old.exists() or old.is_symlink():
        if target.exists() or target.is_symlink():
            _remove(old)
        else:
            old.rename(target)
    _remove(tmp)


def export_model(
    source: str,
    out: str,
    fmt: str = "hf",
    dtype: str = "fp32",
    checkpoint: str = "final",
    force: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Export `source` (run directory, its final/, or a model folder) to `out`; returns the
    provenance written (with the round-trip check's result)."""
    from geokd.evaluate import _quiet_transformers
    from geokd.models import load_model

    if fmt not in FORMATS:
        raise GeokdError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise GeokdError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = Path(os.path.abspath(Path(out).expanduser()))  # "." and ".." have no name to rename
    folder, run_dir = _resolve_source(source, checkpoint)
    check_not_source(target, folder, run_dir)
    recover_stale(target)
    check_out(target, force, fmt)
    _quiet_transformers()
    if is_causal_lm(_read_json(folder / "config.json") or {}):
        from geokd.models.decoder import load_causal_lm

        loaded = load_causal_lm(str(folder), trust_remote_code=trust_remote_code)
    else:
        loaded = load_model(str(folder), trust_remote_code=trust_remote_code)
    head_missing = [k for k in loaded.new_weights if not k.startswith(loaded.model.base_model_prefix + ".")]
    if loaded.new_weights:
        raise GeokdError(
            f"export: {str(folder)!r} lacks weights the model needs ({', '.join((head_missing or list(loaded.new_weights))[:3])}); "
            "export a trained run or a complete model folder"
        )
    model = loaded.model.eval()
    probe = _probe_inputs(loaded.tokenizer)
    reference = _logits(model, probe)  # float32 source logits
    model = model.to(DTYPES[dtype])
    info = provenance(folder, run_dir, loaded, dtype, fmt)
    info["probe"] = {
        "texts": list(PROBE_TEXTS),
        "inputs": {k: v.tolist() for k, v in probe.items()},  # token ids: --check needs no tokenizer
        "logits": _record_logits(reference),
    }
    tmp, _ = _temporaries(target)
    with disk_full_as_error(target, "the export"):  # after the temporary is gone (below)
        try:
            if fmt == "hf":
                tmp.mkdir()
                model.save_pretrained(tmp, safe_serialization=True)
                loaded.tokenizer.save_pretrained(tmp)
                (tmp / "geokd.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
                (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
            else:
                from safetensors.torch import save_model

                metadata = {
                    "geokd": json.dumps(info),
                    "config": model.config.to_json_string(),
                    "format": "pt",
                }
                save_model(model, str(tmp), metadata=metadata)
            check = _round_trip(tmp, dtype, reference, probe)
            info["check"] = check
            if fmt == "hf":  # record the check next to the weights
                (tmp / "geokd.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            follow_umask(tmp)  # the user's usual permissions, not the 0600 safetensors writes
            _replace(tmp, target)
        except BaseException:
            _remove(tmp)
            raise
    return info


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(tmp: Path, target: Path) -> None:
    """Move `tmp` onto `target`. An existing target (only with --force) is moved aside first and
    removed after the rename, or put back if the rename fails."""
    _, old = _temporaries(target)
    _remove(old)  # left by an export that was killed (recover_stale has kept it if it was the only copy)
    if target.exists():
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    _remove(old)


def load_export(
    path: str | Path, trust_remote_code: bool = False
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer or None, provenance) of an export: an hf folder or a .safetensors file."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoTokenizer

    from geokd.evaluate import _quiet_transformers
    from geokd.models import check_safetensors, check_weights

    _quiet_transformers()
    target = Path(path).expanduser()
    if target.is_dir():
        info = _read_json(target / "geokd.json")
        if info is None:
            raise GeokdError(f"--check: {str(target)!r} has no geokd.json; it is not a geokd export")
        _check_info(info, target)

        config_json = _read_json(target / "config.json") or {}
        auto = _auto_class(config_json)
        check_weights(target, "--check", auto_class=auto.__name__)  # no pickles, no damaged safetensors
        try:
            model = auto.from_pretrained(
                target, trust_remote_code=trust_remote_code, dtype=DTYPES[info["dtype"]], use_safetensors=True
            )
            tokenizer = AutoTokenizer.from_pretrained(target)
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise GeokdError(
                f"--check: {str(target)!r} does not load ({type(exc).__name__}: {detail}); re-export it"
            ) from None
        return model.eval(), tokenizer, info
    if target.suffix == ".safetensors" and target.is_file():
        from safetensors import safe_open
        from safetensors.torch import load_model

        check_safetensors(target, "--check")
        try:
            with safe_open(str(target), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except SafetensorError as exc:
            detail = " ".join(str(exc).split())[:200]
            raise GeokdError(f"--check: {str(target)!r} does not load ({detail}); re-export it") from None
        if "geokd" not in metadata or "config" not in metadata:
            raise GeokdError(f"--check: {str(target)!r} carries no geokd metadata; it is not a geokd export")
        try:
            info, config_dict = json.loads(metadata["geokd"]), json.loads(metadata["config"])
        except json.JSONDecodeError:
            raise GeokdError(f"--check: the metadata of {str(target)!r} is damaged; re-export it") from None
        _check_info(info, target)
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = _auto_class(config).from_config(config, dtype=DTYPES[info["dtype"]])
        try:
            load_model(model, str(target))
        except SafetensorError as exc:
            detail = " ".join(str(exc).split())[:200]
            raise GeokdError(f"--check: {str(target)!r} does not load ({detail}); re-export it") from None
        return model.eval(), None, info
    raise GeokdError(f"--check: {str(target)!r} is neither an export folder nor a .safetensors file")


def _check_info(info: Any, target: Path) -> None:
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES or "format" not in info:
        raise GeokdError(
            f"--check: {str(target)!r} holds geokd provenance but not an export's (no dtype/format); "
            "pass a folder or file written by geokd export"
        )


def _round_trip(
    path: Path, dtype: str, reference: torch.Tensor, probe: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Reload what was written and compare its logits on the probe batch with the source's."""
    model, _, _ = load_export(path)
    got = _logits(model, probe)
    diff = float((got - reference).abs().max())
    if diff > TOLERANCE[dtype]:
        raise GeokdError(
            f"export: the exported model's logits differ from the source's by {diff:.3g} (allowed {TOLERANCE[dtype]:g} "
            f"for {dtype}); nothing was written"
        )
    return {"max_abs_logit_diff": diff, "tolerance": TOLERANCE[dtype], "examples": len(PROBE_TEXTS)}


def verify_export(path: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """`geokd export --check`: recompute the recorded probe logits with the export and compare."""
    model, tokenizer, info = load_export(path, trust_remote_code=trust_remote_code)
    probe = info.get("probe")
    if not probe or "inputs" not in probe:
        raise GeokdError(f"--check: {str(path)!r} records no probe batch; re-export it with this geokd")
    inputs = {k: torch.tensor(v) for k, v in probe["inputs"].items()}
    got = _logits(model, inputs)
    diff = _recorded_diff(got, probe["logits"])
    tolerance = TOLERANCE[info["dtype"]]
    return {
        "ok": diff <= tolerance,
        "max_abs_logit_diff": diff,
        "tolerance": tolerance,
        "dtype": info["dtype"],
    }
