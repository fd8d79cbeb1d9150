"""Benchmark: weight-only quantization of all-MiniLM-L6-v2 (fp32 source), scored by sentence-embedding cosine.

The fp32 model embeds the pydoc eval-split paragraphs once (mean pooling, L2-normalised); each recipe's
quantized copy embeds the same paragraphs and is scored by the cosine to the fp32 embedding of each
paragraph (mean, min, 5th percentile). Calibrated recipes use the pydoc calib split in 64-token windows
framed as [CLS] … [SEP], like the paragraphs they embed; by default 1500 of them (nearly all the split
holds; ``--sweep`` measures the best GPTQ recipe at other sample counts and dampenings). Prints Markdown
tables and writes JSON (+ the tables as .md).

    .venv/bin/python bench/minilm.py             # every eval paragraph, 1500 × 64 calibration tokens
    .venv/bin/python bench/minilm.py --sweep     # + calibration-size, damp and block-tuning sweeps of the best GPTQ recipe
    .venv/bin/python bench/minilm.py --quick     # 64 paragraphs, 64 × 64 calibration tokens, 3 recipes
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import time
from pathlib import Path

from weightwise.compare import describe
from weightwise.data.corpora import corpus, join_documents
from weightwise.evaluate.embeddings import (
    embedding_cosine,
    paragraphs,
    sentence_embeddings,
)
from weightwise.evaluate.size import model_size
from weightwise.io.artifacts import (
    environment_versions,
    write_json_atomic,
    write_text_atomic,
)
from weightwise.io.models import load_model
from weightwise.quantize.api import quantize
from weightwise.quantize.calibration import CalibrationConfig
from weightwise.quantize.recipe import QuantRecipe

FP32_LINEARS = r"\.layer\.\d+\."  # the encoder blocks' linears, for the fp32 row's bits/weight

LS = {"name": "gptq", "refit_scales": True}
BEST = {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}
BEST_D03 = {**BEST, "damp": 0.03}
G128 = {"group_size": 128}
FULL = [
    {"format": "int8", "granularity": "channel"},
    {"format": "int4", **G128},
    {"format": "int4", **G128, "bias_correction": True},
    {"format": "int4", **G128, "method": "gptq"},
    {"format": "int4", **G128, "method": LS},
    {"format": "int4", **G128, "method": "gptq", "bias_correction": True},
    {"format": "int4_asym", **G128, "method": "gptq"},
    {"format": "int4_asym", **G128, "method": LS},
    {"format": "int4_asym", **G128, "method": LS, "bias_correction": True},
    {"format": "int4_asym", **G128, "method": BEST, "bias_correction": True},
    {"format": "int4_asym", **G128, "method": BEST_D03, "bias_correction": True},
    {"format": "int4_asym", **G128, "method": BEST, "bias_correction": True, "block_tune": {}},
    {"format": "int4_asym", **G128, "method": BEST_D03, "bias_correction": True, "block_tune": {}},
    {"format": "nf4", "group_size": 64},
    {"format": "int3", **G128},
    {"format": "int3", **G128, "method": "gptq"},
    {"format": "int3_asym", **G128, "method": BEST, "bias_correction": True},
]
QUICK = [{"format": "int8", "granularity": "channel"}, {"format": "int4", **G128}, {"format": "int4", **G128, "method": "gptq"}]
SWEEP_SAMPLES = (256, 1024)  # the calibration windows tried besides the default (64 tokens each)
SWEEP_DAMP = (0.001, 0.01, 0.03, 0.1)
SWEEP_TUNE = ({"epochs": 16}, {"epochs": 16, "lr": 5e-4})  # longer block tuning of the best recipe (damp 0.03)


def label(r: QuantRecipe) -> str:
    """describe() plus the options that distinguish rows here."""
    m = r.method
    parts = [describe(r)]
    if getattr(m, "clip_search", False):
        parts.append("clip search")
    if getattr(m, "refit_scales", False):
        rounds = getattr(m, "refit_rounds", 0)
        parts.append("least-squares scales" + (f" ×{rounds + 1} rounds" if rounds else ""))
    if r.bias_correction:
        parts.append("bias correction")
    if r.block_tune is not None:
        changed = {k: v for k, v in r.block_tune.model_dump().items() if v != type(r.block_tune).model_fields[k].default}
        parts.append("block tuning" + (f" ({', '.join(f'{k} {v:g}' for k, v in changed.items())})" if changed else ""))
    if m.name == "gptq" and m.damp != 0.01:
        parts.append(f"damp {m.damp:g}")
    return " + ".join(parts)


def markdown(rows: list[dict], windows: bool = False) -> str:
    lines = ["| recipe |" + (" windows |" if windows else "") + " bits/weight | model MB | mean cosine | min cosine | p05 cosine | quantize s |",
             "|---|" + ("---:|" if windows else "") + "---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q = "–" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.1f}"
        lines.append(f"| {r['name']} |" + (f" {r['calibration_samples']} |" if windows else "")
                     + f" {r['bits_per_weight']:.3f} | {r['total_bytes'] / 1e6:.1f} | {r['cosine_mean']:.5f} | "
                     f"{r['cosine_min']:.4f} | {r['cosine_p05']:.4f} | {q} |")
    return "\n".join(lines)


def measure(model, tokenizer, texts, reference, fields: dict, calibration: CalibrationConfig) -> dict:
    """Quantize by ``fields`` (+ ``calibration``) and score the embeddings; one table row."""
    r = QuantRecipe(**fields, calibration=calibration)
    t0 = time.perf_counter()
    qmodel = quantize(model, r, tokenizer=tokenizer)
    seconds = time.perf_counter() - t0
    cosine = embedding_cosine(reference, sentence_embeddings(qmodel, tokenizer, texts))
    size = model_size(qmodel)
    row = {"name": label(r), "recipe": r.model_dump(mode="json"), "quantize_seconds": seconds,
           "bits_per_weight": size["bits_per_weight"], "total_bytes": size["total_bytes"],
           "calibration_samples": calibration.samples if r.needs_calibration else None,
           **{f"cosine_{k}": v for k, v in cosine.items()}}
    print(f"{row['name']} ({row['calibration_samples'] or 0} windows): mean cosine {cosine['mean']:.5f}, "
          f"min {cosine['min']:.4f} ({seconds:.1f} s)", flush=True)
    del qmodel
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 paragraphs, 64 calibration windows, 3 recipes")
    parser.add_argument("--sweep", action="store_true", help="also the best GPTQ recipe at other calibration sizes and damps")
    parser.add_argument("--out", type=Path, default=Path("bench/results/minilm.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    calibration = CalibrationConfig(samples=64 if args.quick else 1500, seq_len=64)
    model, tokenizer = load_model("minilm")
    texts = paragraphs(join_documents(corpus("pydoc", "eval")))
    texts = texts[:64] if args.quick else texts
    reference = sentence_embeddings(model, tokenizer, texts)
    size = model_size(model, linear_pattern=FP32_LINEARS)
    rows = [{"name": "source fp32", "recipe": None, "quantize_seconds": None, "bits_per_weight": size["bits_per_weight"],
             "total_bytes": size["total_bytes"], "calibration_samples": None, "cosine_mean": 1.0, "cosine_min": 1.0,
             "cosine_p05": 1.0}]
    rows += [measure(model, tokenizer, texts, reference, fields, calibration) for fields in (QUICK if args.quick else FULL)]
    sweep = []
    if args.sweep:
        best = {"format": "int4_asym", **G128, "bias_correction": True}
        sweep += [measure(model, tokenizer, texts, reference, {**best, "method": BEST},
                          calibration.model_copy(update={"samples": n})) for n in SWEEP_SAMPLES]
        sweep += [measure(model, tokenizer, texts, reference, {**best, "method": {**BEST, "damp": d}}, calibration)
                  for d in SWEEP_DAMP if d not in (0.01, 0.03)]  # 0.01 and 0.03 are rows of the main table
        sweep += [measure(model, tokenizer, texts, reference, {**best, "method": BEST_D03, "block_tune": tune}, calibration)
                  for tune in SWEEP_TUNE]
    table = markdown(rows)
    header = (f"all-MiniLM-L6-v2 (fp32 source), pydoc eval split: {len(texts)} paragraphs (≤ 1000 chars, ≤ 256 tokens), "
              f"cosine of mean-pooled normalised embeddings to fp32; calibration pydoc calib {calibration.samples}×"
              f"{calibration.seq_len} tokens; Python {platform.python_version()}; total {time.perf_counter() - started:.0f} s")
    text = header + "\n\n" + table
    if sweep:
        text += ("\n\nSweep of the clip search + least-squares ×4 rounds + bias correction recipe (calibration windows of 64 tokens; "
                 "the last rows: longer block tuning at damp 0.03):\n\n" + markdown(sweep, windows=True))
    print(text)
    settings = {"paragraphs": len(texts), "max_chars": 1000, "max_length": 256, "calibration": calibration.model_dump(),
                "python_version": platform.python_version()}
    write_json_atomic(args.out, {"settings": settings, "quick": args.quick, "versions": environment_versions(), "rows": rows,
                                 "sweep": sweep})
    write_text_atomic(args.out.with_suffix(".md"), text + "\n")


if __name__ == "__main__":
    main()
