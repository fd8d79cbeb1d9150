"""Benchmark: the weight compander (`reparam: compander`) on full fine-tuning of the default SmolLM2-135M-Instruct.

Two arms that differ only by the reparameterisation: full fine-tuning (AdamW, lr 5e-5, as bench/tune.py) without and
with ``reparam: compander`` (defaults: alpha 2, margin 1.25, fixed), on the arithmetic task, ``--steps`` optimizer
steps of ``--batch-size`` examples, seed 0. Each arm is one `weightwise tune` process (its own peak RSS). Per arm:

- task: exact match on ``--test-examples`` held-out problems (greedy, ``--max-new-tokens``), before (once) and after;
- retention: perplexity on the first ``--retention-tokens`` tokens of the pydoc eval split (512-token windows), as
  every tune benchmark measures it, before and after;
- quantization after tuning: the tuned model (the base with the run's patch, loaded from the run folder) quantized by
  round-to-nearest int4 in groups of 64: the relative weight error sqrt(sum ||Q(W) - W||^2 / sum ||W||^2) over the
  quantized layers and the perplexity of the quantized model on the same windows; the untuned base the same way;
- weights: the largest |W| of the targeted layers over the base's, and the mean over rows of each row's largest |W|
  over the base row's (what the compander's bound limits).

A short tune cannot show a regularizer's effect on generalisation; this measures what it costs (step time, memory)
and what it does to retention and to the weights' quantization in that budget.

    .venv/bin/python bench/compander.py            # 10 steps × 8, 40 problems, 4096 tokens (about 10 min on 2 idle cores)
    .venv/bin/python bench/compander.py --quick    # 2 steps, 4 problems, 512 tokens: the wiring
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from weightwise.evaluate import evaluate
from weightwise.io.artifacts import environment_versions, write_json_atomic
from weightwise.io.models import load_model
from weightwise.qlinear import QuantizedLinear
from weightwise.quantize import quantize

RESULTS = Path(__file__).parent / "results"
ARMS = {"full": None, "full+compander": "compander"}
LR = 5e-5  # bench/tune.py's full fine-tuning rate
RTN = {"format": "int4", "group_size": 64, "method": "rtn"}


def run_arm(name: str, reparam: str | None, args, out: Path, eval_before: bool) -> dict:
    config = {"method": "full", "reparam": reparam, "task": "arithmetic", "train_examples": args.train_examples,
              "test_examples": args.test_examples, "max_steps": args.steps, "batch_size": args.batch_size, "lr": LR,
              "seed": 0, "max_new_tokens": args.max_new_tokens, "retention_max_tokens": args.retention_tokens,
              "eval_before": eval_before, "checkpoint_every": 0}
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = out.parent / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "weightwise.cli", "tune", "default", "--config", str(config_path), "-o", str(out),
           "--overwrite"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


@torch.no_grad()
def quantization(model, tokenizer, tokens: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """RTN int4 g64 of ``model``: the relative weight error over the layers it quantizes and the quantized model's
    perplexity; and those layers' float weights by name."""
    qmodel = quantize(model, RTN)
    floats = dict(model.named_modules())
    weights = {name: floats[name].weight.detach() for name, m in qmodel.named_modules() if isinstance(m, QuantizedLinear)}
    quantized = dict(qmodel.named_modules())
    err = sum(float((quantized[n].dequantized_weight().float() - w.float()).pow(2).sum()) for n, w in weights.items())
    ref = sum(float(w.float().pow(2).sum()) for w in weights.values())
    ppl = evaluate(qmodel, tokenizer, max_tokens=tokens, window=512, measure_speed=False)
    return {"relative_weight_error": math.sqrt(err / ref), "ppl": ppl.ppl, "n_tokens_scored": ppl.n_tokens_scored}, weights


def growth(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    """Largest |W| over the base's (over all layers), and the mean over rows of each row's largest |W| ratio."""
    largest = max(float(tuned[n].abs().max()) for n in base) / max(float(w.abs().max()) for w in base.values())
    rows = torch.cat([tuned[n].abs().amax(dim=1) / base[n].abs().amax(dim=1).clamp_min(1e-12) for n in base])
    return {"largest_abs_ratio": largest, "row_max_ratio_mean": float(rows.mean()), "row_max_ratio_max": float(rows.max())}


def markdown(result: dict) -> str:
    s, base = result["settings"], result["base"]
    lines = [f"SmolLM2-135M-Instruct, full fine-tuning on arithmetic: {s['steps']} steps × {s['batch_size']} examples, "
             f"lr {LR}, seed 0; {s['test_examples']} held-out problems; pydoc ppl on {base['n_tokens_scored']} tokens; "
             "RTN int4 g64 on the quantized layers.", "",
             f"Untuned: exact match {base['exact_match']:.3f}, pydoc ppl {base['ppl']:.3f}; RTN int4 g64: relative "
             f"weight error {base['rtn']['relative_weight_error']:.5f}, ppl {base['rtn']['ppl']:.3f}.", "",
             "| arm | loss first → last | exact match | pydoc ppl | Δppl | RTN int4 g64 rel. error | RTN ppl | "
             "max \\|W\\| / base | row max / base (mean) | s/step | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["arms"].items():
        train = r["train"]
        lines.append(f"| {name} | {train['loss_first']:.3f} → {train['loss_last']:.3f} | {r['exact_match']:.3f} | "
                     f"{r['ppl']:.3f} | {r['ppl'] - base['ppl']:+.3f} | {r['rtn']['relative_weight_error']:.5f} | "
                     f"{r['rtn']['ppl']:.3f} | {r['growth']['largest_abs_ratio']:.4f} | "
                     f"{r['growth']['row_max_ratio_mean']:.5f} | {train['seconds'] / train['steps_run']:.1f} | "
                     f"{train['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps, 4 problems, 512 tokens: the wiring")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--test-examples", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--retention-tokens", type=int, default=4096)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-compander"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.test_examples, args.retention_tokens, args.train_examples = 2, 4, 512, 16
        args.runs = args.runs.with_name(args.runs.name + "-quick")
    stem = "compander-quick" if args.quick else "compander"
    torch.set_num_threads(2)
    started = time.perf_counter()
    arms = {name: run_arm(name, reparam, args, args.runs / name, eval_before=i == 0)
            for i, (name, reparam) in enumerate(ARMS.items())}

    base_model, tokenizer = load_model("default")
    before = arms["full"]["before"]
    rtn, weights = quantization(base_model, tokenizer, args.retention_tokens)
    base = {"exact_match": before["exact_match"]["accuracy"], "ppl": before["retention"]["ppl"],
            "n_tokens_scored": before["retention"]["n_tokens_scored"], "rtn": rtn}
    rows = {}
    for name, metrics in arms.items():
        tuned, _ = load_model(args.runs / name)  # the base with the run's patch
        rtn, tuned_weights = quantization(tuned, tokenizer, args.retention_tokens)
        rows[name] = {"exact_match": metrics["after"]["exact_match"]["accuracy"], "ppl": metrics["after"]["retention"]["ppl"],
                      "rtn": rtn, "growth": growth(tuned_weights, weights), "train": metrics["train"],
                      "trained_entries": metrics["trained_entries"], "wall_seconds": metrics["wall_seconds"],
                      "config": json.loads((args.runs / name / "tune_config.json").read_text())["config"]}
        del tuned, tuned_weights
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"lr": LR, "rtn": RTN},
              "versions": environment_versions(), "base": base, "arms": rows,
              "seconds": time.perf_counter() - started}
    table = markdown(result)
    write_json_atomic(RESULTS / f"{stem}.json", result)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
