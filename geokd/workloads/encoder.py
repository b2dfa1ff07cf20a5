"""The encoder workload: BERT-family classifiers on GLUE or custom data (issues #3-#5).

Data: a GLUE folder or custom CSV/TSV/JSONL (a custom task's labels come from its train split).
Models: a teacher with a trained head (labels mapped to the task's order by name), and a student
(`truncate:N`, `shrink:...` or pretrained); with `--cache` the teacher's logits and features are
read from disk and the teacher is loaded only to derive a truncate/shrink student. The objective is
`γ·task + α·Σ feature + (1−α)·τ²·KL` on one tokenised batch both models read. A micro-batch
weighs its number of examples.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from geokd.cache import TeacherCache, check_cache_matches, tokenizer_sha256
from geokd.config import RunConfig
from geokd.errors import GeokdError
from geokd.evaluate import check_max_length
from geokd.losses.objective import LossOutput, Objective
from geokd.runtime import Runtime
from geokd.workloads import Workload, attention_setup, cached_teacher_summary, place_models, teacher_summary


def distill_step(
    student: torch.nn.Module,
    objective: Objective,
    batch: dict[str, torch.Tensor],
    runtime: Runtime,
    teacher_outputs: Callable[
        [dict[str, torch.Tensor]], tuple[torch.Tensor | None, list[torch.Tensor] | None]
    ],
    student_features: Callable[[object, torch.Tensor], list],
    record: Callable[[], AbstractContextManager] = nullcontext,
) -> LossOutput:
    """Forward the student (and the teacher source) on one micro-batch and evaluate the objective.
    No backward, no optimizer: the caller owns those. `student_features(hidden states or what
    `record()` captured, attention mask)` gives the student's rows per layer pair (attention losses:
    `record` is the student's `AttentionTap.recording`)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_id")}
    features = bool(objective.layer_pairs)
    needs_hidden = features and objective.batch_level
    with runtime.autocast(), record() as captured:
        out = student(**inputs, output_hidden_states=needs_hidden)
    teacher_logits, teacher_feats = teacher_outputs(batch)
    student_feats = (
        student_features(out.hidden_states if needs_hidden else captured, batch["attention_mask"]) if features else None
    )
    return objective(out.logits.float(), batch["labels"], teacher_logits, student_feats, teacher_feats)


