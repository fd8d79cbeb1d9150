"""Benchmark: compressed-tensors exports loaded by transformers compute the perplexity weightwise computes.

For each recipe (RTN on the default model: int4 g64 symmetric, int8 per channel, fp8_e4m3 per channel), the
quantized model's perplexity in weightwise and the perplexity of its compressed-tensors export loaded with
``transformers.AutoModelForCausalLM.from_pretrained`` (CPU, the compressed-tensors package decompressing it) are
measured with the same harness on the first 16 windows of 512 tokens of the pydoc eval split. Target: the two
within 0.1 %.

    .venv/bin/python bench/compressed_tensors.py            # three recipes, 16 windows
    .venv/bin/python bench/compressed_tensors.py --quick    # 2 windows

Results: bench/results/compressed-tensors.json and .md (--quick: compressed-tensors-quick.*).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from weightwise.data.corpora import corpus, join_documents
from weightwise.evaluate import evaluate
from weightwise.export.compressed_tensors import write_compressed_tensors
from weightwise.io.artifacts import environment_versions, write_json_atomic
from weightwise.io.models import load_model
from weightwise.quantize import quantize

RECIPES = {
    "int4 g64": {"format": "int4", "group_size": 64},
    "int8 channel": {"format": "int8", "granularity": "channel"},
    "fp8_e4m3 channel": {"format": "fp8_e4m3", "granularity": "channel"},
}
WINDOW = 512


def ppl(model, tokenizer, text: str, max_tokens: int) -> float:
    return evaluate(model, tokenizer, text=text, max_tokens=max_tokens, window=WINDOW, measure_speed=False).ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    max_tokens = 1024 if args.quick else 8192
    text = join_documents(corpus("pydoc", "eval"))
    tokenizer = load_model("default")[1]
    rows = []
    for name, recipe in RECIPES.items():
        started = time.perf_counter()
        model = quantize(load_model("default")[0], recipe)
        ours = ppl(model, tokenizer, text, max_tokens)
        with tempfile.TemporaryDirectory() as folder:
            report = write_compressed_tensors(model, tokenizer, Path(folder))
            del model
            loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
            theirs = ppl(loaded, tokenizer, text, max_tokens)
            schemes = sorted(group["scheme"] for group in report["groups"].values())
        gap = theirs / ours - 1
        rows.append({"recipe": name, "spec": recipe, "formats": schemes, "bytes": report["bytes"], "weightwise_ppl": ours,
                     "transformers_ppl": theirs, "gap": gap, "within_0.1%": abs(gap) <= 1e-3,
                     "warnings": report.get("warnings", []), "seconds": time.perf_counter() - started})
        print(f"{name}: weightwise {ours:.4f}, transformers {theirs:.4f}, gap {gap:+.4%}", flush=True)
    results = {"settings": {"max_tokens": max_tokens, "window": WINDOW, "text": "pydoc eval", "method": "rtn",
                            "threads": 2}, "versions": environment_versions(), "rows": rows}
    out = Path(__file__).parent / "results" / ("compressed-tensors-quick.json" if args.quick else "compressed-tensors.json")
    write_json_atomic(out, results)
    lines = [f"SmolLM2-135M-Instruct, RTN, pydoc eval, {max_tokens // WINDOW} windows × {WINDOW}: weightwise's perplexity "
             "of the quantized model vs transformers' of its compressed-tensors export (from_pretrained, CPU).", "",
             "| recipe | compressed-tensors format | file bytes | weightwise ppl | transformers ppl | gap | within 0.1 % |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {', '.join(r['formats'])} | {r['bytes']:,} | {r['weightwise_ppl']:.4f} | "
                     f"{r['transformers_ppl']:.4f} | {r['gap']:+.4%} | {'yes' if r['within_0.1%'] else 'no'} |")
    warnings = sorted({w for r in rows for w in r["warnings"]})
    if warnings:
        lines += ["", "Warnings the export printed:", "", *[f"- {w}" for w in warnings]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
