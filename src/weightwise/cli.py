"""The `weightwise` command: options → config object → API call → rich output. User errors exit 2."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from weightwise.errors import WeightwiseError
from weightwise.evaluate.config import EvalConfig
from weightwise.export.gguf import GGUFExportConfig
from weightwise.quantize.calibration import CalibrationConfig
from weightwise.quantize.recipe import QuantRecipe, recipe_from_yaml, validated, validation_message
from weightwise.tune.config import TuneConfig, shortcut_description

app = typer.Typer(
    help="Quantize, evaluate and compare Hugging Face causal LMs on one GPU or a laptop CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
logger = logging.getLogger("weightwise.cli")

_R = QuantRecipe.model_fields
_E = EvalConfig.model_fields

ModelArg = Annotated[str, typer.Argument(help="A local HF folder, a .gguf file, a hub id in the local HF cache, a weightwise run folder, 'default' (SmolLM2-135M-Instruct) or 'minilm' (the all-MiniLM-L6-v2 encoder; quantize only).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML file with the same fields; command-line options override it.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow loading pickled .bin checkpoints (runs code from the file: only for files you trust).")]
RemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a model folder's own Python code to run.")]


def _given(**options) -> dict:
    """The options the user actually set (None means 'not given', so YAML and defaults apply)."""
    return {k: v for k, v in options.items() if v is not None}


def _build(model_cls, config: Optional[Path], updates: dict):
    return recipe_from_yaml(model_cls, config, updates) if config else validated(model_cls, updates)


@contextmanager
def _progress(description: str):
    """A rich progress bar; yields a callback (done, total[, name])."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[item]}"), console=console, transient=True,
    ) as bar:
        task = bar.add_task(description, total=None, item="")

        def update(done: int, total: int, item: str = "") -> None:
            bar.update(task, completed=done, total=total, item=item)

        yield update


@contextmanager
def _no_progress(description: str):
    """What :func:`_progress` yields, showing nothing (processes other than the first under a launcher)."""
    yield lambda done, total, item="": None


def _load(source: str, allow_pickle: bool = False, trust_remote_code: bool = False, dtype="float32"):
    import torch

    from weightwise.io.models import load_model

    started = time.perf_counter()
    with console.status(f"loading {source}"):
        model, tokenizer = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                      dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    console.print(f"loaded [bold]{source}[/] in {time.perf_counter() - started:.1f} s")
    return model, tokenizer


@app.command()
def formats() -> None:
    """List the number formats with their bits and storage cost."""
    from weightwise.formats import FORMAT_NAMES, QuantSpec, get_format, storage_bits

    table = Table(title="Number formats (bits/weight of a 576×1536 matrix at the default group size; scales fp16 unless fixed)")
    for column in ("name", "family", "bits/code", "values", "max", "scaling", "group", "scale dtype", "bits/weight"):
        table.add_column(column, justify="right" if column in ("bits/code", "values", "max", "group", "bits/weight") else "left")
    for name in FORMAT_NAMES:
        fmt = get_format(name)
        spec = QuantSpec(format=name)
        shape = (576, 1536)
        bpw = storage_bits(shape, spec) / (shape[0] * shape[1])
        table.add_row(
            name + (f" ({', '.join(fmt.aliases)})" if fmt.aliases else ""), fmt.family, str(fmt.bits), str(len(fmt.grid)),
            f"{fmt.max_value:g}", fmt.scaling, str(spec.resolved_group_size), spec.resolved_scale_dtype, f"{bpw:.3f}",
        )
    out = Console(width=max(Console().width, 130))
    out.print(table)
    out.print("General minifloats: fp{bits}_e{E}m{M}, e.g. fp5_e2m2 (every code finite).")


