"""The geometry benchmark behind `geokd synthetic`: what each feature loss does to the student's
representation geometry, on problems small enough to see the answer (arXiv 2509.25253, §4 and
Theorem 1).

1. Optimisation. A teacher of n random unit vectors in d_t dimensions (n > d_t by default: the
   over-complete regime, where near-orthogonal directions live in superposition) and a student
   matrix [n, d_s], d_s < d_t, optimised directly under each loss from the same random start. We
   count the teacher's ε-orthogonal pairs (|cos| ≤ ε) that stay ε-orthogonal in the student, and
   the size of a maximal set of examples whose pairs are all preserved, over steps.
2. The CKA counterexample. (a) n points in two antiparallel clusters in d_t dimensions; (b) the
   same with a subset moved by δ, each along its own direction orthogonal to everything else; (c)
   an exact copy of (a) in d_s dimensions. CKA barely tells (b) from (a) (its loss is O(δ⁴)) while
   Procrustes and Gram see the perturbation (O(δ²)). We measure the order from δ and δ/2.

Cosines are taken between row-centred vectors: every geometry loss here is translation-invariant,
so the student's mean is arbitrary and only centred geometry is comparable.

Run: `geokd synthetic --json out.json --plot out.png` (about 10 s on a laptop CPU by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

import geokd
from geokd.errors import GeokdError
from geokd.losses import build_feature_loss, cka, gram, procrustes

OPTIMISED_LOSSES = ("procrustes", "gram", "cka", "proj")


@dataclass(frozen=True)
class SyntheticConfig:
    n: int = 256  # teacher vectors (rows)
    d_teacher: int = 64
    d_student: int = 32
    epsilon: float = 0.1  # |cos| ≤ ε counts as ε-orthogonal
    delta: float = 0.1  # counterexample perturbation size
    steps: int = 500
    lr: float = 0.01
    seed: int = 0
    log_every: int = 10
    counterexample_n: int = 32
    losses: tuple[str, ...] = field(default=OPTIMISED_LOSSES)

    def validate(self) -> None:
        """Raise one GeokdError listing every problem, each with the value received and a fix."""
        problems = []
        if self.n < 3:
            problems.append(f"n must be at least 3, got {self.n}")
        if self.d_teacher < 2:
            problems.append(f"d_teacher must be at least 2, got {self.d_teacher}")
        if not 1 <= self.d_student < self.d_teacher:
            problems.append(
                f"d_student must be between 1 and d_teacher - 1 = {self.d_teacher - 1} "
                f"(the student is the narrower model), got {self.d_student}"
            )
        if not 0.0 < self.epsilon < 1.0:
            problems.append(f"epsilon must be in (0, 1), got {self.epsilon}; 0.1 is a common choice")
        if not 0.0 < self.delta <= 1.0:
            problems.append(f"delta must be in (0, 1], got {self.delta}")
        if self.steps < 1:
            problems.append(f"steps must be at least 1, got {self.steps}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.log_every < 1:
            problems.append(f"log_every must be at least 1, got {self.log_every}")
        if self.counterexample_n < 4 or self.counterexample_n % 2:
            problems.append(f"counterexample_n must be an even number ≥ 4, got {self.counterexample_n}")
        unknown = [name for name in self.losses if name not in OPTIMISED_LOSSES]
        if unknown or not self.losses:
            problems.append(
                f"losses must be a non-empty subset of {', '.join(OPTIMISED_LOSSES)}, got {list(self.losses)}"
            )
        if problems:
            raise GeokdError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Pair statistics
# ---------------------------------------------------------------------------------------------


def centred_cosines(x: torch.Tensor) -> np.ndarray:
    """[n, d] -> [n, n] cosine similarities between row-centred vectors (float64)."""
    x = x.detach().double()
    x = x - x.mean(dim=0, keepdim=True)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-300)
    return (x @ x.T).numpy()


def orthogonal_pairs(cos: np.ndarray, epsilon: float) -> np.ndarray:
    """Boolean [n, n] adjacency of ε-orthogonal pairs (diagonal False)."""
    adj = np.abs(cos) <= epsilon
    np.fill_diagonal(adj, False)
    return adj


def greedy_max_set(adj: np.ndarray) -> int:
    """Size of a maximal clique of `adj`, built greedily (always adding the candidate with the most
    neighbours among the remaining candidates). A maximum clique is NP-hard; a maximal one is a
    deterministic lower bound that is comparable across losses."""
    candidates = np.ones(adj.shape[0], dtype=bool)
    size = 0
    while candidates.any():
        degrees = np.where(candidates, (adj & candidates).sum(axis=1), -1)
        v = int(np.argmax(degrees))
        size += 1
        candidates &= adj[v]
    return size


def preserved(teacher_adj: np.ndarray, student: torch.Tensor, epsilon: float) -> tuple[int, int]:
    """(# teacher ε-orthogonal pairs still ε-orthogonal in the student, size of a maximal set of
    examples whose pairs are all preserved)."""
    both = teacher_adj & orthogonal_pairs(centred_cosines(student), epsilon)
    return int(np.triu(both).sum()), greedy_max_set(both)


# ---------------------------------------------------------------------------------------------
# Experiment 1: direct optimisation
# ---------------------------------------------------------------------------------------------


def make_teacher(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """n random unit vectors in d dimensions, [n, d] float32."""
    x = torch.randn(n, d, generator=generator)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def optimise(
    name: str,
    teacher: torch.Tensor,
    start: torch.Tensor,
    config: SyntheticConfig,
    teacher_adj: np.ndarray,
    on_step: Callable[[], None] | None = None,
) -> dict:
    """Optimise a copy of `start` [n, d_s] under loss `name` with Adam; return the final values and
    the history of loss and preserved pairs."""
    torch.manual_seed(config.seed)  # the same projection init for proj, whatever ran before
    loss_fn = build_feature_loss(name, start.shape[1], teacher.shape[1])
    student = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([student, *loss_fn.parameters()], lr=config.lr)
    history: dict[str, list] = {"step": [], "loss": [], "preserved_pairs": [], "max_preserved_set": []}
    for step in range(config.steps + 1):
        loss = loss_fn(student, teacher)
        if step % config.log_every == 0 or step == config.steps:
            pairs, max_set = preserved(teacher_adj, student, config.epsilon)
            history["step"].append(step)
            history["loss"].append(loss.item())
            history["preserved_pairs"].append(pairs)
            history["max_preserved_set"].append(max_set)
        if step == config.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step()
    return {
        "final_loss": history["loss"][-1],
        "preserved_pairs": history["preserved_pairs"][-1],
        "total_pairs": int(np.triu(teacher_adj).sum()),
        "max_preserved_set": history["max_preserved_set"][-1],
        "history": history,
    }


# ---------------------------------------------------------------------------------------------
# Experiment 2: the CKA counterexample
# ---------------------------------------------------------------------------------------------


def counterexample_sets(
    n: int, d_teacher: int, d_student: int, delta: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Return float64 (a [n, d_t], b [n, d_t], c [n, d_s], p): two antiparallel clusters; the same
    with p = min(n/4, d_t − 1) points each moved by δ along its own orthonormal direction
    orthogonal to the cluster axis; and an exact copy of (a) in d_s dimensions."""
    p = min(n // 4, d_teacher - 1)
    signs = torch.cat([torch.ones(n // 2), -torch.ones(n - n // 2)]).double()[:, None]  # [n, 1]
    frame = torch.linalg.qr(torch.randn(d_teacher, p + 1, generator=generator, dtype=torch.float64))[0]
    axis, directions = frame[:, :1], frame[:, 1:]  # [d_t, 1], [d_t, p], orthonormal together
    a = signs * axis.T  # [n, d_t]
    b = a.clone()
    moved = torch.randperm(n, generator=generator)[:p]
    b[moved] += delta * directions.T
    axis_s = torch.randn(d_student, 1, generator=generator, dtype=torch.float64)
    c = signs * (axis_s / torch.linalg.vector_norm(axis_s)).T  # [n, d_s]
    return a, b, c, p


def best_projection_loss(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """`min_W ‖S W − T‖²_F / n`: the projection loss at its optimal W (least squares)."""
    weight = torch.linalg.lstsq(student, teacher, driver="gelsd").solution
    return float(((student @ weight - teacher) ** 2).sum() / student.shape[0])


COUNTEREXAMPLE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "procrustes": lambda s, t: float(procrustes(s, t)),
    "gram": lambda s, t: float(gram(s, t)),
    "cka": lambda s, t: float(cka(s, t)),
    "proj": best_projection_loss,
}


def counterexample(config: SyntheticConfig) -> dict:
    """Every loss between (c) and (a) and between (c) and (b), at δ and δ/2, in float64."""
    results: dict = {}
    values = {}
    for delta in (config.delta, config.delta / 2):
        gen = torch.Generator().manual_seed(config.seed)  # same construction at both δ
        a, b, c, p = counterexample_sets(
            config.counterexample_n, config.d_teacher, config.d_student, delta, gen
        )
        values[delta] = {name: (fn(c, a), fn(c, b)) for name, fn in COUNTEREXAMPLE_LOSSES.items()}
    for name in COUNTEREXAMPLE_LOSSES:
        to_a, to_b = values[config.delta][name]
        half = values[config.delta / 2][name][1]
        order = math.log2(to_b / half) if to_b > 0 and half > 0 else float("nan")
        results[name] = {"to_a": to_a, "to_b": to_b, "to_b_half_delta": half, "order": order}
    return {"perturbed_points": p, "n": config.counterexample_n, "delta": config.delta, "losses": results}


# ---------------------------------------------------------------------------------------------
# Both experiments
# ---------------------------------------------------------------------------------------------


def run_synthetic(config: SyntheticConfig, on_step: Callable[[], None] | None = None) -> dict:
    """Run both experiments; returns a JSON-ready dict (schema in the README)."""
    config.validate()
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    teacher = make_teacher(config.n, config.d_teacher, gen)  # [n, d_t]
    start = torch.randn(config.n, config.d_student, generator=gen) / math.sqrt(config.d_student)  # [n, d_s]
    teacher_adj = orthogonal_pairs(centred_cosines(teacher), config.epsilon)
    losses = {name: optimise(name, teacher, start, config, teacher_adj, on_step) for name in config.losses}
    return {
        "geokd_version": geokd.__version__,
        "torch_version": torch.__version__,
        "config": {**asdict(config), "losses": list(config.losses)},
        "teacher": {
            "epsilon_orthogonal_pairs": int(np.triu(teacher_adj).sum()),
            "all_pairs": config.n * (config.n - 1) // 2,
            "max_orthogonal_set": greedy_max_set(teacher_adj),
        },
        "losses": losses,
        "counterexample": counterexample(config),
        "elapsed_s": time.perf_counter() - started,
    }


def plot_synthetic(result: dict, path: str) -> None:
    """PNG: preserved pairs vs step (left) and loss relative to its start (right), per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    total = result["teacher"]["epsilon_orthogonal_pairs"]
    for name, entry in result["losses"].items():
        hist = entry["history"]
        left.plot(hist["step"], hist["preserved_pairs"], label=name)
        first = hist["loss"][0] if hist["loss"][0] > 0 else 1.0
        right.plot(hist["step"], [max(v / first, 1e-12) for v in hist["loss"]], label=name)
    left.axhline(total, color="grey", linestyle="--", linewidth=1, label="teacher ε-orthogonal pairs")
    cfg = result["config"]
    left.set(
        xlabel="step",
        ylabel="preserved ε-orthogonal pairs",
        title=f"n={cfg['n']}, d_t={cfg['d_teacher']}, d_s={cfg['d_student']}, ε={cfg['epsilon']}",
    )
    right.set(xlabel="step", ylabel="loss / initial loss", yscale="log", title="loss")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
