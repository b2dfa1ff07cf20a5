"""Geometry-aware feature alignment with the loss library, on real transformer hidden states.

A teacher BERT and a narrower student BERT (random weights built from configs, so nothing is
downloaded) read the same padded batch; the student is trained so that the geometry of its
token representations matches the teacher's at a mapped layer pair. Shows the two row layouts the
losses expect: one row per example (masked mean pooling) and one row per non-padding token.

    python examples/align_features.py [--loss procrustes] [--steps 50] [--features tokens]

The geokd distill command (next milestone) wraps exactly this with data, a task head, logit KD
and checkpoints.
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertModel

from geokd.losses import build_feature_loss, feature_loss_names


def rows(hidden: torch.Tensor, mask: torch.Tensor, features: str) -> torch.Tensor:
    """[B, T, D] hidden states + [B, T] attention mask -> [n, D] rows with padding removed."""
    if features == "tokens":
        return hidden[mask.bool()]  # [tokens in batch, D]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    return (hidden * weights).sum(1) / weights.sum(1)  # [B, D] masked mean


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", default="procrustes", choices=feature_loss_names())
    parser.add_argument("--features", default="mean", choices=["mean", "tokens"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    teacher = BertModel(
        BertConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)
    )
    student = BertModel(
        BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    )
    teacher.eval()
    batch, length = 16, 24
    input_ids = torch.randint(1000, 5000, (batch, length))
    lengths = torch.randint(6, length + 1, (batch,))
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # mixed lengths

    # Hugging Face hidden_states indexing: 0 = embeddings, i = output of block i.
    teacher_layer, student_layer = 4, 2
    with torch.no_grad():
        teacher_hidden = teacher(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        teacher_rows = rows(teacher_hidden.hidden_states[teacher_layer], attention_mask, args.features)

    loss_fn = build_feature_loss(args.loss, student.config.hidden_size, teacher.config.hidden_size)
    optimizer = torch.optim.AdamW([*student.parameters(), *loss_fn.parameters()], lr=1e-3)
    history = []
    for step in range(args.steps + 1):
        out = student(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        student_rows = rows(out.hidden_states[student_layer], attention_mask, args.features)
        loss = loss_fn(student_rows, teacher_rows)
        history.append(loss.item())
        if step % 10 == 0 or step == args.steps:
            print(
                f"step {step:4d}  {args.loss}[{student_layer}->{teacher_layer}] = {loss.item():.5f}  rows = {student_rows.shape[0]}"
            )
        if step == args.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"loss": args.loss, "first": history[0], "last": history[-1], "rows": int(student_rows.shape[0])}


if __name__ == "__main__":
    main()
