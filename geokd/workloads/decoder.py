"""The decoder workload: causal LMs on instruction data, the MiniLLM / DistiLLM protocol (issue #11).

Data: `--task instruct --data FOLDER` with train.jsonl and dev.jsonl in any supported format
(`geokd.tasks.instruct`), rendered with `--template alpaca|chat`; prompt and padding tokens carry
label -100 and never enter a loss. Models: causal-LM teacher and student (`truncate:N`, `shrink:...`
or pretrained) sharing one tokenizer (checked before anything runs; vocabularies that differ only
by padding rows are sliced to the shared size). The objective is `geokd.losses.token_objective`.

One micro-batch: both models run their base transformer (not the LM head) on the same batch; the
final hidden states at the response positions (position t predicts token t + 1, so the positions
whose next token has a label) go to the chunked SFT and KD terms, and the mapped hidden states give
the feature rows (`tokens`: every response token; `mean`: the mean over an example's response
tokens; `last`: the last prompt token). A micro-batch weighs its number of response tokens.

Evaluation during training: the response-token loss and perplexity on dev (fast);
`--eval-generate N` adds greedy ROUGE-L on the first N dev examples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from geokd.config import RunConfig
from geokd.errors import GeokdError
from geokd.losses.objective import LossOutput
from geokd.losses.token_objective import TokenObjective, chunked_cross_entropy
from geokd.models.spans import span_rows
from geokd.runtime import Runtime
from geokd.workloads import Workload, attention_setup, cached_teacher_summary, place_models, teacher_summary


def response_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T-1] of positions whose next token is a response token, those next tokens [N])."""
    following = labels[:, 1:]
    mask = following != -100
    return mask, following[mask]


