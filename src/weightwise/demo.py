"""`weightwise demo` as an API: a model quantized by round-to-nearest and by GPTQ, evaluated in one harness,
reported with a Pareto plot, and the best row that llama.cpp stores exactly written as a GGUF file.

The demo shows what calibration buys at the same storage (RTN vs GPTQ at 4 and 3 bits in 32-entry groups, the
block size of GGUF's Q4_0; GPTQ on IQ4_NL's non-uniform grid) and ends with a file another runtime runs, exported
from the very model that was measured (no second quantization).
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from torch import nn

from weightwise.compare import compare_recipes, describe
from weightwise.errors import WeightwiseError
from weightwise.evaluate.config import EvalConfig
from weightwise.evaluate.report import write_report
from weightwise.export import gguf_tokenizer_source
from weightwise.export.gguf import GGUFExportConfig, GGUFExportReport, export_gguf
from weightwise.export.gguf_types import exact_gguf_type
from weightwise.io.defaults import DEFAULT_MODEL_NAME
from weightwise.io.models import load_model
from weightwise.qlinear import QuantizedLinear
from weightwise.quantize.recipe import QuantRecipe, validated

logger = logging.getLogger(__name__)

DEMO_FORMATS: tuple[str, ...] = ("int8:0", "int4:32", "int4:32:gptq", "int3:32", "int3:32:gptq", "iq4_nl:32:gptq")
DEMO_CALIBRATION: dict[str, int] = {"samples": 32, "seq_len": 256}  # small: the whole demo fits a few CPU minutes
GGUF_MAX_BITS = 4.5  # bits/weight of a row worth exporting (Q4_0 / IQ4_NL: 4 bits + an fp16 scale per 32)
GGUF_NAME = "model.gguf"
SOURCE_NAME = "source fp32"
PROMPT = "def fibonacci(n):"


class GGUFChoice(BaseModel):
    """The row exported to GGUF: the lowest perplexity among rows at ≤ GGUF_MAX_BITS that map exactly."""

    name: str
    ppl: float
    bits_per_weight: float
    gguf_types: list[str] = Field(description="GGUF block types of its linear layers.")


class DemoResult(BaseModel):
    """What the demo measured and wrote."""

    rows: list[dict[str, Any]] = Field(description="The source's row, then one per recipe (see compare_recipes).")
    report: Path = Field(description="report.md (metrics.json and pareto.png beside it).")
    exact_gguf: dict[str, list[str]] = Field(description="Per quantized row, its layers' exact GGUF types; [] when one has none.")
    choice: GGUFChoice | None = Field(None, description="The exported row; None when no row qualifies or export is off.")
    export: GGUFExportReport | None = None
    run_commands: list[str] = Field(default_factory=list, description="Shell commands that run the exported file.")
    note: str | None = Field(None, description="Why nothing was exported, when nothing was.")


def short_recipe(item: str, calibration: dict[str, Any] | None = None) -> QuantRecipe:
    """FORMAT[:GROUP[:METHOD]] → a recipe: 'int4:32' (groups of 32, round-to-nearest), 'int8:0' (per channel),
    'int4:32:gptq' (GPTQ on ``calibration``, default DEMO_CALIBRATION), 'mxfp4' (the format's own grouping)."""
    parts = item.split(":")
    if len(parts) > 3:
        raise WeightwiseError(f"--format {item}: expected FORMAT[:GROUP[:METHOD]], e.g. int4:32:gptq")
    name, group, method = parts + [""] * (3 - len(parts))
    fields: dict[str, Any] = {"format": name, "method": method or "rtn"}
    if group and not group.isdigit():
        raise WeightwiseError(f"--format {item}: the group after ':' must be an integer (0 = per channel)")
    if group:
        fields.update({"granularity": "channel"} if int(group) == 0 else {"group_size": int(group)})
    recipe = validated(QuantRecipe, fields, source=f"--format {item}")
    if recipe.needs_calibration:
        recipe = validated(QuantRecipe, {**fields, "calibration": calibration or DEMO_CALIBRATION}, source=f"--format {item}")
    return recipe


def exact_gguf_types(model: nn.Module) -> list[str]:
    """The GGUF block types that store every quantized layer of ``model`` as it is; [] when a layer has none
    (LoRC factors, simulated activations, a format or grouping without an exact type)."""
    types = set()
    for layer in model.modules():
        if not isinstance(layer, QuantizedLinear):
            continue
        rule = exact_gguf_type(layer.spec, (layer.out_features, layer.in_features))
        if rule is None or layer.lowrank is not None or layer.act_format is not None:
            return []
        types.add(rule.gguf_type.name)
    return sorted(types)


def run_commands(path: Path, prompt: str = PROMPT) -> list[str]:
    """How to run a GGUF file: llama.cpp's CLI and a llama-cpp-python one-liner (POSIX shell quoting)."""
    python = (f"from llama_cpp import Llama; llm = Llama({str(path)!r}, verbose=False); "
              f"print(llm({prompt!r}, max_tokens=64)['choices'][0]['text'])")
    return [f"llama-cli -m {shlex.quote(str(path))} -p {shlex.quote(prompt)} -n 64", f"python -c {_double_quoted(python)}"]


def _double_quoted(text: str) -> str:
    """``text`` in shell double quotes (readable around Python's single-quoted strings)."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def run_demo(
    output: str | Path,
    *,
    source: str = "default",
    recipes: list[QuantRecipe] | None = None,
    config: EvalConfig | None = None,
    export: bool = True,
    gguf_path: str | Path | None = None,
    on_event: Callable[[str], None] | None = None,
) -> DemoResult:
    """Quantize ``source`` with each recipe (default: DEMO_FORMATS), evaluate every row against the float source,
    write the report into ``output`` and, with ``export``, the best exactly-stored row as GGUF (``gguf_path``,
    default output/model.gguf; embeddings q8_0; the tokenizer copied from the source's GGUF file when it has one).

    Only the best export candidate so far is kept in memory while the recipes run.
    """
    say = on_event or (lambda message: None)
    output = Path(output)
    recipes = recipes if recipes is not None else [short_recipe(item) for item in DEMO_FORMATS]
    config = config or EvalConfig(max_tokens=4096)
    started = time.perf_counter()
    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise WeightwiseError(f"{source} has no tokenizer files; save the tokenizer with the model")
    say(f"loaded {source} in {time.perf_counter() - started:.1f} s")

    exact: dict[str, list[str]] = {}
    best: tuple[dict, nn.Module] | None = None  # the export candidate so far: its row and model

    def keep_best(row: dict, qmodel: nn.Module) -> None:
        nonlocal best
        exact[row["name"]] = exact_gguf_types(qmodel)
        if (export and exact[row["name"]] and row["bits_per_weight"] <= GGUF_MAX_BITS
                and (best is None or row["ppl"] < best[0]["ppl"])):
            best = (row, qmodel)

    rows = compare_recipes(model, tokenizer, recipes, config, source_name=SOURCE_NAME, on_event=say, on_model=keep_best)
    del model
    name = DEFAULT_MODEL_NAME if source == "default" else str(source)
    methods = " vs ".join(dict.fromkeys(recipe.method.name.upper() for recipe in recipes))
    write_report(output, rows, title=f"weightwise demo: {name}, {methods}", reference_name=SOURCE_NAME,
                 settings=config.model_dump())
    result = DemoResult(rows=rows, report=output / "report.md", exact_gguf=exact)
    if not export:
        return result
    if best is None:
        result.note = (f"no row is stored exactly by a GGUF type at ≤ {GGUF_MAX_BITS} bits/weight "
                       f"({', '.join(describe(r) for r in recipes)}); nothing exported")
        logger.info(result.note)
        return result
    row, qmodel = best
    path = Path(gguf_path) if gguf_path is not None else output / GGUF_NAME
    say(f"exporting {row['name']} to {path}")
    result.choice = GGUFChoice(name=row["name"], ppl=row["ppl"], bits_per_weight=row["bits_per_weight"],
                               gguf_types=exact[row["name"]])
    result.export = export_gguf(qmodel, tokenizer, path, GGUFExportConfig(embeddings="q8_0"),
                                tokenizer_gguf=gguf_tokenizer_source(source), overwrite=True)
    result.run_commands = run_commands(path)
    return result
