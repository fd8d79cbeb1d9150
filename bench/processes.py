"""Benchmark: `weightwise quantize` (GPTQ) of the default SmolLM2 in one process and shared by two under torchrun.

Rows, each the real command in its own process tree under ``/usr/bin/time -v`` (wall clock; user time summed over
the processes), with the machine's cores split between the processes:

- ``1 process``: ``weightwise quantize ...`` with OMP/MKL threads = ``--cores``;
- ``N processes``: ``torchrun --standalone --nproc_per_node N -m weightwise.cli quantize ...`` (gloo), each process
  with ``--cores / N`` threads: each calibrates on its share of the batches and quantizes its share of each block's
  layers.

The outputs are compared with the one-process run: layers whose codes are bit-identical, the largest relative
difference of a dequantized weight, and the perplexity of both on pydoc's test split (``weightwise eval``), since
summing the Hessians in another order may round a few codes the other way. The GGUF cache of the default model is
built first (not measured). Results: bench/results/processes.json and processes.md (``--quick``: processes-quick.*);
a row already measured with the same settings (its ``--work`` folder) is not run again.

    .venv/bin/python bench/processes.py            # 128 × 512 calibration, 2 cores (~15 min on 2 idle cores)
    .venv/bin/python bench/processes.py --quick    # 16 × 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from memory import RECIPE, folder_tensors, parse_time

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_row(processes: int, cores: int, calib: str, out: Path) -> dict:
    """Quantize with ``processes`` processes sharing ``cores`` threads under /usr/bin/time -v; its measurements."""
    argv = ["quantize", "default", *RECIPE, "--calib", calib, "-o", str(out)]
    threads = max(cores // processes, 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    launcher = ([str(TORCHRUN), "--standalone", "--nproc_per_node", str(processes)] if processes > 1
                else [sys.executable])
    command = [*launcher, "-m", "weightwise.cli", *argv]
    done = subprocess.run(["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-30:])
        raise SystemExit(f"{processes} process(es) failed (exit {done.returncode}):\n{tail}")
    measured = parse_time(done.stderr)
    return {"processes": processes, "threads_per_process": threads, "command": " ".join(command[len(launcher) - 1 :]),
            "launcher": " ".join(Path(launcher[0]).name if i == 0 else part for i, part in enumerate(launcher)),
            "wall_s": measured["wall_s"], "user_s": measured["user_s"], "system_s": measured["system_s"],
            "peak_rss_mb_largest_process": measured["peak_rss_mb"]}


def compare(single: Path, shared: Path) -> dict:
    """Per quantized layer: bit-identical codes or not; and the largest relative difference of a dequantized weight."""
    import torch

    from weightwise.io.folders import load_quantized
    from weightwise.quantize import QuantizedLinear

    ours, theirs = folder_tensors(single), folder_tensors(shared)
    if ours.keys() != theirs.keys():
        raise SystemExit(f"the runs store different tensors: {sorted(ours.keys() ^ theirs.keys())[:5]}")
    models = [dict(load_quantized(run)[0].named_modules()) for run in (single, shared)]
    layers = [name for name, module in models[0].items() if isinstance(module, QuantizedLinear)]
    identical, worst = 0, 0.0
    for name in layers:
        a, b = models[0][name], models[1][name]
        identical += torch.equal(a.packed_codes, b.packed_codes)
        wa, wb = a.dequantized_weight(), b.dequantized_weight()
        worst = max(worst, ((wa - wb).norm() / wa.norm()).item())
    return {"layers": len(layers), "layers_identical_codes": identical, "max_relative_weight_difference": worst,
            "tensors_identical": sum(torch.equal(ours[k], theirs[k]) for k in ours), "tensors": len(ours)}


def perplexities(runs: dict[str, Path], out: Path, max_tokens: int, cores: int) -> dict[str, float]:
    """Perplexity of each run on pydoc's test split (first ``max_tokens`` tokens), by `weightwise eval`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
    subprocess.run([sys.executable, "-m", "weightwise.cli", "eval", *map(str, runs.values()), "--max-tokens", str(max_tokens),
                    "--no-speed", "-o", str(out)], check=True, env=env, capture_output=True)
    rows = json.loads((out / "metrics.json").read_text())["runs"]  # in the order given
    return {name: row["ppl"] for name, row in zip(runs, rows, strict=True)}


def markdown(results: dict) -> str:
    s, cmp = results["settings"], results["comparison"]
    lines = [
        f"`weightwise quantize default {' '.join(RECIPE)} --calib {s['calib']}` on {s['cores']} cores "
        "(wall clock and user time of the whole process tree from `/usr/bin/time -v`).",
        "",
        "| processes | threads each | launcher | wall (s) | user (s) | system (s) | peak RSS, largest process (MiB) | pydoc test ppl |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['processes']} | {row['threads_per_process']} | `{row['launcher']}` | {row['wall_s']:.0f} | "
                     f"{row['user_s']:.0f} | {row['system_s']:.0f} | {row['peak_rss_mb_largest_process']:.0f} | "
                     f"{row['ppl']:.4f} |")
    lines += ["", f"Speed-up: {results['speedup']:.2f}×. Against the one-process run: {cmp['layers_identical_codes']}/"
              f"{cmp['layers']} layers with bit-identical codes, {cmp['tensors_identical']}/{cmp['tensors']} tensors "
              f"identical, largest relative difference of a dequantized weight {cmp['max_relative_weight_difference']:.2e} "
              f"(perplexity on the first {s['ppl_tokens']} tokens of pydoc's test split)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 × 512 calibration tokens instead of 128 × 512")
    parser.add_argument("--processes", type=int, default=2, help="processes of the shared row")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="threads to split between the processes")
    parser.add_argument("--ppl-tokens", type=int, default=32768, help="pydoc test tokens for the perplexity check")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-processes", help="where the run folders go")
    args = parser.parse_args()
    calib = "pydoc:16x512" if args.quick else "pydoc:128x512"
    stem = "processes-quick" if args.quick else "processes"
    subprocess.run([sys.executable, "-c", "from weightwise.io.models import load_model; load_model('default')"],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic

    runs = {n: args.work / f"{n}-processes" for n in (1, args.processes)}
    rows = []
    for n, out in runs.items():  # a row measured by an earlier invocation with the same settings is kept
        measured = out.with_name(out.name + ".row.json")
        row = json.loads(measured.read_text()) if measured.is_file() else {}
        if row.get("settings") != [calib, args.cores] or not (out / "manifest.json").is_file():
            row = {**run_row(n, args.cores, calib, out), "settings": [calib, args.cores]}
            write_json_atomic(measured, row)
        rows.append(row)
        print(f"{n} process(es): wall {row['wall_s']:.0f} s, user {row['user_s']:.0f} s", flush=True)
    ppl = perplexities({str(n): out for n, out in runs.items()}, args.work / "eval", args.ppl_tokens, args.cores)
    for row in rows:
        row["ppl"] = ppl[str(row["processes"])]
    results = {"settings": {"calib": calib, "cores": args.cores, "ppl_tokens": args.ppl_tokens},
               "rows": rows, "speedup": rows[0]["wall_s"] / rows[1]["wall_s"],
               "comparison": compare(runs[1], runs[args.processes]), "versions": environment_versions()}
    out_dir = ROOT / "bench" / "results"
    write_json_atomic(out_dir / f"{stem}.json", results)
    write_text_atomic(out_dir / f"{stem}.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
