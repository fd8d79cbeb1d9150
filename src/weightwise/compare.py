"""Evaluate several models in one harness: one model quantized with several recipes (`weightwise demo`,
`bench/formats.py`), or several saved models and runs against one reference (`weightwise eval`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from weightwise.evaluate import StreamedModel, evaluate, reference_outputs, reference_result, token_windows
from weightwise.evaluate.config import EvalConfig
from weightwise.errors import WeightwiseError
from weightwise.quantize.api import quantize
from weightwise.quantize.recipe import QuantRecipe
from weightwise.records import QuantizationRecord, quantization_record

logger = logging.getLogger(__name__)

Event = Callable[[str], None]


def describe(recipe: QuantRecipe) -> str:
    """Short label: format, granularity and method, e.g. 'int4 g64 rtn'."""
    spec = recipe.base_spec()
    where = f"g{spec.resolved_group_size}" if spec.granularity == "group" else f"per-{spec.granularity}"
    return f"{recipe.format} {where} {recipe.method.name}"


def compare_recipes(
    model: nn.Module,
    tokenizer,
    recipes: list[QuantRecipe],
    config: EvalConfig,
    *,
    source_name: str = "source fp32",
    labels: list[str] | None = None,
    on_event: Event | None = None,
    on_row: Callable[[dict], None] | None = None,
    on_model: Callable[[dict, nn.Module], None] | None = None,
    device: torch.device | str | None = None,
) -> list[dict]:
    """Rows (name, recipe, EvalResult fields, quantize time) for the source model and each recipe.

    The source's outputs are computed once and every quantized model is compared with them.
    ``labels`` name the recipes' rows (default: :func:`describe`); ``on_row`` sees each row as soon as
    it is measured (e.g. to save partial results of a long benchmark); ``on_model(row, qmodel)`` sees each
    quantized model with its row before it is dropped, so a caller may keep one (e.g. to export the best) without
    quantizing it twice. ``device`` is where quantization runs (see :func:`weightwise.quantize.quantize`); the
    evaluation runs where the model is.
    """
    say = on_event or (lambda message: None)
    text = config.load_text()
    windows = token_windows(tokenizer, text, window=config.window, max_tokens=config.max_tokens)
    say(f"reference: {len(windows)} windows × {config.window} tokens")
    started = time.perf_counter()
    reference = reference_outputs(model, windows, batch_size=config.batch_size, measure_speed=config.measure_speed)
    source = reference_result(model, reference, seconds=time.perf_counter() - started).model_dump()
    eval_kwargs = dict(
        text=text,
        reference=reference,
        max_tokens=config.max_tokens,
        window=config.window,
        batch_size=config.batch_size,
        measure_speed=config.measure_speed,
    )
    rows = [{"name": source_name, "format": "fp32", **source}]
    say(f"{source_name}: ppl {source['ppl']:.3f}")
    if on_row:
        on_row(rows[0])
    for index, recipe in enumerate(recipes):
        label = labels[index] if labels else describe(recipe)
        started = time.perf_counter()
        qmodel = quantize(model, recipe, tokenizer=tokenizer, device=device)
        quantize_seconds = time.perf_counter() - started
        result = evaluate(qmodel, tokenizer, **eval_kwargs).model_dump()
        rows.append({"name": label, **run_fields(quantization_record(qmodel)), "quantize_seconds": quantize_seconds, **result})
        say(f"{label}: {result['bits_per_weight']:.3f} bits/weight, ppl {result['ppl']:.3f}, KL {result['kl_mean']:.4f}")
        if on_row:
            on_row(rows[-1])
        if on_model:
            on_model(rows[-1], qmodel)
        del qmodel
        gc.collect()
    return rows


def run_fields(record: QuantizationRecord) -> dict:
    """What a result row says of a quantized run: its real formats (mixed when the planner mixed them), recipe,
    quantize time and device."""
    return {"format": record.format_label, "recipe": record.recipe, "quantize_seconds": record.quantize_seconds,
            "quantize_device": record.device}


def _open_streamed(source: str) -> tuple[StreamedModel, object]:
    streamed = StreamedModel.open(source)
    return streamed, streamed.skeleton.tokenizer


def evaluate_sources(
    sources: list[str],
    config: EvalConfig,
    load: Callable[[str], tuple[nn.Module, object]],
    *,
    reference: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per source (a model or run folder, loaded by ``load``): perplexity, size, speed and, with a
    ``reference`` source, KL and top-1 agreement to it on the same windows. Models are loaded one at a time; with
    ``config.stream`` each is read block by block instead (:class:`~weightwise.evaluate.StreamedModel`)."""
    if config.stream:
        load = _open_streamed
    text = config.load_text()
    ref_outputs = None
    if reference is not None:
        ref_model, ref_tokenizer = load(reference)
        windows = token_windows(ref_tokenizer, text, window=config.window, max_tokens=config.max_tokens)
        ref_outputs = reference_outputs(ref_model, windows, batch_size=config.batch_size,
                                        measure_speed=config.measure_speed, progress=progress)
        del ref_model
    rows = []
    for source in sources:
        model, tokenizer = load(source)
        if tokenizer is None:
            raise WeightwiseError(f"{source} has no tokenizer files; save the tokenizer with the model")
        result = evaluate(model, tokenizer, text=text, reference=ref_outputs, max_tokens=config.max_tokens,
                          window=config.window, batch_size=config.batch_size, measure_speed=config.measure_speed,
                          progress=progress)
        record = quantization_record(model.model if isinstance(model, StreamedModel) else model)
        rows.append({"name": source, **result.model_dump(), **(run_fields(record) if record else {})})
        if on_row:
            on_row(rows[-1])
        del model
        gc.collect()
    return rows
