"""What every benchmark records about where it ran (shared by bench/eval.py and bench/cache.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(root: Path) -> str | None:
    """HEAD of the checkout at `root`, or None outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return result.stdout.strip() or None


def write_result(out: str | Path, result: dict, root: Path) -> None:
    """Write a benchmark's JSON with where it ran (threads, machine, torch, commit) and say so."""
    import json
    import platform

    import torch

    result = {**result, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "commit": git_commit(root)}  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
