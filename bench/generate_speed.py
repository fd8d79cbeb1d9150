"""Benchmark: greedy generation speed of the default SmolLM2 in fp32 and quantized (RTN int4 g64), on 2 CPU threads.

A QuantizedLinear dequantizes its weight on every forward call, so decoding token by token pays one
dequantization of the whole model per token; ``dequantized_once`` (what weightwise's own exact-match
evaluation uses around generation) dequantizes once per generate call instead. Prints a Markdown table of
tokens/s (median and best of interleaved runs, the dequantization inside the timed call) with the ratio
to fp32 in the same run, and writes the same rows as JSON. The best run is the steadier figure on a
machine shared with other jobs.

    .venv/bin/python bench/generate_speed.py            # 64 new tokens, median of 3 runs
    .venv/bin/python bench/generate_speed.py --quick    # 16 new tokens, 1 run
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from weightwise.io.artifacts import environment_versions, write_json_atomic
from weightwise.io.models import load_model
from weightwise.qlinear import dequantized_once
from weightwise.quantize import quantize

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
RECIPE = {"format": "int4", "group_size": 64}
THREADS = 2


def generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int, fast: bool) -> tuple[float, list[int]]:
    """(seconds, new token ids) of one greedy generate call of exactly ``new_tokens`` tokens."""
    start = time.perf_counter()
    with dequantized_once(model) if fast else contextlib.nullcontext():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return time.perf_counter() - start, output[0, input_ids.shape[1]:].tolist()


def measure(configs: list[tuple[str, nn.Module, bool]], input_ids: torch.Tensor, new_tokens: int, runs: int) -> list[dict]:
    """Median tokens/s of each (name, model, fast) after one short warm-up call; the runs are interleaved
    (one of each configuration per round) so that a change in the machine's load hits all of them alike."""
    for _, model, fast in configs:
        generate(model, input_ids, 2, fast)
    timings: list[list[tuple[float, list[int]]]] = [[] for _ in configs]
    for _ in range(runs):
        for timed, (_, model, fast) in zip(timings, configs):
            timed.append(generate(model, input_ids, new_tokens, fast))
    rows = []
    for (name, _, _), timed in zip(configs, timings):
        seconds = statistics.median(t for t, _ in timed)
        rows.append({"name": name, "tokens_per_second": new_tokens / seconds, "seconds": seconds,
                     "best_tokens_per_second": new_tokens / min(t for t, _ in timed),
                     "runs_seconds": [t for t, _ in timed], "tokens": timed[0][1]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | tokens/s (median) | vs fp32 | best run tokens/s | best vs fp32's best | same tokens as "
             "without fast path |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        same = "–" if r["same_tokens"] is None else "yes" if r["same_tokens"] else "no"
        lines.append(f"| {r['name']} | {r['tokens_per_second']:.2f} | {r['ratio_to_fp32']:.2f}× | "
                     f"{r['best_tokens_per_second']:.2f} | {r['best_ratio_to_fp32']:.2f}× | {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 1 run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/generate-speed.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    new_tokens, runs = (16, 1) if args.quick else (64, 3)
    model, tokenizer = load_model("default")
    qmodel = quantize(model, RECIPE)
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    configs = [("fp32", model, False), ("int4 g64, dequantize per forward", qmodel, False),
               ("int4 g64, dequantized_once", qmodel, True)]
    load_before = os.getloadavg()[0]
    rows = measure(configs, input_ids, new_tokens, runs)
    load_after = os.getloadavg()[0]
    rows[0]["same_tokens"] = rows[1]["same_tokens"] = None
    rows[2]["same_tokens"] = rows[2]["tokens"] == rows[1]["tokens"]
    for r in rows:
        r["ratio_to_fp32"] = r["tokens_per_second"] / rows[0]["tokens_per_second"]
        r["best_ratio_to_fp32"] = r["best_tokens_per_second"] / rows[0]["best_tokens_per_second"]
    print(f"SmolLM2-135M-Instruct, RTN {RECIPE}, greedy, {input_ids.shape[1]}-token prompt, {new_tokens} new tokens, "
          f"median of {runs}, {THREADS} threads, {os.cpu_count()} CPUs, load average {load_before:.1f} → {load_after:.1f}"
          f"\n\n{markdown(rows)}")
    settings = {"recipe": RECIPE, "prompt": PROMPT, "new_tokens": new_tokens, "runs": runs, "threads": THREADS,
                "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after}
    write_json_atomic(args.out, {"settings": settings, "quick": args.quick, "versions": environment_versions(),
                                 "rows": rows})


if __name__ == "__main__":
    main()
