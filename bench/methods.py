"""Benchmark: calibrated methods and mixed precision on the default SmolLM2 (the calibrated-quantization targets).

Each named recipe is quantized and evaluated against the fp32 source in one harness (perplexity, KL,
top-1 agreement on the pydoc eval split). Rows are appended to the JSON as soon as they are measured,
so a long run can be continued: rerunning skips recipes whose row is already in the file with the
same recipe and settings (``--fresh`` measures them again).

    .venv/bin/python bench/methods.py --max-tokens 8192                  # every recipe (hours on 2 cores)
    .venv/bin/python bench/methods.py --max-tokens 8192 --only gptq-int3-g64 plan-3.0
    .venv/bin/python bench/methods.py --quick                            # 2 windows, 3 cheap recipes
    .venv/bin/python bench/methods.py --max-tokens 8192 --report         # the table of what is measured so far
    python bench/methods.py --max-tokens 8192 --device cuda --out bench/results/methods-gpu.json --only ...  # quantize on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from weightwise.compare import compare_recipes
from weightwise.evaluate.config import EvalConfig
from weightwise.io.artifacts import environment_versions, write_json_atomic
from weightwise.io.models import load_model
from weightwise.quantize.recipe import QuantRecipe

CALIB = {"source": "pydoc", "samples": 128, "seq_len": 512}
CALIB_SMALL = {"source": "pydoc", "samples": 32, "seq_len": 512}  # for the slower searches (AWQ, SmoothQuant, FP search)

RECIPES: dict[str, dict] = {
    "rtn-int3-g64": {"format": "int3", "group_size": 64},
    "gptq-int3-g64": {"format": "int3", "group_size": 64, "method": "gptq", "calibration": CALIB},
    "gptq-int3-g64-lorc8": {"format": "int3", "group_size": 64, "method": "gptq", "lorc_rank": 8, "calibration": CALIB},
    "gptq-int3-g64-ls": {"format": "int3", "group_size": 64, "method": {"name": "gptq", "refit_scales": True}, "calibration": CALIB},
    "gptq-int3-g64-clip-ls4": {"format": "int3", "group_size": 64, "calibration": CALIB,
                               "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}},
    "awq-int3-g64": {"format": "int3", "group_size": 64, "method": "awq", "calibration": CALIB_SMALL},
    "awq+gptq-int3-g64": {"format": "int3", "group_size": 64, "method": {"name": "awq", "then": "gptq"}, "calibration": CALIB_SMALL},
    "gptq-int4-g64": {"format": "int4", "group_size": 64, "method": "gptq", "calibration": CALIB},
    "gptq-int4-g192": {"format": "int4", "group_size": 192, "method": "gptq", "calibration": CALIB},
    "gptq-int2_asym-g32": {"format": "int2_asym", "group_size": 32, "method": "gptq", "calibration": CALIB},
    "gptq-int2_asym-g64": {"format": "int2_asym", "group_size": 64, "method": "gptq", "calibration": CALIB},
    "gptq-int2_asym-g32-clip-ls4": {"format": "int2_asym", "group_size": 32, "calibration": CALIB,
                                    "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}},
    "gptq-int2_asym-g64-clip-ls4": {"format": "int2_asym", "group_size": 64, "calibration": CALIB,
                                    "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}},
    "plan-3.0": {"target_bpw": 3.0, "method": "gptq", "calibration": CALIB},
    "plan-3.5": {"target_bpw": 3.5, "method": "gptq", "calibration": CALIB},
    "plan-2.5": {"target_bpw": 2.5, "method": "gptq", "calibration": CALIB},
    "plan-2.5-clip-ls4": {"target_bpw": 2.5, "calibration": CALIB,
                          "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}},
    "plan-3.0-clip-ls4": {"target_bpw": 3.0, "calibration": CALIB,
                          "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}},
    # with block-output tuning (scales, offsets, norms fitted to the float block's outputs; minutes on a GPU)
    "gptq-int3-g64-clip-ls4-bt": {"format": "int3", "group_size": 64, "calibration": CALIB, "block_tune": {},
                                  "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}},
    "gptq-int2_asym-g64-clip-ls4-bt": {"format": "int2_asym", "group_size": 64, "calibration": CALIB, "block_tune": {},
                                       "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}},
    "plan-3.0-clip-ls4-bt": {"target_bpw": 3.0, "calibration": CALIB, "block_tune": {},
                             "method": {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}},
    "rtn-fp4_e2m1-g32": {"format": "fp4_e2m1", "group_size": 32},
    "fpsearch-fp4-g32": {"format": "fp4_e2m1", "group_size": 32, "method": "fpsearch", "calibration": CALIB_SMALL},
    "w8a8-int8": {"format": "int8", "granularity": "channel", "act_format": "int8"},
    "w8a8-int8-smooth0.5": {"format": "int8", "granularity": "channel", "act_format": "int8", "smoothquant_alpha": 0.5,
                            "calibration": CALIB_SMALL},
    "w4a8-fp8": {"format": "int4", "group_size": 64, "act_format": "fp8_e4m3"},
    "w4a8-fp8-smooth0.5": {"format": "int4", "group_size": 64, "act_format": "fp8_e4m3", "smoothquant_alpha": 0.5,
                           "calibration": CALIB_SMALL},
    "rtn-int4-g64-pow2": {"format": "int4", "group_size": 64, "pow2_scales": "all"},
}
QUICK = ["rtn-int3-g64", "w8a8-int8", "w4a8-fp8"]


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | method | bits/weight | ppl | ppl / source | KL | top-1 | quantize s | on |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    source = next(r for r in rows if r["name"] == "source fp32")
    for r in rows:
        bpw = "32 (fp32)" if r["quantized_layers"] == 0 else f"{r['bits_per_weight']:.3f}"
        method = r.get("recipe", {}).get("method", {}).get("name", "–")
        q = f"{r['quantize_seconds']:.0f}" if "quantize_seconds" in r else "–"
        lines.append(f"| {r['name']} | {method} | {bpw} | {r['ppl']:.3f} | {r['ppl'] / source['ppl']:.3f} | "
                     f"{r['kl_mean']:.4f} | {r['top1_agreement']:.3f} | {q} | {r.get('quantize_device', 'cpu') if 'quantize_seconds' in r else '–'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 windows, 3 cheap recipes, 8 calibration samples")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens scored per model (default: whole eval split)")
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="run these recipes only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/methods.json"))
    parser.add_argument("--report", action="store_true", help="print the table of the rows in --out and stop")
    parser.add_argument("--fresh", action="store_true", help="measure the requested recipes again even when --out holds their rows")
    parser.add_argument("--device", default=None, help="where to quantize (e.g. cuda); the evaluation runs on the CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = EvalConfig(max_tokens=1024 if args.quick else args.max_tokens)
    names = QUICK if args.quick else (args.only or list(RECIPES))
    recipes = {name: QuantRecipe(**RECIPES[name]) for name in names}

    def saved_rows() -> dict[str, dict]:
        """Rows already in --out measured with the same settings (re-read before each write, so that
        several runs with different --only lists can share one file)."""
        saved = json.loads(args.out.read_text()) if args.out.exists() else {}
        same_settings = saved.get("settings") == config.model_dump() and saved.get("quick") == args.quick
        return {r["name"]: r for r in saved.get("rows", [])} if same_settings else {}

    rows = {} if args.fresh else saved_rows()
    if args.report:
        if "source fp32" not in rows:
            sys.exit(f"{args.out} holds no finished run with these settings yet (its source row is written first)")
        source = rows["source fp32"]
        print(f"SmolLM2-135M-Instruct, pydoc eval split: {source['n_windows']} windows, {source['n_tokens_scored']} "
              f"scored tokens, Python {source['python_version']}; rows of {args.out}\n")
        print(markdown([source] + [rows[n] for n in RECIPES if n in rows]))
        return
    todo = [n for n in names if n not in rows or rows[n].get("recipe") != recipes[n].model_dump(mode="json")]

    def save(row: dict) -> None:
        rows.update(saved_rows())
        rows[row["name"]] = row
        write_json_atomic(args.out, {"settings": config.model_dump(), "quick": args.quick,
                                     "versions": environment_versions(), "rows": list(rows.values())})

    started = time.perf_counter()
    model, tokenizer = load_model("default")
    source = compare_recipes(model, tokenizer, [recipes[n] for n in todo], config, labels=todo,
                             on_event=lambda msg: print(msg, file=sys.stderr, flush=True), on_row=save, device=args.device)[0]
    ordered = [rows["source fp32"]] + [rows[n] for n in RECIPES if n in rows]
    print(f"SmolLM2-135M-Instruct, pydoc eval split: {source['n_windows']} windows, {source['n_tokens_scored']} scored "
          f"tokens, Python {source['python_version']}; this run {time.perf_counter() - started:.0f} s "
          f"({len(todo)} recipes measured, {len(names) - len(todo)} kept from {args.out})\n")
    print(markdown(ordered))


if __name__ == "__main__":
    main()