def teacher_view(batch: dict[str, torch.Tensor], own: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the teacher's inputs, its labels) of a batch: the batch itself, or with `own` (different
    tokenizers, `PairedCollator`) the teacher's own tokenisation of the same examples."""
    if not own:
        return batch, batch["labels"]
    return ({"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]},
            batch["teacher_labels"])  # fmt: skip


def aligned_rows(student_positions: torch.Tensor, teacher_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ULD's alignment (`geokd.losses.uld.uld_positions`): for each example, its first
    min(n_student, n_teacher) response positions on each side. Returns boolean masks over the
    rows of `hidden[:, :-1][positions]` (example after example) of the student and the teacher."""
    s_rank = student_positions.long().cumsum(dim=1) - 1
    t_rank = teacher_positions.long().cumsum(dim=1) - 1
    m = torch.minimum(student_positions.sum(dim=1), teacher_positions.sum(dim=1)).unsqueeze(1)
    return (s_rank < m)[student_positions], (t_rank < m)[teacher_positions]


@dataclasses.dataclass
class PairedCollator:
    """Cross-tokenizer batches: the student's batch plus the teacher's own tokenisation of the same
    examples (`teacher_input_ids`, `teacher_attention_mask`, `teacher_labels`)."""

    student: Any
    teacher: Any
    teacher_features: dict[int, dict[str, Any]]

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.student.warnings)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.student(features)
        other = self.teacher([self.teacher_features[int(f["example_id"])] for f in features])
        batch.update(teacher_input_ids=other["input_ids"], teacher_attention_mask=other["attention_mask"],
                     teacher_labels=other["labels"], teacher_prompt_length=other["prompt_length"])  # fmt: skip
        return batch


@dataclasses.dataclass
class SpanCollator:
    """Adds `student_spans [B, T_s]`, `teacher_spans [B, T_t]` (each position's span, -1 outside
    every span: prompt, padding, an unclosed tail) and `n_spans [B]` to the batches of `inner`
    (`--features spans`; `spans[example_id] = (student span ids, teacher span ids, n)` per
    response token)."""

    inner: Any
    spans: dict[int, tuple[list[int], list[int], int]]
    teacher_table: bool = True  # False: the teacher's rows come from a cache, pooled by `cached_span_rows`

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.inner.warnings)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(features)
        ids = [int(f["example_id"]) for f in features]
        sides = (("student", "input_ids", "prompt_length"), ("teacher", "teacher_input_ids", "teacher_prompt_length"))
        for side, key, prompt_key in sides[: 2 if self.teacher_table else 1]:
            width = batch[key if key in batch else "input_ids"].shape[1]
            prompts = batch[prompt_key if prompt_key in batch else "prompt_length"]
            table = torch.full((len(ids), width), -1, dtype=torch.long)
            for row, example in enumerate(ids):
                values = self.spans[example][0 if side == "student" else 1]
                start = int(prompts[row])
                table[row, start : start + len(values)] = torch.as_tensor(values, dtype=torch.long)
            batch[f"{side}_spans"] = table
        batch["n_spans"] = torch.tensor([self.spans[e][2] for e in ids], dtype=torch.long)
        return batch


def _token_ends(text: str, tokenizer: Any, feature: dict[str, Any]) -> list[int]:
    """End offsets of a feature's response tokens (as training cut them) in the response text."""
    from geokd.models.spans import response_token_ends

    full = response_token_ends(text, tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
    return full[: len(feature["input_ids"]) - feature["prompt_length"]]


def build_spans(split: Any, student_features: list[dict[str, Any]], student_tokenizer: Any,
                teacher_ends: Callable[[int, str], list[int]]) -> dict[int, tuple]:  # fmt: skip
    """`SpanCollator.spans` for the kept examples: the student's response tokens and the teacher's
    (`teacher_ends(example_id, response text)`) grouped at the character boundaries both
    tokenisations share (`geokd.models.spans`)."""
    from geokd.models.spans import common_spans

    texts = {e.example_id: e.response for e in split.examples}
    return {
        f["example_id"]: common_spans(_token_ends(texts[f["example_id"]], student_tokenizer, f),
                                      teacher_ends(f["example_id"], texts[f["example_id"]]))
        for f in student_features
    }  # fmt: skip


def cached_span_rows(rows: torch.Tensor, spans: list[tuple[list[int], list[int], int]]) -> torch.Tensor:
    """Pool a cache's token rows (the batch's examples one after another) into the teacher's span
    rows: `spans` are the batch's `(student ids, teacher ids, n)` in batch order."""
    index, base = [], 0
    for _, teacher_ids, n in spans:
        index += [t + base if t >= 0 else -1 for t in teacher_ids]
        base += n
    ids = torch.tensor(index, dtype=torch.long, device=rows.device)
    if ids.shape[0] != rows.shape[0]:
        raise GeokdError(f"--cache: {rows.shape[0]} cached token rows for {ids.shape[0]} span entries; rebuild the cache")
    return span_rows(rows.unsqueeze(0), ids.unsqueeze(0), torch.tensor([base], device=rows.device))


@dataclasses.dataclass
class SentenceCollator:
    """Encoder feature teacher: adds `teacher_input_ids` / `teacher_attention_mask`, the teacher's
    own tokenisation of each example's sentence (`texts[example_id]`), to the batches of `inner`."""

    inner: Any
    tokenizer: Any
    texts: dict[int, str]
    max_length: int

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.inner.warnings)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.inner(features)
        encoded = self.tokenizer([self.texts[int(f["example_id"])] for f in features], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")  # fmt: skip
        batch.update(teacher_input_ids=encoded["input_ids"], teacher_attention_mask=encoded["attention_mask"])
        return batch


def _sentences(split: Any, features: str) -> dict[int, str]:
    """What an encoder feature teacher embeds: the response (`mean`) or the prompt (`last`):
    the instruction, then a blank line and the input when there is one."""
    from geokd.tasks.instruct import prompt_messages

    if features == "mean":
        return {e.example_id: e.response for e in split.examples}
    return {e.example_id: "\n\n".join(m["content"] for m in prompt_messages(e)) for e in split.examples}


def _check_encoder_teacher(config: RunConfig, derived: bool) -> None:
    problems = []
    if derived:
        problems.append("truncate:/shrink: students are built from a causal-LM teacher: pass a causal-LM --student")
    if config.loss in ("attn", "attn-relation"):
        problems.append(f"--loss {config.loss} compares the two models' attention over the same tokens: use a feature "
                        "loss on mean or last rows")  # fmt: skip
    if config.loss != "none" and config.features not in ("mean", "last"):
        problems.append("an encoder embeds whole sentences: use --features mean (the response) or last (the prompt)")
    if config.alpha < 1.0:
        problems.append("an encoder has no next-token distribution: pass --alpha 1 (no token KD)")
    if problems:
        raise GeokdError(f"teacher: {config.teacher!r} is an encoder (a feature teacher); {'; '.join(problems)}")


def _cross_path(config: RunConfig, cached: bool = False) -> str:
    parts = ["each model tokenises the text itself"]
    if config.loss != "none":
        if config.features == "spans":
            parts.append("feature rows are spans (the shared token boundaries; each model's mean over its tokens)")
        else:
            rows = "one row per example: the mean over its response tokens" if config.features == "mean" else (
                "one row per example: the last prompt token")  # fmt: skip
            parts.append(f"feature rows are examples ({rows})")
    uld = "KD by ULD over the first min(n_student, n_teacher) response tokens"
    if cached:
        uld += " (top-k ranks + tail mass from the cache: a lower bound of ULD)"
    parts.append(uld if config.alpha < 1.0 else "no token KD (alpha 1)")
    return "; ".join(parts)


def _check_cross_tokenizer(config: RunConfig, difference: str, cached: bool = False) -> None:
    """Different tokenizers: example-level rows (`mean`, `last`), span rows (`spans`) and ULD (or
    no KD) are defined; from a cache, example-level or span rows with `--alpha 1`."""
    problems = []
    if config.loss in ("attn", "attn-relation"):
        problems.append(f"--loss {config.loss} compares attention position by position, which needs one tokenisation: "
                        "use a feature loss on mean, last or spans rows")  # fmt: skip
    if cached and config.features not in ("mean", "last", "spans") and config.loss != "none":
        problems.append("from a cache, use example-level rows (--features mean or last) or --features spans (from "
                        "cached token rows)")
    if cached and config.alpha < 1.0 and config.kd != "uld":
        problems.append("a cache's top-k ids are the teacher's vocabulary: use --kd uld (it compares sorted "
                        "probabilities) or pass --alpha 1 (no token KD)")  # fmt: skip
    if config.loss != "none" and config.features == "tokens":
        problems.append("token rows need one tokenisation: use --features spans (span-aligned token rows), mean or last")
    if config.alpha < 1.0 and config.kd != "uld" and not cached:
        problems.append(f"--kd {config.kd} compares one vocabulary: use --kd uld or --alpha 1 (no token KD)")
    if problems:
        raise GeokdError(f"tokenizer: {difference.removeprefix('tokenizer: ')}; {'; '.join(problems)}")


def _base_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], hidden: bool):
    """The transformer below the LM head: last_hidden_state (what the head reads) and, when asked,
    every layer's hidden states."""
    return model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden
    )


