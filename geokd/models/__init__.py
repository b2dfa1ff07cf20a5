"""The model layer: load teachers, students and fine-tuning models, build students from a teacher,
map student layers to teacher layers, and pull the mapped hidden states out as loss rows.

Encoders and causal language models sit side by side:

```
models/
  loading.py   names and aliases, provenance, safetensors checks, tokenizers, the shared types
  encoder.py   sequence-classification models: load_model, load_teacher (head, label order),
               EncoderStudents
  decoder.py   causal LMs: load_causal_lm (folder, hub id, alias, .gguf), DecoderStudents,
               check_same_tokenizer, output_head, decoder_features
  students.py  --student parsing, the block lists of every architecture, truncate / shrink
               (shared), load_student (picks the builder of the teacher's kind)
  features.py  layer maps (uniform, last, pairs) and encoder rows (cls, mean, tokens)
```

Everything is re-exported here: import from `geokd.models`, and monkeypatch it here too
(`_minilm_dir`, `_smollm2_file`, `check_safetensors` are looked up on this package at call time).

Used by `geokd finetune` (`load_model`) and `geokd distill` (`load_teacher`, `load_student`,
`parse_layer_map`, `extract_features`); `geokd models` renders `list_aliases()`. The causal-LM
rules are in `geokd.models.decoder`'s docstring (tested in tests/unit/test_decoder_models.py).

Encoder rules (each one tested in tests/unit/test_models.py):

* **Names.** `--teacher/--student/--model` take a short alias (`list_aliases()`), a local directory
  holding `config.json`, or a Hugging Face id. Under `HF_HUB_OFFLINE=1` an id loads only from the
  local cache. An alias wins over a directory of the same name (write `./name` for the directory).
  A missing directory, a directory without `config.json` or tokenizer files, and an id that cannot
  be reached all raise one `GeokdError` line whose fix is "pass a local directory".
* **Loading.** `AutoConfig`, `AutoTokenizer`, `AutoModelForSequenceClassification`;
  `trust_remote_code` is False unless the caller says so. Weights are read from safetensors only:
  geokd never unpickles, so a checkpoint that has only `pytorch_model.bin` (or its index) is
  refused with the conversion to run in a trusted environment, and transformers is told
  `use_safetensors=True`. Every local safetensors file (each shard of an index) gets a cheap
  structural check first (`check_safetensors`: header length, JSON header, every tensor's data
  offsets inside the file, file size = 8 + header + data), so a 0-byte, truncated or damaged file
  is one line naming it, never a traceback. Weights load in float32 by default. `num_labels=1` sets `problem_type="regression"`. Provenance: the
  resolved path or id, the requested revision and the cached commit (hub only), and the SHA-256 of
  the weights file (of the shards' bytes in name order for a sharded checkpoint).
* **Teacher head.** A teacher must have a trained task head. Weights that transformers had to
  initialise because the checkpoint lacked them (or held them with another shape) are listed in
  `LoadedModel.new_weights`; a teacher with any of them is refused with a pointer to
  `geokd finetune` (all-MiniLM-L6-v2 is such a raw encoder: its `classifier.*` is missing).
* **Teacher labels.** `load_teacher(..., id2label=TASK)` loads the teacher with its own label names
  and matches them to the task's by name (case, spaces, `-` and `_` ignored, as `geokd eval`
  does). A head in another order (MNLI models often say 0=contradiction) has the rows of its output
  `nn.Linear` permuted so that output i is task label i; its id2label becomes the task's. So the
  teacher's logits, the cache's logits and a `truncate:` student's copied head are in task order.
  Other names are refused; generic `LABEL_i` names keep their order with a warning
  (`LoadedModel.warnings`); a head with another number of labels is refused.
* **Layer indices** follow Hugging Face `hidden_states`: 0 = embeddings, i = output of block i
  (1-based), L = the last block. Python blocks in `encoder.layer` are 0-based: block index b is
  `hidden_states[b + 1]`.
* **`uniform` layer map.** Student layer i (1..L_s) maps to teacher layer
  `t(i) = max(1, floor(i·L_t/L_s + 1/2))` (round half up, in integers:
  `(2·i·L_t + L_s) // (2·L_s)`); the last student layer always maps to the last teacher layer.
  When L_s > L_t several student layers share a teacher layer. `last` is `[(L_s, L_t)]`; explicit
  pairs `"2:4,4:8"` are `student:teacher` in the same indexing, kept in the order given.
* **`truncate:N`** copies the teacher's embeddings, everything outside the block list (pooler,
  classifier head, final norms) and N of its blocks: student block i (1-based) is teacher block
  t(i) from the `uniform` rule with L_s = N. So a truncated student's `uniform` map pairs every
  student layer with the teacher layer it was copied from. 12 → 6 keeps blocks 2, 4, ..., 12
  (1-based; 1, 3, ..., 11 0-based, as DistilBERT did); 12 → 4 keeps 3, 6, 9, 12. Supported block
  lists: `base_model.encoder.layer` (BERT, RoBERTa; ELECTRA and DeBERTa share the layout but are
  untested) and `base_model.transformer.layer` (DistilBERT); anything else is a GeokdError
  (`geokd.models.students.BLOCK_LISTS` holds these and the causal-LM layouts).
* **`shrink:layers=L,hidden=H,heads=A[,intermediate=I]`** builds a randomly initialised model of
  the teacher's class and config (same model_type, vocabulary, tokenizer, max positions, labels)
  with L blocks, width H, A heads and feed-forward width I (default 4·H).
* **Rows.** `extract_features` returns one `[n, d]` tensor per requested layer: `cls` = position 0
  of each example (right padding required), `mean` = masked mean over non-padding tokens (computed
  in float32), `tokens` = every non-padding token, flattened. Padding never enters a row.

Nothing happens at import time beyond imports; transformers is imported inside the functions that
need it.
"""

