"""The Performance summary (issue #16): every headline number of the earlier benchmarks, run again in
one sitting, with the machine each came from.

    python bench/summary.py --run        # run the benchmarks one after another, then summarise
    python bench/summary.py              # summarise the JSONs already in bench/results/

`--run` executes, in this order and with nothing else running: losses.py, eval.py, generate.py,
token_kd.py, cache.py (cls and tokens rows), decoder_cache.py and, where a CUDA device is visible,
throughput.py --scale cuda (examples/s and MFU). Each writes its own JSON in bench/results/ as
before; this script then reads them and writes `bench/results/summary.json` and a Markdown table on
stdout (the README's Performance summary). Each row names its JSON, the machine (device, CPU count
and torch threads, torch version), the commit and, after `--run`, the sitting it belongs to and the
benchmark's wall time. A benchmark that fails or cannot run here (no SmolLM2 weights, no data, no
GPU) is reported as such, never filled in."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# (name, command-line arguments, the JSONs it writes); throughput only on CUDA
SITTING = [
    ("losses", ["bench/losses.py"], ["losses.json"]),
    ("eval", ["bench/eval.py"], ["eval.json"]),
    ("generate", ["bench/generate.py"], ["generate.json"]),
    ("token_kd", ["bench/token_kd.py"], ["token_kd.json"]),
    ("cache", ["bench/cache.py"], ["cache.json"]),
    ("cache_tokens", ["bench/cache.py", "--features", "tokens", "--out", "bench/results/cache_tokens.json"],
     ["cache_tokens.json"]),
    ("decoder_cache", ["bench/decoder_cache.py"], ["decoder_cache.json"]),
]  # fmt: skip


def run_sitting(python: str) -> dict:
    """Run every benchmark in turn; returns what ran, when, for how long, and how it ended."""
    import torch

    plan = list(SITTING)
    if torch.cuda.is_available():
        plan.append(("throughput", ["bench/throughput.py", "--scale", "cuda"], ["throughput.json"]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    sitting = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": _cpu_model(), "benchmarks": {}}
    for name, args, _ in plan:
        print(f"== {name}: {' '.join(args)}", flush=True)
        started = time.perf_counter()
        done = subprocess.run([python, *args], cwd=ROOT, env=env, check=False)
        sitting["benchmarks"][name] = {"args": args, "wall_s": round(time.perf_counter() - started, 1),
                                       "returncode": done.returncode}  # fmt: skip
    sitting["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return sitting


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def machine(result: dict) -> str:
    """Where one benchmark ran, from what its JSON recorded (the scripts record it differently)."""
    meta = result.get("machine") if isinstance(result.get("machine"), dict) else {}
    device = result.get("device_name") or result.get("card") or result.get("device") or "cpu"
    if device in ("x86_64", "aarch64"):
        device = "cpu"
    cpus = result.get("cpu_count") or meta.get("cpu_count")
    threads = result.get("threads") or meta.get("torch_threads")
    torch_version = result.get("torch") or meta.get("torch")
    parts = [str(device)]
    if cpus:
        parts.append(f"{cpus} CPUs")
    if threads:
        parts.append(f"{threads} torch threads")
    if torch_version:
        parts.append(f"torch {torch_version}")
    return ", ".join(parts)


def _commit(result: dict) -> str | None:
    commit = result.get("commit") or (result.get("code") or {}).get("git_commit")
    return commit[:8] if isinstance(commit, str) else None


def summarise(sitting: dict | None = None) -> dict:
    """Read the benchmarks' JSONs into rows: what, value, target, source, machine, commit."""
    rows: list[dict] = []

    def add(what: str, value: str, target: str, source: str, result: dict | None) -> None:
        rows.append({"what": what, "value": value, "target": target, "source": source,
                     "machine": machine(result) if result else None, "commit": _commit(result) if result else None,
                     "wall_s": ((sitting or {}).get("benchmarks", {}).get(source.split(".")[0]) or {}).get("wall_s")})  # fmt: skip

    losses = _load("losses.json")
    if losses:
        step = losses["training_step"]["ms"]
        for t in losses["targets"]:
            add(f"{t['loss']} at n = {t['n']} ({t['d_s']} → {t['d_t']}), % of a {step:.0f} ms training step",
                f"{t['pct_of_step']:.2f}%", f"< {t['limit_pct']:g}%: {'met' if t['passed'] else 'missed'}", "losses.json",
                losses)  # fmt: skip
    for name, label in (("cache.json", "cls"), ("cache_tokens.json", "tokens")):
        cache = _load(name)
        if cache:
            ratio = cache["training"]["distill --cache"]["vs_finetune"]
            add(f"encoder epoch, distill --cache / finetune ({label} rows)", f"{ratio:.3f}×",
                f"≤ {cache['targets']['from_cache_vs_finetune']}×: {'met' if ratio <= cache['targets']['from_cache_vs_finetune'] else 'missed'}",
                name, cache)  # fmt: skip
            add(f"encoder cache bytes / minimum ({label} rows)",
                f"{cache['bytes_per_example_per_layer'] / cache['minimum_bytes_per_example_per_layer']:.3f}×",
                "", name, cache)  # fmt: skip
    decoder = _load("decoder_cache.json")
    if decoder:
        ratio = decoder["epoch_ratio_cache_to_floor"]
        add("decoder epoch, distill --cache / SFT alone", f"{ratio:.3f}×", f"≤ 1.10×: {'met' if ratio <= 1.10 else 'missed'}",
            "decoder_cache.json", decoder)  # fmt: skip
        size = decoder["size"]["ratio_to_minimum"]
        add("decoder cache bytes / minimum (top-64 + tail)", f"{size:.3f}×", f"≤ 1.05×: {'met' if size <= 1.05 else 'missed'}",
            "decoder_cache.json", decoder)  # fmt: skip
    evaluation = _load("eval.json")
    if evaluation:
        measured = evaluation["target"]["measured"]
        add("eval throughput, length-sorted / naive batching (SST-2 dev)", f"{measured:.2f}×",
            f"≥ {evaluation['target']['speedup']}×: {'met' if evaluation['target']['met'] else 'missed'}", "eval.json",
            evaluation)  # fmt: skip
    generate = _load("generate.json")
    if generate:
        speedup = generate["plans"][-1]["speedup"]
        add(f"generation throughput, geokd / per-example generate ({generate['n_prompts']} Dolly prompts, "
            f"{'identical' if generate['identical_outputs'] else 'DIFFERENT'} outputs)", f"{speedup:.2f}×",
            f"≥ 3×: {'met' if speedup >= 3 else 'missed'}", "generate.json", generate)  # fmt: skip
    kd = _load("token_kd.json")
    if kd:
        ratio = kd["memory_ratio_chunked_over_naive"]
        add("token-level KD peak memory, chunked / naive", f"{ratio:.3f}×", f"≤ {kd['target_memory_ratio']}×: "
            f"{'met' if kd['met'] else 'missed'}", "token_kd.json", kd)  # fmt: skip
    throughput = _load("throughput.json")
    if throughput and throughput.get("scale") == "cuda":
        for case, numbers in throughput["cases"].items():
            distill = numbers["distill"]
            mfu = numbers.get("mfu")
            add(f"{case} distill on {throughput.get('card')}", f"{distill['examples_per_s']:.0f} examples/s"
                + (f", MFU {mfu:.1%}" if mfu is not None else ""), "", "throughput.json", throughput)  # fmt: skip
    else:
        rows.append({"what": "GPU examples/s and MFU", "value": "not measured: no GPU was lent", "target": "",
                     "source": "throughput.json", "machine": None, "commit": None, "wall_s": None})  # fmt: skip
    return {"sitting": sitting, "rows": rows, "summarised_on": platform.node()}


def markdown(summary: dict) -> str:
    lines = ["| what | measured | target | machine | source (commit) |", "|---|---|---|---|---|"]
    for row in summary["rows"]:
        source = f"`{row['source']}`" + (f" ({row['commit']})" if row["commit"] else "")
        lines.append(f"| {row['what']} | **{row['value']}** | {row['target']} | {row['machine'] or '-'} | {source} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run every benchmark first, in one sitting")
    parser.add_argument("--out", default=str(RESULTS / "summary.json"))
    args = parser.parse_args()
    sitting = run_sitting(sys.executable) if args.run else None
    if sitting is None and (RESULTS / "summary.json").is_file():
        sitting = json.loads((RESULTS / "summary.json").read_text()).get("sitting")
    summary = summarise(sitting)
    Path(args.out).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(markdown(summary))
    if sitting:
        failed = [n for n, b in sitting["benchmarks"].items() if b["returncode"] != 0]
        print(f"\nsitting {sitting['started']} → {sitting['ended']}" + (f" on {sitting['cpu']}" if sitting.get("cpu") else "") + (f"; FAILED: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
