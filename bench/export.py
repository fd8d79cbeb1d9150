"""Benchmark: GGUF export of the default SmolLM2, with perplexity measured inside llama.cpp.

What it measures, on the default model (SmolLM2-135M-Instruct, its Q4_1 GGUF dequantized to fp32) and the
first 16 windows of 512 tokens of the pydoc eval split (``--quick``: 2 windows):

1. parity: each RTN recipe with an exact GGUF type (int4 g32 → Q4_0, int4_asym g32 → Q4_1, int5 g32 → Q5_0,
   int8 per channel → Q8_0, iq4_nl g32 → IQ4_NL, mxfp4 → MXFP4) and the float model (→ F32) is exported with
   ``weightwise.export``; weightwise's own perplexity of the model vs llama.cpp's perplexity of the file
   (same token ids, same windows, same scoring: NLL of every position of a window but the first, log-softmax in
   float64 over ``Llama.scores``), the relative gap, the file size and bits per weight. Quantized exports store
   the token embeddings as q8_0, the source GGUF's own type (so token_embd is reproduced exactly); the F32
   export stores everything in f32. The source GGUF itself is scored in llama.cpp too.
2. tokenization: llama.cpp's tokenization of the eval text vs the Hugging Face tokenizer's ids.
3. calibrated files of the same type: weightwise GPTQ (clip search, 3 least-squares scale rounds) exported to
   Q4_0 / Q5_0 / IQ4_NL / MXFP4 vs llama.cpp's own quantizer (``llama_model_quantize``, no imatrix) on the F32
   export. The like-for-like llama.cpp file is quantized with ``pure`` (every linear layer in the type) and
   token_embd q8_0, the same layout as weightwise's file; llama.cpp's default mix is also quantized and scored
   (its tensor types are listed: for IQ4_NL it keeps a few tensors in other types, and its MXFP4 ftype,
   MXFP4_MOE, only puts MoE experts in MXFP4, so on this dense model it writes Q8_0). ΔPPL is against the F32
   export in llama.cpp; the target is weightwise ΔPPL ≤ 0.5 × llama.cpp ΔPPL.
4. speed (2 threads): llama.cpp prompt and greedy generation tokens/s of the Q4_0, Q8_0 and F32 RTN exports
   beside transformers' fp32 forward and greedy generation speed in the same run (prompt = first 256 eval
   tokens, 64 generated tokens, median of 3 after a warm-up), and how many greedy tokens llama.cpp F32 and
   transformers agree on.

    .venv/bin/python bench/export.py                          # everything (~40 min on 2 cores)
    .venv/bin/python bench/export.py --only int4-g32 speed    # some rows, merged into the existing results
    .venv/bin/python bench/export.py --calib-samples 32       # GPTQ rows with 32×512 calibration
    .venv/bin/python bench/export.py --quick                  # CI-sized: 2 windows, few rows, 16×512 calibration
    .venv/bin/python bench/export.py --report                 # the Markdown of the results measured so far

Rows: ``NAMES`` below. Results: bench/results/export.json and export.md (``--quick``: export-quick.*).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import difflib
import gc
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import llama_cpp
from gguf import GGUFReader

from weightwise.errors import WeightwiseError
from weightwise.evaluate import evaluate, token_windows
from weightwise.evaluate.config import EvalConfig
from weightwise.export import export
from weightwise.export.gguf import GGUFExportConfig
from weightwise.io.artifacts import environment_versions, write_json_atomic
from weightwise.io.defaults import default_gguf_path
from weightwise.io.models import load_model
from weightwise.quantize.api import quantize
from weightwise.quantize.recipe import QuantRecipe

THREADS = 2
WINDOW = 512
MAX_TOKENS = 8192
QUICK_MAX_TOKENS = 1024
GAP_TARGET = 0.01  # parity: |llama.cpp ppl / weightwise ppl - 1| ≤ 1 %
RATIO_TARGET = 0.5  # calibrated: weightwise ΔPPL ≤ 0.5 × llama.cpp ΔPPL

# parity rows: name → (RTN recipe or None for the float model, GGUF type)
PARITY: dict[str, tuple[dict | None, str]] = {
    "int4-g32": ({"format": "int4", "group_size": 32}, "q4_0"),
    "int4_asym-g32": ({"format": "int4_asym", "group_size": 32}, "q4_1"),
    "int5-g32": ({"format": "int5", "group_size": 32}, "q5_0"),
    "int8-channel": ({"format": "int8", "granularity": "channel"}, "q8_0"),
    "iq4_nl-g32": ({"format": "iq4_nl", "group_size": 32}, "iq4_nl"),
    "mxfp4": ({"format": "mxfp4"}, "mxfp4"),
    "f32": (None, "f32"),
}
GPTQ = {"name": "gptq", "clip_search": True, "refit_scales": True, "refit_rounds": 3}
# calibrated rows: name → (weightwise format, group size, GGUF type, llama.cpp ftype)
CALIBRATED: dict[str, tuple[str, int | None, str, int]] = {
    "gptq-q4_0": ("int4", 32, "q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
    "gptq-q5_0": ("int5", 32, "q5_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0),
    "gptq-iq4_nl": ("iq4_nl", 32, "iq4_nl", llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL),
    "gptq-mxfp4": ("mxfp4", None, "mxfp4", llama_cpp.LLAMA_FTYPE_MOSTLY_MXFP4_MOE),
}
GGML_TYPES = {"q4_0": llama_cpp.GGML_TYPE_Q4_0, "q5_0": llama_cpp.GGML_TYPE_Q5_0, "iq4_nl": llama_cpp.GGML_TYPE_IQ4_NL,
              "mxfp4": llama_cpp.GGML_TYPE_MXFP4, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
SPEED_FILES = ("int4-g32", "int8-channel", "f32")  # Q4_0, Q8_0, F32
NAMES = [*PARITY, "source-gguf", "tokenization", *CALIBRATED, "speed"]
QUICK = ["int4-g32", "int4_asym-g32", "f32", "source-gguf", "tokenization", "gptq-q4_0", "speed"]

# --------------------------------------------------------------------------- helpers

def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_stderr():
    """Silence the C library's stderr (llama.cpp's quantizer logs every tensor)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def open_llama(path: Path, logits_all: bool) -> llama_cpp.Llama:
    with quiet_stderr():
        return llama_cpp.Llama(str(path), logits_all=logits_all, n_ctx=WINDOW, n_batch=WINDOW, n_threads=THREADS,
                               n_threads_batch=THREADS, verbose=False)


