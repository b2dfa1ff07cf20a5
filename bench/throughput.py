"""Training throughput of `geokd distill` through the real engine (issue #14): examples/s and
tokens/s for (1) a BERT-base-sized encoder teacher into a 6-block `truncate:` student with
Procrustes on [CLS] rows, and (2) a 1B-class Llama decoder teacher into an 8-block `truncate:`
student with forward-KL token KD and Procrustes on response-token rows. Both models are random
weights from configs in code (throughput does not depend on the values); the data is synthetic
text at fixed lengths (128 tokens for the encoder, 512 for the decoder).

On CUDA it reports model FLOPs utilisation: achieved FLOP/s over the card's dense bf16 peak,
counting 6·P_student + 2·P_teacher FLOPs per token (P: non-embedding parameters; attention
score FLOPs are left out, so the MFU is slightly under-counted). On CPU, where an absolute number
says little about anyone else's machine, it reports the distillation step's throughput as a ratio
of the student's own finetune step on the same data (`--scale cpu` shrinks both models).

    python bench/throughput.py                      # CUDA if available (full size), else CPU (small)
    python bench/throughput.py --scale cpu --steps 6
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _meta import write_result  # noqa: E402

from geokd.config import resolve_config  # noqa: E402
from geokd.engine import train  # noqa: E402

WORDS = [f"w{i}" for i in range(2000)]
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets (SXM parts without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "B200": 2250e12, "RTX 4090": 165e12}  # fmt: skip
SIZES = {
    "full": {"encoder": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
             "encoder_student": "truncate:6", "encoder_batch": 32, "encoder_length": 128,
             "decoder": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                             intermediate_size=8192),
             "decoder_student": "truncate:8", "decoder_batch": 8, "decoder_length": 512},
    "cpu": {"encoder": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
            "encoder_student": "truncate:2", "encoder_batch": 16, "encoder_length": 128,
            "decoder": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=1024),
            "decoder_student": "truncate:2", "decoder_batch": 4, "decoder_length": 256},
}  # fmt: skip


def _word_tokenizer(bert: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<pad>", "<s>", "</s>", "<unk>"]
    template = "Below is an instruction that describes a task . Write a response appropriately completes the request"
    vocab = list(dict.fromkeys(special + template.split() + ["###", "Instruction:", "Response:"] + WORDS))
    if bert:
        return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=False)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")  # fmt: skip


def _encoder_setup(root: Path, size: dict, blocks: int) -> tuple[Path, Path]:
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _word_tokenizer(bert=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), num_labels=2, max_position_embeddings=512, **size["encoder"])
    model = BertForSequenceClassification(config)
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    teacher = root / "encoder-teacher"
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    shaped = BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_hidden_layers": blocks}))
    shaped.config.id2label, shaped.config.label2id = model.config.id2label, model.config.label2id
    shaped.save_pretrained(root / "encoder-student")
    tokenizer.save_pretrained(root / "encoder-student")
    data = root / "SST-2"
    data.mkdir()
    rng = random.Random(0)
    words = size["encoder_length"] - 2
    for split, n in (("train", 4096), ("dev", 8)):
        rows = ["sentence\tlabel"] + [f"{' '.join(rng.choices(WORDS, k=words))}\t{i % 2}" for i in range(n)]
        (data / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return teacher, data


def _decoder_setup(root: Path, size: dict, blocks: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _word_tokenizer(bert=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, **size["decoder"])  # fmt: skip
    teacher = root / "decoder-teacher"
    LlamaForCausalLM(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "num_hidden_layers": blocks})).save_pretrained(
        root / "decoder-student"
    )
    tokenizer.save_pretrained(root / "decoder-student")
    data = root / "instruct"
    data.mkdir()
    rng = random.Random(0)
    half = size["decoder_length"] // 2 - 24
    for split, n in (("train", 1024), ("dev", 8)):
        rows = [{"instruction": " ".join(rng.choices(WORDS, k=half)), "input": "",
                 "output": " ".join(rng.choices(WORDS, k=half))} for _ in range(n)]  # fmt: skip
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return teacher, data


def _run(mode: str, flags: dict, out: Path, steps: int) -> dict:
    train(resolve_config(mode, flags={**flags, "out": str(out), "max_steps": steps, "save_every": None,
                                       "save_minutes": 0, "lr": 1e-5}))  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kept = records[min(3, len(records) - 1) :]  # the first steps pay for warm-up (and compilation)
    return {"examples_per_s": statistics.median(r["examples_per_s"] for r in kept),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in kept), "steps": len(records)}  # fmt: skip


def _non_embedding_parameters(folder: Path, student: str | None = None) -> tuple[int, int]:
    """(teacher, student) non-embedding parameter counts; a truncate:N student keeps N of L blocks."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    embedding = sum(p.numel() for name, p in model.named_parameters() if "embed" in name)
    total = sum(p.numel() for p in model.parameters()) - embedding
    blocks = int(student.split(":")[1]) if student else config.num_hidden_layers
    return total, int(total * blocks / config.num_hidden_layers)


