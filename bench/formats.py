"""Benchmark: every named format (RTN, sensible group size) on the default SmolLM2, pydoc eval split.

Prints a Markdown table (bits/weight, model MB, perplexity, KL, top-1 agreement, quantize time,
forward speed relative to fp32 in the same run) and writes the same rows as JSON.

    .venv/bin/python bench/formats.py                 # full eval split, all formats
    .venv/bin/python bench/formats.py --quick         # 2 windows, 5 formats (CI-sized)
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from weightwise.compare import compare_recipes
from weightwise.evaluate.config import EvalConfig
from weightwise.io.artifacts import environment_versions, write_json_atomic
from weightwise.io.models import load_model
from weightwise.quantize.recipe import QuantRecipe

# (format, group size; 0 = per output channel, None = the format's fixed block)
FULL = [
    ("int8", 0), ("int6", 64), ("int5", 64), ("int4", 64), ("int4_asym", 64), ("int3", 64), ("int3_asym", 64),
    ("int3_asym", 32), ("int2_asym", 32), ("fp8_e4m3", 0), ("fp8_e5m2", 0), ("fp6_e3m2", 64), ("fp6_e2m3", 64),
    ("fp4_e2m1", 32), ("nf4", 64), ("mxfp8_e4m3", None), ("mxfp6_e3m2", None), ("mxfp6_e2m3", None),
    ("mxfp4", None), ("mxint8", None), ("ternary", 0),
]
QUICK = [("int8", 0), ("int4", 64), ("nf4", 64), ("mxfp4", None), ("int3_asym", 32)]


def recipe(fmt: str, group: int | None) -> QuantRecipe:
    if group == 0:
        return QuantRecipe(format=fmt, granularity="channel")
    return QuantRecipe(format=fmt, group_size=group)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| recipe | bits/weight | model MB | ppl | Δppl | KL | top-1 | quantize s | speed vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    source_ppl = rows[0]["ppl"]
    for r in rows:
        bpw = "32 (fp32)" if r["quantized_layers"] == 0 else f"{r['bits_per_weight']:.3f}"
        q = f"{r['quantize_seconds']:.1f}" if "quantize_seconds" in r else "–"
        speed = f"{r['speed_ratio']:.2f}×" if r.get("speed_ratio") else "1.00×" if "quantize_seconds" not in r else "–"
        lines.append(
            f"| {r['name']} | {bpw} | {r['total_bytes'] / 1e6:.1f} | {r['ppl']:.3f} | {r['ppl'] - source_ppl:+.3f} | "
            f"{r['kl_mean']:.4f} | {r['top1_agreement']:.3f} | {q} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 windows and 5 formats")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens scored per model (default: whole eval split)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/formats.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    max_tokens = 1024 if args.quick else args.max_tokens
    config = EvalConfig(max_tokens=max_tokens)
    started = time.perf_counter()
    model, tokenizer = load_model("default")
    rows = compare_recipes(model, tokenizer, [recipe(f, g) for f, g in (QUICK if args.quick else FULL)], config,
                           on_event=lambda msg: print(msg, file=sys.stderr, flush=True))
    table = markdown(rows)
    tokens = rows[0]["n_tokens_scored"]
    header = (f"SmolLM2-135M-Instruct (Q4_1 source, dequantized to fp32), RTN, pydoc eval split: {rows[0]['n_windows']} windows × "
              f"{config.window} = {tokens} scored tokens, Python {rows[0]['python_version']}; total {time.perf_counter() - started:.0f} s")
    print(header + "\n\n" + table)
    write_json_atomic(args.out, {"settings": config.model_dump(), "quick": args.quick, "versions": environment_versions(), "rows": rows})


if __name__ == "__main__":
    main()