def decoder_workload(config: RunConfig, runtime: Runtime, warn: Callable[[str], None]) -> Workload:
    from geokd import models as models_lib
    from geokd.models import decoder as decoder_lib
    from geokd.tasks import instruct

    if config.data is None:
        raise GeokdError("--data: --task instruct needs a folder holding train.jsonl and dev.jsonl")
    train_split = instruct.load_instruct_split(config.data, "train", format=config.format)
    dev_split = instruct.load_instruct_split(config.data, "dev", format=config.format)

    # With --cache the teacher is read from disk: it is loaded only to build a truncate:/shrink:
    # student from its weights, and never run.
    teacher = None
    cache = None
    if config.mode == "distill" and config.cache:
        from geokd.cache_decoder import DecoderCache

        cache = DecoderCache(config.cache)
    derived = models_lib.parse_student_spec(config.student).kind != "pretrained"
    encoder_teacher = bool(config.mode == "distill" and cache is None and config.teacher
                           and decoder_lib.is_encoder_model(config.teacher, trust_remote_code=config.trust_remote_code))  # fmt: skip
    if encoder_teacher:
        _check_encoder_teacher(config, derived)
        teacher = models_lib.load_model(config.teacher, trust_remote_code=config.trust_remote_code)
        student = decoder_lib.load_causal_lm(config.student, trust_remote_code=config.trust_remote_code)
    elif config.mode == "distill" and (cache is None or derived):
        teacher = decoder_lib.load_causal_lm(
            config.teacher or cache.manifest["teacher"]["path_or_id"],  # type: ignore[union-attr]
            trust_remote_code=config.trust_remote_code,
        )
        def calibration() -> list[dict[str, torch.Tensor]]:  # prune: seeded training examples
            from geokd.flexkd import batches_of, sample_indices

            features, _ = instruct.tokenize_instruct(train_split, teacher.tokenizer, template=config.template,
                                                     max_prompt_length=config.max_prompt_length,
                                                     max_length=config.max_length)  # fmt: skip
            picked = sample_indices(len(features), config.prune_samples, config.seed)
            collate = instruct.make_instruct_collate(teacher.tokenizer)
            return list(batches_of(features, picked, collate, config.batch_size, runtime.device))

        if models_lib.parse_student_spec(config.student).kind == "prune":
            teacher.model.to(runtime.device)  # the calibration pass runs where training will
        student = models_lib.load_student(config.student, teacher, trust_remote_code=config.trust_remote_code,
                                          seed=config.seed, allow_different_tokenizer=cache is None,
                                          calibration=calibration)  # fmt: skip
    else:
        student = decoder_lib.load_causal_lm(config.student, trust_remote_code=config.trust_remote_code)
    vocab, cross = None, None
    if encoder_teacher:
        cross = f"teacher: {config.teacher!r} is an encoder ({teacher.config.model_type})"  # type: ignore[union-attr]
        warn(f"{cross}: feature-teacher path: it embeds each example's "
             f"{'response' if config.features == 'mean' else 'prompt'} as a sentence with its own tokenizer (the mean "
             "over its tokens); the student's rows are its own --features rows; no token KD")  # fmt: skip
    elif teacher is not None:
        try:
            vocab = decoder_lib.check_same_tokenizer(teacher, student)
        except GeokdError as difference:
            cross = str(difference).split("; ")[0]
    if cross is not None and not encoder_teacher:
        _check_cross_tokenizer(config, cross)
        warn(f"{cross}: cross-tokenizer path: {_cross_path(config)}")
    teacher_info = teacher_summary(config.teacher, teacher) if teacher is not None else None
    if cache is not None:
        from geokd.cache import tokenizer_sha256

        cache_tokenizer = tokenizer_sha256(student.tokenizer)
        if cache_tokenizer != cache.manifest["tokenizer_sha256"] and teacher is None:
            # A pretrained student with another tokenizer: only cached example or span rows apply.
            cross = "tokenizer: the student does not tokenise like the cached teacher"
            _check_cross_tokenizer(config, cross, cached=True)
            warn(f"{cross}: cross-tokenizer path: {_cross_path(config, cached=True)}")
        vocab = int(cache.manifest["vocab"]) if cross is None else None  # None: the student's whole head
        if vocab is not None and decoder_lib.vocab_rows(student.model) < vocab:
            raise GeokdError(
                f"--cache: the student's head has {decoder_lib.vocab_rows(student.model)} rows but the cache's vocabulary "
                f"is {vocab} tokens; the student must tokenise like the cached teacher"
            )
        teacher_info = cached_teacher_summary(config.teacher, cache.manifest, cache.path)
        cache_teacher_sha = teacher.source.weights_sha256 if teacher is not None else None
        teacher = None  # never run: a derived student has its own copy of the weights it needs
    for loaded in (student, None if encoder_teacher else teacher):  # an encoder teacher truncates its sentences
        cfg = loaded.config if loaded is not None else None
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if isinstance(positions, int) and config.max_length > positions:
            raise GeokdError(
                f"--max-length: {config.max_length} tokens exceeds the {positions} positions of "
                f"{loaded.source.name!r}; pass --max-length {positions} or less"  # type: ignore[union-attr]
            )
    for loaded in (student, teacher):
        if loaded is not None:
            for message in getattr(loaded, "warnings", ()):
                warn(message)
    tokenizer = student.tokenizer
    tokenize = dict(template=config.template, max_prompt_length=config.max_prompt_length,
                    max_length=config.max_length)  # fmt: skip
    train_features, train_stats = instruct.tokenize_instruct(train_split, tokenizer, **tokenize)
    dev_features, dev_stats = instruct.tokenize_instruct(dev_split, tokenizer, **tokenize)
    for name, stats in (("train", train_stats), ("dev", dev_stats)):
        dropped, cut = stats.get("dropped_prompt", 0), stats.get("truncated_response", 0)
        if dropped or cut:
            warn(
                f"{name}: {dropped} example(s) dropped (prompt over --max-prompt-length {config.max_prompt_length}), "
                f"{cut} response(s) cut at --max-length {config.max_length}"
            )
    collate = instruct.make_instruct_collate(tokenizer)
    for message in getattr(collate, "warnings", ()):
        warn(message)
    if cross is not None and cache is not None:  # the cache holds the examples the teacher's tokenisation kept
        kept = [f for f in train_features if f["example_id"] in cache.example_ids]
        if len(kept) < len(train_features):
            warn(f"train: {len(train_features) - len(kept)} example(s) are not in the cache (the teacher's tokenisation "
                 f"of their prompt is over --max-prompt-length {config.max_prompt_length}); they are left out")  # fmt: skip
        train_features = kept
    elif encoder_teacher:
        assert teacher is not None
        positions = getattr(teacher.config, "max_position_embeddings", None) or 512
        collate = SentenceCollator(collate, teacher.tokenizer, _sentences(train_split, config.features),
                                   min(config.max_length, int(positions)))  # fmt: skip
    elif cross is not None:  # the teacher reads the same texts through its own tokenizer
        assert teacher is not None
        teacher_features, _ = instruct.tokenize_instruct(train_split, teacher.tokenizer, **tokenize)
        by_id = {f["example_id"]: f for f in teacher_features}
        kept = [f for f in train_features if f["example_id"] in by_id]
        if len(kept) < len(train_features):
            warn(f"train: {len(train_features) - len(kept)} example(s) dropped: the teacher's tokenisation of their prompt "
                 f"is over --max-prompt-length {config.max_prompt_length}")  # fmt: skip
        train_features = kept
        collate = PairedCollator(collate, instruct.make_instruct_collate(teacher.tokenizer), by_id)
    spans: dict[int, tuple] = {}
    if config.features == "spans" and config.loss != "none" and teacher is not None:
        if cross is not None:
            ends = lambda example, text: _token_ends(text, teacher.tokenizer, by_id[example])  # noqa: E731
        else:
            by_example = {f["example_id"]: f for f in train_features}
            ends = lambda example, text: _token_ends(text, tokenizer, by_example[example])  # noqa: E731
        spans = build_spans(train_split, train_features, tokenizer, ends)
        collate = SpanCollator(collate, spans)
    elif config.features == "spans" and config.loss != "none" and cache is not None:
        spans = build_spans(train_split, train_features, tokenizer, lambda example, _: cache.token_ends(example))
        collate = SpanCollator(collate, spans, teacher_table=False)

    layer_pairs: list[tuple[int, int]] = []
    if teacher_info is not None and config.loss != "none":
        layer_pairs = models_lib.parse_layer_map(
            config.layers, student.num_layers, teacher_info["layers"], getattr(student, "teacher_blocks", None)
        )
    if cache is not None:
        from geokd.cache_decoder import check_decoder_cache_matches

        check_decoder_cache_matches(
            cache.manifest, data_fingerprint=train_split.fingerprint, template=config.template,
            max_prompt_length=config.max_prompt_length, max_length=config.max_length, features=config.features,
            teacher_layers=sorted({t for _, t in layer_pairs}), temperature=config.temperature,
            tokenizer_hash=cache_tokenizer if cross is None else None, teacher_sha256=cache_teacher_sha,
            teacher_name=config.teacher,
        )  # fmt: skip
    if config.loss == "flexkd" and layer_pairs and encoder_teacher:
        raise GeokdError("--loss flexkd: its scoring pass needs a causal-LM teacher (the gradient of its next-token "
                         "output); an encoder feature teacher has none; use another --loss")  # fmt: skip
    if config.loss == "flexkd" and layer_pairs and cache is not None:
        from geokd.flexkd import check_cache_entry

        check_cache_entry(cache.manifest.get("flexkd"), config.flexkd_samples, config.flexkd_output)
    attention = (
        attention_setup(config, student.model, teacher.model, layer_pairs, causal=True)
        if teacher is not None and not encoder_teacher and cross is None
        else None
    )
    objective = TokenObjective(
        config.loss,
        layer_pairs,
        student.config.hidden_size,
        teacher_info["hidden"] if teacher_info is not None else 1,
        alpha=config.alpha,
        gamma=config.gamma,
        temperature=config.temperature,
        kd=config.kd,
        kd_beta=config.kd_beta,
        kd_skew=config.kd_skew,
        mode=config.mode,
        vocab=vocab,
        flexkd_basis=config.flexkd_basis,
        loss_options=attention.options if attention is not None else None,
    ).to(runtime.device)
    place_models(student, teacher, runtime.device)
    student_head = decoder_lib.output_head(student.model)
    teacher_head = decoder_lib.output_head(teacher.model) if teacher is not None and not encoder_teacher else None
    student_layers = [s for s, _ in layer_pairs]
    teacher_layers = [t for _, t in layer_pairs]
    needs_teacher = teacher is not None and (config.alpha < 1.0 or bool(layer_pairs))
    reads_cache = cache is not None and (config.alpha < 1.0 or bool(layer_pairs))

    def step(batch: dict[str, torch.Tensor]) -> LossOutput:
        positions, targets = response_positions(batch["labels"])
        response_mask = batch["labels"] != -100
        if attention is not None:  # attention losses: queries at the response tokens, causal keys
            key_mask = batch["attention_mask"].bool()
            with runtime.autocast(), attention.student.recording() as captured:
                out = _base_forward(student.model, batch, False)
            s_feats = attention.student.rows(captured, student_layers, response_mask, key_mask)
            del captured
            with torch.no_grad(), runtime.autocast(), attention.teacher.recording() as captured:
                t_out = _base_forward(teacher.model, batch, False)  # type: ignore[union-attr]
            t_feats = attention.teacher.rows(captured, teacher_layers, response_mask, key_mask)
            s_hidden = out.last_hidden_state[:, :-1][positions]
            t_hidden = t_out.last_hidden_state[:, :-1][positions] if config.alpha < 1.0 else None
            return objective(s_hidden, student_head, targets, t_hidden, teacher_head, s_feats, t_feats)
        with runtime.autocast():
            out = _base_forward(student.model, batch, bool(layer_pairs))
        s_hidden = out.last_hidden_state[:, :-1][positions]
        t_hidden = s_feats = t_feats = aligned = None
        if needs_teacher and encoder_teacher:
            with torch.no_grad(), runtime.autocast():
                t_out = teacher.model(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],  # type: ignore[union-attr]
                                      output_hidden_states=True)  # fmt: skip
            t_feats = models_lib.extract_features(t_out.hidden_states, batch["teacher_attention_mask"], teacher_layers,
                                                  "mean")  # fmt: skip
        elif needs_teacher:
            t_batch, t_labels = teacher_view(batch, cross is not None)
            t_positions, _ = response_positions(t_labels)
            with torch.no_grad(), runtime.autocast():
                t_out = _base_forward(teacher.model, t_batch, bool(layer_pairs))  # type: ignore[union-attr]
            t_hidden = t_out.last_hidden_state[:, :-1][t_positions]
            if layer_pairs and config.features == "spans":
                t_feats = [span_rows(t_out.hidden_states[layer], batch["teacher_spans"], batch["n_spans"])
                           for layer in teacher_layers]  # fmt: skip
            elif layer_pairs:
                t_feats = decoder_lib.decoder_features(t_out.hidden_states, t_labels != -100, teacher_layers,
                                                       config.features)  # fmt: skip
            if config.kd == "uld":
                s_keep, t_keep = aligned_rows(positions, t_positions)
                aligned = (s_hidden[s_keep], t_hidden[t_keep])
        cached = None
        if reads_cache:
            read = cache.lookup(batch["example_id"].tolist(), teacher_layers)  # type: ignore[union-attr]
            if cross is None and read.ids.shape[0] != s_hidden.shape[0]:
                raise GeokdError(
                    f"--cache: the cache holds {read.ids.shape[0]} response tokens for this batch, the student's batch has "
                    f"{s_hidden.shape[0]}; the cache was tokenised differently, rebuild it"
                )
            device = s_hidden.device
            cached = (read.ids.to(device), read.log_probs.to(device), read.log_tail.to(device))
            if config.kd == "uld" and config.alpha < 1.0:  # the first min(n_s, n_t) of each example
                counts = torch.tensor(read.counts, dtype=torch.long, device=device)
                cached_positions = torch.arange(int(counts.max()), device=device) < counts.unsqueeze(1)
                s_keep, t_keep = aligned_rows(positions, cached_positions)
                aligned = (s_hidden[s_keep], None)
                cached = tuple(part[t_keep] for part in cached)
            t_feats = [row.to(device) for row in read.rows] if layer_pairs else None
            if t_feats and config.features == "spans":
                batch_spans = [spans[int(e)] for e in batch["example_id"].tolist()]
                t_feats = [cached_span_rows(row, batch_spans) for row in t_feats]
        if layer_pairs and config.features == "spans":
            s_feats = [span_rows(out.hidden_states[layer], batch["student_spans"], batch["n_spans"])
                       for layer in student_layers]  # fmt: skip
        elif layer_pairs:
            s_feats = decoder_lib.decoder_features(out.hidden_states, response_mask, student_layers, config.features)
        return objective(s_hidden, student_head, targets, t_hidden, teacher_head, s_feats, t_feats, cached, aligned)

    def score_flexkd(indices: list[int]) -> dict:
        """Flex-KD's scoring pass (geokd.flexkd): the log-probability of the teacher's next token
        (its own greedy one, or the gold one) at the response positions, on its tokenisation; or
        the scores the cache holds."""
        from geokd import flexkd as flexkd_lib

        tangent = config.flexkd_basis == "tangent"
        if cache is not None:
            return flexkd_lib.cached_scores(cache.path, cache.manifest["flexkd"], teacher_layers, tangent)
        assert teacher is not None and teacher_head is not None
        forward = flexkd_lib.decoder_forward(teacher.model, teacher_head, vocab, config.flexkd_output, runtime.autocast,
                                             teacher_keys=cross is not None)  # fmt: skip
        batches = flexkd_lib.batches_of(train_features, indices, collate, config.batch_size, runtime.device)
        return flexkd_lib.score_teacher(teacher.model, batches, teacher_layers, forward, tangent=tangent)

    def response_tokens(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def dev_loss() -> dict[str, float]:
        """Response-token cross-entropy (mean over all dev response tokens) and perplexity."""
        was_training = student.model.training
        student.model.eval()
        total, count = 0.0, 0
        try:
            order = sorted(range(len(dev_features)), key=lambda i: len(dev_features[i]["input_ids"]))
            with torch.inference_mode():
                for first in range(0, len(order), config.batch_size):
                    batch = collate([dev_features[i] for i in order[first : first + config.batch_size]])
                    batch = {k: v.to(runtime.device) for k, v in batch.items()}
                    positions, targets = response_positions(batch["labels"])
                    with runtime.autocast():
                        hidden = _base_forward(student.model, batch, False).last_hidden_state[:, :-1][positions]
                    total += float(chunked_cross_entropy(hidden, student_head, targets, vocab))
                    count += int(targets.shape[0])
        finally:
            student.model.train(was_training)
        loss = total / max(1, count)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "response_tokens": float(count)}

    extra_results: dict[str, Any] = {"data_stats": {"train": train_stats, "dev": dev_stats}}

    def generate_dev() -> dict[str, float]:
        from geokd.generation import generate, rouge_l

        n = min(int(config.eval_generate or 0), len(dev_split.examples))
        subset = dataclasses.replace(dev_split, examples=dev_split.examples[:n])
        prompts, _ = instruct.tokenize_prompts(subset, tokenizer, template=config.template,
                                               max_prompt_length=config.max_prompt_length)  # fmt: skip
        was_training = student.model.training
        student.model.eval()
        try:
            outputs = generate(student.model, tokenizer, [f["input_ids"] for f in prompts],
                               max_new_tokens=config.max_new_tokens, decoding="greedy")  # fmt: skip
        finally:
            student.model.train(was_training)
        scores = [
            rouge_l(o.text, subset.examples[f["example_id"]].references)
            for o, f in zip(outputs, prompts, strict=True)
        ]
        return {"rouge_l": sum(scores) / max(1, len(scores)), "generated": float(len(scores))}

    def final_evaluate() -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        metrics = dev_loss()
        if config.eval_generate:
            metrics.update(generate_dev())
        return metrics, {}

    return Workload(
        kind="decoder",
        task="instruct",
        dev_split="dev",
        student=student,
        tokenizer=tokenizer,
        teacher_info=teacher_info,
        teacher_sha256=(teacher.source.weights_sha256 if teacher is not None
                        else cache.manifest["teacher"].get("weights_sha256") if cache is not None else None),  # fmt: skip
        layer_pairs=layer_pairs,
        objective=objective,
        train_features=train_features,
        dev_examples=len(dev_features),
        collate=collate,
        data={"train": train_split.fingerprint, "dev": dev_split.fingerprint},
        step=step,
        size=response_tokens,
        evaluate=dev_loss,
        final_evaluate=final_evaluate,
        extra_results=extra_results,
        score_flexkd=score_flexkd if (teacher is not None and teacher_head is not None) or cache is not None else None,
        teacher_model=teacher.model if teacher is not None else None,
        attention_note=attention.notes if attention is not None else [],
    )
