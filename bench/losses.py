"""Cost of the geokd feature losses, relative to one training step of a small encoder.

What it measures (CPU, float32, all in one run so that the ratios share the machine's state):

1. Reference: one training step (forward + backward + AdamW step + zero_grad) of a 4-layer,
   256-wide BERT encoder (random init, no downloads) on a 32 x 128 batch of random token ids,
   timed before and after the losses; the reference is the mean of the two medians, and their
   difference (drift) is a noise indicator.
2. Forward + backward of every feature loss in `geokd.losses` (procrustes, gram, cka, proj, mse,
   cosine) for a student `[n, d_s]` that requires grad and a teacher `[n, d_t]` that does not, over
   sentence-level (n = 32, 128, 512) and token-level (n = 2048, 8192) shapes. `mse` and `cosine`
   need equal widths and are recorded as "n/a" for the unequal pairs here. Each time is the median
   over repeats after two warm-up calls; the number of repeats adapts to the cost of the case.
3. The Procrustes nuclear-norm formulation, picked by measurement, at (d_s, d_t) = (384, 768):
   geokd's default (float64 eigh of the smaller Gram matrix, teacher thin factor), `method="svd"`,
   no thin factor (full d_s x d_t cross-product), and PyTorch's built-in
   `torch.linalg.matrix_norm(..., ord="nuc")` autograd. Timed through the whole loss and on the bare
   nuclear norm, and checked on degenerate inputs (all-zero, rank-1): is the gradient finite, how
   large is it, how far from the default's.
4. The issue's targets: each geometry loss under 1% of the training step at n = 32, (384, 768),
   and under 15% at n = 8192, (384, 768).
5. The attention losses (issue #15), forward + backward for one mapped layer pair from captured
   tensors: `attn` (scores and probs) and `attn-relation` at an encoder shape (32 x 128 tokens,
   12 heads; student width 384, teacher 768, the relation over 12 heads) and a decoder shape
   (8 x 512 tokens, causal, 9 heads; student 288, teacher 576, 3 key/value heads). `rkd` and
   `spkd` run in the row grid of 2.; `rkd` refuses the token-level shapes (its angle term compares
   n³ triplets; at most `RKD_MAX_ROWS` rows) and is recorded as n/a there.

Run from the repository root:

    python bench/losses.py [--quick] [--repeats N] [--threads N] [--out PATH]

The full grid takes 2-3 minutes on 2 idle CPU cores; `--quick` (target shapes only) under half a
minute. Results are printed as tables and written as JSON to `--out` (default
`bench/results/losses.json`). Other work on the same cores distorts small cases badly (torch's
worker threads wait on each other): the JSON's `noise_warnings` flag step drift and a high load
average, and `min_ms` far below the median is another sign. `--threads N` sets torch's thread count
for the whole run (reference step included).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import geokd  # noqa: E402
from geokd.errors import GeokdError  # noqa: E402
from geokd.losses import (  # noqa: E402
    build_feature_loss,
    feature_loss_names,
    geometry,
    procrustes,
)
from geokd.losses._core import cross_nuclear_norm, nuclear_norm  # noqa: E402
from geokd.losses.attention import AttentionRows  # noqa: E402
from geokd.losses.registry import ATTENTION_LOSSES  # noqa: E402

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Widths = tuple[int, int]  # (d_s, d_t)
Row = dict[str, Any]

SEED = 0
GEOMETRY_LOSSES = ("procrustes", "gram", "cka")
FORMULATION_WIDTHS: Widths = (384, 768)
TARGETS = ((32, 1.0), (8192, 15.0))  # (n, limit in % of the training step), at FORMULATION_WIDTHS
MIN_REPEATS, MAX_REPEATS = 3, 200
DEFAULT_OUT = Path("bench/results/losses.json")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Grid:
    """The shapes to time, and the seconds of timed repeats to aim for per case."""

    sentence_n: tuple[int, ...]
    sentence_widths: tuple[Widths, ...]
    token_n: tuple[int, ...]
    token_widths: tuple[Widths, ...]
    formulation_n: tuple[int, ...]
    budget_s: float
    step_budget_s: float


FULL = Grid(
    sentence_n=(32, 128, 512),
    sentence_widths=((384, 768), (128, 768), (768, 4096)),
    token_n=(2048, 8192),
    token_widths=((384, 768), (768, 4096)),
    formulation_n=(32, 8192),
    budget_s=2.0,
    step_budget_s=12.0,
)
QUICK = Grid(
    sentence_n=(32,),
    sentence_widths=(FORMULATION_WIDTHS,),
    token_n=(8192,),
    token_widths=(FORMULATION_WIDTHS,),
    formulation_n=(32, 8192),
    budget_s=0.25,
    step_budget_s=2.5,
)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    min_ms: float
    repeats: int


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(fn: Callable[[], object], budget_s: float, repeats: int | None = None) -> Timing:
    """Median wall time of `fn()` after two warm-up calls. Without `repeats`, as many repeats as fit
    in `budget_s` (judged from the faster warm-up call), clamped to [MIN_REPEATS, MAX_REPEATS]."""
    gc.collect()
    estimate = min(_seconds(fn), _seconds(fn))
    if repeats is None:
        repeats = min(MAX_REPEATS, max(MIN_REPEATS, math.floor(budget_s / max(estimate, 1e-9))))
    samples = [_seconds(fn) for _ in range(repeats)]
    return Timing(ms=1e3 * statistics.median(samples), min_ms=1e3 * min(samples), repeats=repeats)


def forward_backward_fn(
    loss: Callable[[], torch.Tensor], leaves: Iterable[torch.Tensor]
) -> Callable[[], None]:
    """A closure running `loss().backward()`, with the leaves' gradients cleared first (no accumulation)."""
    leaves = list(leaves)

    def run() -> None:
        for leaf in leaves:
            leaf.grad = None
        loss().backward()

    return run