@app.command("quantize")
def quantize_cmd(
    model: ModelArg = "default",
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder to write (model.safetensors, config, tokenizer, manifest.json).")] = ...,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help=_R["format"].description)] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-g", help=_R["group_size"].description)] = None,
    granularity: Annotated[Optional[str], typer.Option(help=_R["granularity"].description)] = None,
    scale_dtype: Annotated[Optional[str], typer.Option(help=_R["scale_dtype"].description)] = None,
    method: Annotated[Optional[str], typer.Option(help=_R["method"].description)] = None,
    targets: Annotated[Optional[list[str]], typer.Option("--targets", help=_R["targets"].description)] = None,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", help=_R["ignore"].description)] = None,
    pad: Annotated[Optional[bool], typer.Option("--pad/--no-pad", help=_R["pad"].description)] = None,
    lorc_rank: Annotated[Optional[int], typer.Option("--lorc-rank", help=_R["lorc_rank"].description)] = None,
    pow2_scales: Annotated[Optional[str], typer.Option("--pow2-scales", help=_R["pow2_scales"].description)] = None,
    act_format: Annotated[Optional[str], typer.Option("--act-format", help=_R["act_format"].description)] = None,
    smoothquant_alpha: Annotated[Optional[float], typer.Option("--smoothquant-alpha", help=_R["smoothquant_alpha"].description)] = None,
    search_fp: Annotated[bool, typer.Option("--search-fp", help="Same as --method fpsearch: per layer, the best exponent/mantissa "
                                            "split of the minifloat --format's bit width and a clipping ratio (needs calibration).")] = False,
    target_bpw: Annotated[Optional[float], typer.Option("--target-bpw", help=_R["target_bpw"].description)] = None,
    target_mb: Annotated[Optional[float], typer.Option("--target-mb", help=_R["target_mb"].description)] = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration data for gptq, awq, fpsearch and SmoothQuant: SOURCE[:SAMPLESxTOKENS], e.g. pydoc:128x512, data.jsonl:64x256, self:32x256 (data-free).")] = None,
    true_sequential: Annotated[bool, typer.Option("--true-sequential", help=CalibrationConfig.model_fields["true_sequential"].description)] = False,
    bias_correction: Annotated[Optional[bool], typer.Option("--bias-correction/--no-bias-correction", help=_R["bias_correction"].description)] = None,
    block_tune: Annotated[bool, typer.Option("--block-tune", help=_R["block_tune"].description + " Tune it in a YAML recipe (block_tune: {epochs, lr, tune_norms}).")] = False,
    device: Annotated[str, typer.Option("--device", help="Where the work runs: auto (a GPU when there is one), cpu or cuda. "
                                        "The model stays in CPU memory; one decoder block at a time goes to the GPU.")] = "auto",
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Read the model block by block from its "
                      "safetensors files (memory: about one decoder block; the output is sharded, one shard per block) or "
                      "load it whole. Default: stream when the model is a Hugging Face folder, hub id or .gguf file and the "
                      "recipe allows it (no size target, no 'self' calibration, no --trust-remote-code); same result either way.")] = None,
    config: ConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Quantize MODEL's linear layers by a recipe and save the result as a run folder.

    Calibrated methods (gptq, awq, fpsearch) checkpoint every finished decoder block next to the output folder:
    rerunning the same command after a kill resumes at the next unfinished block (a streamed run: every method).
    Runs unchanged on N processes under `torchrun --nproc_per_node N -m weightwise.cli quantize ...` (gloo on CPU,
    nccl on GPUs): each calibrates on its share of the batches and quantizes its share of each block's layers;
    process 0 writes.
    """
    from weightwise.comm import process_group
    from weightwise.evaluate.size import model_size
    from weightwise.heap import mmap_allocations_from
    from weightwise.quantize.api import quantize_to_folder
    from weightwise.records import quantization_record

    if search_fp and method not in (None, "fpsearch"):
        raise WeightwiseError(f"--search-fp is the method fpsearch; drop --method {method} or --search-fp")
    recipe = _build(QuantRecipe, config, _given(format=format, group_size=group_size, granularity=granularity,
                                                scale_dtype=scale_dtype, method=method, targets=targets, ignore=ignore, pad=pad,
                                                lorc_rank=lorc_rank, pow2_scales=pow2_scales, target_bpw=target_bpw, target_mb=target_mb,
                                                act_format=act_format, smoothquant_alpha=smoothquant_alpha, bias_correction=bias_correction,
                                                calibration=CalibrationConfig.parse(calib).model_dump() if calib else None))
    if search_fp and recipe.method.name != "fpsearch":  # keeps a YAML's fpsearch options when it names the method
        recipe = validated(QuantRecipe, {**recipe.model_dump(), "method": "fpsearch"})
    if true_sequential:  # merged into the calibration settings from --calib or the YAML
        dump = recipe.model_dump()
        recipe = validated(QuantRecipe, {**dump, "calibration": {**dump["calibration"], "true_sequential": True}})
    if block_tune and recipe.block_tune is None:  # a YAML's block_tune settings win over the flag's defaults
        recipe = validated(QuantRecipe, {**recipe.model_dump(), "block_tune": {}})
    work_device = _work_device(device)
    if stream or (stream is None and not trust_remote_code):
        # a freed tensor's memory goes back to the OS at once: block by block, tensors of many sizes are freed and
        # allocated, and glibc's heap would keep the fragments (SmolLM2-135M GPTQ: peak 1.13 GB → 0.79 GB, for
        # ~25 % more CPU time in page faults; not worth it for the whole model in memory: 1.45 → 1.35 GB)
        mmap_allocations_from(1 << 20)
    with process_group(work_device) as comm:
        show = _progress if comm.is_main else _no_progress
        with show(f"quantizing {model} ({recipe.method.name}, {recipe.format}) on {work_device}") as update:
            qmodel = quantize_to_folder(model, recipe, output, stream=stream, progress=update, device=work_device, comm=comm,
                                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if not comm.is_main:
        return
    size = model_size(qmodel)
    info = quantization_record(qmodel).summary()
    summary = Table(show_header=False, title=f"{output}")
    summary.add_row("layers quantized", str(info["layers"]))
    summary.add_row("formats", info["formats"])
    summary.add_row("weight SQNR (dB)", "exact" if info["sqnr_db_min"] is None else
                    f"min {info['sqnr_db_min']:.2f} / mean {info['sqnr_db_mean']:.2f}")
    summary.add_row("exact layers", str(info["exact_layers"]))
    summary.add_row("bits/weight (quantized linears)", f"{size['bits_per_weight']:.3f}")
    summary.add_row("model size (MB)", f"{size['total_bytes'] / 1e6:.1f}")
    summary.add_row("quantize time (s)", f"{info['quantize_seconds']:.1f} on {info['device']}")
    if info["act_format"]:
        summary.add_row("activations (simulated)", f"{info['act_format']} per token")
    if info["fp_search_choices"]:
        summary.add_row("fp search choices", ", ".join(f"{label} ×{n}" for label, n in info["fp_search_choices"].items()))
    if info["plan"]:
        plan = info["plan"]
        summary.add_row("plan", f"{plan['bits_per_weight']:.3f} bits/weight (budget {plan['budget_bits']} bits, "
                        f"{'optimal' if plan['optimal'] else 'not proven optimal'})")
    Console().print(summary)


@app.command("eval")
def eval_cmd(
    models: Annotated[list[str], typer.Argument(help="One or more models or run folders to evaluate and compare.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for metrics.json, report.md and pareto.png.")] = ...,
    reference: Annotated[Optional[str], typer.Option(help="Reference model for KL / top-1 agreement (e.g. default).")] = None,
    text: Annotated[Optional[str], typer.Option(help=_E["text"].description)] = None,
    split: Annotated[Optional[str], typer.Option(help=_E["split"].description)] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help=_E["max_tokens"].description)] = None,
    window: Annotated[Optional[int], typer.Option(help=_E["window"].description)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_E["batch_size"].description)] = None,
    speed: Annotated[Optional[bool], typer.Option("--speed/--no-speed", help=_E["measure_speed"].description)] = None,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help=_E["stream"].description)] = None,
    config: ConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Perplexity, KL to a reference, top-1 agreement, size and speed of one or more models; one report."""
    from weightwise.compare import evaluate_sources
    from weightwise.evaluate.report import write_report

    cfg = _build(EvalConfig, config, _given(text=text, split=split, max_tokens=max_tokens, window=window,
                                            batch_size=batch_size, measure_speed=speed, stream=stream))
    if cfg.stream:  # block by block: freed tensors go back to the OS at once (see quantize)
        from weightwise.heap import mmap_allocations_from

        mmap_allocations_from(1 << 20)

    def load(source: str):
        return _load(source, allow_pickle, trust_remote_code)

    def on_row(row: dict) -> None:
        console.print(f"{row['name']}: ppl {row['ppl']:.3f}" + (f", KL {row['kl_mean']:.4f}" if row["kl_mean"] is not None else ""))

    with _progress("evaluating") as update:
        rows = evaluate_sources(models, cfg, load, reference=reference, progress=update, on_row=on_row)
    title = "weightwise eval" + (f" (reference: {reference})" if reference else "")
    write_report(output, rows, title=title, settings={**cfg.model_dump(), "reference": reference})
    _print_rows(rows)
    console.print(f"report: {output / 'report.md'}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the comparative report (and model.gguf).")] = Path("runs/demo"),
    full: Annotated[bool, typer.Option("--full", help="Evaluate on the whole pydoc eval split (slower) instead of --max-tokens.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Tokens scored per model when not --full.")] = 4096,
    formats: Annotated[Optional[list[str]], typer.Option("--format", help="Recipes to compare instead of the default ones: FORMAT[:GROUP[:METHOD]], "
                                                         "e.g. int4:32:gptq (GROUP 0 = per channel; METHOD rtn by default).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML with evaluation settings (the fields of `weightwise eval`); options override it.")] = None,
    no_export: Annotated[bool, typer.Option("--no-export", help="Do not write the best exactly-stored row as GGUF.")] = False,
    gguf: Annotated[Optional[Path], typer.Option("--gguf", help="Where the GGUF file goes, replaced if it exists (default: OUTPUT/model.gguf).")] = None,
) -> None:
    """The main job: the default model by RTN and by GPTQ, each evaluated, one report with a Pareto plot, and the
    best row that llama.cpp stores exactly exported as GGUF."""
    from weightwise.demo import run_demo, short_recipe

    recipes = [short_recipe(item) for item in formats] if formats else None
    cfg = _build(EvalConfig, config, {"max_tokens": None if full else max_tokens})
    result = run_demo(output, recipes=recipes, config=cfg, export=not no_export, gguf_path=gguf,
                      on_event=lambda msg: console.print(msg))
    _print_rows(result.rows, gguf=result.exact_gguf)
    console.print(f"report: {result.report}")
    if result.export is not None:
        choice = result.choice
        console.print(f"GGUF: [bold]{result.export.path}[/] ({result.export.file_bytes / 1e6:.1f} MB): {choice.name}, "
                      f"ppl {choice.ppl:.3f}, every linear layer stored exactly as {'/'.join(choice.gguf_types)}", soft_wrap=True)
        console.print("run it:\n  " + "\n  ".join(result.run_commands), soft_wrap=True, markup=False, highlight=False)
    elif result.note:
        console.print(result.note)


