"""The `geokd` command line: one thin function per subcommand.

Each command builds a config, calls one library function and renders the result with rich. User
errors (`GeokdError`, bad option values) are printed as one red line and exit with status 2; bugs
raise normally with their traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import geokd
from geokd.errors import GeokdError

# Typer >= 0.2x vendors its own copy of click; older releases raise click's own exceptions.
_USAGE_ERRORS: tuple[type[Exception], ...] = ()
for _module_name in ("typer._click.exceptions", "click.exceptions"):
    try:
        _module = importlib.import_module(_module_name)
    except ImportError:  # pragma: no cover - depends on the installed typer
        continue
    _USAGE_ERRORS += (_module.UsageError,)
_ABORTS: tuple[type[BaseException], ...] = (typer.Abort, KeyboardInterrupt)

app = typer.Typer(
    name="geokd",
    help="Geometry-aware knowledge distillation for transformer language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Without a terminal (CI logs, `| tee`, nohup) nothing is wrapped or cut at 80 columns: tables
# take their natural width and every line stays one line.
_PLAIN_WIDTH = 4096


class _Console(Console):
    @property
    def size(self):  # type: ignore[override]
        from rich.console import ConsoleDimensions

        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(_PLAIN_WIDTH, 25)
        return Console.size.fget(self)  # type: ignore[attr-defined]

    @size.setter
    def size(self, new_size) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console()
err_console = _Console(stderr=True)


def _rule(title: str) -> None:
    """A section heading: a full-width rule on a terminal, one plain line otherwise."""
    if console.is_terminal:
        console.rule(title)
    else:
        console.print(f"== {title} ==", highlight=False)


def _fail(message: str) -> None:
    # escape: messages quote user values and options such as 'geokd[demo]' or 'dev[:10]', not markup
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a GeokdError into one line on stderr and exit status 2."""
    try:
        yield
    except GeokdError as exc:
        _fail(str(exc))
        raise typer.Exit(code=2) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"geokd {geokd.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Geometry-aware knowledge distillation for transformer language models."""