def close_llama(llm: llama_cpp.Llama) -> None:
    with contextlib.suppress(Exception):
        llm.close()
    del llm
    gc.collect()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_layout(path: Path) -> dict:
    """File bytes, tensor type counts (2-D tensors), bits per weight of the linear layers and of all tensors."""
    reader = GGUFReader(path)
    linear_bits = linear_params = all_params = 0
    types: Counter = Counter()
    embedding_type = None
    for t in reader.tensors:
        n = int(np.prod([int(d) for d in t.shape]))
        all_params += n
        if t.name == "token_embd.weight":
            embedding_type = t.tensor_type.name
        elif t.name.startswith("blk.") and len(t.shape) == 2:
            types[t.tensor_type.name] += 1
            linear_bits += int(t.n_bytes) * 8
            linear_params += n
    size = path.stat().st_size
    return {"file_bytes": size, "linear_types": dict(types), "token_embd_type": embedding_type,
            "linear_bpw": linear_bits / linear_params, "file_bits_per_param": size * 8 / all_params}


def layout_label(layout: dict) -> str:
    linear = ", ".join(f"{n} {t}" for t, n in sorted(layout["linear_types"].items(), key=lambda kv: -kv[1]))
    return f"{linear}; token_embd {layout['token_embd_type']}"


# --------------------------------------------------------------------------- measurements

def llama_ppl(path: Path, windows: torch.Tensor) -> dict:
    """llama.cpp's perplexity of the file on ``windows``: each window evaluated from an empty cache, every
    position but the first scored from ``Llama.scores`` with a float64 log-softmax."""
    started = time.perf_counter()
    llm = open_llama(path, logits_all=True)
    total, scored = 0.0, 0
    try:
        for ids in windows.tolist():
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
            peak = logits.max(axis=1, keepdims=True)
            log_z = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
            targets = np.asarray(ids[1:])
            total += float((log_z - logits[np.arange(len(targets)), targets]).sum())
            scored += len(targets)
    finally:
        close_llama(llm)
    mean_nll = total / scored
    return {"ppl": float(np.exp(mean_nll)), "mean_nll": mean_nll, "n_tokens_scored": scored,
            "seconds": time.perf_counter() - started}


def weightwise_ppl(model, tokenizer, text: str, max_tokens: int) -> float:
    return evaluate(model, tokenizer, text=text, max_tokens=max_tokens, window=WINDOW, measure_speed=False).ppl


