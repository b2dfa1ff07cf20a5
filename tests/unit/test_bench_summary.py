"""bench/summary.py (issue #16's Performance summary): every required number is read from the
benchmarks' JSONs with its machine, and met/missed follows the recorded values."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "bench" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_required_number_is_there_with_its_machine(summary):
    rows = summary.summarise()["rows"]
    text = " ".join(row["what"] for row in rows)
    for needed in ("% of a", "distill --cache / finetune", "decoder epoch, distill --cache", "cache bytes / minimum",
                   "eval throughput", "generation throughput", "KD peak memory", "GPU"):  # fmt: skip
        assert needed in text, needed
    assert all(row["machine"] for row in rows if not row["what"].startswith("GPU"))
    markdown = summary.markdown(summary.summarise())
    assert markdown.count("\n") == len(rows) + 1


def test_met_and_missed_follow_the_recorded_values(summary):
    losses = json.loads((ROOT / "bench" / "results" / "losses.json").read_text())
    rows = {row["what"]: row for row in summary.summarise()["rows"]}
    for target in losses["targets"]:
        [row] = [r for w, r in rows.items() if w.startswith(f"{target['loss']} at n = {target['n']} ")]
        assert row["value"] == f"{target['pct_of_step']:.2f}%"
        assert row["target"].endswith("met" if target["passed"] else "missed")
    kd = json.loads((ROOT / "bench" / "results" / "token_kd.json").read_text())
    [row] = [r for w, r in rows.items() if "KD peak memory" in w]
    assert row["value"] == f"{kd['memory_ratio_chunked_over_naive']:.3f}×"


def test_machine_reads_every_recording_style(summary):
    assert summary.machine({"device": "cpu", "cpu_count": 2, "threads": 2, "torch": "2.13.0+cpu"}) == (
        "cpu, 2 CPUs, 2 torch threads, torch 2.13.0+cpu")
    assert summary.machine({"machine": {"cpu_count": 4, "torch_threads": 4, "torch": "x"}}).startswith("cpu, 4 CPUs")
    assert summary.machine({"machine": "x86_64", "device_name": "NVIDIA H100", "threads": 8}).startswith("NVIDIA H100")