def encoder_workload(config: RunConfig, runtime: Runtime, warn: Callable[[str], None]) -> Workload:
    from geokd import data as data_lib
    from geokd import models as models_lib
    from geokd.engine import evaluate
    from geokd.tasks import get_task

    # Data. A custom task's label names are inferred from its train split and reused for dev.
    train_split = data_lib.load_split(
        get_task(config.task, text_fields=config.text_fields, label_field=config.label_field),
        config.data,
        "train",
    )
    task = train_split.task
    dev_split = data_lib.load_split(task, config.data, task.dev_split)
    num_labels = task.num_labels
    id2label = task.id2label or None

    # Models: the teacher and student read the same tokenised batch (same vocabulary). With --cache
    # the teacher is read from disk; it is loaded only to build a truncate:/shrink: student from it.
    teacher = None
    teacher_sha: str | None = None
    cache = TeacherCache(config.cache) if config.mode == "distill" and config.cache else None
    derived = models_lib.parse_student_spec(config.student).kind != "pretrained"
    if config.mode == "distill" and (cache is None or derived):
        teacher = models_lib.load_teacher(
            config.teacher or cache.manifest["teacher"]["path_or_id"],  # type: ignore[union-attr]
            num_labels=num_labels,
            id2label=id2label,
            trust_remote_code=config.trust_remote_code,
        )
        def calibration() -> list[dict[str, torch.Tensor]]:  # prune: seeded training examples
            from geokd.flexkd import batches_of, sample_indices

            features = data_lib.tokenize_examples(train_split, teacher.tokenizer, config.max_length)
            picked = sample_indices(len(features), config.prune_samples, config.seed)
            collate = data_lib.make_collate_fn(teacher.tokenizer, task)
            return list(batches_of(features, picked, collate, config.batch_size, runtime.device))

        if models_lib.parse_student_spec(config.student).kind == "prune":
            teacher.model.to(runtime.device)  # the calibration pass runs where training will
        student = models_lib.load_student(
            config.student, teacher, trust_remote_code=config.trust_remote_code, seed=config.seed,
            calibration=calibration,
        )  # fmt: skip
    else:  # finetune, or distill of a pretrained student from --cache: no teacher at all
        student = models_lib.load_model(
            config.student,
            num_labels=num_labels,
            id2label=id2label,
            trust_remote_code=config.trust_remote_code,
        )
    tokenizer = student.tokenizer
    for loaded in (student, teacher):
        if loaded is not None:
            check_max_length(loaded, config.max_length)
            for message in getattr(loaded, "warnings", ()):
                warn(message)
    if cache is not None:
        teacher_info = cached_teacher_summary(config.teacher, cache.manifest, cache.path)
        teacher_sha = teacher.source.weights_sha256 if teacher is not None else None
        if teacher_sha is None and config.teacher:
            teacher_sha = models_lib.model_source(config.teacher).weights_sha256
        teacher = None  # never run: a derived student has its copy of the weights it needs
    elif teacher is not None:
        teacher_info = teacher_summary(config.teacher, teacher)
        teacher_sha = teacher.source.weights_sha256
    else:
        teacher_info = None
    train_features = data_lib.tokenize_examples(train_split, tokenizer, config.max_length)
    dev_features = data_lib.tokenize_examples(dev_split, tokenizer, config.max_length)
    collate = data_lib.make_collate_fn(tokenizer, task)
    if config.features == "cls" and config.loss != "none" and getattr(tokenizer, "padding_side", "right") == "left":
        raise GeokdError(
            "features: cls pooling reads position 0, but the tokenizer pads on the left; use --features mean"
        )

    layer_pairs: list[tuple[int, int]] = []
    if teacher_info is not None and config.loss != "none":
        layer_pairs = models_lib.parse_layer_map(
            config.layers, student.num_layers, teacher_info["layers"], getattr(student, "teacher_blocks", None)
        )
    if cache is not None:
        check_cache_matches(
            cache.manifest,
            task=task.name,
            data_fingerprint=train_split.fingerprint,
            max_length=config.max_length,
            features=config.features,
            teacher_layers=sorted({t for _, t in layer_pairs}),
            needs_logits=config.alpha < 1.0,
            tokenizer_hash=tokenizer_sha256(tokenizer),
            teacher_sha256=teacher_sha,
            teacher_name=config.teacher,
        )
    if config.loss == "flexkd" and cache is not None and layer_pairs:
        from geokd.flexkd import check_cache_entry

        check_cache_entry(cache.manifest.get("flexkd"), config.flexkd_samples, config.flexkd_output)
    attention = attention_setup(config, student.model, teacher.model, layer_pairs, causal=False) if teacher else None
    objective = Objective(
        config.loss,
        layer_pairs,
        student.config.hidden_size,
        teacher_info["hidden"] if teacher_info is not None else 1,
        alpha=config.alpha,
        gamma=config.gamma,
        temperature=config.temperature,
        mode=config.mode,
        flexkd_basis=config.flexkd_basis,
        loss_options=attention.options if attention is not None else None,
    ).to(runtime.device)
    place_models(student, teacher, runtime.device)

    student_layers = [s for s, _ in layer_pairs]
    teacher_layers = [t for _, t in layer_pairs]

    def teacher_outputs(batch: dict[str, torch.Tensor]):
        if cache is not None:
            logits, rows = cache.lookup(batch["example_id"], teacher_layers)
            if (
                config.features == "tokens"
                and rows
                and rows[0].shape[0] != int(batch["attention_mask"].sum())
            ):
                raise GeokdError(
                    f"--cache: the cache holds {rows[0].shape[0]} token rows for this batch, the student's batch has "
                    f"{int(batch['attention_mask'].sum())} tokens; the cache was tokenised differently, rebuild it"
                )
            logits = logits.to(runtime.device) if logits is not None else None
            return logits, [r.to(runtime.device) for r in rows] if layer_pairs else None
        if teacher is None:
            return None, None
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_id")}
        if attention is not None:
            with torch.no_grad(), runtime.autocast(), attention.teacher.recording() as captured:
                out = teacher.model(**inputs)
            mask = batch["attention_mask"].bool()
            return out.logits.float(), attention.teacher.rows(captured, teacher_layers, mask, mask)
        with torch.no_grad(), runtime.autocast():
            out = teacher.model(**inputs, output_hidden_states=bool(layer_pairs))
        feats = (
            models_lib.extract_features(
                out.hidden_states, batch["attention_mask"], teacher_layers, config.features
            )
            if layer_pairs
            else None
        )
        return out.logits.float(), feats

    def student_features(hidden_states, attention_mask):
        if attention is not None:  # what the student's tap recorded
            mask = attention_mask.bool()
            return attention.student.rows(hidden_states, student_layers, mask, mask)
        return models_lib.extract_features(hidden_states, attention_mask, student_layers, config.features)

    record = attention.student.recording if attention is not None else nullcontext

    def step(batch: dict[str, torch.Tensor]) -> LossOutput:
        return distill_step(student.model, objective, batch, runtime, teacher_outputs, student_features, record)

    def dev_metrics() -> dict[str, float]:
        return evaluate(student.model, dev_features, collate, runtime, task, config.batch_size)

    def score_flexkd(indices: list[int]) -> dict:
        """Flex-KD's scoring pass (geokd.flexkd): the teacher's classifier output on `indices`, or
        the scores the cache holds."""
        from geokd import flexkd as flexkd_lib

        tangent = config.flexkd_basis == "tangent"
        if cache is not None:
            return flexkd_lib.cached_scores(cache.path, cache.manifest["flexkd"], teacher_layers, tangent)
        assert teacher is not None
        forward = flexkd_lib.encoder_forward(teacher.model, config.flexkd_output, runtime.autocast)
        batches = flexkd_lib.batches_of(train_features, indices, collate, config.batch_size, runtime.device)
        return flexkd_lib.score_teacher(teacher.model, batches, teacher_layers, forward, tangent=tangent)

    def final_evaluate() -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        metrics = dev_metrics()
        other_splits = {}  # MNLI: dev_mismatched next to dev_matched
        for split in task.eval_splits[1:]:
            extra = data_lib.tokenize_examples(
                data_lib.load_split(task, config.data, split), tokenizer, config.max_length
            )
            other_splits[split] = evaluate(student.model, extra, collate, runtime, task, config.batch_size)
        return metrics, other_splits

    return Workload(
        kind="encoder",
        task=task.name,
        dev_split=dev_split.split,
        student=student,
        tokenizer=tokenizer,
        teacher_info=teacher_info,
        teacher_sha256=teacher_sha,
        layer_pairs=layer_pairs,
        objective=objective,
        train_features=train_features,
        dev_examples=len(dev_features),
        collate=collate,
        data={"train": train_split.fingerprint, dev_split.split: dev_split.fingerprint},
        step=step,
        size=lambda batch: int(batch["example_id"].shape[0]),
        evaluate=dev_metrics,
        final_evaluate=final_evaluate,
        score_flexkd=score_flexkd if teacher is not None or cache is not None else None,
        teacher_model=teacher.model if teacher is not None else None,
        attention_note=attention.notes if attention is not None else [],
    )