def export_gguf(model, tokenizer, path: Path, gguf_type: str, embeddings: str) -> dict:
    """weightwise's GGUF export; what it reports about exactness (tensors exported exactly, token_embd error)."""
    started = time.perf_counter()
    report = export(model, tokenizer, "gguf", path, gguf=GGUFExportConfig(type=gguf_type, embeddings=embeddings),
                    tokenizer_gguf=default_gguf_path(), overwrite=True)
    path.with_name(path.name + ".json").unlink(missing_ok=True)
    embd = next(t for t in report["tensors"] if t["gguf_name"] == "token_embd.weight")
    return {"exact_tensors": sum(t["how"] == "exact" for t in report["tensors"]), "tensors": len(report["tensors"]),
            "fallback_layers": len(report["fallback_layers"]), "token_embd_max_abs_diff": embd["max_abs_diff"],
            "export_seconds": time.perf_counter() - started}


def llama_quantize(src: Path, dst: Path, ftype: int, pure: bool, embeddings: str | None) -> float:
    """llama.cpp's own quantizer (no imatrix); ``pure``: every tensor in the ftype's type; returns seconds."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = THREADS
    params.pure = pure
    if embeddings is not None:
        params.token_embedding_type = GGML_TYPES[embeddings]
    started = time.perf_counter()
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc} for {dst.name}")
    return time.perf_counter() - started


def gptq_recipe(fmt: str, group: int | None, samples: int) -> tuple[QuantRecipe, list[str]]:
    """The calibrated recipe; options the recipe refuses for this format are dropped and named."""
    method, dropped = dict(GPTQ), []
    while True:
        fields = {"format": fmt, "method": method, "calibration": {"samples": samples, "seq_len": WINDOW}}
        if group is not None:
            fields["group_size"] = group
        try:
            return QuantRecipe(**fields), dropped
        except (ValueError, WeightwiseError) as err:
            option = next((o for o in ("clip_search", "refit_scales") if o in method and o in str(err)), None)
            if option is None:
                raise
            dropped.append(f"{option} ({str(err).splitlines()[-1].strip()})")
            method.pop(option)
            if option == "refit_scales":
                method.pop("refit_rounds", None)


def gptq_progress(done: int, total: int, name: str) -> None:
    if done % 35 == 0 or done == total:
        say(f"  GPTQ {done}/{total} layers")


def gptq_quantize(model, tokenizer, fmt: str, group: int | None, samples: int):
    """GPTQ-quantized model, its recipe, dropped options; an option refused while quantizing is dropped too."""
    recipe, dropped = gptq_recipe(fmt, group, samples)
    while True:
        started = time.perf_counter()
        try:
            qmodel = quantize(model, recipe, tokenizer=tokenizer, progress=gptq_progress)
            return qmodel, recipe, dropped, time.perf_counter() - started
        except WeightwiseError as err:
            method = recipe.method.model_dump()
            option = next((o for o in ("clip_search", "refit_scales") if method.get(o) and o in str(err)), None)
            if option is None:
                raise
            dropped.append(f"{option} ({err})")
            fields = recipe.model_dump()
            fields["method"] = {k: v for k, v in method.items() if k != option and not (option == "refit_scales" and k == "refit_rounds")}
            recipe = QuantRecipe(**fields)


# --------------------------------------------------------------------------- rows

def parity_row(ctx: dict, name: str) -> dict:
    recipe, gguf_type = PARITY[name]
    say(f"{name}: quantize, weightwise ppl, export {gguf_type}, llama.cpp ppl")
    model = ctx["model"] if recipe is None else quantize(ctx["model"], recipe)
    ww = weightwise_ppl(model, ctx["tokenizer"], ctx["text"], ctx["max_tokens"])
    path = ctx["workdir"] / f"{name}.gguf"
    embeddings = "f32" if recipe is None else "q8_0"
    exported = export_gguf(model, ctx["tokenizer"], path, gguf_type, embeddings)
    if recipe is not None:
        del model
    lc = llama_ppl(path, ctx["windows"])
    row = {"name": name, "recipe": recipe, "gguf_type": gguf_type.upper(), "embeddings": embeddings,
           "weightwise_ppl": ww, "llama_ppl": lc["ppl"], "llama_mean_nll": lc["mean_nll"],
           "n_tokens_scored": lc["n_tokens_scored"], "gap": lc["ppl"] / ww - 1, **exported, **gguf_layout(path),
           "llama_eval_seconds": lc["seconds"]}
    if gguf_type == "q4_1":
        row["tensors_identical_to_source"] = identical_tensors(path, default_gguf_path())
    ctx["files"][name] = path
    say(f"{name}: weightwise {ww:.4f}, llama.cpp {lc['ppl']:.4f} ({row['gap']:+.3%})")
    return row


def identical_tensors(path: Path, source: Path) -> dict:
    """How many of the source GGUF's tensors the export holds byte for byte (same name, type and data)."""
    ours = {t.name: t for t in GGUFReader(path).tensors}
    same = 0
    theirs = GGUFReader(source).tensors
    for t in theirs:
        mine = ours.get(t.name)
        same += mine is not None and mine.tensor_type == t.tensor_type and np.array_equal(
            np.asarray(mine.data).view(np.uint8), np.asarray(t.data).view(np.uint8))
    return {"identical": same, "source_tensors": len(theirs), "exported_tensors": len(ours)}


