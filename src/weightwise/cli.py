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
from weightwise.quantize.calibration import CalibrationConfig
from weightwise.quantize.recipe import QuantRecipe, recipe_from_yaml, validated, validation_message

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

ModelArg = Annotated[str, typer.Argument(help="A local HF folder, a .gguf file, a hub id in the local HF cache, a weightwise run folder, or 'default'.")]
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


def _load(source: str, allow_pickle: bool = False, trust_remote_code: bool = False):
    from weightwise.io.models import load_model

    started = time.perf_counter()
    with console.status(f"loading {source}"):
        model, tokenizer = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
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
    target_bpw: Annotated[Optional[float], typer.Option("--target-bpw", help=_R["target_bpw"].description)] = None,
    target_mb: Annotated[Optional[float], typer.Option("--target-mb", help=_R["target_mb"].description)] = None,
    calib: Annotated[Optional[str], typer.Option("--calib", help="Calibration data for gptq: SOURCE[:SAMPLESxTOKENS], e.g. pydoc:128x512, data.jsonl:64x256, self:32x256 (data-free).")] = None,
    config: ConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Quantize MODEL's linear layers by a recipe and save the result as a run folder.

    Calibrated methods (gptq) checkpoint every finished decoder block next to the output folder:
    rerunning the same command after a kill resumes at the next unfinished block.
    """
    from weightwise.io.models import model_source_info
    from weightwise.quantize.api import quantize
    from weightwise.quantize.serialize import save

    recipe = _build(QuantRecipe, config, _given(format=format, group_size=group_size, granularity=granularity,
                                                scale_dtype=scale_dtype, method=method, targets=targets, ignore=ignore, pad=pad,
                                                lorc_rank=lorc_rank, pow2_scales=pow2_scales, target_bpw=target_bpw, target_mb=target_mb,
                                                calibration=CalibrationConfig.parse(calib).model_dump() if calib else None))
    model_obj, tokenizer = _load(model, allow_pickle, trust_remote_code)
    checkpoint = output.parent / f".{output.name}.partial"
    with _progress(f"quantizing ({recipe.method.name}, {recipe.format})") as update:
        qmodel = quantize(model_obj, recipe, tokenizer=tokenizer, checkpoint_dir=checkpoint, progress=update)
    from weightwise.evaluate.size import model_size

    size = model_size(qmodel)
    save(qmodel, output, tokenizer=tokenizer, source=model_source_info(model), metrics={"size": size})
    record = qmodel.weightwise_quantization
    sqnrs = [layer["sqnr_db"] for layer in record["layers"].values()]
    finite = [s for s in sqnrs if s is not None]
    summary = Table(show_header=False, title=f"{output}")
    summary.add_row("layers quantized", str(len(sqnrs)))
    summary.add_row("weight SQNR (dB)", f"min {min(finite):.2f} / mean {sum(finite) / len(finite):.2f}" if finite else "exact")
    summary.add_row("exact layers", str(len(sqnrs) - len(finite)))
    summary.add_row("bits/weight (quantized linears)", f"{size['bits_per_weight']:.3f}")
    summary.add_row("model size (MB)", f"{size['total_bytes'] / 1e6:.1f}")
    summary.add_row("quantize time (s)", f"{record['timings']['quantize_seconds']:.1f}")
    if "plan" in record:
        plan = record["plan"]
        counts: dict[str, int] = {}
        for choice in plan["choices"].values():
            counts[choice["choice"]] = counts.get(choice["choice"], 0) + 1
        summary.add_row("plan", f"{plan['bits_per_weight']:.3f} bits/weight (budget {plan['budget_bits']} bits, "
                        f"{'optimal' if plan['optimal'] else 'not proven optimal'})")
        summary.add_row("plan choices", ", ".join(f"{label} ×{n}" for label, n in sorted(counts.items())))
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
    config: ConfigOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
) -> None:
    """Perplexity, KL to a reference, top-1 agreement, size and speed of one or more models; one report."""
    from weightwise.evaluate import evaluate, reference_outputs, token_windows
    from weightwise.evaluate.report import write_report
    from weightwise.quantize.api import quantization_record

    cfg = _build(EvalConfig, config, _given(text=text, split=split, max_tokens=max_tokens, window=window,
                                            batch_size=batch_size, measure_speed=speed))
    corpus_text = cfg.load_text()
    ref_outputs = None
    if reference is not None:
        ref_model, ref_tok = _load(reference, allow_pickle, trust_remote_code)
        windows = token_windows(ref_tok, corpus_text, window=cfg.window, max_tokens=cfg.max_tokens)
        with _progress(f"reference {reference}") as update:
            ref_outputs = reference_outputs(ref_model, windows, batch_size=cfg.batch_size, measure_speed=cfg.measure_speed, progress=update)
        del ref_model
    rows = []
    for source in models:
        model_obj, tokenizer = _load(source, allow_pickle, trust_remote_code)
        if tokenizer is None:
            raise WeightwiseError(f"{source} has no tokenizer files; save the tokenizer with the model")
        with _progress(f"evaluating {source}") as update:
            result = evaluate(model_obj, tokenizer, text=corpus_text, reference=ref_outputs, max_tokens=cfg.max_tokens,
                              window=cfg.window, batch_size=cfg.batch_size, measure_speed=cfg.measure_speed, progress=update)
        row = {"name": source, **result.model_dump()}
        record = quantization_record(model_obj)
        if record:
            row.update(format=record["recipe"]["format"], recipe=record["recipe"], quantize_seconds=record["timings"]["quantize_seconds"])
        rows.append(row)
        console.print(f"{source}: ppl {row['ppl']:.3f}" + (f", KL {row['kl_mean']:.4f}" if row["kl_mean"] is not None else ""))
        del model_obj
    title = "weightwise eval" + (f" (reference: {reference})" if reference else "")
    write_report(output, rows, title=title, settings={**cfg.model_dump(), "reference": reference})
    _print_rows(rows)
    console.print(f"report: {output / 'report.md'}")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the comparative report.")] = Path("runs/demo"),
    full: Annotated[bool, typer.Option("--full", help="Evaluate on the whole pydoc eval split (slower) instead of --max-tokens.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Tokens scored per model when not --full.")] = 4096,
    formats: Annotated[Optional[list[str]], typer.Option("--format", help="Formats to compare (FORMAT or FORMAT:GROUP, GROUP 0 = per channel); default: six.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML with evaluation settings (the fields of `weightwise eval`); options override it.")] = None,
) -> None:
    """The main job: quantize the default model in several formats, evaluate each, one report with a Pareto plot."""
    from weightwise.compare import compare_recipes
    from weightwise.evaluate.report import write_report

    recipes = [_recipe_from_short(item) for item in (formats or DEMO_FORMATS)]
    cfg = _build(EvalConfig, config, {"max_tokens": None if full else max_tokens})
    model_obj, tokenizer = _load("default")
    rows = compare_recipes(model_obj, tokenizer, recipes, cfg, on_event=lambda msg: console.print(msg))
    write_report(output, rows, title="weightwise demo: SmolLM2-135M-Instruct, RTN in six formats", reference_name="source fp32", settings=cfg.model_dump())
    _print_rows(rows)
    console.print(f"report: {output / 'report.md'}")


DEMO_FORMATS = ["int8:0", "int4:64", "fp4_e2m1:32", "nf4:64", "int3_asym:32", "mxfp4"]


def _recipe_from_short(item: str) -> QuantRecipe:
    """'int4:64' → group of 64, 'int8:0' → per channel, 'mxfp4' → the format's default grouping."""
    name, _, group = item.partition(":")
    if not group:
        return validated(QuantRecipe, {"format": name})
    if not group.isdigit():
        raise WeightwiseError(f"--format {item}: the group after ':' must be an integer (0 = per channel)")
    fields = {"format": name, "granularity": "channel"} if int(group) == 0 else {"format": name, "group_size": int(group)}
    return validated(QuantRecipe, fields)


def _print_rows(rows: list[dict]) -> None:
    table = Table(title="results")
    for column in ("name", "bits/weight", "MB", "ppl", "KL", "top-1", "tokens/s"):
        table.add_column(column, justify="left" if column == "name" else "right")
    for row in rows:
        def fmt(key, spec):
            value = row.get(key)
            return "–" if value is None else format(value, spec)

        table.add_row(row["name"], fmt("bits_per_weight", ".3f"), f"{row['total_bytes'] / 1e6:.1f}", fmt("ppl", ".3f"),
                      fmt("kl_mean", ".4f"), fmt("top1_agreement", ".3f"), fmt("tokens_per_second", ".0f"))
    Console().print(table)


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
