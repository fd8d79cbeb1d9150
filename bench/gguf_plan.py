"""Benchmark: a mixed-precision plan of exact GGUF types against llama.cpp's K-quant files of the same size.

llama.cpp's Q3_K_M and Q2_K files of the default model are made from the F32 export by llama.cpp's own quantizer
(`llama_model_quantize`, no imatrix). For each, weightwise plans one exact GGUF type per linear layer
(`plan_storage: gguf`: MXFP4, IQ4_NL, Q4_0, Q5_0, Q8_0, each costing its block bytes) under a budget that makes the
exported file no larger than llama.cpp's, quantizes with GPTQ (clip search, least-squares scales), exports with the
source's tokenizer and the embeddings of EMBEDDINGS (Q8_0 as llama.cpp keeps them; at Q2_K's size Q8_0 embeddings would
leave the linear layers 4.23 bits/weight, below MXFP4's 4.25, the smallest exact type, so there the tied embedding
matrix is stored as Q5_0, rounded to nearest, and the linear layers get what that frees), and both files' perplexity is measured inside llama.cpp on the same 16 eval
windows (bench/export.py's `llama_ppl`). Asymmetric 4/5-bit candidates (Q4_1, Q5_1) are left out: they hold the
default model's Q4_1 source grid exactly, which would make the comparison meaningless.

    .venv/bin/python bench/gguf_plan.py             # 128 × 512 calibration (about 10 min per plan on 2 cores)
    .venv/bin/python bench/gguf_plan.py --samples 32 --only Q3_K_M   # a shorter run
    .venv/bin/python bench/gguf_plan.py --quick     # 16 × 256 calibration, 2 eval windows: the wiring
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import llama_cpp
import torch

sys.path.insert(0, str(Path(__file__).parent))
from export import gguf_layout, layout_label, llama_ppl, llama_quantize  # noqa: E402  (bench/export.py: the llama.cpp harness)

from weightwise.errors import WeightwiseError  # noqa: E402
from weightwise.evaluate import evaluate, token_windows  # noqa: E402
from weightwise.evaluate.config import EvalConfig  # noqa: E402
from weightwise.export import export  # noqa: E402
from weightwise.export.gguf import GGUFExportConfig  # noqa: E402
from weightwise.io.artifacts import environment_versions, write_json_atomic  # noqa: E402
from weightwise.io.defaults import default_gguf_path  # noqa: E402
from weightwise.io.models import load_model  # noqa: E402
from weightwise.quantize import quantization_record, quantize  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CANDIDATES = [{"format": "mxfp4"}, {"format": "iq4_nl", "group_size": 32}, {"format": "int4", "group_size": 32},
              {"format": "int5", "group_size": 32}, {"format": "int8", "group_size": 32}]
K_QUANTS = {"Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M, "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K}
EMBEDDINGS = {"Q3_K_M": "q8_0", "Q2_K": "q5_0"}  # GGUF type of the (tied) token embeddings in weightwise's file
ALIGNMENT_MARGIN = 1 << 16  # bytes kept free for GGUF's per-tensor alignment padding


def write_gguf(model, tokenizer, path: Path, **options) -> dict:
    export(model, tokenizer, "gguf", path, gguf=GGUFExportConfig(**options), tokenizer_gguf=default_gguf_path(), overwrite=True)
    return gguf_layout(path)


def save(out: Path, settings: dict, rows: list[dict]) -> None:
    """Write the rows measured now over the file's earlier rows of the same name (a run with --only keeps the others)."""
    kept = {row["name"]: row for row in (json.loads(out.read_text())["rows"] if out.is_file() else [])}
    kept.update({row["name"]: row for row in rows})
    write_json_atomic(out, {"settings": settings, "versions": environment_versions(), "rows": list(kept.values())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-gguf-plan"))
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences of 512 tokens")
    parser.add_argument("--reuse", action="store_true", help="measure weightwise plan files a killed run already wrote "
                        "instead of quantizing again")
    parser.add_argument("--only", nargs="+", choices=list(K_QUANTS), default=list(K_QUANTS), help="llama.cpp files to match")
    args = parser.parse_args()
    torch.set_num_threads(2)
    max_tokens, calib = (1024, {"samples": 16, "seq_len": 256}) if args.quick else (8192, {"samples": args.samples, "seq_len": 512})
    args.runs.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model("default")
    text = EvalConfig(max_tokens=max_tokens).load_text()
    windows = token_windows(tokenizer, text, window=512, max_tokens=max_tokens)

    f32 = args.runs / "f32.gguf"
    write_gguf(model, tokenizer, f32, type="f32", embeddings="f32")
    source = llama_ppl(f32, windows)
    rows = [{"name": "F32 export", "where": "llama.cpp", **gguf_layout(f32), "ppl": source["ppl"]}]
    n_linear = sum(m.weight.numel() for name, m in model.named_modules()
                   if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear))

    def fixed_bytes(embeddings: str) -> float:
        """Bytes of everything but the linear layers (embeddings, norms, tokenizer, metadata) in a file."""
        fixed = write_gguf(model, tokenizer, args.runs / f"{embeddings}-embd.gguf", type="q8_0", embeddings=embeddings)
        return fixed["file_bytes"] - fixed["linear_bpw"] * n_linear / 8
    out = RESULTS / ("gguf-plan-quick.json" if args.quick else "gguf-plan.json")
    settings = {"max_tokens": max_tokens, "calibration": calib, "candidates": CANDIDATES, "windows": int(windows.shape[0])}
    for name in args.only:
        ftype = K_QUANTS[name]
        theirs = args.runs / f"llama-{name}.gguf"
        seconds = llama_quantize(f32, theirs, ftype, pure=False, embeddings=None)
        layout = gguf_layout(theirs)
        rows.append({"name": f"llama.cpp {name}", "where": "llama.cpp", **layout, "ppl": llama_ppl(theirs, windows)["ppl"],
                     "quantize_seconds": seconds})
        embeddings = EMBEDDINGS[name]
        target_bpw = (layout["file_bytes"] - fixed_bytes(embeddings) - ALIGNMENT_MARGIN) * 8 / n_linear
        recipe = {"method": {"name": "gptq", "clip_search": True, "refit_scales": True},
                  "target_bpw": target_bpw, "plan_storage": "gguf", "candidates": CANDIDATES, "calibration": calib}
        ours = args.runs / f"weightwise-plan-{name}.gguf"
        row = {"name": f"weightwise plan ≤ {name} size", "where": "llama.cpp", "target_bpw": target_bpw, "embeddings": embeddings}
        if args.reuse and ours.is_file():  # a file a killed run already wrote: measure it again in llama.cpp
            our_layout = gguf_layout(ours)
            row.update({**our_layout, "ppl": llama_ppl(ours, windows)["ppl"], "reused_file": True,
                        "formats": layout_label(our_layout)})
        else:
            started = time.perf_counter()
            try:
                qmodel = quantize(model, recipe, tokenizer=tokenizer)
            except WeightwiseError as err:  # e.g. a budget below the smallest exact type: recorded, not hidden
                rows.append({**row, "infeasible": str(err)})
                save(out, settings, rows)
                continue
            quantize_seconds = time.perf_counter() - started
            our_layout = write_gguf(qmodel, tokenizer, ours, embeddings=embeddings)
            row.update({**our_layout, "ppl": llama_ppl(ours, windows)["ppl"], "quantize_seconds": quantize_seconds,
                        "weightwise_ppl": evaluate(qmodel, tokenizer, text=text, max_tokens=max_tokens, measure_speed=False).ppl,
                        "formats": quantization_record(qmodel).format_label})
            del qmodel
        row["fits"] = row["file_bytes"] <= layout["file_bytes"]
        row["beats"] = row["ppl"] < rows[-1]["ppl"]
        rows.append(row)
        save(out, settings, rows)
    print(f"SmolLM2-135M-Instruct, perplexity in llama.cpp on {windows.shape[0]} × 512 eval tokens (source F32 export: "
          f"{source['ppl']:.3f})\n")
    print("| file | MB | linear b/w | linear types | ppl (llama.cpp) | ppl (weightwise) | fits / beats |\n|---|---:|---:|---|---:|---:|---|")
    for row in rows:
        if "infeasible" in row:
            print(f"| {row['name']} | – | {row['target_bpw']:.3f} | infeasible: {row['infeasible']} | – | – | – |")
            continue
        types = ", ".join(f"{n} {t}" for t, n in sorted(row["linear_types"].items(), key=lambda kv: -kv[1]))
        verdict = "" if row.get("fits") is None else f"{'fits' if row['fits'] else 'TOO BIG'} / {'beats' if row['beats'] else 'does not beat'}"
        ww = f"{row['weightwise_ppl']:.3f}" if "weightwise_ppl" in row else ""
        print(f"| {row['name']} | {row['file_bytes'] / 1e6:.2f} | {row['linear_bpw']:.3f} | {types} | {row['ppl']:.3f} | {ww} | {verdict} |")


if __name__ == "__main__":
    main()
