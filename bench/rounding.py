"""Benchmark: the cost of rounding to the nearest code, by arithmetic against a search of the grid, on real weights.

QAT rounds every latent weight three times a step (the forward's codes, the backward's recomputation, oscillation
tracking), so on the default SmolLM2 (210 linear weights, 106.2 M entries) the rounding rule is part of each step's
time. Formats whose codes are consecutive integers (``NumberFormat.grid_code_offset``: int*, int*_asym and ternary,
whose fourth code is unused) round by arithmetic; the others search the sorted grid (``torch.bucketize``). For each
format this times one pass of ``nearest_codes`` over the weights (each row scaled to its absmax on the grid), and
for the arithmetic formats also the grid search on the same input and how many codes the two disagree on.

    .venv/bin/python bench/rounding.py                   # ~2 min on 2 cores
    .venv/bin/python bench/rounding.py --formats ternary int2_asym --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from weightwise.formats import FORMAT_NAMES, get_format
from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic
from weightwise.io.models import load_model
from weightwise.tune.api import target_modules
from weightwise.tune.config import TuneConfig


def grid_search(fmt, y: torch.Tensor) -> torch.Tensor:
    """Grid value nearest to each entry of ``y`` by a search of the sorted grid (an exact tie goes to the lower)."""
    grid = fmt.grid.to(torch.float32)
    return grid[torch.bucketize(y, (grid[1:] + grid[:-1]) / 2, right=False)]


def timed(fn, inputs: list[torch.Tensor], repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Median seconds of one pass of ``fn`` over ``inputs``, and the last pass's outputs."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [fn(y) for y in inputs]
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), outputs


def measure(name: str, weights: list[torch.Tensor], repeats: int) -> dict:
    fmt = get_format(name)
    inputs = [w / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) * fmt.max_abs for w in weights]
    seconds, codes = timed(fmt.nearest_codes, inputs, repeats)
    row = {"format": name, "rule": "arithmetic" if fmt.grid_code_offset is not None else "grid search",
           "entries": sum(y.numel() for y in inputs), "seconds": seconds}
    if fmt.grid_code_offset is not None:
        search_seconds, nearest = timed(lambda y: grid_search(fmt, y), inputs, repeats)
        row["grid_search_seconds"] = search_seconds
        row["codes_differing"] = sum(int((fmt.code_values(c) != v).sum()) for c, v in zip(codes, nearest))
    return row


def markdown(results: dict) -> str:
    lines = ["| format | rule | s per pass | grid search s | speed-up | codes differing |", "|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        search = r.get("grid_search_seconds")
        search_cells = ("–", "–") if search is None else (f"{search:.3f}", f"{search / r['seconds']:.1f} ×")
        lines.append(f"| {r['format']} | {r['rule']} | {r['seconds']:.3f} | {search_cells[0]} | {search_cells[1]} | "
                     f"{r.get('codes_differing', '–')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["ternary", "int2_asym", "int3", "int4", "nf4", "fp4_e2m1"],
                        choices=sorted(FORMAT_NAMES), metavar="FORMAT")
    parser.add_argument("--repeats", type=int, default=3, help="passes per timing (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results/rounding.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model("default")
    weights = [m.weight.detach() for m in target_modules(model, TuneConfig()).values()]  # the linears QAT trains
    rows = [measure(name, weights, args.repeats) for name in args.formats]
    results = {"model": "default", "linear_weights": len(weights), "threads": args.threads, "repeats": args.repeats,
               "versions": environment_versions(), "rows": rows}
    write_json_atomic(args.out, results)
    write_text_atomic(args.out.with_suffix(".md"), markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main(sys.argv[1:])