def source_row(ctx: dict) -> dict:
    say("source GGUF: llama.cpp ppl")
    path = Path(default_gguf_path())
    lc = llama_ppl(path, ctx["windows"])
    return {"name": "source-gguf", "path": path.name, "llama_ppl": lc["ppl"], "llama_mean_nll": lc["mean_nll"],
            "n_tokens_scored": lc["n_tokens_scored"], **gguf_layout(path)}


def tokenization_row(ctx: dict) -> dict:
    """llama.cpp's tokenization of the whole eval text vs the Hugging Face ids: positions that differ when
    aligned by index, and (aligned with difflib) the spans that differ, how many of them hold only whitespace and
    digits on both sides, and whether the scored windows' tokens are equal."""
    say("tokenization: llama.cpp vs Hugging Face")
    tokenizer = ctx["tokenizer"]
    hf = tokenizer(ctx["text"], add_special_tokens=False)["input_ids"]
    path = ctx["files"].get("f32") or ctx["files"].get("int4-g32") or Path(default_gguf_path())
    with quiet_stderr():
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        lc = llm.tokenize(ctx["text"].encode(), add_bos=False, special=False)
        pre = llm.metadata.get("tokenizer.ggml.pre")
    finally:
        close_llama(llm)
    spans = [op for op in difflib.SequenceMatcher(None, hf, lc, autojunk=False).get_opcodes() if op[0] != "equal"]
    texts = [(tokenizer.decode(hf[i1:i2]), tokenizer.decode(lc[j1:j2])) for _, i1, i2, j1, j2 in spans]
    first = next((i for i, (a, b) in enumerate(zip(hf, lc)) if a != b), None)
    scored = ctx["windows"].numel()
    examples = [{"hf": tokenizer.convert_ids_to_tokens(hf[i1:i2]), "llama": tokenizer.convert_ids_to_tokens(lc[j1:j2])}
                for _, i1, i2, j1, j2 in spans[:3]]
    return {"name": "tokenization", "file": path.name, "hf_tokens": len(hf), "llama_tokens": len(lc),
            "length_difference": len(lc) - len(hf), "mismatching_positions": sum(a != b for a, b in zip(hf, lc)),
            "compared": min(len(hf), len(lc)), "first_mismatch": first, "differing_spans": len(spans),
            "hf_tokens_in_spans": sum(i2 - i1 for _, i1, i2, _, _ in spans),
            "llama_tokens_in_spans": sum(j2 - j1 for _, _, _, j1, j2 in spans),
            "spans_whitespace_and_digits": sum(not (a + b).strip(" \n0123456789") for a, b in texts),
            "llama_pre_tokenizer": pre,
            "examples": examples, "eval_tokens": scored, "eval_tokens_equal": hf[:scored] == lc[:scored],
            "text_chars": len(ctx["text"])}


def f32_source(ctx: dict) -> tuple[Path, float]:
    """The F32 export (the llama.cpp quantizer's input) and its llama.cpp ppl, measured once per run."""
    if "f32" not in ctx["rows"]:
        ctx["rows"]["f32"] = parity_row(ctx, "f32")
    if "f32" not in ctx["files"]:  # ppl from an earlier run, file not kept: export it again
        export_gguf(ctx["model"], ctx["tokenizer"], ctx["workdir"] / "f32.gguf", "f32", "f32")
        ctx["files"]["f32"] = ctx["workdir"] / "f32.gguf"
    return ctx["files"]["f32"], ctx["rows"]["f32"]["llama_ppl"]