def _print_rows(rows: list[dict], gguf: dict[str, list[str]] | None = None) -> None:
    """The results table; ``gguf`` (row name → exact GGUF types) adds a column."""
    table = Table(title="results")
    for column in ("name", "bits/weight", "MB", "ppl", "KL", "top-1", "tokens/s") + (("GGUF",) if gguf is not None else ()):
        table.add_column(column, justify="left" if column in ("name", "GGUF") else "right")
    for row in rows:
        def fmt(key, spec):
            value = row.get(key)
            return "–" if value is None else format(value, spec)

        cells = [row["name"], fmt("bits_per_weight", ".3f"), f"{row['total_bytes'] / 1e6:.1f}", fmt("ppl", ".3f"),
                 fmt("kl_mean", ".4f"), fmt("top1_agreement", ".3f"), fmt("tokens_per_second", ".0f")]
        if gguf is not None:
            cells.append("/".join(gguf.get(row["name"]) or ["–"]))
        table.add_row(*cells)
    Console(width=max(Console().width, 110)).print(table)


_T = TuneConfig.model_fields
_S = shortcut_description


@app.command("tune")
def tune_cmd(
    model: ModelArg = "default",
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder (patch.safetensors, adapter/ or model/ (qat, qat-lora: a quantized run), metrics, manifest.json, checkpoints while running).")] = ...,
    task: Annotated[Optional[str], typer.Option("--task", help=_T["task"].description)] = None,
    sample_temperature: Annotated[Optional[float], typer.Option("--sample-temperature", help=_T["sample_temperature"].description)] = None,
    method: Annotated[Optional[str], typer.Option("--method", help=_T["method"].description)] = None,
    density: Annotated[Optional[float], typer.Option("--density", help=_S("density"))] = None,
    rank_budget: Annotated[Optional[int], typer.Option("--rank-budget", help=_S("rank_budget"))] = None,
    filter_rank: Annotated[Optional[int], typer.Option("--filter-rank", help=_S("filter_rank"))] = None,
    randomized_svd: Annotated[Optional[bool], typer.Option("--randomized-svd/--exact-svd", help=_S("randomized_svd"))] = None,
    refresh_every: Annotated[Optional[int], typer.Option("--refresh-every", help=_S("refresh_every"))] = None,
    targets: Annotated[Optional[list[str]], typer.Option("--targets", help=_T["targets"].description)] = None,
    reparam: Annotated[Optional[str], typer.Option("--reparam", help=_T["reparam"].description + " Its settings in a YAML config (reparam: {name: compander, expansion, margin, learn}).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=_T["lr"].description)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", help=_T["warmup_steps"].description)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help=_T["max_steps"].description)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help=_T["epochs"].description)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=_T["batch_size"].description)] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help=_T["grad_accum"].description)] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help=_T["max_length"].description)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help=_T["seed"].description)] = None,
    train_examples: Annotated[Optional[int], typer.Option("--train-examples", help=_T["train_examples"].description)] = None,
    test_examples: Annotated[Optional[int], typer.Option("--test-examples", help=_T["test_examples"].description)] = None,
    test_task: Annotated[Optional[str], typer.Option("--test-task", help=_T["test_task"].description)] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help=_S("lora_rank"))] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help=_S("lora_alpha"))] = None,
    lora_dropout: Annotated[Optional[float], typer.Option("--lora-dropout", help=_S("lora_dropout"))] = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help=_S("format"))] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", "-g", help=_S("group_size"))] = None,
    init: Annotated[Optional[str], typer.Option("--init", help=_S("init"))] = None,
    distill_weight: Annotated[Optional[float], typer.Option("--distill-weight", help=_S("distill_weight"))] = None,
    distill_temperature: Annotated[Optional[float], typer.Option("--distill-temperature", help=_S("distill_temperature"))] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help=_T["checkpoint_every"].description)] = None,
    patch_dtype: Annotated[Optional[str], typer.Option("--patch-dtype", help=_T["patch_dtype"].description)] = None,
    retention_max_tokens: Annotated[Optional[int], typer.Option("--retention-max-tokens", help=_T["retention_max_tokens"].description)] = None,
    eval_before: Annotated[Optional[bool], typer.Option("--eval-before/--no-eval-before", help=_T["eval_before"].description)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing run in OUT and start afresh (without it a finished run or another run's checkpoint is refused).")] = False,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when there is one, unless launched with --cpu), cpu or cuda.")] = "auto",
    config: ConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Fine-tune MODEL on a task (LIFT by default) and save a sparse weight patch, a peft adapter or (qat, qat-lora) a quantized run.

    The method options (--density ... --init) set the chosen method's settings; one it does not read is an error.

    Checkpoints every --checkpoint-every steps: rerunning the same command after a kill resumes and ends
    with the same weights. Runs unchanged on N processes under `torchrun --nproc_per_node N -m weightwise.cli tune ...`
    or `accelerate launch --multi_gpu --num_processes N -m weightwise.cli tune ...` (gloo with --device cpu or
    without GPUs); `accelerate launch --cpu` starts several processes only through mpirun.
    """
    import os

    from weightwise.comm import process_group
    from weightwise.io.models import model_source_info
    from weightwise.tune.api import tune

    cfg = _build(TuneConfig, config, _given(
        task=task, sample_temperature=sample_temperature, method=method, density=density, rank_budget=rank_budget, filter_rank=filter_rank,
        randomized_svd=randomized_svd, refresh_every=refresh_every, targets=targets, reparam=reparam, lr=lr,
        warmup_steps=warmup_steps, max_steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
        max_length=max_length, seed=seed,
        train_examples=train_examples, test_examples=test_examples, test_task=test_task, lora_rank=lora_rank,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, format=format, group_size=group_size, init=init,
        distill_weight=distill_weight, distill_temperature=distill_temperature,
        checkpoint_every=checkpoint_every, patch_dtype=patch_dtype,
        retention_max_tokens=retention_max_tokens, eval_before=eval_before))
    main_process = int(os.environ.get("RANK", "0")) == 0
    out = console if main_process else Console(stderr=True, quiet=True)
    if main_process:
        model_obj, tokenizer = _load(model, allow_pickle, trust_remote_code)
    else:
        from weightwise.io.models import load_model

        model_obj, tokenizer = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise WeightwiseError(f"{model} has no tokenizer files; save the tokenizer with the model")
    work_device = _work_device(device)
    model_obj.to(work_device)
    with process_group(work_device) as comm, _tune_progress(out, cfg.method.name) as update:
        metrics = tune(model_obj, tokenizer, cfg, output, progress=update, overwrite=overwrite, source=model_source_info(model),
                       comm=comm)
    if main_process:
        _print_tune_summary(output, metrics)


def _work_device(option: str):
    """The device to train or quantize on: under a launcher, this process's GPU; --cpu launches and machines without one: the CPU."""
    import os

    import torch

    if option not in ("auto", "cpu", "cuda"):
        raise WeightwiseError(f"--device {option}: use auto, cpu or cuda")
    launched_on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if option == "cpu" or (option == "auto" and (launched_on_cpu or not torch.cuda.is_available())):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise WeightwiseError("--device cuda: no GPU is visible; use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def _tune_progress(out: Console, method: str):
    """A progress bar with loss, tokens/s and ETA; one printed line per checkpoint, resume and the last step."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[item]}"), console=out, transient=True,
    ) as bar:
        task = bar.add_task(f"tuning ({method})", total=None, item="")

        last = {}

        def update(phase: str, done: int, total: int, info: dict) -> None:
            event = info.get("event")
            if event == "resumed":
                out.print(f"resumed from step {info['step']}")
            elif event == "checkpoint":
                out.print(f"{last.get('line', f'step {done}/{total}')} · checkpoint {info['path']}")
            elif phase == "train" and "loss" in info:
                last["line"] = f"step {done}/{total} loss {info['loss']:.4f} · {info['tokens_per_second']:.0f} tok/s"
                bar.update(task, description=f"training ({method})", completed=done, total=total,
                           item=last["line"].split(" ", 2)[2])
                if "refresh" in info:
                    out.print(f"step {done}: masks refreshed ({info['refresh']['kept']} kept, {info['refresh']['new']} new)")
                if done == total:
                    out.print(last["line"])
            else:
                bar.update(task, description=phase, completed=done, total=total if phase in ("train", "masks") else None, item="")

        yield update


def _print_tune_summary(output: Path, metrics: dict) -> None:
    def pair(key: str, inner: str, spec: str) -> str:
        values = [((metrics.get(side) or {}).get(key) or {}).get(inner) for side in ("before", "after")]
        return " → ".join("–" if v is None else format(v, spec) for v in values)

    train = metrics["train"]
    summary = Table(show_header=False, title=f"{output}")
    summary.add_row("method", metrics["method"])
    summary.add_row("trained entries", f"{metrics['trained_entries']} ({100 * metrics['trained_fraction']:.2f} % of the targets)")
    summary.add_row("optimizer state (MB)", f"{metrics['optimizer_state_bytes'] / 1e6:.2f}")
    summary.add_row("steps", f"{train['steps']}" + (f" (resumed at {metrics['resumed_from_step']})" if metrics["resumed_from_step"] else ""))
    summary.add_row("loss", "–" if train["loss_first"] is None else f"{train['loss_first']:.4f} → {train['loss_last']:.4f}")
    summary.add_row("tokens/s", "–" if train["tokens_per_second"] is None else f"{train['tokens_per_second']:.0f}")
    summary.add_row("exact match", pair("exact_match", "accuracy", ".3f"))
    summary.add_row("retention ppl", pair("retention", "ppl", ".3f"))
    summary.add_row("files", ", ".join(metrics["files"]))
    Console().print(summary)


_G = GGUFExportConfig.model_fields


@app.command("export")
def export_cmd(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="File (gguf) or folder (compressed-tensors, hf) to write.")] = ...,
    to: Annotated[str, typer.Option("--to", help="gguf (llama.cpp), compressed-tensors (transformers, vLLM) or hf (dense safetensors).")] = "gguf",
    gguf_type: Annotated[Optional[str], typer.Option("--type", help=_G["type"].description)] = None,
    fallback: Annotated[Optional[str], typer.Option("--fallback", help=_G["fallback"].description)] = None,
    embeddings: Annotated[Optional[str], typer.Option("--embeddings", help=_G["embeddings"].description)] = None,
    tokenizer_pre: Annotated[Optional[str], typer.Option("--tokenizer-pre", help=_G["tokenizer_pre"].description)] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16: the weights of an hf export, the unquantized tensors of a compressed-tensors export.")] = "fp32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Read the model one decoder block at a time (memory: one "
                                         "block): a quantized run, a model folder or a .gguf file --to gguf; a quantized "
                                         "run --to compressed-tensors (written as shards).")] = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Write MODEL (a quantized run, a model folder, a .gguf file or 'default') for another runtime.

    GGUF files carry each quantized layer's own codes and scales in its exact GGUF type (see README's mapping
    table), are read back after writing and compared with weightwise's weights tensor by tensor.
    """
    from weightwise.export import TARGETS, export_source

    if to not in TARGETS:
        raise WeightwiseError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise WeightwiseError(f"--dtype {dtype}: choose fp32, fp16 or bf16")
    options = _given(type=gguf_type, fallback=fallback, embeddings=embeddings, tokenizer_pre=tokenizer_pre)
    if options and to != "gguf":
        raise WeightwiseError(f"{', '.join('--' + k.replace('_', '-') for k in options)} apply to --to gguf only")
    gguf_config = validated(GGUFExportConfig, options) if to == "gguf" else None
    if stream:  # block by block: freed tensors go back to the OS at once (see quantize)
        from weightwise.heap import mmap_allocations_from

        mmap_allocations_from(1 << 20)
    with console.status(f"exporting {model} to {to}"):
        report = export_source(model, to, output, gguf=gguf_config, dtype=dtype, overwrite=overwrite,
                               allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, stream=stream)
    if to == "gguf":
        table = Table(title=f"{output}: {report['file_bytes'] / 1e6:.1f} MB, {report['arch']}")
        for column in ("how", "GGUF type", "tensors", "max |diff|"):
            table.add_column(column, justify="left" if column in ("how", "GGUF type") else "right")
        groups: dict[tuple[str, str], list[float]] = {}
        for tensor in report["tensors"]:
            groups.setdefault((tensor["how"], tensor["type"]), []).append(tensor["max_abs_diff"])
        for (how, kind), diffs in sorted(groups.items()):
            table.add_row(how, kind, str(len(diffs)), f"{max(diffs):.3g}")
        Console().print(table)
        console.print(f"run it: llama-cli -m {output} -p 'Hello'   (or llama_cpp.Llama('{output}') in Python)")
    else:
        for warning in report.get("warnings", []):
            console.print(f"[yellow]warning:[/] {warning}")
        console.print(f"wrote [bold]{output}[/]")


@app.command("select")
def select_cmd(
    pool: Annotated[Path, typer.Argument(help="JSONL (or .jsonl.gz) of {prompt, response}, {messages} or {text} records.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for scored.jsonl, selected.jsonl, report.md and manifest.json.")] = ...,
    scorer: Annotated[Optional[list[str]], typer.Option("--scorer", help="NAME[:WEIGHT[:high|low]], repeatable; scores combine by weighted rank "
                                                        "averaging. Names: loss, el2n, ifd, grand, rds, less, dsir, length, prototype.")] = None,
    selector: Annotated[Optional[str], typer.Option("--selector", help="top, bottom, random, stratified, kcenter or facility.")] = None,
    stratify_by: Annotated[Optional[str], typer.Option("--stratify-by", help="Record field whose values share the budget (with --selector stratified).")] = None,
    budget: Annotated[Optional[int], typer.Option("--budget", help="Examples to keep.")] = None,
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="Fraction of the filtered pool to keep.")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="JSONL of target examples (a small dev set) for rds, less and dsir.")] = None,
    dedup: Annotated[Optional[str], typer.Option("--dedup", help="none, exact or near (MinHash; default).")] = None,
    near_threshold: Annotated[Optional[float], typer.Option("--near-threshold", help="Jaccard similarity above which examples are near duplicates (default 0.8).")] = None,
    contamination: Annotated[Optional[list[str]], typer.Option("--contamination", help="JSONL of evaluation examples; pool examples sharing a 13-word span with them are dropped. Repeatable.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Causal LM for the model-based scorers (default: SmolLM2-135M-Instruct).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Tokens per example for model-based scorers.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per scoring batch.")] = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="local (default) or ray (Ray Data actors; pip install 'weightwise[ray]').")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Ray scoring actors, each with one copy of the model.")] = None,
    on_error: Annotated[Optional[str], typer.Option("--on-error", help="skip (default: report bad lines and go on) or fail.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the random and diversity selectors.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    config: ConfigOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Score the examples of POOL, drop duplicates and contaminated ones, and keep a budget of the rest.

    A killed run resumes from its score cache when the same command is run again. The kept examples
    (OUTPUT/selected.jsonl) train with `weightwise tune MODEL --task OUTPUT/selected.jsonl`.
    """
    from weightwise.select import SelectConfig, parse_scorer, select

    selector_cfg = None
    if selector is not None or stratify_by is not None:
        selector_cfg = {"name": selector or "stratified", **({"field": stratify_by} if stratify_by else {})}
    cfg = _build(SelectConfig, config, _given(
        scorers=[parse_scorer(spec).model_dump() for spec in scorer] if scorer else None, selector=selector_cfg,
        budget=budget, fraction=fraction, target=target, dedup=dedup, near_threshold=near_threshold,
        contamination=contamination, model=model, max_length=max_length, batch_size=batch_size, engine=engine,
        workers=workers, on_error=on_error, seed=seed, trust_remote_code=trust_remote_code or None))
    with console.status(f"selecting from {pool}"):
        selection = select(pool, output, cfg, overwrite=overwrite)
    counts = selection.reason_counts()
    console.print(f"kept [bold]{len(selection.kept)}[/] of {len(selection.pool)} valid examples in {selection.seconds:.1f} s"
                  + (f"; dropped: {', '.join(f'{n} {why}' for why, n in counts.items())}" if counts else ""))
    for bad in selection.pool.bad_lines[:10]:
        console.print(f"[yellow]skipped line {bad.line}:[/] {bad.reason}")
    if len(selection.pool.bad_lines) > 10:
        console.print(f"[yellow]… {len(selection.pool.bad_lines) - 10} more invalid lines in {output}/manifest.json[/]")
    console.print(f"wrote [bold]{output}[/]: selected.jsonl (train with `weightwise tune MODEL --task {output}/selected.jsonl`), "
                  "scored.jsonl, report.md, manifest.json")


patch_app = typer.Typer(help="Sparse weight patches: apply to a model, remove, compose, inspect.", no_args_is_help=True)
app.add_typer(patch_app, name="patch")
PatchArg = Annotated[Path, typer.Argument(help="A patch file (.safetensors) written by `weightwise tune` or `patch compose`.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Proceed even though the base model hashes differ.")]


@patch_app.command("apply")
def patch_apply_cmd(
    model: ModelArg,
    patch: PatchArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Model folder to write (safetensors, config, tokenizer, undo record, manifest.json).")] = ...,
    scale: Annotated[float, typer.Option("--scale", help="Multiply the patch's deltas by this factor (0 = base model, 1 = tuned model).")] = 1.0,
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Write MODEL with PATCH added (× --scale) as a full model folder; a model the patch was not made for is refused."""
    from weightwise.tune.patch import WeightPatch

    loaded = WeightPatch.load(patch)
    with console.status(f"applying {patch} to {model}"):
        loaded.merge(model, output, scale=scale, force=force, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    console.print(f"wrote [bold]{output}[/] ({sum(i.numel() for i, _ in loaded.entries.values())} entries × {scale:g})")


@patch_app.command("remove")
def patch_remove_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A folder written by `weightwise patch apply`.")],
    patch: PatchArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Model folder to write with the original weights.")] = ...,
) -> None:
    """Write the model MODEL_DIR was made from, bit-exact (from the undo record `patch apply` stored)."""
    from weightwise.tune.patch import WeightPatch

    with console.status(f"removing {patch} from {model_dir}"):
        WeightPatch.load(patch).unmerge(model_dir, output)
    console.print(f"wrote [bold]{output}[/] (original weights restored and verified)")


@patch_app.command("compose")
def patch_compose_cmd(
    patches: Annotated[list[Path], typer.Argument(help="Two or more patch files.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Patch file to write (.safetensors).")] = ...,
    scales: Annotated[Optional[list[float]], typer.Option("--scale", help="One factor per patch, in order (default 1 each).")] = None,
    value_dtype: Annotated[Optional[str], typer.Option("--value-dtype", help="fp16, bf16, fp32 or int8 (default: the first patch's).")] = None,
    force: ForceOpt = False,
) -> None:
    """Sum several patches into one; entries at the same index are added and reported as overlaps."""
    from weightwise.tune.patch import WeightPatch, compose

    loaded = [WeightPatch.load(p) for p in patches]
    result, report = compose(loaded, scales, force=force)
    result.save(output, value_dtype or loaded[0].source["value_dtype"])
    table = Table(title=f"{output}: {report['entries']} entries")
    for column in ("tensor", "overlaps", "cancelled"):
        table.add_column(column, justify="left" if column == "tensor" else "right")
    for name, n in report["overlaps"].items():
        if n:
            table.add_row(name, str(n), str(report["cancelled"][name]))
    table.add_row("total", str(report["total_overlaps"]), str(report["total_cancelled"]))
    Console().print(table)


@patch_app.command("info")
def patch_info_cmd(patch: PatchArg) -> None:
    """Tensors, entries, density, stored bytes, value dtype and metadata of a patch file."""
    import json

    from weightwise.tune.patch import patch_info

    info = patch_info(patch)
    table = Table(title=f"{patch}: {info['entries']} entries, density {info['density']:.4f}, {info['file_bytes']} bytes, "
                        f"{info['value_dtype']} values")
    for column in ("tensor", "shape", "entries", "density", "bytes"):
        table.add_column(column, justify="left" if column in ("tensor", "shape") else "right")
    for name, t in info["tensors"].items():
        table.add_row(name, "×".join(map(str, t["shape"])), str(t["entries"]), f"{t['density']:.4f}", str(t["bytes"]))
    out = Console(width=max(Console().width, 120))
    out.print(table)
    out.print_json(json.dumps({"sha256": info["sha256"], "fingerprint": info["fingerprint"], "metadata": info["metadata"]}))


def main() -> None:
    """Console entry point: configures logging and turns user errors into one line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except WeightwiseError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except ValidationError as err:
        typer.echo(f"error: {validation_message(err)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; no output was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