from __future__ import annotations

from geokd.models.decoder import (
    DECODER_FEATURES,
    DecoderStudents,
    check_same_tokenizer,
    decoder_features,
    load_causal_lm,
    output_head,
    vocab_rows,
)
from geokd.models.encoder import EncoderStudents, load_model, load_teacher
from geokd.models.features import (
    FEATURES,
    count_parameters,
    extract_features,
    parse_layer_map,
    uniform_layer,
)
from geokd.models.loading import (
    SMOLLM2_INSTALL,
    LoadedModel,
    LoadedStudent,
    ModelAlias,
    ModelSource,
    check_safetensors,
    check_weights,
    is_gguf,
    list_aliases,
    model_source,
    resolve_model_name,
    weights_sha256,
)

# Private names kept reachable here: geokd.export imports `_check_weights` (`check_weights` is the
# public form), and tests monkeypatch `_minilm_dir` / `_smollm2_file` on this package.
from geokd.models.loading import _check_weights as _check_weights
from geokd.models.loading import _minilm_dir as _minilm_dir
from geokd.models.loading import _smollm2_file as _smollm2_file
from geokd.models.students import (
    BLOCK_LISTS,
    PER_LAYER_CONFIG,
    StudentBuilder,
    StudentSpec,
    block_list,
    builder_for,
    copied_blocks,
    load_student,
    map_layer_config,
    model_kind,
    parse_student_spec,
    truncate_blocks,
)

__all__ = [
    "BLOCK_LISTS",
    "DECODER_FEATURES",
    "FEATURES",
    "PER_LAYER_CONFIG",
    "SMOLLM2_INSTALL",
    "DecoderStudents",
    "EncoderStudents",
    "LoadedModel",
    "LoadedStudent",
    "ModelAlias",
    "ModelSource",
    "StudentBuilder",
    "StudentSpec",
    "block_list",
    "builder_for",
    "check_safetensors",
    "check_same_tokenizer",
    "check_weights",
    "count_parameters",
    "decoder_features",
    "extract_features",
    "is_gguf",
    "list_aliases",
    "load_causal_lm",
    "load_model",
    "load_student",
    "load_teacher",
    "map_layer_config",
    "model_kind",
    "model_source",
    "output_head",
    "parse_layer_map",
    "parse_student_spec",
    "resolve_model_name",
    "copied_blocks",
    "truncate_blocks",
    "uniform_layer",
    "vocab_rows",
    "weights_sha256",
]