@app.command()
def synthetic(
    n: int = typer.Option(256, help="Teacher vectors (rows). n > d_teacher is the over-complete regime."),
    d_teacher: int = typer.Option(64, "--d-teacher", help="Teacher width."),
    d_student: int = typer.Option(32, "--d-student", help="Student width (< d_teacher)."),
    epsilon: float = typer.Option(0.1, help="Pairs with |cos| <= epsilon are epsilon-orthogonal."),
    delta: float = typer.Option(0.1, help="Perturbation size in the CKA counterexample."),
    steps: int = typer.Option(500, help="Optimisation steps per loss."),
    lr: float = typer.Option(0.01, help="Adam learning rate."),
    seed: int = typer.Option(0, help="Random seed (teacher, start, projection init)."),
    losses: str = typer.Option("procrustes,gram,cka,proj", help="Comma-separated losses to optimise."),
    json_path: Path = typer.Option(None, "--json", help="Write the results as JSON here."),
    plot_path: Path = typer.Option(None, "--plot", help="Write a PNG plot (preserved pairs vs step) here."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """The geometry benchmark: what each loss does to the student's representation geometry."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from geokd.artifacts import check_output_path, write_json
    from geokd.synthetic import SyntheticConfig, plot_synthetic, run_synthetic

    with user_errors():
        config = SyntheticConfig(
            n=n,
            d_teacher=d_teacher,
            d_student=d_student,
            epsilon=epsilon,
            delta=delta,
            steps=steps,
            lr=lr,
            seed=seed,
            losses=tuple(name.strip() for name in losses.split(",") if name.strip()),
        )
        config.validate()
        if json_path is not None:
            check_output_path(json_path, "--json")
        if plot_path is not None:
            check_output_path(plot_path, "--plot")
        with Progress(
            TextColumn("[bold]optimising"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=quiet,
            transient=True,
        ) as progress:
            task = progress.add_task("steps", total=steps * len(config.losses))
            result = run_synthetic(config, on_step=lambda: progress.advance(task))
        _render_synthetic(result)
        if json_path is not None:
            write_json(json_path, result)
            console.print(f"wrote {json_path}")
        if plot_path is not None:
            plot_synthetic(result, str(plot_path))
            console.print(f"wrote {plot_path}")


def _render_synthetic(result: dict) -> None:
    cfg, teacher = result["config"], result["teacher"]
    total = teacher["epsilon_orthogonal_pairs"]
    table = Table(
        title=(
            f"Optimisation: n={cfg['n']} unit vectors, d_t={cfg['d_teacher']} -> d_s={cfg['d_student']}, "
            f"eps={cfg['epsilon']}, {cfg['steps']} steps\n"
            f"teacher: {total} of {teacher['all_pairs']} pairs eps-orthogonal, "
            f"maximal eps-orthogonal set {teacher['max_orthogonal_set']}"
        )
    )
    for column in (
        "loss",
        "final loss",
        "preserved pairs",
        "% of teacher's",
        "maximal preserved set",
        "at start",
    ):
        table.add_column(column, justify="left" if column == "loss" else "right")
    for name, entry in result["losses"].items():
        table.add_row(
            name,
            f"{entry['final_loss']:.4g}",
            str(entry["preserved_pairs"]),
            f"{100.0 * entry['preserved_pairs'] / max(total, 1):.1f}",
            str(entry["max_preserved_set"]),
            str(entry["history"]["preserved_pairs"][0]),
        )
    console.print(table)

    ce = result["counterexample"]
    table = Table(
        title=(
            f"CKA counterexample (Theorem 1): n={ce['n']} points in two antiparallel clusters, "
            f"{ce['perturbed_points']} moved by delta={ce['delta']}\n"
            "(a) clusters, (b) perturbed, (c) exact copy of (a) in d_s dims; order = log2 L(delta)/L(delta/2); "
            "proj at its least-squares W"
        )
    )
    for column in ("loss", "(c) vs (a)", "(c) vs (b)", "(c) vs (b) at delta/2", "order in delta"):
        table.add_column(column, justify="left" if column == "loss" else "right")
    for name, entry in ce["losses"].items():
        table.add_row(
            name,
            f"{entry['to_a']:.3g}",
            f"{entry['to_b']:.3g}",
            f"{entry['to_b_half_delta']:.3g}",
            f"{entry['order']:.2f}",
        )
    console.print(table)


# ---------------------------------------------------------------------------------------------
# finetune / distill
# ---------------------------------------------------------------------------------------------

_COMMON_HELP = "Options may also come from --config FILE.yaml and --set key=value (flags win)."


def _render_run_summary(summary: dict) -> None:
    from geokd.config import DISTILL_ONLY, INSTRUCT_ONLY

    cfg = summary["config"]
    finetune = cfg["mode"] == "finetune"
    table = Table(title=f"geokd {cfg['mode']}: resolved configuration", show_header=False)
    table.add_column("key")
    table.add_column("value")
    for key, value in cfg.items():
        if finetune and key in DISTILL_ONLY:
            continue  # no teacher, no feature or KD terms: only the task loss
        if cfg.get("task") != "instruct" and key in INSTRUCT_ONLY:
            continue
        if value is not None:
            table.add_row("model" if finetune and key == "student" else key, str(value))
    console.print(table)
    models = Table(title="models")
    for column in ("role", "model", "parameters", "layers", "hidden"):
        models.add_column(column)
    for role in ("teacher", "student"):
        info = summary[role]
        if info is not None:
            count = f"{info['parameters']:,}" if info["parameters"] is not None else "(read from --cache)"
            shown = "model" if finetune and role == "student" else role
            models.add_row(shown, str(info["name"]), count, str(info["layers"]), str(info["hidden"]))
    if summary["teacher"] is not None and summary["teacher"]["parameters"]:
        ratio = summary["student"]["parameters"] / summary["teacher"]["parameters"]
        models.caption = f"student / teacher parameters: {ratio:.1%}"
    console.print(models)
    if summary["layer_pairs"]:
        pairs = Table(title=f"layer mapping ({cfg['loss']}, features={cfg['features']})")
        pairs.add_column("student hidden state")
        pairs.add_column("teacher hidden state")
        for s_layer, t_layer in summary["layer_pairs"]:
            pairs.add_row(str(s_layer), str(t_layer))
        console.print(pairs)
    for line in summary.get("attention") or []:
        console.print(f"attention capture: {line}", highlight=False)
    flexkd = summary.get("flexkd")
    if flexkd and flexkd.get("pairs"):
        how = "read back from flexkd.safetensors" if flexkd["reused"] else f"scored on {flexkd['rows']} teacher rows"
        kept = "; ".join(f"{pair}: {p['width']} of {p['of']} dims, {p['score_kept']:.0%} of the gradient score"
                         + (f", {p['own_channel']} paired with the channel they were cut from" if "own_channel" in p else "")
                         for pair, p in flexkd["pairs"].items())  # fmt: skip
        console.print(f"flexkd ({cfg['flexkd_basis']}, {cfg['flexkd_output']}): {how} in {flexkd['seconds']:.1f} s; {kept}",
                      highlight=False)  # fmt: skip
    elif flexkd:
        console.print("flexkd: the selection is the checkpoint's", highlight=False)
    resumed = f", resuming from {summary['resumed_from']}" if summary["resumed_from"] else ""
    console.print(
        f"device {summary['device']} ({summary['precision']}); {summary['train_examples']} train / "
        f"{summary['dev_examples']} dev examples; {summary['total_steps']} steps{resumed}",
        highlight=False,
    )


@app.command()
def models() -> None:
    """List the short model names accepted by --model, --teacher and --student."""
    from geokd.models import list_aliases

    table = Table(title="model aliases (or pass a local directory, a Hugging Face id or a .gguf file)")
    for column in ("alias", "kind", "resolves to", "description"):
        table.add_column(column)
    for alias in list_aliases("all"):
        table.add_row(alias.name, getattr(alias, "kind", "encoder"), alias.target, alias.description)
    console.print(table)
    console.print(
        "students may also be truncate:N (N of the teacher's blocks) or "
        "shrink:layers=L,hidden=H,heads=A[,kv_heads=K][,intermediate=I]"
    )


def _progress_columns(label: str) -> tuple:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return (
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )


def _json_line(event: str, **fields) -> None:
    """`--log-format json`: one JSON object per line on stdout, flushed at once."""
    import json
    import math

    def finite(value):  # strict JSON: NaN/inf (e.g. Pearson of constant predictions) become null
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    sys.stdout.write(json.dumps(finite({"event": event, **fields}), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _rank_zero() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints and writes."""
    return os.environ.get("RANK", "0") == "0"


def _one_process_only(command: str) -> None:
    """Commands that do not shard their work yet refuse torchrun, instead of every rank writing the
    same files."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1"):
        raise GeokdError(
            f"geokd {command} does not run under torchrun yet (WORLD_SIZE={world}); run it as one process "
            "(distill and finetune are the commands that scale out)"
        )


def _run_training(
    mode: str,
    config_file: Path | None,
    overrides: list[str] | None,
    flags: dict,
    quiet: bool,
    seeds_text: str | None = None,
    log_format: str = "text",
) -> None:
    from rich.progress import Progress

    from geokd.config import resolve_config
    from geokd.engine import RunInterrupted, parse_seeds, train, train_seeds

    # Under torchrun rank 0 speaks for the job (the engine also keeps the others quiet); errors
    # are printed by every rank, since one rank may fail alone.
    main_rank = _rank_zero()
    quiet = quiet or not main_rank
    with user_errors():
        if log_format not in ("text", "json"):
            raise GeokdError(f"--log-format: expected text or json, got {log_format!r}")
        as_json = log_format == "json"
        seeds = parse_seeds(seeds_text) if seeds_text is not None else None
        if seeds is not None and flags.get("seed") is not None:
            raise GeokdError(
                f"--seed {flags['seed']} and --seeds {seeds_text} contradict each other; pass one of them"
            )
        config = resolve_config(mode, file=config_file, overrides=overrides, flags=flags)
        config.validate()
        bars: list[Progress] = []
        # Without a terminal (a log file, CI) a live bar cannot redraw: plain lines, about 20 per run.
        live = err_console.is_terminal
        bar_off = quiet or not live or as_json

        def on_warning(message: str) -> None:
            if as_json:
                _json_line("warning", message=message)
            else:
                err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}", highlight=False)

        def on_start(summary: dict) -> None:
            if as_json:
                _json_line("start", **summary)
            else:
                _render_run_summary(summary)

        def on_step(record: dict) -> None:
            if as_json:
                _json_line("step", **record)
                return
            bar = bars[-1]
            terms = " ".join(
                f"{k.split('/')[-1] if k.startswith('feature/') else k}={v:.4f}"
                for k, v in record.items()
                if k in ("loss", "task", "kl", "sft", "kd") or k.startswith("feature/")
            )
            info = f"epoch {record['epoch']:.2f} {terms} {record['examples_per_s']:.0f} ex/s"
            bar.update(bar.task_ids[0], total=record["total_steps"], completed=record["step"], info=info)
            every = max(1, record["total_steps"] // 20)
            if (
                not live
                and not quiet
                and (record["step"] % every == 0 or record["step"] == record["total_steps"])
            ):
                err_console.print(
                    f"{mode} step {record['step']}/{record['total_steps']} {info}", highlight=False
                )

        def finished(result) -> None:
            if not main_rank:
                return
            if as_json:
                _json_line(
                    "finished", run_dir=str(result.run_dir), final_dir=str(result.final_dir),
                    steps=result.steps, metrics=result.metrics,
                )  # fmt: skip
            else:
                _render_train_result(mode, result)

        try:
            if seeds is None:
                with Progress(*_progress_columns(mode), console=err_console, disable=bar_off) as bar:
                    bar.add_task(mode, total=None, info="loading")
                    bars.append(bar)
                    result = train(config, progress=on_step, on_start=on_start, on_warning=on_warning)
                finished(result)
                return

            def open_bar() -> None:
                if bars:
                    bars[-1].stop()
                bar = Progress(*_progress_columns(mode), console=err_console, disable=bar_off)
                bar.add_task(mode, total=None, info="loading")
                bar.start()
                bars.append(bar)

            def on_seed(index: int, seed: int, run_dir: Path, skipped: bool) -> None:
                if bars:
                    bars[-1].stop()
                state = "already finished, kept" if skipped else "starting"
                if as_json:
                    _json_line("seed", seed=seed, index=index, run_dir=str(run_dir), skipped=skipped)
                else:
                    _rule(f"seed {seed} ({index + 1} of {len(seeds)}): {run_dir} {state}")
                if not skipped:
                    open_bar()

            def on_seed_step(record: dict) -> None:
                if not bars:  # the --finetune-teacher run, before the first seed
                    open_bar()
                on_step(record)

            try:
                results = train_seeds(
                    config, seeds, progress=on_seed_step, on_start=on_start, on_seed=on_seed,
                    on_warning=on_warning,
                )  # fmt: skip
            finally:
                if bars:
                    bars[-1].stop()
        except RunInterrupted as stop:
            for bar in bars:
                bar.stop()
            if as_json:
                _json_line(
                    "interrupted", signal=stop.signum, step=stop.step, run_dir=str(stop.run_dir),
                    checkpoint=None if stop.checkpoint is None else str(stop.checkpoint),
                )  # fmt: skip
            err_console.print(f"[bold yellow]stopped:[/bold yellow] {escape(str(stop))}", highlight=False,
                              soft_wrap=True)  # fmt: skip
            raise typer.Exit(code=stop.exit_code) from None
        for result in results:
            finished(result)
        _finish_seeds(Path(config.out), [r.run_dir for r in results], as_json)


def _render_train_result(mode: str, result) -> None:
    table = Table(title=f"{mode} finished: {result.steps} steps, dev metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.metrics.items():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    console.print(f"run directory: {result.run_dir}  final model: {result.final_dir}")


def _finish_seeds(root: Path, run_dirs: list[Path], as_json: bool = False) -> None:
    """After --seeds: the compare table over the seed runs, also written as OUT/compare.json."""
    from geokd.artifacts import write_json
    from geokd.compare import compare_runs, plot_comparison

    comparison = compare_runs([str(d) for d in run_dirs])
    write_json(root / "compare.json", comparison)
    plot_comparison(comparison, root / "compare.png")
    if as_json:
        _json_line("compare", path=str(root / "compare.json"), comparison=comparison)
        return
    _render_comparison(comparison)
    console.print(f"wrote {root / 'compare.json'} and {root / 'compare.png'}")


_O = typer.Option
# Options shared by finetune and distill (one definition each: same flag, same help).
_TASK = _O(None, help="GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), 'custom', or 'instruct' (decoders).")
_DATA = _O(
    None, help="Folder of GLUE TSVs (train.tsv, dev.tsv) or of train/dev CSV/JSONL, or a datasets name."
)
_TEXT_FIELDS = _O(None, "--text-fields", help="Custom task: comma-separated text columns.")
_LABEL_FIELD = _O(None, "--label-field", help="Custom task: label column.")
_OUT = _O(None, help="Run directory.")
_EPOCHS = _O(None, help="Epochs (default 3).")
_MAX_STEPS = _O(None, "--max-steps", help="Optimizer steps (overrides --epochs).")
_LR = _O(None, help="Peak learning rate (default 5e-5).")
_BATCH_SIZE = _O(None, "--batch-size", help="Examples per micro-batch (default 32).")
_GRAD_ACCUM = _O(None, "--grad-accum", help="Micro-batches per optimizer step (default 1).")
_MAX_LENGTH = _O(None, "--max-length", help="Tokens per example (default 128).")
_SEED = _O(None, help="Random seed (default 42).")
_EVAL_EVERY = _O(None, "--eval-every", help="Evaluate on dev every N steps (and at the end).")
_SAVE_EVERY = _O(None, "--save-every", help="Checkpoint every N steps.")
_SAVE_MINUTES = _O(
    None, "--save-minutes", help="Also checkpoint when this many minutes passed since the last one (default 10; 0: off)."
)
_KEEP_CHECKPOINTS = _O(
    None, "--keep-checkpoints", help="Keep only the newest K checkpoints (default: all); older ones go once a newer one is complete."
)
_TRUST_REMOTE_CODE = _O(
    None, "--trust-remote-code", help="Allow the model repository's own Python code to run (never read from --config/--set)."
)
_FORMAT = _O(None, "--format", help="--task instruct: auto (default), minillm, dolly, self-instruct, chat, prompt-completion.")
_TEMPLATE = _O(None, "--template", help="--task instruct: alpaca (default, the MiniLLM prompt) or chat (the tokenizer's template).")
_MAX_PROMPT_LENGTH = _O(None, "--max-prompt-length", help="--task instruct: longer prompts are dropped and counted (default 256).")
_EVAL_GENERATE = _O(None, "--eval-generate", help="--task instruct: greedy ROUGE-L on the first N dev examples at the end.")
_MAX_NEW_TOKENS = _O(None, "--max-new-tokens", help="--task instruct: generation length for --eval-generate (default 128).")
_LOG_FORMAT = _O("text", "--log-format", help="text (tables, progress) or json (one JSON object per line on stdout).")
_RESUME = _O(None, help="'auto' (latest checkpoint in --out) or a checkpoints/step-N path.")
_DEVICE = _O(None, help="auto (default), cpu, cuda, cuda:N or mps.")
_STRATEGY = _O(None, "--strategy", help="Under torchrun: ddp (the student replicated, default) or fsdp (each transformer block sharded over the ranks with FSDP2).")
_PRECISION = _O(None, "--precision", help="Forward passes: auto (bf16 on recent GPUs, fp16 with loss scaling on older ones, fp32 on CPU), fp32, bf16 or fp16.")
_COMPILE = _O(None, "--compile/--no-compile", help="torch.compile the student's forward (a warm-up cost, then faster steps on GPUs).")
_ACTIVATION_CHECKPOINTING = _O(None, "--activation-checkpointing/--no-activation-checkpointing",
                               help="Recompute the student's block activations in the backward: less memory, about a third more compute.")
_CONFIG = _O(None, "--config", help="YAML file of options.")
_SET = _O(None, "--set", help="key=value override (repeatable).")
_QUIET = _O(False, "--quiet", help="No progress bar.")
_SEEDS = _O(
    None, "--seeds", help="Run once per seed, e.g. 1,2,3, into OUT/seed-K/, then print the compare table."
)
_NOT_CONFIG_KEYS = ("config_file", "overrides", "quiet", "seeds", "log_format")


@app.command(help=f"Fine-tune a model on a task with the task loss only. {_COMMON_HELP}")
def finetune(
    model: str = _O(None, "--model", help="Local directory, Hugging Face id or alias (geokd models)."),
    task: str = _TASK,
    data: str = _DATA,
    text_fields: str = _TEXT_FIELDS,
    label_field: str = _LABEL_FIELD,
    out: str = _OUT,
    epochs: float = _EPOCHS,
    max_steps: int = _MAX_STEPS,
    lr: float = _LR,
    batch_size: int = _BATCH_SIZE,
    grad_accum: int = _GRAD_ACCUM,
    max_length: int = _MAX_LENGTH,
    format: str = _FORMAT,
    template: str = _TEMPLATE,
    max_prompt_length: int = _MAX_PROMPT_LENGTH,
    eval_generate: int = _EVAL_GENERATE,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    seed: int = _SEED,
    seeds: str = _SEEDS,
    eval_every: int = _EVAL_EVERY,
    save_every: int = _SAVE_EVERY,
    save_minutes: float = _SAVE_MINUTES,
    keep_checkpoints: int = _KEEP_CHECKPOINTS,
    resume: str = _RESUME,
    device: str = _DEVICE,
    strategy: str = _STRATEGY,
    precision: str = _PRECISION,
    compile: bool = _COMPILE,
    activation_checkpointing: bool = _ACTIVATION_CHECKPOINTING,
    trust_remote_code: bool = _TRUST_REMOTE_CODE,
    config_file: Path = _CONFIG,
    overrides: list[str] = _SET,
    quiet: bool = _QUIET,
    log_format: str = _LOG_FORMAT,
) -> None:
    flags = {k: v for k, v in locals().items() if k not in _NOT_CONFIG_KEYS}
    flags["student"] = flags.pop("model")  # the model being trained is the config's `student`
    _run_training("finetune", config_file, overrides, flags, quiet, seeds, log_format)


@app.command(help=f"Distil a teacher into a student: γ·task + α·Σ feature + (1−α)·τ²·KL. {_COMMON_HELP}")
def distill(
    teacher: str = _O(None, help="Fine-tuned teacher: local directory, Hugging Face id or alias."),
    student: str = _O(
        None, help="Student: directory/id/alias/.gguf, truncate:N, shrink:layers=4,hidden=256,heads=4[,kv_heads=2] or prune:hidden=H,heads=A,intermediate=F,layers=L."
    ),
    task: str = _TASK,
    data: str = _DATA,
    text_fields: str = _TEXT_FIELDS,
    label_field: str = _LABEL_FIELD,
    loss: str = _O(None, help="Feature loss: procrustes (default), gram, cka, proj, mse, cosine, flexkd, rkd, spkd, attn, attn-relation, or none."),
    alpha: float = _O(None, help="Feature weight α in [0, 1] (default 0.5); KL gets 1 − α."),
    gamma: float = _O(None, help="Task-loss weight γ (default 1.0)."),
    temperature: float = _O(None, help="KD temperature τ (default 2.0)."),
    layers: str = _O(None, help="uniform (default), last, copied (each truncate: block with its source block), or student:teacher pairs '2:4,4:8'."),
    features: str = _O(
        None, help="cls (default), mean or tokens: rows per example or per token; decoders: tokens (default), mean, last."
    ),
    kd: str = _O(None, "--kd", help="--task instruct: forward (default), reverse, jsd, skew-forward, skew-reverse, tvd, or uld (any two tokenizers)."),
    kd_beta: float = _O(None, "--kd-beta", help="--kd jsd: the teacher's weight in the mixture (default 0.5)."),
    kd_skew: float = _O(None, "--kd-skew", help="--kd skew-*: the skew alpha (default 0.1)."),
    flexkd_basis: str = _O(None, "--flexkd-basis", help="--loss flexkd: dims (teacher coordinates, default) or tangent (principal gradient directions)."),
    flexkd_samples: int = _O(None, "--flexkd-samples", help="--loss flexkd: training examples that score the teacher's dimensions (default 1024; 0: all)."),
    prune_samples: int = _O(None, "--prune-samples", help="--student prune:...: training examples of the calibration pass (default 256)."),
    flexkd_output: str = _O(None, "--flexkd-output", help="--loss flexkd: whose output's gradient scores: prediction (the teacher's own, default) or label."),
    attn_map: str = _O(None, "--attn-map", help="--loss attn: scores (pre-softmax, TinyBERT; default) or probs (softmax probabilities)."),
    relation_heads: int = _O(None, "--relation-heads", help="--loss attn-relation: relation heads R (default: the teacher's head count, or the largest divisor of both attention widths below it)."),
    finetune_teacher: bool = _O(
        None, "--finetune-teacher", help="Fine-tune a head-less teacher on the task first (in RUN/teacher)."
    ),
    cache: str = _O(
        None, help="Read the teacher's logits and features from this geokd cache (no teacher forward)."
    ),
    out: str = _OUT,
    epochs: float = _EPOCHS,
    max_steps: int = _MAX_STEPS,
    lr: float = _LR,
    batch_size: int = _BATCH_SIZE,
    grad_accum: int = _GRAD_ACCUM,
    geometry_batch: str = _O(None, "--geometry-batch", help="With --grad-accum: global (feature losses over the step's whole batch, default; one extra student forward per micro-batch) or micro (each micro-batch's own)."),
    max_length: int = _MAX_LENGTH,
    format: str = _FORMAT,
    template: str = _TEMPLATE,
    max_prompt_length: int = _MAX_PROMPT_LENGTH,
    eval_generate: int = _EVAL_GENERATE,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    seed: int = _SEED,
    seeds: str = _SEEDS,
    eval_every: int = _EVAL_EVERY,
    save_every: int = _SAVE_EVERY,
    save_minutes: float = _SAVE_MINUTES,
    keep_checkpoints: int = _KEEP_CHECKPOINTS,
    resume: str = _RESUME,
    device: str = _DEVICE,
    strategy: str = _STRATEGY,
    shard_teacher: bool = _O(None, "--shard-teacher/--no-shard-teacher", help="With --strategy fsdp: shard the frozen teacher's blocks too, for teachers that do not fit one device."),
    precision: str = _PRECISION,
    compile: bool = _COMPILE,
    activation_checkpointing: bool = _ACTIVATION_CHECKPOINTING,
    trust_remote_code: bool = _TRUST_REMOTE_CODE,
    config_file: Path = _CONFIG,
    overrides: list[str] = _SET,
    quiet: bool = _QUIET,
    log_format: str = _LOG_FORMAT,
) -> None:
    flags = {k: v for k, v in locals().items() if k not in _NOT_CONFIG_KEYS}
    _run_training("distill", config_file, overrides, flags, quiet, seeds, log_format)


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


@app.command()
def cache(
    teacher: str = _O(None, help="Fine-tuned teacher: local directory, Hugging Face id or alias."),
    task: str = _TASK,
    data: str = _DATA,
    split: str = _O("train", help="Split to cache (distillation reads train)."),
    layers: str = _O(None, help="Teacher hidden states to store, e.g. 2,4,6 (0 = embeddings), or all (default: "
                     "all; none for --task instruct)."),
    features: str = _O(None, help="cls or mean (one row per example) or tokens (every non-padding token); "
                       "instruct: tokens (response tokens, default), mean or last."),
    dtype: str = _O("bf16", help="Storage precision of the features (and top-k values): bf16, fp16 or fp32."),
    logits: bool = _O(True, "--logits/--no-logits", help="Store the teacher's logits (logit KD needs them)."),
    max_length: int = _O(None, "--max-length", help="Tokens per example, must match the distill run (128; "
                         "instruct 512)."),
    batch_size: int = _O(None, "--batch-size", help="Examples per teacher batch (64; instruct 8)."),
    topk: int = _O(64, "--topk", help="instruct: the teacher's top-k next-token log-probabilities stored per response token."),
    flexkd_samples: int = _O(None, "--flexkd-samples", help="Also store Flex-KD scores of the cached layers from N examples (0: all), for distill --loss flexkd --cache."),
    flexkd_output: str = _O("prediction", "--flexkd-output", help="With --flexkd-samples: prediction (the teacher's own, default) or label."),
    temperature: float = _O(1.0, "--temperature", help="instruct: τ of the stored distribution (distill uses the same)."),
    template: str = _O("alpaca", "--template", help="instruct: alpaca (MiniLLM prompt) or chat."),
    max_prompt_length: int = _O(256, "--max-prompt-length", help="instruct: longer prompts are dropped and counted."),
    data_format: str = _O("auto", "--format", help="instruct: the data format (auto-detected)."),
    shard_size: int = _O(4096, "--shard-size", help="Examples per shard (the unit of resume)."),
    text_fields: str = _TEXT_FIELDS,
    label_field: str = _LABEL_FIELD,
    out: str = _O(None, help="Cache directory (re-run the same command to resume)."),
    verify: Path = _O(None, "--verify", help="Check an existing cache (checksums, shards) and report."),
    info: Path = _O(None, "--info", help="Print an existing cache's manifest."),
    device: str = _DEVICE,
    trust_remote_code: bool = _O(False, "--trust-remote-code", help="Allow custom model code."),
    quiet: bool = _QUIET,
) -> None:
    """Run the teacher once over a split and store its logits and hidden states for distill --cache."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from geokd.artifacts import human_bytes
    from geokd.cache import CacheRequest, build_cache, read_manifest, verify_cache
    from geokd.cache_decoder import is_decoder_cache

    main_rank = _rank_zero()  # under torchrun rank 0 prints
    quiet = quiet or not main_rank
    with user_errors():
        if verify is not None or info is not None:
            _one_process_only("cache --verify/--info")
            if verify is not None and info is not None:
                raise GeokdError("--verify and --info: pass one of them")
            if is_decoder_cache(verify or info):
                _decoder_cache_report(verify, info)
                return
            if verify is not None:
                report = verify_cache(verify)
                _render_cache_manifest(read_manifest(verify), report)
                if not report["ok"]:
                    raise GeokdError(
                        f"cache {str(verify)!r} failed verification: {'; '.join(report['problems'])}"
                    )
                console.print(f"[bold green]ok[/bold green]: {len(report['shards'])} shard(s) verified")
            else:
                _render_cache_manifest(read_manifest(info), None)
            return
        missing = [
            flag for flag, value in (("--teacher", teacher), ("--task", task), ("--out", out)) if not value
        ]
        if missing:
            raise GeokdError(f"cache: {', '.join(missing)} missing; pass them (or --verify/--info CACHE)")
        if task == "instruct":
            _cache_instruct(teacher, data, out, split=split, layers=layers or "", features=features or "tokens",
                            dtype=dtype, topk=topk, temperature=temperature, template=template,
                            max_prompt_length=max_prompt_length, max_length=max_length or 512,
                            batch_size=batch_size or 8, shard_size=shard_size, data_format=data_format,
                            device=device or "auto", trust_remote_code=trust_remote_code, quiet=quiet,
                            flexkd_samples=flexkd_samples, flexkd_output=flexkd_output)  # fmt: skip
            return
        request = CacheRequest(
            teacher=teacher, task=task, data=data, split=split, layers=layers or "all", features=features or "cls",
            dtype=dtype, logits=logits, max_length=max_length or 128, batch_size=batch_size or 64,
            shard_size=shard_size, text_fields=text_fields, label_field=label_field, out=out, device=device or "auto",
            trust_remote_code=trust_remote_code, flexkd_samples=flexkd_samples, flexkd_output=flexkd_output,
        )  # fmt: skip
        columns = (TextColumn("[bold]cache"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err_console, disable=quiet or not err_console.is_terminal) as bar:
            bar_task = bar.add_task("cache", total=None)

            def on_plan(plan: dict) -> None:
                for message in plan.get("warnings", []):
                    err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}", highlight=False)
                console.print(
                    f"caching {plan['examples']:,} examples ({plan['tokens']:,} tokens), layers {plan['layers']}: "
                    f"about {human_bytes(plan['expected_bytes'])} on disk, {human_bytes(plan['free_bytes'])} free; "
                    f"{plan['shards']} shard(s), {plan['shards_kept']} kept from an earlier run",
                    highlight=False,
                )
                done = min(plan["examples"], plan["shards_kept"] * request.shard_size)
                bar.update(bar_task, total=plan["examples"], completed=done)

            manifest = build_cache(request, on_plan=on_plan, on_batch=lambda k: bar.advance(bar_task, k))
        if not main_rank:
            return
        _render_cache_manifest(manifest, None)
        console.print(f"wrote {out}")


def _cache_instruct(teacher: str, data: str | None, out: str, *, quiet: bool, data_format: str, **options) -> None:
    """`geokd cache --task instruct`: the decoder cache (geokd.cache_decoder)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from geokd.artifacts import human_bytes
    from geokd.cache_decoder import DecoderCacheRequest, build_decoder_cache

    if data is None:
        raise GeokdError("cache: --data missing; --task instruct needs a folder holding train.jsonl (and dev.jsonl)")
    request = DecoderCacheRequest(teacher=teacher, data=data, out=out, format=data_format, **options)
    columns = (TextColumn("[bold]cache"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, disable=quiet or not err_console.is_terminal) as bar:
        bar_task = bar.add_task("cache", total=None)

        def on_plan(plan: dict) -> None:
            for message in plan.get("warnings", []):
                err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(message)}", highlight=False)
            stats = plan["data_stats"]
            console.print(
                f"caching {plan['examples']:,} examples ({plan['tokens']:,} response tokens; {stats['dropped_prompt']} "
                f"dropped for long prompts), top-{request.topk}, layers {plan['layers'] or 'none'}: about "
                f"{human_bytes(plan['expected_bytes'])} on disk ({plan['minimum_bytes'] / max(1, plan['tokens']):.0f} "
                f"bytes per response token), {human_bytes(plan['free_bytes'])} free; {plan['shards']} shard(s), "
                f"{plan['shards_kept']} kept from an earlier run",
                highlight=False,
            )
            bar.update(bar_task, total=plan["examples"], completed=min(plan["examples"], plan["shards_kept"] * request.shard_size))

        manifest = build_decoder_cache(request, on_plan=on_plan, on_batch=lambda k: bar.advance(bar_task, k))
    if not _rank_zero():  # torchrun: rank 0 reports
        return
    _render_decoder_cache_manifest(manifest, None)
    console.print(f"wrote {out}")


def _decoder_cache_report(verify: Path | None, info: Path | None) -> None:
    from geokd.cache_decoder import read_decoder_manifest, verify_decoder_cache

    if verify is not None:
        report = verify_decoder_cache(verify)
        _render_decoder_cache_manifest(read_decoder_manifest(verify), report)
        if not report["ok"]:
            raise GeokdError(f"cache {str(verify)!r} failed verification: {'; '.join(report['problems'])}")
        console.print(f"[bold green]ok[/bold green]: {len(report['shards'])} shard(s) verified")
    else:
        assert info is not None
        _render_decoder_cache_manifest(read_decoder_manifest(info), None)


def _render_decoder_cache_manifest(manifest: dict, report: dict | None) -> None:
    from geokd.artifacts import human_bytes

    table = Table(title=f"decoder teacher cache ({'complete' if manifest.get('complete') else 'INCOMPLETE'})",
                  show_header=False)  # fmt: skip
    table.add_column("field")
    table.add_column("value")
    teacher = manifest["teacher"]
    stored = sum(s["bytes"] for s in manifest["shards"])
    rows = {
        "teacher": f"{teacher['path_or_id']} (weights sha256 {str(teacher.get('weights_sha256'))[:12]})",
        "teacher shape": f"{manifest['teacher_layers']} layers, hidden {manifest['hidden_size']}, vocabulary {manifest['vocab']:,}",
        "tokenizer sha256": manifest["tokenizer_sha256"][:12],
        "data": f"{manifest['data']['source']} ({manifest['data']['fingerprint'][:19]}), split {manifest['split']}",
        "template / lengths": f"{manifest['template']} / prompt {manifest['max_prompt_length']}, total {manifest['max_length']}",
        "examples / response tokens": f"{manifest['n_examples']:,} / {manifest['n_tokens']:,}",
        "top-k / τ": f"{manifest['topk']} ({manifest['id_dtype']} ids, {manifest['dtype']} values) / {manifest['temperature']}",
        "layers / features": f"{', '.join(map(str, manifest['layers'])) or 'none'} / {manifest['features']}",
        "shards": f"{len(manifest['shards'])} of {manifest['shard_size']:,} examples, {human_bytes(stored)} "
        f"({stored / max(1, manifest['n_tokens']):.1f} bytes per response token; fields alone "
        f"{manifest['bytes_minimum'] / max(1, manifest['n_tokens']):.1f})",
        "geokd version": manifest["geokd_version"],
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)
    if report is not None:
        for problem in report["problems"]:
            console.print(f"[red]{escape(problem)}[/red]")


def _render_cache_manifest(manifest: dict, report: dict | None) -> None:
    from geokd.artifacts import human_bytes

    table = Table(
        title=f"teacher cache ({'complete' if manifest.get('complete') else 'INCOMPLETE'})", show_header=False
    )
    table.add_column("field")
    table.add_column("value")
    teacher = manifest["teacher"]
    rows = {
        "teacher": f"{teacher['path_or_id']} (weights sha256 {str(teacher.get('weights_sha256'))[:12]})",
        "teacher shape": f"{manifest['teacher_layers']} layers, hidden {manifest['hidden_size']}",
        "tokenizer sha256": manifest["tokenizer_sha256"][:12],
        "task / split": f"{manifest['task']} / {manifest['split']}",
        "data": f"{manifest['data']['source']} ({manifest['data']['fingerprint'][:19]})",
        "examples / tokens": f"{manifest['n_examples']:,} / {manifest['n_tokens']:,}",
        "max length": str(manifest["max_length"]),
        "layers": ", ".join(map(str, manifest["layers"])),
        "features / dtype": f"{manifest['features']} / {manifest['dtype']}",
        "logits": "yes" if manifest["logits"] else "no",
        "shards": f"{len(manifest['shards'])} of {manifest['shard_size']:,} examples, "
        f"{human_bytes(sum(s['bytes'] for s in manifest['shards']))}",
        "geokd version": manifest["geokd_version"],
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)
    if report is not None:
        shards = Table(title="shards")
        for column in ("file", "examples", "rows", "size", "status"):
            shards.add_column(column)
        for entry in report["shards"]:
            style = "green" if entry["status"] == "ok" else "red"
            shards.add_row(entry["file"], f"{entry['first_example']}..{entry['first_example'] + entry['n_examples'] - 1}",
                           f"{entry['n_rows']:,}", human_bytes(entry["bytes"]), f"[{style}]{entry['status']}[/{style}]")  # fmt: skip
        console.print(shards)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


@app.command()
def export(
    source: str = typer.Argument(
        None, help="A run directory (its final/ or --checkpoint), or a model folder."
    ),
    out: Path = _O(None, help="hf: a directory; safetensors: a .safetensors file."),
    fmt: str = _O("hf", "--format", help="hf (Hugging Face folder + model card) or safetensors (one file)."),
    dtype: str = _O("fp32", help="fp32, fp16 or bf16."),
    checkpoint: str = _O("final", help="final, or step-N of the run's checkpoints."),
    force: bool = _O(False, "--force", help="Replace a non-empty --out."),
    check: Path = _O(None, "--check", help="Re-run the round-trip check on an existing export and report."),
    trust_remote_code: bool = _O(False, "--trust-remote-code", help="Allow custom model code."),
) -> None:
    """Export the student for deployment: weights, config, tokenizer, model card, provenance."""
    from geokd.export import export_model, verify_export

    with user_errors():
        _one_process_only("export")
        if check is not None:
            if source is not None or out is not None:
                raise GeokdError("--check takes only the export to check; drop SOURCE and --out")
            report = verify_export(check, trust_remote_code=trust_remote_code)
            verdict = "ok" if report["ok"] else "FAILED"
            console.print(
                f"{verdict}: probe logits differ by at most {report['max_abs_logit_diff']:.3g} "
                f"(allowed {report['tolerance']:g} for {report['dtype']})",
                highlight=False,
            )
            if not report["ok"]:
                raise GeokdError(
                    f"--check: {str(check)!r} does not reproduce its recorded logits; re-export it"
                )
            return
        if source is None or out is None:
            raise GeokdError("export: pass SOURCE and --out (or --check EXPORT)")
        info = export_model(source, str(out), fmt=fmt, dtype=dtype, checkpoint=checkpoint, force=force,
                            trust_remote_code=trust_remote_code)  # fmt: skip
        table = Table(
            title=f"exported {info['task'] or 'model'} ({fmt}, {dtype}) to {out}", show_header=False
        )
        table.add_column("key")
        table.add_column("value")
        table.add_row("parameters", f"{info['parameters']:,}")
        if info["teacher_parameters"]:
            table.add_row("teacher parameters", f"{info['teacher_parameters']:,}")
        for name, value in (info["metrics"] or {}).items():
            table.add_row(f"{info['split'] or 'dev'} {name}", f"{value:.4f}")
        table.add_row("round trip", f"max |Δ logit| {info['check']['max_abs_logit_diff']:.3g}")
        console.print(table)


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


@app.command()
def demo(
    out: Path = _O(Path("runs/demo"), help="Where the demo's runs go (finished stages are reused)."),
    model: str = _O(None, "--model", help="Teacher to fine-tune (default: the packaged all-MiniLM-L6-v2)."),
    teacher_epochs: float = _O(2.0, "--teacher-epochs", help="Teacher fine-tuning epochs."),
    student_epochs: float = _O(3.0, "--student-epochs", help="Student distillation epochs."),
    max_steps: int = _O(None, "--max-steps", help="Cap every stage at N steps (a quick check)."),
    seed: int = _O(42, help="Random seed."),
    trust_remote_code: bool = _O(False, "--trust-remote-code", help="Allow a --model's own repository code to run."),
    quiet: bool = _QUIET,
) -> None:
    """Offline quickstart: fine-tune MiniLM on an SST-2 sample, distil a 3-layer student, evaluate, export."""
    import time

    from geokd.artifacts import write_json
    from geokd.demo import stage_flags, summary_rows, teacher_name
    from geokd.evaluate import default_eval_path, evaluate_model
    from geokd.export import export_model

    started = time.perf_counter()
    with user_errors():
        teacher = teacher_name(model)
        for number, stage in enumerate(("teacher", "student"), start=1):
            epochs = teacher_epochs if stage == "teacher" else student_epochs
            flags = stage_flags(stage, teacher, out, epochs, max_steps, seed)
            if trust_remote_code:
                flags["trust_remote_code"] = True
            run = Path(flags["out"])
            _rule(
                f"step {number} of 4: {'fine-tune the teacher' if stage == 'teacher' else 'distil the student'}"
            )
            if (run / "results.json").is_file():
                from geokd.config import read_config, resolve_config
                from geokd.engine import check_resume_config

                mode = "finetune" if stage == "teacher" else "distill"
                try:  # reuse only a run made with these options
                    check_resume_config(read_config(run / "config.yaml"), resolve_config(mode, flags=flags))
                except GeokdError:
                    raise GeokdError(
                        f"demo: {run} was made with other options (--model, --seed, epochs or --max-steps); delete "
                        f"it or pass another --out"
                    ) from None
                console.print(f"reusing the finished run {run} (delete it to train again)")
                continue
            if run.exists():
                flags["resume"] = "auto"
            _run_training("finetune" if stage == "teacher" else "distill", None, None, flags, quiet)
        _rule("step 3 of 4: evaluate both on the 872 SST-2 dev sentences")
        results = {}
        for stage in ("teacher", "student"):
            results[stage] = evaluate_model(str(out / stage), batch_size=64, trust_remote_code=trust_remote_code)
            record = default_eval_path(out / stage, results[stage]["task"], results[stage]["split"], None)
            assert record is not None
            record.parent.mkdir(exist_ok=True)
            write_json(record, results[stage])
            console.print(f"{stage}: accuracy {results[stage]['metrics']['accuracy']:.4f}", highlight=False)
        _rule("step 4 of 4: export the student")
        export_dir = out / "export"
        info = export_model(str(out / "student"), str(export_dir), force=True, trust_remote_code=trust_remote_code)
        console.print(
            f"exported to {export_dir} (round trip max |Δ logit| {info['check']['max_abs_logit_diff']:.3g})"
        )
        name = "all-MiniLM-L6-v2" if model is None else Path(model).name
        table = Table(title=f"geokd demo: {name} teacher vs truncate:3 student (procrustes), SST-2")
        for column in ("", "teacher", "student", "student / teacher"):
            table.add_column(column, justify="left" if not column else "right")
        for row in summary_rows(results["teacher"], results["student"], export_dir):
            table.add_row(*row)
        table.caption = (
            f"{time.perf_counter() - started:.0f} s in all; runs in {out}, deployable student in {export_dir}"
        )
        console.print(table)


# ---------------------------------------------------------------------------------------------
# study
# ---------------------------------------------------------------------------------------------


@app.command()
def study(
    file: Path = typer.Argument(None, help="The study file (YAML): tasks, students, losses, seeds, settings."),
    out: Path = _O(None, help="The study folder (default runs/study-NAME); finished runs in it are skipped. "
                   "With --records: where the records go."),
    dry_run: bool = _O(False, "--dry-run", help="Print the plan (runs, estimated time and disk) and stop."),
    report: Path = _O(None, "--report", help="Rebuild STUDY/report.md and report.json from the finished runs of this folder."),
    records: Path = _O(None, "--records", help="Copy this study folder's weight-free records (specs, results, configs, "
                       "logs, evaluations) to --out: enough to rebuild the report, or to continue the study elsewhere."),
    jobs: int = _O(1, "--jobs", help="Student runs side by side in worker processes (the CPU threads split between them)."),
    quick: bool = _O(False, "--quick", help="The first task and student, two losses, two seeds, 4 steps each: the plumbing."),
    only: list[str] = _O(None, "--only", help="Run one part: KEY=VALUE with KEY task, student, loss or seed (repeatable; "
                         "values of one key are alternatives). The report covers every finished run."),
    quiet: bool = _QUIET,
) -> None:
    """Run a grid of distillations (teachers, caches, students), resumably, and report statistics (issue #16)."""
    from rich.progress import Progress

    from geokd.study import StudyInterrupted, build_report, load_study, parse_only, run_study
    from geokd.study import dry_run as plan_dry_run

    with user_errors():
        if records is not None:
            from geokd.artifacts import human_bytes
            from geokd.study import export_records

            if out is None:
                raise GeokdError("study --records: pass --out DIR, the folder the records go to")
            kept = export_records(records, out)
            console.print(f"wrote {out}: {kept['runs']} finished runs, {kept['files']} files, {human_bytes(kept['bytes'])}")
            return
        if report is not None:
            result = build_report(report)
            console.print(f"wrote {report / 'report.md'} ({sum(len(t['rows']) for t in result['tasks'].values())} rows)")
            return
        if file is None:
            raise GeokdError("study: pass a study file (e.g. examples/studies/glue.yaml) or --report STUDY")
        if jobs > 1 and os.environ.get("WORLD_SIZE", "1") != "1":
            raise GeokdError("--jobs: under torchrun every run uses the whole process group; run with --jobs 1")
        selection = parse_only(only)
        spec = load_study(file, quick=quick)
        root = out or Path("runs") / f"study-{spec.name}"
        if dry_run:
            plan = plan_dry_run(spec, root, selection)
            seconds = plan["estimated_seconds"]
            timing = (f"time unknown ({plan['throughput_source']})" if seconds != seconds else
                      f"about {seconds / 3600:.1f} h at {plan['seconds_per_optimizer_step']:.2f} s per optimizer step"
                      + (f" plus {plan['seconds_per_run_overhead']:.0f} s per run (loading, final evaluation)"
                         if plan["seconds_per_run_overhead"] else "")
                      + f" ({plan['throughput_source']})")  # fmt: skip
            if plan["generation_evals_to_do"]:
                generation = plan["generation_seconds"]
                timing += (f"; then {plan['generation_evals_to_do']} generation evaluation(s), "
                           + (f"time unknown ({plan['generation_source']})" if generation != generation else
                              f"about {generation / 3600:.1f} h ({plan['generation_source']})"))  # fmt: skip
            console.print(
                f"study {plan['study']}: {plan['steps']} steps ({plan['runs']} runs), {plan['done']} done; to do: "
                + ", ".join(f"{n} {kind}(s)" for kind, n in plan["to_do"].items())
                + f"; {timing}; at most {plan['estimated_disk_bytes'] / 2**30:.1f} GiB on disk",
                highlight=False,
            )
            return
        with Progress(*_progress_columns("study"), console=err_console, disable=quiet or not err_console.is_terminal) as bar:
            task = bar.add_task("study", total=None, info="")

            def on_step(index: int, total: int, step, skipped: bool) -> None:  # noqa: ANN001
                label = step.label or {}
                what = f"{step.kind} {step.task}" + (f" {label.get('student')} {label.get('loss')} seed {label.get('seed')}"
                                                     if label else "")  # fmt: skip
                bar.update(task, total=total, completed=index, info=("skip " if skipped else "") + what)
                if not quiet and not skipped:
                    console.print(f"[{index + 1}/{total}] {what}", highlight=False)

            try:
                result = run_study(spec, root, on_step=on_step, jobs=jobs, only=selection)
            except StudyInterrupted as stop:
                bar.stop()
                err_console.print(f"[bold yellow]stopped:[/bold yellow] {escape(str(stop))}", highlight=False,
                                  soft_wrap=True)  # fmt: skip
                raise typer.Exit(code=stop.exit_code) from None
        if _rank_zero():
            console.print(f"wrote {root / 'report.md'}: {', '.join(result['tasks'])}")


# ---------------------------------------------------------------------------------------------
# eval / compare
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


@app.command("eval")
def eval_command(
    model: str = typer.Argument(
        ..., help="A run directory, its final/, an export, a model folder or a Hugging Face id."
    ),
    task: str = _O(None, help="Task (default: the one the model was trained on, from its geokd.json)."),
    data: str = _O(
        None, help="GLUE task folder, a data file, or a datasets name (default: the model's training data)."
    ),
    split: str = _O(None, help="Split to score (default: dev; MNLI: dev_matched and dev_mismatched)."),
    text_fields: str = _TEXT_FIELDS,
    label_field: str = _LABEL_FIELD,
    batch_size: int = _O(64, "--batch-size", help="Examples per batch at the longest length."),
    max_length: int = _O(None, "--max-length", help="Tokens per example (default: the run's, else 128)."),
    limit: int = _O(None, help="Score only the first N examples of the split."),
    json_path: Path = _O(None, "--json", help="Also write the result JSON here."),
    teacher: str = _O(None, help="Teacher for the geometry report (with --geometry)."),
    geometry: bool = _O(False, "--geometry", help="Report the geometry of the model against --teacher."),
    layers: str = _O(None, help="Geometry layer pairs: uniform (default, or the run's), last, or '2:4,4:8'."),
    features: str = _O(None, help="Geometry rows: cls (default, or the run's) or mean."),
    epsilon: float = _O(0.1, help="Geometry: pairs with |centred cosine| <= epsilon are epsilon-orthogonal."),
    plot_path: Path = _O(None, "--plot", help="Geometry: write a PNG heat-map here."),
    decoding: str = _O("greedy", "--decoding", help="--task instruct: greedy (default) or sample (MiniLLM: T=1, top-k 0, top-p 1)."),
    gen_seeds: str = _O(None, "--gen-seeds", help="--decoding sample: generation seeds (default 10,20,30,40,50)."),
    max_new_tokens: int = _O(256, "--max-new-tokens", help="--task instruct: tokens generated per response."),
    max_prompt_length: int = _O(None, "--max-prompt-length", help="--task instruct: longer prompts are dropped and counted (default: the run's, else 256)."),
    template: str = _O(None, "--template", help="--task instruct: alpaca or chat (default: the run's, else alpaca)."),
    data_format: str = _O("auto", "--format", help="--task instruct: data format (auto-detected by default)."),
    train_data: str = _O(None, "--train-data", help="--task instruct: training data for the contamination count (default: the run's)."),
    device: str = _DEVICE,
    trust_remote_code: bool = _O(False, "--trust-remote-code", help="Allow custom model code."),
    quiet: bool = _QUIET,
) -> None:
    """Score a model on a task split: GLUE metrics (+ geometry against a teacher), or for
    --task instruct generation with ROUGE-L on the MiniLLM protocol."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from geokd.artifacts import check_output_path, write_json
    from geokd.evaluate import default_eval_path, evaluate_model, plot_geometry

    # Under torchrun the ranks share the forward passes; rank 0 prints and writes.
    main_rank = _rank_zero()
    quiet = quiet or not main_rank
    with user_errors():
        if json_path is not None:
            check_output_path(json_path, "--json")
        if _is_instruct_eval(model, task):
            if geometry and teacher is None:
                raise GeokdError("--geometry needs --teacher TEACHER (a causal LM) to compare against")
            geometry_options = dict(teacher=teacher if geometry else None, layers=layers, features=features,
                                    epsilon=epsilon, max_length=max_length)  # fmt: skip
            _eval_instruct(model, data, split, limit, json_path, batch_size, decoding, gen_seeds, max_new_tokens,
                           max_prompt_length, template, data_format, train_data, device, trust_remote_code, quiet,
                           geometry_options)  # fmt: skip
            return
        if plot_path is not None:
            if not geometry:
                raise GeokdError("--plot draws the geometry report; add --geometry --teacher TEACHER")
            check_output_path(plot_path, "--plot")
        columns = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        # Off when stderr is not a terminal: a transient bar would still leave a blank line there.
        bar_off = quiet or not err_console.is_terminal
        with Progress(*columns, console=err_console, disable=bar_off, transient=True) as bar:
            bar_task = bar.add_task("eval", total=None)
            result = evaluate_model(
                model,
                task,
                data,
                split,
                text_fields=text_fields,
                label_field=label_field,
                batch_size=batch_size,
                max_length=max_length,
                limit=limit,
                device=device or "auto",
                trust_remote_code=trust_remote_code,
                teacher=teacher,
                geometry=geometry,
                geometry_grid=plot_path is not None,
                layers=layers,
                features=features,
                epsilon=epsilon,
                on_batch=lambda k: bar.advance(bar_task, k),
                on_total=lambda n: bar.update(bar_task, total=n),
            )
        if not main_rank:
            return
        _render_eval(result)
        written = []
        if json_path is not None:
            write_json(json_path, result)
            written.append(str(json_path))
        run_copy = default_eval_path(result["model"]["run_dir"], result["task"], result["split"], limit)
        if run_copy is not None:
            try:
                run_copy.parent.mkdir(exist_ok=True)
                write_json(run_copy, result)
                written.append(str(run_copy))
            except OSError as exc:  # a read-only run directory: the result is still printed (and --json)
                err_console.print(
                    f"[bold yellow]warning:[/bold yellow] could not write {run_copy} ({exc.strerror}); "
                    "pass --json PATH to keep the result",
                    highlight=False,
                )
        if plot_path is not None:
            plot_geometry(result["geometry"], plot_path, title=f"{model} vs {teacher}")
            written.append(str(plot_path))
        if written:
            console.print(f"wrote {', '.join(written)}")


def _is_instruct_eval(model: str, task: str | None) -> bool:
    from geokd.evaluate import locate_model
    from geokd.tasks import is_instruct_task

    if task is not None:
        return is_instruct_task(task)
    record = locate_model(model).record or {}
    return record.get("task") == "instruct"


def _eval_instruct(model, data, split, limit, json_path, batch_size, decoding, gen_seeds, max_new_tokens,
                   max_prompt_length, template, data_format, train_data, device, trust_remote_code, quiet,
                   geometry_options) -> None:  # fmt: skip
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from geokd.artifacts import write_json
    from geokd.engine import parse_seeds
    from geokd.evaluate import default_eval_path
    from geokd.generation import write_generations_jsonl
    from geokd.instruct_eval import evaluate_instruct_model

    seeds = parse_seeds(gen_seeds) if gen_seeds is not None else None
    columns = (TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, disable=quiet or not err_console.is_terminal, transient=True) as bar:
        bar_task = bar.add_task("generate", total=None)
        result = evaluate_instruct_model(
            model, data, split=split, data_format=data_format, template=template,
            max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens, decoding=decoding,
            gen_seeds=seeds, limit=limit, batch_size=min(batch_size, 64), device=device or "auto",
            trust_remote_code=trust_remote_code, train_data=train_data,
            on_total=lambda n: bar.update(bar_task, total=n), on_batch=lambda k: bar.advance(bar_task, k),
            **geometry_options,
        )  # fmt: skip
    records = result.pop("records")
    if not _rank_zero():  # torchrun: rank 0 prints and writes
        return
    table = Table(title=f"instruct: {model} on {result['data']['source']} ({result['decoding']['decoding']})")
    table.add_column("examples", justify="right")
    for name in result["metrics"]:
        table.add_column(name + (" *" if name == "rouge_l" else ""), justify="right")
    cells = []
    for name in result["metrics"]:
        spread = result["metrics_spread"][name]
        std = f" ± {spread['std']:.2f}" if spread.get("std") is not None else ""
        cells.append(f"{spread['mean']:.2f}{std}")
    table.add_row(str(result["n_examples"]), *cells)
    dropped = result["prompts"].get("dropped_prompt", 0)
    contamination = result["contamination"]
    table.caption = (
        f"{result['model']['parameters']:,} parameters; {dropped} prompt(s) over {result['prompts']['max_prompt_length']} "
        f"tokens dropped; contamination: "
        + (f"{contamination['count']} of {contamination['total']}" if contamination else "unknown (no --train-data)")
        + f"; {result['elapsed_s']:.1f} s"
    )
    console.print(table)
    _render_geometry(result.get("geometry"))
    written = []
    targets = [json_path] if json_path is not None else []
    run_copy = default_eval_path(result["model"]["run_dir"], "instruct", result["split"], None)
    if run_copy is not None:
        run_copy.parent.mkdir(exist_ok=True)
        targets.append(run_copy)
    for target in targets:
        generations = Path(target).with_suffix(".generations.jsonl")
        write_generations_jsonl(generations, records)
        write_json(target, {**result, "generations": str(generations)})
        written += [str(target), str(generations)]
    if written:
        console.print(f"wrote {', '.join(written)}")


def _render_eval(result: dict) -> None:
    model = result["model"]
    table = Table(title=f"{result['task']}: {model['given']}")
    table.add_column("split")
    table.add_column("examples", justify="right")
    names = list(result["metrics"])
    for name in names:
        table.add_column(name + (" *" if name == result["primary_metric"] else ""), justify="right")
    table.add_column("examples/s", justify="right")
    splits = {result["split"]: result, **result.get("other_splits", {})}
    for split, entry in splits.items():
        table.add_row(
            split,
            str(entry["n_examples"]),
            *(f"{entry['metrics'][n]:.4f}" for n in names),
            f"{entry['examples_per_s']:.0f}",
        )
    kind = model["label_mapping"]["kind"]
    mapping = "regression head" if kind == "regression" else f"labels mapped {kind.replace('_', ' ')}"
    table.caption = (
        f"{model['parameters']:,} parameters, {mapping}; data {result['data']['fingerprint'][:19]}; "
        f"{result['settings']['device']}; {result['elapsed_s']:.1f} s"
    )
    console.print(table)
    for warning in result["warnings"]:
        err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(warning)}", highlight=False)
    _render_geometry(result.get("geometry"))


def _render_geometry(report: dict | None) -> None:
    """The geometry table of `geokd eval --geometry` (classifiers and decoders alike)."""
    if report is None:
        return
    geo = Table(
        title=(
            f"geometry vs {report['teacher']['name']}: {report['n_examples']} {report['split']} examples, "
            f"{report['features']} rows, eps={report['epsilon']:g}"
        )
    )
    for column in (
        "student",
        "teacher",
        "procrustes",
        "gram",
        "cka_distance",
        "teacher eps-pairs",
        "preserved",
        "%",
    ):
        geo.add_column(column, justify="right")
    flexkd = any("flexkd_correlation" in entry for entry in report["layer_pairs"])
    if flexkd:
        geo.add_column("flexkd corr", justify="right")
    notes = []
    for entry in report["layer_pairs"]:
        geo.add_row(
            str(entry["student_layer"]),
            str(entry["teacher_layer"]),
            # None: undefined (a side's rows are all identical), never 0 = "same geometry"
            *(
                "n/a" if entry[k] is None else f"{entry[k]:.4f}"
                for k in ("procrustes", "gram", "cka_distance")
            ),
            f"{entry['teacher_pairs']:,}",
            f"{entry['preserved_pairs']:,}",
            _fmt(100.0 * entry["preserved_fraction"] if entry["teacher_pairs"] else None, ".1f"),
            *([_fmt(entry.get("flexkd_correlation"), ".4f")] if flexkd else []),
        )
        if entry.get("undefined"):
            notes.append(f"n/a at {entry['student_layer']}:{entry['teacher_layer']}: {entry['undefined']}")
    geo.caption = "; ".join(
        [
            "procrustes: squared, normalised (0..2); gram: normalised; cka_distance = 1 - linear CKA; "
            "0 = same geometry; layer 0 = embeddings",
            *(["flexkd corr: mean Pearson correlation of the student's dimensions with the teacher subspace the run "
               "selected (1 = aligned)"] if flexkd else []),
            *notes,
        ]
    )
    console.print(geo)


@app.command()
def compare(
    runs: list[str] = typer.Argument(
        ..., help="Run directories (or dirs of seed-K runs, or eval JSON files)."
    ),
    metric: str = _O(None, help="Metric to compare (default: the task's primary metric)."),
    baseline: str = _O(
        None, help="Baseline group label, or a key=value naming one group (default: the first)."
    ),
    json_path: Path = _O(None, "--json", help="Write the comparison as JSON here."),
    plot_path: Path = _O(None, "--plot", help="Write a PNG of per-seed points and group means here."),
) -> None:
    """Group runs by configuration (minus the seed) and test each group against a baseline."""
    from geokd.artifacts import check_output_path, write_json
    from geokd.compare import compare_runs, plot_comparison

    with user_errors():
        for path, option in ((json_path, "--json"), (plot_path, "--plot")):
            if path is not None:
                check_output_path(path, option)
        comparison = compare_runs(runs, metric=metric, baseline=baseline)
        _render_comparison(comparison)
        if json_path is not None:
            write_json(json_path, comparison)
            console.print(f"wrote {json_path}")
        if plot_path is not None:
            plot_comparison(comparison, plot_path)
            console.print(f"wrote {plot_path}")


def _render_comparison(comparison: dict) -> None:
    table = Table(
        title=f"{comparison['task']}: {comparison['metric']} by configuration (baseline: {comparison['baseline']})"
    )
    for column in ("group", "n", "mean ± std", "Δ vs baseline", "95% CI of Δ", "Welch p", "paired p (pairs)"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for group in comparison["groups"]:
        versus = group["vs_baseline"]
        spread = f" ± {group['std']:.4f}" if group["std"] is not None else ""
        if versus is None:
            cells = ["baseline", "", "", ""]
        else:
            ci = versus["ci95"]
            paired = versus["paired"]
            cells = [
                f"{versus['difference']:+.4f}",
                f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" + (" (paired)" if versus["ci_paired"] else "") if ci else "-",
                _fmt(versus["welch"]["p"], ".3g"),
                f"{_fmt(paired['p'], '.3g')} ({paired['n_pairs']})" if paired else "-",
            ]
        table.add_row(group["label"], str(group["n"]), f"{group['mean']:.4f}{spread}", *cells)
    console.print(table)
    for note in comparison["notes"]:
        err_console.print(f"[bold yellow]note:[/bold yellow] {escape(note)}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Usage errors from option parsing also become one line and exit 2. It
    ends through `geokd.distributed.leave` (a torchrun rank leaves with `os._exit`)."""
    from geokd import distributed

    distributed.leave(_run(argv))


def _run(argv: list[str] | None) -> int:
    command = typer.main.get_command(app)
    try:
        try:
            code = command.main(args=argv, prog_name="geokd", standalone_mode=False)
        finally:
            from geokd import distributed

            distributed.shutdown()  # torchrun: leave the process group before the interpreter exits
    except _USAGE_ERRORS as exc:
        where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "geokd"
        _fail(f"{exc.format_message()} (see {where} --help)")
        return 2
    except _ABORTS:
        _fail("aborted")
        return 130
    except GeokdError as exc:  # raised outside a command's own handler
        _fail(str(exc))
        return 2
    except RuntimeError as exc:
        from geokd import distributed

        if not distributed.peer_failure(exc):
            raise
        # torchrun: this rank waited on a rank that stopped (its own error is printed above it)
        first = str(exc).strip().splitlines()[0][:200]
        _fail(f"rank {os.environ.get('RANK', '?')}: another rank of this torchrun job stopped or stopped answering "
              f"({first}); its error is the one to read; nothing more was written by this rank")  # fmt: skip
        return 1
    return code if isinstance(code, int) else 0

