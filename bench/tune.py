"""Benchmark: LIFT vs full fine-tuning vs LoRA vs magnitude and random sparse masks (the fine-tuning targets).

Every method fine-tunes the default SmolLM2 on the same arithmetic examples, for the same steps, with the
same seed, through `weightwise tune` in its own process (so that each peak RSS is its own). The sparse
methods and LoRA train the same number of entries (``--rank-budget r`` = a rank-r LoRA's count). Reports
exact match on held-out problems, pydoc perplexity before/after (retention), peak RSS, optimizer-state
bytes, step time and result size, as Markdown and JSON. A method whose run folder already holds
metrics.json is not rerun (delete the folder, or pass --fresh).

    .venv/bin/python bench/tune.py                       # the default sizes below (about an hour on 2 cores)
    .venv/bin/python bench/tune.py --quick               # 4 steps, 8 test problems: checks the wiring
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from weightwise.io.artifacts import environment_versions, write_json_atomic

METHODS = ("lift", "full", "lora", "magnitude", "random")
# Learning rates: one per family of method, the usual ranges (full fine-tuning wants ~10× less than adapters/sparse).
LR = {"lift": 5e-4, "magnitude": 5e-4, "random": 5e-4, "lora": 5e-4, "full": 5e-5}
FP16_MODEL_BYTES_PER_PARAM = 2


def result_bytes(out: Path) -> int:
    """Bytes of the tuned result: the patch, or the peft adapter's weights."""
    return sum(f.stat().st_size for f in out.rglob("*.safetensors") if "checkpoints" not in f.parts)


def method_settings(method: str, args) -> dict:
    """The method's config: the sparse ones the same entry count as a rank-r LoRA (or --density), LoRA rank r."""
    if method in ("lift", "magnitude", "random"):
        budget = {"density": args.density} if args.density else {"rank_budget": args.rank}
        return {"name": method, **budget, "refresh_every": args.refresh_every}
    return {"name": method, "rank": args.rank} if method == "lora" else {"name": method}


def run_method(method: str, args, out: Path, eval_before: bool) -> dict:
    config = {"method": method_settings(method, args), "task": "arithmetic", "train_examples": args.train_examples,
              "test_examples": args.test_examples, "max_steps": args.steps, "batch_size": args.batch_size,
              "lr": LR[method], "seed": args.seed, "max_new_tokens": args.max_new_tokens,
              "retention_max_tokens": args.retention_tokens, "eval_before": eval_before,
              "checkpoint_every": args.checkpoint_every}
    out.mkdir(parents=True, exist_ok=True)
    config_path = out.parent / f"{method}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "weightwise.cli", "tune", args.model, "--config", str(config_path), "-o", str(out)]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def markdown(rows: dict[str, dict], model_params: int) -> str:
    before = next(r["before"] for r in rows.values() if r.get("before"))
    ppl0 = before["retention"]["ppl"]
    acc0 = before["exact_match"]["accuracy"]
    lines = [f"Before tuning: exact match {acc0:.3f}, pydoc ppl {ppl0:.3f}.", "",
             "| method | trained entries | exact match | pydoc ppl after | Δppl | peak RSS MB | optimizer state MB | "
             "s/step | result MB | result / fp16 model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        after, train = r["after"], r["train"]
        ppl = after["retention"]["ppl"]
        size = r["result_bytes"]
        lines.append(f"| {name} | {r['trained_entries']:,} | {after['exact_match']['accuracy']:.3f} | {ppl:.3f} | "
                     f"{ppl - ppl0:+.3f} | {train['peak_rss_mb']:.0f} | {r['optimizer_state_bytes'] / 1e6:.2f} | "
                     f"{train['seconds'] / max(train['steps'], 1):.2f} | {size / 1e6:.2f} | "
                     f"1/{model_params * FP16_MODEL_BYTES_PER_PARAM / max(size, 1):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--quick", action="store_true", help="4 steps, 8 test problems, 512 retention tokens")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=800)
    parser.add_argument("--test-examples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--retention-tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank; sparse methods train the same count")
    parser.add_argument("--density", type=float, default=None, help="sparse methods train this fraction of each matrix instead")
    parser.add_argument("--refresh-every", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-tune"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/tune.json"))
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.test_examples, args.retention_tokens, args.train_examples = 4, 8, 512, 32
    methods = [m for m in METHODS if m in args.methods]
    if args.fresh and args.runs.exists():
        shutil.rmtree(args.runs)
    rows = {}
    for method in methods:
        out = args.runs / method
        done = out / "metrics.json"
        rows[method] = json.loads(done.read_text()) if done.exists() else run_method(method, args, out, method == methods[0])
        rows[method]["result_bytes"] = result_bytes(out)

    from weightwise.io.models import load_model

    model, _ = load_model(args.model)
    model_params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    for row in rows.values():
        row["model_params"] = model_params
    table = markdown(rows, model_params)
    budget = f"density {args.density}" if args.density else f"rank budget {args.rank}"
    print(f"SmolLM2-135M-Instruct, arithmetic: {args.steps} steps × {args.batch_size} examples, "
          f"{args.test_examples} test problems, {budget}, seed {args.seed}\n")
    print(table)
    write_json_atomic(args.out, {"settings": vars(args) | {"runs": str(args.runs), "out": str(args.out)},
                                 "lr": LR, "versions": environment_versions(), "rows": rows})


if __name__ == "__main__":
    main()
