"""Benchmark: peak memory and time of GPTQ on one wide layer (Llama-2-7B's down_proj: 4096 × 11008), before and after.

GPTQ factors the layer's 11008 × 11008 input Hessian in float64 (0.97 GB a copy), so the number of copies it holds at
once decides whether a 7B model's GPTQ fits a few GB. Each row runs, in its own process, ``gptq`` of the code at a
git revision (``src`` exported with ``git archive``) on the same layer: weights normal(0, 0.02) and a Hessian
XᵀX / n from ``--tokens`` random inputs with a few outlier channels, both seeded; int4 g128, act order. It reports
the process's peak RSS (``resource.getrusage``) above its RSS just before the call, the wall time, and whether the
two revisions' dequantized weights and scales are identical (the factorisation's order of operations may move a code or two).
Results: bench/results/gptq-memory.json and .md.

    .venv/bin/python bench/gptq_memory.py --before 2a1c13e      # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from memory import export_revision

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, resource, sys, time
import torch
from weightwise.formats.base import QuantSpec
from weightwise.formats.quantizer import dequantize
from weightwise.quantize.methods.gptq import gptq

rows, cols, tokens, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
weight = 0.02 * torch.randn(rows, cols, generator=g)
x = torch.randn(tokens, cols, generator=g)
x[:, :8] *= 20  # outlier channels, as in real activations
hessian = x.T @ x / tokens
del x
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
before = rss_mb()
start = time.perf_counter()
qt, diagnostics = gptq(weight, QuantSpec(format="int4", group_size=128), hessian, act_order=True)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.save({"weight": dequantize(qt), "scales": qt.scales}, out)
print(json.dumps({"rss_before_mb": before, "peak_rss_mb": peak, "seconds": seconds, "damp": diagnostics["damp"]}))
"""


def run_row(src: Path, rows: int, cols: int, tokens: int, out: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", WORKER, str(rows), str(cols), str(tokens), str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["peak_above_start_mb"] = row["peak_rss_mb"] - row["rss_before_mb"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' row")
    parser.add_argument("--after", default="HEAD", help="git revision of the 'after' row (default HEAD)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=8192, help="random inputs behind the Hessian (16 × 512)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic

    results = {"settings": vars(args), "rows": {}, "versions": environment_versions()}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {}
        for name in ("before", "after"):
            rev = getattr(args, name)
            src = export_revision(rev, Path(tmp) / name)
            outputs[name] = Path(tmp) / f"{name}.pt"
            results["rows"][name] = {"revision": rev, **run_row(src, args.rows, args.cols, args.tokens, outputs[name], args.threads)}
            print(name, results["rows"][name], flush=True)
        a, b = (torch.load(outputs[n], weights_only=True) for n in ("before", "after"))
        results["codes_identical"] = bool(torch.equal(a["weight"], b["weight"]))
        results["codes_differing"] = int((a["weight"] != b["weight"]).sum())  # same scales: a differing value is a code
        results["scales_identical"] = bool(torch.equal(a["scales"], b["scales"]))
    lines = [f"GPTQ int4 g128, act order, one {args.rows} × {args.cols} layer (Hessian from {args.tokens} random inputs), "
             f"{args.threads} threads; peak RSS of the process above its RSS just before the call:", "",
             "| row | revision | peak above start (MiB) | peak RSS (MiB) | seconds |", "|---|---|---:|---:|---:|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {row['revision']} | {row['peak_above_start_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['seconds']:.1f} |")
    lines += ["", f"Codes identical: {results['codes_identical']} ({results['codes_differing']} of {args.rows * args.cols} "
              f"differ); scales identical: {results['scales_identical']}."]
    out = ROOT / "bench" / "results" / "gptq-memory.json"
    write_json_atomic(out, results)
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