def llama_quantizer_files(ctx: dict, name: str, src: Path) -> dict:
    """llama.cpp's like-for-like file (pure, token_embd q8_0) and its default mix, each scored."""
    _, _, gguf_type, ftype = CALIBRATED[name]
    out = {}
    hashes = {}
    for label, pure, embeddings in (("pure", True, "q8_0"), ("default", False, None)):
        path = ctx["workdir"] / f"llama-{gguf_type}-{label}.gguf"
        seconds = llama_quantize(src, path, ftype, pure, embeddings)
        hashes[label] = file_sha256(path)
        if label == "default" and hashes["default"] == hashes["pure"]:
            out[label] = {**out["pure"], "same_file_as_pure": True, "quantize_seconds": seconds}
        else:
            lc = llama_ppl(path, ctx["windows"])
            out[label] = {"ppl": lc["ppl"], "mean_nll": lc["mean_nll"], "quantize_seconds": seconds,
                          "same_file_as_pure": label == "pure", **gguf_layout(path)}
        path.unlink()
        say(f"{name}: llama.cpp {label}: {layout_label(out[label])}, ppl {out[label]['ppl']:.4f}")
    out["pure"].pop("same_file_as_pure")
    return out


def calibrated_row(ctx: dict, name: str) -> dict:
    fmt, group, gguf_type, _ = CALIBRATED[name]
    src, source_ppl = f32_source(ctx)
    say(f"{name}: llama.cpp quantizer on the F32 export")
    llama = llama_quantizer_files(ctx, name, src)
    say(f"{name}: weightwise GPTQ {fmt} ({ctx['calib_samples']}×{WINDOW} calibration)")
    qmodel, recipe, dropped, seconds = gptq_quantize(ctx["model"], ctx["tokenizer"], fmt, group, ctx["calib_samples"])
    ww_own = weightwise_ppl(qmodel, ctx["tokenizer"], ctx["text"], ctx["max_tokens"])
    path = ctx["workdir"] / f"{name}.gguf"
    exported = export_gguf(qmodel, ctx["tokenizer"], path, gguf_type, "q8_0")
    del qmodel
    lc = llama_ppl(path, ctx["windows"])
    ours = {"ppl": lc["ppl"], "mean_nll": lc["mean_nll"], "weightwise_ppl": ww_own, "gap": lc["ppl"] / ww_own - 1,
            "quantize_seconds": seconds, **exported, **gguf_layout(path)}
    path.unlink()
    d_ours, d_llama = ours["ppl"] - source_ppl, llama["pure"]["ppl"] - source_ppl
    row = {"name": name, "gguf_type": gguf_type.upper(), "recipe": recipe.model_dump(mode="json"),
           "dropped_options": dropped, "calibration": f"{ctx['calib_samples']}x{WINDOW}", "source_ppl": source_ppl,
           "weightwise": ours, "llama": llama, "delta_weightwise": d_ours, "delta_llama": d_llama,
           "ratio": d_ours / d_llama if d_llama else None}
    say(f"{name}: source {source_ppl:.4f}, llama.cpp {llama['pure']['ppl']:.4f}, weightwise {ours['ppl']:.4f}, "
        f"ratio {row['ratio']:.3f}")
    return row


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """Logits of the last evaluated token (without logits_all, llama-cpp-python keeps no scores)."""
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_speed(path: Path, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Prompt tokens/s (one eval of the prompt) and greedy generation tokens/s (one token per eval), median of
    ``repeats`` after a warm-up; the greedy tokens of the last repeat."""
    llm = open_llama(path, logits_all=False)
    prompts, gens, generated = [], [], []
    try:
        for attempt in range(repeats + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            generated = []
            for _ in range(new_tokens):
                token = int(np.argmax(last_logits(llm)))
                generated.append(token)
                llm.eval([token])
            t2 = time.perf_counter()
            if attempt:
                prompts.append(len(prompt) / (t1 - t0))
                gens.append(new_tokens / (t2 - t1))
    finally:
        close_llama(llm)
    return {"prompt_tps": statistics.median(prompts), "gen_tps": statistics.median(gens), "generated": generated}


@torch.inference_mode()
def hf_speed(model, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """transformers fp32: forward tokens/s over the prompt, and greedy generation with the KV cache, one token
    per forward call (same loop as llama.cpp's), median of ``repeats`` after a warm-up."""
    model.eval()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' past_key_values rename
    ids = torch.tensor([prompt])
    prompts, gens, generated = [], [], []
    for attempt in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        past, generated = out.past_key_values, []
        token = int(out.logits[0, -1].argmax())
        for step in range(new_tokens):
            generated.append(token)
            if step == new_tokens - 1:
                break
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        t2 = time.perf_counter()
        if attempt:
            prompts.append(len(prompt) / (t1 - t0))
            gens.append((new_tokens - 1) / (t2 - t1))
    return {"prompt_tps": statistics.median(prompts), "gen_tps": statistics.median(gens), "generated": generated}


def speed_row(ctx: dict) -> dict:
    prompt = ctx["windows"][0, : ctx["prompt_tokens"]].tolist()
    new, repeats = ctx["new_tokens"], ctx["repeats"]
    load_before = os.getloadavg()[0]
    entries = []
    say("speed: transformers fp32")
    hf = hf_speed(ctx["model"], prompt, new, repeats)
    entries.append({"runtime": "transformers", "model": "fp32", **hf})
    for name in SPEED_FILES:
        if name not in ctx["files"]:
            recipe, gguf_type = PARITY[name]
            path = ctx["workdir"] / f"{name}.gguf"
            model = ctx["model"] if recipe is None else quantize(ctx["model"], recipe)
            export_gguf(model, ctx["tokenizer"], path, gguf_type, "f32" if recipe is None else "q8_0")
            del model
            ctx["files"][name] = path
        say(f"speed: llama.cpp {PARITY[name][1].upper()}")
        entries.append({"runtime": "llama.cpp", "model": PARITY[name][1].upper(), "file_bytes": ctx["files"][name].stat().st_size,
                        **llama_speed(ctx["files"][name], prompt, new, repeats)})
    f32 = next(e for e in entries if e["model"] == "F32")
    agree = next((i for i, (a, b) in enumerate(zip(hf["generated"], f32["generated"])) if a != b), new)
    for e in entries:
        e["generated"] = len(e.pop("generated"))
    return {"name": "speed", "threads": THREADS, "prompt_tokens": len(prompt), "new_tokens": new, "repeats": repeats,
            "greedy_tokens_equal_hf_vs_llama_f32": agree, "entries": entries,
            "torch_threads": torch.get_num_threads(), "load_average_1min_before": load_before}


# --------------------------------------------------------------------------- report

def fmt_gap(gap: float) -> str:
    return f"{gap:+.3%}"


def markdown(results: dict) -> str:
    rows, s = results["rows"], results["settings"]
    out = [f"SmolLM2-135M-Instruct (Q4_1 GGUF source, dequantized to fp32), pydoc eval split, {s['n_windows']} windows × "
           f"{WINDOW} = {s['n_tokens_scored']} scored tokens; llama-cpp-python {results['versions'].get('llama_cpp_python') or s['llama_cpp_version']}, "
           f"{THREADS} threads. Perplexity in llama.cpp: Llama(logits_all, n_ctx=512, n_batch=512), each window "
           "from an empty cache, same token ids and scoring as weightwise (every position but the first).", ""]
    parity = [rows[n] for n in PARITY if n in rows]
    if parity:
        out += ["### Parity: weightwise's ppl of the model vs llama.cpp's ppl of the exported file", "",
                "Quantized exports store token_embd as q8_0 (the source GGUF's own type; the column gives the exporter's "
                "max |difference| from weightwise's fp32 embedding); the F32 export stores everything in f32. "
                "'packed exactly': tensors written from weightwise's codes and scales, read back with gguf-py and equal to "
                "the quantized layer (the exporter refuses a file otherwise); bpw linear: bits of the blk.* matrices per "
                "weight; bits/param file: file bits per parameter of all tensors; gap: llama.cpp ppl / weightwise ppl − 1.", "",
                "| recipe (RTN) | GGUF | file bytes | bpw linear | bits/param file | packed exactly | token_embd Δmax | "
                "weightwise ppl | llama.cpp ppl | gap | within 1 % |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in parity:
            out.append(f"| {r['name']} | {r['gguf_type']} (embd {r['token_embd_type']}) | {r['file_bytes']:,} | {r['linear_bpw']:.3f} | "
                       f"{r['file_bits_per_param']:.3f} | {r['exact_tensors']}/{r['tensors']} | {r['token_embd_max_abs_diff']:.2g} | "
                       f"{r['weightwise_ppl']:.4f} | {r['llama_ppl']:.4f} | {fmt_gap(r['gap'])} | "
                       f"{'yes' if abs(r['gap']) <= GAP_TARGET else 'NO'} |")
        if "source-gguf" in rows:
            r = rows["source-gguf"]
            out.append(f"| source GGUF as downloaded | {layout_label(r)} | {r['file_bytes']:,} | {r['linear_bpw']:.3f} | "
                       f"{r['file_bits_per_param']:.3f} | – | – | – | {r['llama_ppl']:.4f} | – | – |")
        asym = rows.get("int4_asym-g32", {}).get("tensors_identical_to_source")
        if asym:
            out += ["", f"int4_asym g32 → Q4_1 export: {asym['identical']} of the source GGUF's {asym['source_tensors']} tensors "
                    f"are byte-identical in the export (same name, type and bytes)."]
        out.append("")
    if "tokenization" in rows:
        r = rows["tokenization"]
        out += ["### Tokenization of the eval text", "",
                f"llama.cpp (`{r['file']}`, add_bos=False, special=False): {r['llama_tokens']:,} tokens; Hugging Face "
                f"(add_special_tokens=False): {r['hf_tokens']:,} tokens; length difference {r['length_difference']}; "
                f"mismatching positions (compared index by index) {r['mismatching_positions']:,} of {r['compared']:,}"
                + (f", first at token {r['first_mismatch']:,}" if r["first_mismatch"] is not None else "") + ". "
                f"Aligned with difflib: {r['differing_spans']} differing spans ({r['hf_tokens_in_spans']} HF tokens ↔ "
                f"{r['llama_tokens_in_spans']} llama.cpp tokens), {r['spans_whitespace_and_digits']} of them holding only spaces, "
                f"newlines and digits on both sides (llama.cpp pre-tokenizer '{r['llama_pre_tokenizer']}', from the source "
                f"GGUF's metadata). The {r['eval_tokens']:,} tokens of the scored windows are "
                f"{'identical' if r['eval_tokens_equal'] else 'NOT identical'} (and every perplexity above feeds the HF ids "
                "to both)." + (" Example: HF " + " ".join(r["examples"][0]["hf"]) + " vs llama.cpp "
                               + " ".join(r["examples"][0]["llama"]) + "." if r["examples"] else ""), ""]
    calibrated = [rows[n] for n in CALIBRATED if n in rows]
    if calibrated:
        out += ["### Calibrated weightwise files vs llama.cpp's quantizer, same GGUF type", "",
                "llama.cpp: `llama_model_quantize` on the F32 export, no imatrix, `pure` (every linear layer in the "
                "type) with token_embd q8_0 — the layout of weightwise's file. weightwise: GPTQ + clip search + 3 "
                "least-squares scale rounds, exported with token_embd q8_0. ΔPPL against the F32 export in llama.cpp; "
                f"target: weightwise Δ ≤ {RATIO_TARGET} × llama.cpp Δ.", "",
                "| GGUF | calibration | source ppl | llama.cpp bytes | llama.cpp ppl | llama.cpp Δ | weightwise bytes | "
                "weightwise ppl (llama.cpp) | weightwise ppl (own eval) | weightwise Δ | ratio | target met |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in calibrated:
            w, lp = r["weightwise"], r["llama"]["pure"]
            ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}"
            met = "–" if r["ratio"] is None else ("yes" if r["ratio"] <= RATIO_TARGET else "no")
            out.append(f"| {r['gguf_type']} | {r['calibration']} | {r['source_ppl']:.4f} | {lp['file_bytes']:,} | {lp['ppl']:.4f} | "
                       f"{r['delta_llama']:+.4f} | {w['file_bytes']:,} | {w['ppl']:.4f} | {w['weightwise_ppl']:.4f} | "
                       f"{r['delta_weightwise']:+.4f} | {ratio} | {met} |")
        out += ["", "Tensor types of each file, and llama.cpp's default mix (same ftype, not `pure`):", "",
                "| GGUF | weightwise file | llama.cpp pure | llama.cpp default mix | default bytes | default ppl |",
                "|---|---|---|---|---:|---:|"]
        for r in calibrated:
            d = r["llama"]["default"]
            same = " (same file as pure)" if d.get("same_file_as_pure") else ""
            out.append(f"| {r['gguf_type']} | {layout_label(r['weightwise'])} | {layout_label(r['llama']['pure'])} | "
                       f"{layout_label(d)}{same} | {d['file_bytes']:,} | {d['ppl']:.4f} |")
        notes = [f"{r['gguf_type']}: dropped {', '.join(r['dropped_options'])}" for r in calibrated if r["dropped_options"]]
        gaps = ", ".join(f"{r['gguf_type']} {fmt_gap(r['weightwise']['gap'])}" for r in calibrated)
        out += ["", f"Parity of the calibrated files (llama.cpp ppl / weightwise ppl − 1): {gaps}."]
        out += ["", "GPTQ options refused and dropped: " + ("; ".join(notes) if notes else "none") + "."]
        out.append("")
    if "speed" in rows:
        r = rows["speed"]
        base = next(e for e in r["entries"] if e["runtime"] == "transformers")
        out += [f"### Speed, {r['threads']} threads (prompt {r['prompt_tokens']} tokens, {r['new_tokens']} generated greedily, "
                f"median of {r['repeats']} after a warm-up)", "",
                f"The machine's 2 cores are shared with other jobs: 1-minute load average {r['load_average_1min_before']:.1f} "
                f"before and {r['load_average_1min_after']:.1f} after this row (2.0 = both cores busy). All rows of the "
                "table come from one pass; compare them with each other rather than with other runs.", "",
                "| runtime | weights | file bytes | prompt tok/s | generation tok/s | prompt vs transformers | generation vs transformers |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for e in r["entries"]:
            size = f"{e['file_bytes']:,}" if "file_bytes" in e else "–"
            out.append(f"| {e['runtime']} | {e['model']} | {size} | {e['prompt_tps']:.1f} | {e['gen_tps']:.1f} | "
                       f"{e['prompt_tps'] / base['prompt_tps']:.2f}× | {e['gen_tps'] / base['gen_tps']:.2f}× |")
        out += ["", f"Greedy tokens equal between transformers fp32 and llama.cpp F32 before the first difference: "
                f"{r['greedy_tokens_equal_hf_vs_llama_f32']} of {r['new_tokens']}.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def previous_results(path: Path, settings: dict) -> dict:
    """Rows of an earlier run with the same settings (merged with this run's rows by name)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same = {k: v for k, v in old.get("settings", {}).items() if k != "calib_samples"} == {
        k: v for k, v in settings.items() if k != "calib_samples"}
    return old.get("rows", {}) if same else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 windows, a few rows, 16×512 calibration")
    parser.add_argument("--only", nargs="+", choices=NAMES, metavar="NAME", help=f"rows to run: {', '.join(NAMES)}")
    parser.add_argument("--calib-samples", type=int, default=None, help="GPTQ calibration sequences of 512 tokens "
                        "(default 128; --quick 16)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/export.json; "
                        "--quick: export-quick.json); the Markdown goes beside it")
    parser.add_argument("--keep", type=Path, default=None, help="keep the GGUF files in this folder")
    parser.add_argument("--report", action="store_true", help="only print (and rewrite) the Markdown of the JSON results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    out = args.out or Path("bench/results/export-quick.json" if args.quick else "bench/results/export.json")
    if args.report:
        write_markdown(json.loads(out.read_text()), out)
        return
    names = args.only or (QUICK if args.quick else NAMES)
    max_tokens = QUICK_MAX_TOKENS if args.quick else MAX_TOKENS
    calib_samples = args.calib_samples or (16 if args.quick else 128)

    model, tokenizer = load_model("default")
    text = EvalConfig(max_tokens=max_tokens).load_text()
    windows = token_windows(tokenizer, text, window=WINDOW, max_tokens=max_tokens)
    settings = {"quick": args.quick, "max_tokens": max_tokens, "window": WINDOW, "n_windows": int(windows.shape[0]),
                "n_tokens_scored": int(windows.shape[0] * (WINDOW - 1)), "threads": THREADS,
                "calib_samples": calib_samples, "llama_cpp_version": llama_cpp.__version__,
                "source_gguf": Path(default_gguf_path()).name}
    rows = previous_results(out, settings)
    workdir_cm = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="ww-export-")
    with workdir_cm as workdir:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = {"model": model, "tokenizer": tokenizer, "text": text, "windows": windows, "max_tokens": max_tokens,
               "workdir": workdir, "files": {}, "rows": rows, "calib_samples": calib_samples,
               "prompt_tokens": 128 if args.quick else 256, "new_tokens": 16 if args.quick else 64,
               "repeats": 1 if args.quick else 3}
        for name in names:
            row_started = time.perf_counter()
            if name in PARITY:
                rows[name] = parity_row(ctx, name)
            elif name == "source-gguf":
                rows[name] = source_row(ctx)
            elif name == "tokenization":
                rows[name] = tokenization_row(ctx)
            elif name in CALIBRATED:
                rows[name] = calibrated_row(ctx, name)
            elif name == "speed":
                rows[name] = speed_row(ctx)
            rows[name]["row_seconds"] = time.perf_counter() - row_started
            rows[name]["load_average_1min_after"] = os.getloadavg()[0]  # the machine is shared: contention shows here
            results = {"settings": settings, "versions": {**environment_versions(), "llama_cpp_python": llama_cpp.__version__},
                       "rows": {n: rows[n] for n in NAMES if n in rows}}
            write_json_atomic(out, results)  # after every row: a long run keeps what it measured
    results["total_seconds_this_run"] = time.perf_counter() - started
    write_json_atomic(out, results)
    write_markdown(results, out)


def write_markdown(results: dict, out: Path) -> None:
    table = markdown(results)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