def pct(ms: float | None, step_ms: float) -> float | None:
    return None if ms is None else 100.0 * ms / step_ms


# --------------------------------------------------------------------------------------------
# Reference: one training step of a small encoder
# --------------------------------------------------------------------------------------------

ENCODER = dict(
    vocab_size=30522,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    num_labels=2,
)
BATCH, SEQ_LEN = 32, 128


def training_step_fn() -> Callable[[], None]:
    """A closure running one forward + backward + AdamW step + zero_grad on a fixed random batch."""
    import transformers  # heavy; only needed here

    torch.manual_seed(SEED)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**ENCODER))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(0, ENCODER["vocab_size"], (BATCH, SEQ_LEN))
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, ENCODER["num_labels"], (BATCH,))

    def step() -> None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------------------------
# Feature losses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    level: str
    n: int
    d_s: int
    d_t: int
    loss: str
    ms: float | None = None
    min_ms: float | None = None
    repeats: int | None = None
    pct_of_step: float | None = None
    note: str | None = None


def make_pair(n: int, d_s: int, d_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 student `[n, d_s]` that requires grad and a teacher `[n, d_t]` that does not."""
    torch.manual_seed(SEED)
    return torch.randn(n, d_s, requires_grad=True), torch.randn(n, d_t)


def case_shapes(grid: Grid) -> list[tuple[str, int, int, int]]:
    sentence = [("sentence", n, d_s, d_t) for n in grid.sentence_n for d_s, d_t in grid.sentence_widths]
    token = [("token", n, d_s, d_t) for n in grid.token_n for d_s, d_t in grid.token_widths]
    return sentence + token


def time_loss(case: Case, budget_s: float, repeats: int | None) -> Case:
    try:
        module = build_feature_loss(case.loss, case.d_s, case.d_t)
    except GeokdError:
        return replace(case, note="n/a: needs equal widths")
    student, teacher = make_pair(case.n, case.d_s, case.d_t)
    try:
        module(student, teacher)
    except GeokdError as refused:  # rkd above RKD_MAX_ROWS rows
        return replace(case, note=f"n/a: {str(refused).split(';')[0]}")
    run = forward_backward_fn(partial(module, student, teacher), [student, *module.parameters()])
    return replace(case, **asdict(measure(run, budget_s, repeats)))


def time_all_losses(grid: Grid, repeats: int | None, console: Console) -> list[Case]:
    cases = []
    for level, n, d_s, d_t in case_shapes(grid):
        console.log(f"losses: {level} n={n} ({d_s}, {d_t})")
        for name in feature_loss_names():
            if name in ATTENTION_LOSSES:  # they read attention, not rows: time_attention_losses
                continue
            cases.append(time_loss(Case(level, n, d_s, d_t, name), grid.budget_s, repeats))
    return cases


# (name, batch, tokens, heads, key/value heads, student head width, teacher head width, causal)
ATTENTION_SHAPES = (
    ("encoder", 32, 128, 12, 12, 32, 64, False),
    ("decoder", 8, 512, 9, 3, 32, 64, True),
)


def _attention_rows(kind: str, b: int, t: int, heads: int, kv: int, dh: int, causal: bool, grad: bool) -> AttentionRows:
    lengths = torch.randint(t // 2, t + 1, (b,), generator=torch.Generator().manual_seed(SEED))
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    if kind == "scores":
        q, k = torch.randn(b, heads, t, dh).requires_grad_(grad), torch.randn(b, kv, t, dh).requires_grad_(grad)
        return AttentionRows("scores", q, k, mask, mask, causal, scaling=dh**-0.5)
    q, k, v = (torch.randn(b, t, heads * dh).requires_grad_(grad) for _ in range(3))
    return AttentionRows("qkv", q, k, mask, mask, causal, value=v)


def time_attention_losses(grid: Grid, repeats: int | None) -> list[Row]:
    """Forward + backward of each attention loss for one layer pair (module docstring, 5.)."""
    rows = []
    for shape, b, t, heads, kv, dh_s, dh_t, causal in ATTENTION_SHAPES:
        torch.manual_seed(SEED)
        for name, options in (("attn", {"map": "scores"}), ("attn", {"map": "probs"}), ("attn-relation", {"heads": heads})):
            kind = "scores" if name == "attn" else "qkv"
            student = _attention_rows(kind, b, t, heads, kv if kind == "scores" else heads, dh_s, causal, True)
            teacher = _attention_rows(kind, b, t, heads, kv if kind == "scores" else heads, dh_t if kind == "qkv" else dh_s,
                                      causal, False)  # fmt: skip
            module = build_feature_loss(name, 0, 0, **options)
            leaves = [x for x in (student.query, student.key, student.value) if x is not None]
            timing = measure(forward_backward_fn(partial(module, student, teacher), leaves), grid.budget_s, repeats)
            rows.append(dict(shape=shape, loss=name, options=options, batch=b, tokens=t, heads=heads, kv_heads=kv,
                             student_width=heads * dh_s, teacher_width=heads * dh_t, causal=causal, **asdict(timing)))  # fmt: skip
    return rows


def attention_table(rows: list[Row], step_ms: float) -> Table:
    return _table(
        f"Attention losses, one layer pair, forward+backward: ms (% of the {step_ms:.0f} ms training step)",
        ["shape", "loss", "B x T", "heads", "widths s → t", "median ms", "% of step"],
        [[r["shape"], r["loss"] + (f" ({r['options']['map']})" if "map" in r["options"] else
                                   f" (R={r['options']['heads']})"),
          f"{r['batch']} x {r['tokens']}", f"{r['heads']}" + (f" (kv {r['kv_heads']})" if r["kv_heads"] != r["heads"] else ""),
          f"{r['student_width']} → {r['teacher_width']}", f"{r['ms']:.1f}", _num(r["pct_of_step"])] for r in rows],
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Procrustes formulations
# --------------------------------------------------------------------------------------------


def procrustes_via(cross_nuc: LossFn) -> LossFn:
    """`geokd.losses.procrustes` with its cross nuclear norm `‖S̃ᵀT̃‖_*` swapped for `cross_nuc`.

    The swap patches the name inside `geokd.losses.geometry` for the forward call only (autograd
    keeps the graph it built), so every formulation runs geokd's own centring, scaling and
    accumulation and differs from the default in the nuclear norm alone."""
    if not hasattr(geometry, "cross_nuclear_norm"):
        raise RuntimeError("geokd.losses.geometry no longer calls cross_nuclear_norm; update procrustes_via")

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        with mock.patch.object(geometry, "cross_nuclear_norm", cross_nuc):
            return procrustes(student, teacher)

    return loss


# The nuclear norm of one matrix `m [p, q]`, three ways; the first is geokd's default.
NUCLEAR_NORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "eigh": partial(nuclear_norm, method="eigh"),
    "svd": partial(nuclear_norm, method="svd"),
    "builtin": lambda m: torch.linalg.matrix_norm(m, ord="nuc").double(),
}

# The whole Procrustes loss, four ways; the first is geokd's default.
FORMULATIONS: dict[str, tuple[str, LossFn]] = {
    "default": ("geokd default: eigh of the smaller Gram (float64), teacher thin factor", procrustes),
    "svd": (
        'custom function, method="svd" (float64 thin SVD), teacher thin factor',
        procrustes_via(partial(cross_nuclear_norm, method="svd")),
    ),
    "no_thin_factor": (
        "custom function, eigh, full d_s x d_t cross-product",
        procrustes_via(lambda s, t: NUCLEAR_NORMS["eigh"](s.T @ t)),
    ),
    "builtin": (
        'torch.linalg.matrix_norm(S~^T T~, ord="nuc") with built-in autograd (float32 SVD)',
        procrustes_via(lambda s, t: NUCLEAR_NORMS["builtin"](s.T @ t)),
    ),
}


def time_formulations(grid: Grid, repeats: int | None) -> list[Row]:
    """Forward + backward of the whole Procrustes loss, per formulation."""
    d_s, d_t = FORMULATION_WIDTHS
    rows = []
    for n in grid.formulation_n:
        student, teacher = make_pair(n, d_s, d_t)
        note = None if n < d_t else "n >= d_t: no thin factor, so default and no_thin_factor coincide"
        for name, (description, fn) in FORMULATIONS.items():
            run = forward_backward_fn(partial(fn, student, teacher), [student])
            timing = measure(run, grid.budget_s, repeats)
            value = fn(student, teacher).item()
            row = dict(n=n, d_s=d_s, d_t=d_t, formulation=name, description=description, **asdict(timing))
            rows.append(dict(row, value=value, note=note))
    return rows


def time_nuclear_norms(grid: Grid, repeats: int | None) -> list[Row]:
    """Forward + backward of the bare nuclear norm of a random float32 `[d_s, k]` matrix: k = 32 is
    the thin-factor shape at n = 32, k = d_t the full cross-product."""
    d_s, d_t = FORMULATION_WIDTHS
    rows = []
    for k in (32, d_t):
        torch.manual_seed(SEED)
        m = torch.randn(d_s, k, requires_grad=True)
        for name, fn in NUCLEAR_NORMS.items():
            timing = measure(forward_backward_fn(partial(fn, m), [m]), grid.budget_s, repeats)
            rows.append(dict(shape=[d_s, k], method=name, **asdict(timing)))
    return rows


def degenerate_inputs(rows: int, cols: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(SEED)
    return {"zeros": torch.zeros(rows, cols), "rank1": torch.outer(torch.randn(rows), torch.randn(cols))}


def gradient_report(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reference: torch.Tensor | None
) -> tuple[Row, torch.Tensor]:
    """Value of `fn(x)`, and its gradient's finiteness, size and distance to `reference` (if any)."""
    leaf = x.clone().requires_grad_(True)
    value = fn(leaf)
    value.backward()
    grad = leaf.grad
    finite = bool(torch.isfinite(grad).all())
    report = dict(
        value=value.item(),
        value_finite=math.isfinite(value.item()),
        grad_finite=finite,
        grad_max_abs=grad.abs().max().item() if finite else None,
        grad_max_abs_diff_vs_default=None
        if reference is None or not finite
        else (grad - reference).abs().max().item(),
    )
    return report, grad


def degenerate_checks(n: int = 32) -> list[Row]:
    """Each formulation on degenerate inputs (all-zero, rank-1): through the whole Procrustes loss
    (student `[n, d_s]`; centring already maps an all-zero student to exactly zero) and on the bare
    nuclear norm of a `[d_s, d_t]` matrix (no centring guard). The first formulation of each group,
    geokd's default, gives the reference gradient."""
    d_s, d_t = FORMULATION_WIDTHS
    torch.manual_seed(SEED + 1)
    teacher = torch.randn(n, d_t)
    whole_loss = {name: partial(fn, teacher=teacher) for name, (_, fn) in FORMULATIONS.items()}
    groups = [
        ("procrustes", f"student [{n}, {d_s}]", degenerate_inputs(n, d_s), whole_loss),
        ("nuclear_norm", f"matrix [{d_s}, {d_t}]", degenerate_inputs(d_s, d_t), NUCLEAR_NORMS),
    ]
    rows = []
    for target, shape, inputs, fns in groups:
        for kind, x in inputs.items():
            reference = None
            for name, fn in fns.items():
                report, grad = gradient_report(fn, x, reference)
                reference = grad if reference is None else reference
                rows.append(dict(target=target, input=kind, shape=shape, formulation=name, **report))
    return rows


# --------------------------------------------------------------------------------------------
# Targets, machine and code info, output
# --------------------------------------------------------------------------------------------


def check_targets(cases: list[Case]) -> list[Row]:
    d_s, d_t = FORMULATION_WIDTHS
    by_key = {(c.n, c.d_s, c.d_t, c.loss): c for c in cases}
    checks = []
    for n, limit in TARGETS:
        for loss in GEOMETRY_LOSSES:
            case = by_key.get((n, d_s, d_t, loss))
            measured = case.pct_of_step if case else None
            passed = None if measured is None else measured < limit
            checks.append(
                dict(loss=loss, n=n, d_s=d_s, d_t=d_t, limit_pct=limit, pct_of_step=measured, passed=passed)
            )
    return checks


def load_average() -> float | None:
    """1-minute load average (None where the OS has none). Above ~0.5 before the run, or well above
    the thread count after it, means other work shared the cores and the timings are noisy."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def noise_warnings(
    before: Timing, after: Timing, load_before: float | None, load_after: float | None
) -> list[str]:
    """Signs that other work shared the cores during the run (then small cases can be 10-100x slow:
    torch's worker threads wait a whole scheduler slice for each other)."""
    warnings = []
    drift = abs(after.ms - before.ms) / min(before.ms, after.ms)
    if drift > 0.10:
        warnings.append(f"training step drifted {100 * drift:.0f}% ({before.ms:.0f} -> {after.ms:.0f} ms)")
    if load_before is not None and load_before > 0.5:
        warnings.append(f"load average {load_before:.2f} before the run")
    busy = torch.get_num_threads() + 0.5
    if load_after is not None and load_after > busy:
        warnings.append(
            f"load average {load_after:.2f} after the run (> {busy:g} expected from this process)"
        )
    return warnings


def machine_info() -> Row:
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        python=sys.version.split()[0],
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        geokd=geokd.__version__,
    )


def code_info() -> Row:
    """The commit, whether geokd/ differs from it, and a hash of the loss sources actually timed."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--", "geokd")
    digest = hashlib.sha256()
    for path in sorted(Path(geokd.__file__).parent.joinpath("losses").glob("*.py")):
        digest.update(path.read_bytes())
    return dict(
        git_commit=git("rev-parse", "HEAD"),
        geokd_dirty=None if status is None else bool(status),
        losses_sha256=digest.hexdigest()[:16],
    )


def write_json_atomic(path: Path, payload: Row) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        try:
            json.dump(payload, tmp, indent=2)
            tmp.write("\n")
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)  # a temp file is created 0600; give it a normal file's mode
    os.replace(tmp.name, path)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _table(
    title: str, columns: Iterable[str], rows: Iterable[Iterable[str]], caption: str | None = None
) -> Table:
    table = Table(title=title, caption=caption)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def _num(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def cases_table(cases: list[Case], step_ms: float) -> Table:
    """One row per shape, one column per loss; losses that are n/a for every shape go in the caption."""
    measured = [
        name for name in feature_loss_names() if any(c.loss == name and c.ms is not None for c in cases)
    ]
    skipped = sorted({c.loss for c in cases} - set(measured))
    by_shape: dict[tuple[str, int, int, int], dict[str, Case]] = {}
    for c in cases:
        by_shape.setdefault((c.level, c.n, c.d_s, c.d_t), {})[c.loss] = c
    rows = [
        [level, str(n), f"{d_s} → {d_t}", *(_loss_cell(by_loss[name]) for name in measured)]
        for (level, n, d_s, d_t), by_loss in by_shape.items()
    ]
    return _table(
        f"Feature loss forward+backward: ms (% of the {step_ms:.0f} ms training step)",
        ["level", "n", "d_s → d_t", *measured],
        rows,
        caption=f"{', '.join(skipped)}: n/a (need equal widths)" if skipped else None,
    )


def _loss_cell(case: Case) -> str:
    return "n/a" if case.ms is None else f"{case.ms:.2f} ({case.pct_of_step:.2f}%)"


def formulation_tables(formulations: Row) -> list[Table]:
    whole = _table(
        f"Procrustes formulations, whole loss forward+backward at (d_s, d_t) = {FORMULATION_WIDTHS}",
        ["n", "formulation", "median ms", "min ms", "% of step", "value"],
        (
            [
                str(r["n"]),
                r["formulation"],
                _num(r["ms"]),
                _num(r["min_ms"]),
                _num(r["pct_of_step"]),
                f"{r['value']:.6f}",
            ]
            for r in formulations["loss"]
        ),
    )
    bare = _table(
        "Bare nuclear norm forward+backward",
        ["matrix", "method", "median ms", "min ms"],
        (
            [f"{r['shape'][0]} × {r['shape'][1]}", r["method"], _num(r["ms"]), _num(r["min_ms"])]
            for r in formulations["nuclear_norm"]
        ),
    )
    robust = _table(
        "Formulations on degenerate inputs",
        ["on", "input", "formulation", "value", "grad finite", "max |g|", "max |g − g_default|"],
        (
            [
                r["target"],
                r["input"],
                r["formulation"],
                f"{r['value']:.6g}",
                str(r["grad_finite"]),
                _num(r["grad_max_abs"], ".3g"),
                _num(r["grad_max_abs_diff_vs_default"], ".3g"),
            ]
            for r in formulations["degenerate"]
        ),
    )
    return [whole, bare, robust]


def targets_table(checks: list[Row]) -> Table:
    verdict = {True: "[green]pass", False: "[red]FAIL", None: "not measured"}
    return _table(
        f"Targets: geometry losses vs the training step at (d_s, d_t) = {FORMULATION_WIDTHS}",
        ["loss", "n", "limit", "measured", "result"],
        (
            [
                c["loss"],
                str(c["n"]),
                f"< {c['limit_pct']:g}%",
                "-" if c["pct_of_step"] is None else f"{c['pct_of_step']:.2f}%",
                verdict[c["passed"]],
            ]
            for c in checks
        ),
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="target shapes only; under half a minute")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed repeats per case (default: adaptive, {MIN_REPEATS}-{MAX_REPEATS})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = QUICK if args.quick else FULL
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console() if sys.stdout.isatty() else Console(width=130)  # no wrapping in logs
    started, load_before, code = time.perf_counter(), load_average(), code_info()  # code as imported
    if load_before is not None and load_before > 0.5:
        console.log(f"[yellow]load average {load_before:.2f} before the run: timings will be noisy")

    console.log("training step (before the losses)")
    step_fn = training_step_fn()
    step_before = measure(step_fn, grid.step_budget_s, args.repeats)
    cases = time_all_losses(grid, args.repeats, console)
    console.log("attention losses")
    attention = time_attention_losses(grid, args.repeats)
    console.log("procrustes formulations")
    formulations = dict(
        loss=time_formulations(grid, args.repeats),
        nuclear_norm=time_nuclear_norms(grid, args.repeats),
        degenerate=degenerate_checks(),
    )
    console.log("training step (after the losses)")
    step_after = measure(step_fn, grid.step_budget_s, args.repeats)

    step_ms = (step_before.ms + step_after.ms) / 2
    cases = [replace(c, pct_of_step=pct(c.ms, step_ms)) for c in cases]
    for row in [*formulations["loss"], *attention]:
        row["pct_of_step"] = pct(row["ms"], step_ms)
    targets = check_targets(cases)
    load_after = load_average()
    warnings = noise_warnings(step_before, step_after, load_before, load_after)

    payload = dict(
        mode="quick" if args.quick else "full",
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=machine_info(),
        code=code,
        load_average_1m=dict(before=load_before, after=load_after),
        noise_warnings=warnings,
        seed=SEED,
        repeats="adaptive" if args.repeats is None else args.repeats,
        training_step=dict(
            ms=step_ms,
            before=asdict(step_before),
            after=asdict(step_after),
            drift_pct=100.0 * (step_after.ms - step_before.ms) / step_before.ms,
            model="BertForSequenceClassification",
            config=ENCODER,
            batch=[BATCH, SEQ_LEN],
            optimizer="AdamW(lr=1e-4)",
        ),
        cases=[asdict(c) for c in cases],
        attention=attention,
        formulations=formulations,
        targets=targets,
        all_targets_passed=all(c["passed"] for c in targets if c["passed"] is not None),
        wall_s=time.perf_counter() - started,
    )
    write_json_atomic(args.out, payload)

    tables = (cases_table(cases, step_ms), attention_table(attention, step_ms), *formulation_tables(formulations),
              targets_table(targets))  # fmt: skip
    for table in tables:
        console.print(table)
    for warning in warnings:
        console.print(f"[yellow]noisy: {warning}")
    console.print(
        f"training step {step_ms:.1f} ms (before {step_before.ms:.1f}, after {step_after.ms:.1f}); "
        f"wrote {args.out} in {payload['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