def _peak(device: torch.device) -> tuple[str | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("full", "cpu"), default=None, help="default: full on CUDA, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 30 on CUDA, 8 on CPU)")
    parser.add_argument("--compile", action="store_true", help="also time --compile")
    parser.add_argument("--parts", default="encoder,decoder")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    scale = args.scale or ("full" if cuda else "cpu")
    steps = args.steps or (30 if cuda else 8)
    size = SIZES[scale]
    device = torch.device("cuda" if cuda else "cpu")
    card, peak = _peak(device)
    results: dict = {"scale": scale, "device": str(device), "card": card, "peak_bf16_flops": peak, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for part in args.parts.split(","):
            setup = _encoder_setup if part == "encoder" else _decoder_setup
            student = size[f"{part}_student"]
            teacher, data = setup(root, size, int(student.split(":")[1]))
            task = "sst2" if part == "encoder" else "instruct"
            common = {"task": task, "data": str(data), "batch_size": size[f"{part}_batch"], "seed": 0,
                      "max_length": size[f"{part}_length"],
                      **({"max_prompt_length": size["decoder_length"] // 2} if part == "decoder" else {})}  # fmt: skip
            features = {"features": "cls"} if part == "encoder" else {}
            distill = {**common, **features, "teacher": str(teacher), "student": student, "loss": "procrustes",
                       "layers": "uniform"}  # fmt: skip
            case = {"distill": _run("distill", distill, root / f"{part}-distill", steps)}
            if args.compile:
                case["distill_compiled"] = _run("distill", {**distill, "compile": True}, root / f"{part}-c", steps)
            # The floor: a model of the student's shape fine-tuned alone on the same batches.
            alone = {**common, "student": str(root / f"{part}-student")}
            case["student_only"] = _run("finetune", alone, root / f"{part}-floor", steps)
            case["distill_over_student_only"] = {
                key: case["distill"][key] / case["student_only"][key] for key in ("examples_per_s", "tokens_per_s")
            }
            p_teacher, p_student = _non_embedding_parameters(teacher, student)
            case["parameters"] = {"teacher_non_embedding": p_teacher, "student_non_embedding": p_student}
            tokens = case["distill"]["tokens_per_s"]
            case["flops_per_token"] = 6 * p_student + 2 * p_teacher
            if peak:
                case["mfu"] = tokens * case["flops_per_token"] / peak
            results["cases"][part] = case
            ratio = case["distill_over_student_only"]["examples_per_s"]
            print(f"{part}: distill at {ratio:.2f}x the student-only step's examples/s"
                  + (f"; {case['distill']['examples_per_s']:.1f} examples/s, {tokens:.0f} tokens/s, "
                     f"MFU {case['mfu']:.1%} of {card}" if peak else ""))  # fmt: skip
    write_result(args.out, results, ROOT)


if __name__ == "__main__":
    main()
