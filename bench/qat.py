"""Benchmark: quantization-aware training (`weightwise tune --method qat`) against the PTQ rows at 2.5 and 3.25 bits/weight.

The protocol, on the default SmolLM2-135M-Instruct (``load_model("default")``):

- Training data: the pydoc *calib* split (the documents CPython's pydoc topics keep for calibration, disjoint from
  the eval split), joined as the evaluation protocol joins text, cut into non-overlapping ``--seq-len``-token windows
  and decoded back to text, one ``{"text": ...}`` record per window in ``WORK/data/<text>-<seq_len>.jsonl``. `tune`
  reads such records as plain language modelling (loss on every token, the tokenizer's special tokens plus an
  end-of-sequence token, truncated to ``--seq-len``). ``--text FILE`` (a .txt/.md/.jsonl of ``text`` fields) trains on
  another text instead. The calib split is about 83k tokens, so the default steps see it about seven times (the
  row records its epochs).
- Training: ``tune`` with ``method: qat`` (format, group size 64, ``init``), ``--steps`` optimizer steps of
  ``--batch-size`` windows, AdamW at ``--lr`` after ``--warmup`` linear warmup steps, gradient clipping 1.0,
  seed ``--seed``; no exact match, no retention evaluation inside `tune` (the saved run is measured instead).
  Checkpoints every ``--checkpoint-every`` steps: a killed row resumes from the tune run's own checkpoint.
- Evaluation: the saved artefact, ``WORK/<row>/tune/model`` (the quantized run `tune` writes), loaded back with
  ``load_model`` and scored by ``weightwise.evaluate`` on the same 16 × 512-token windows of the pydoc eval split
  as the PTQ tables (KL and top-1 against the float source on the same windows), on the CPU. The starting point is
  scored the same way (round-to-nearest: `quantize` in memory; PTQ: its saved run). Where `weightwise export --to
  gguf` stores the run's format exactly (int2_asym / int3_asym → Q4_1, int2 / int3 → Q4_0; blocks of 32, so g64
  fits) the run is exported (token embeddings f16) and, when llama-cpp-python is importable, its perplexity is
  measured inside llama.cpp on the same windows (bench/export.py's ``llama_ppl``).
- Rows (``--only``): ``int2-rtn``, ``int2-ptq`` (2.5 b/w: int2_asym g64 from round-to-nearest, and from the best
  PTQ run, bench/methods.py's ``gptq-int2_asym-g64-clip-ls4``: GPTQ + clip search + three least-squares rounds;
  target ppl ≤ 30.2, 2.0 × the source's 15.1, against PTQ's 56.5), ``int3-ptq``, ``int3-rtn`` (3.25 b/w: int3 g64
  from ``gptq-int3-g64-clip-ls4`` and from RTN; target ≤ 16.6 against PTQ with block tuning, 17.56), and
  ``int2-rtn-damp-freeze`` (oscillations: ``int2-rtn``, plain LSQ, is its other arm; the same tokens with the
  dampening loss ``--dampening`` and freezing past ``--freeze-threshold``): final oscillating fraction (the last
  step's, and the mean over the last 10 % of steps), frozen fraction, ppl; ``int2-rtn-lora`` (QAT-LoRA, ``method:
  qat-lora``: W0 frozen, a rank ``--lora-rank`` pair and the scales trained at ``--lora-lr``; ``int2-rtn`` is its QAT
  arm on the same tokens): ppl, trained parameters, optimizer state and peak memory of training; ``float-full`` (the
  control: a float full fine-tune, ``method: full``, on the same tokens, its tune run (base + patch) scored: how much
  of a QAT row's ppl is adaptation to the training text rather than recovery of the source). A PTQ start is
  quantized with weightwise's own ``quantize`` (the recipe of bench/methods.py) and cached in ``WORK/ptq/<recipe>/`` when absent; the PTQ
  reference figures are read from bench/results/methods-*.json (16 windows), "not measured" when absent.
- Each row records training tokens, steps, epochs, wall-clock, peak RSS of training (the worker's own process), the
  device, the loss curve's ends and oscillation metrics from ``metrics.jsonl``.

The defaults (300 steps × 4 × 512 tokens = 614k training tokens) are sized for at most 2 h per row on 2 CPU cores:
about 15 s a step on 2 uncontended cores (fake quantization and oscillation tracking cost about 4 s a step, the
wiring run's first step: 5.5 s for 256 tokens; the tokens about 10.5 s at bench/results/tune.json's 195 tok/s of full
fine-tuning), so about 75 min of training, plus a few minutes of evaluation and export, plus the PTQ start's
quantization once (int2 g64: about 15 min on 2 cores). Contended cores are slower (the wiring run's later steps took
13–128 s beside another benchmark). The script prints an estimate before each row (from the throughput of earlier
rows, or of bench/results/tune.json when there are none) and a measured one after a row's first 5 steps. The learning rate (5e-5) and the dampening weight (100: the loss is a mean over ~10^8 weights,
so this puts its per-weight gradient at a fraction of the task loss's) were chosen, not tuned here.

    .venv/bin/python bench/qat.py                                   # every row (≤ 2 h each on 2 cores; resumable)
    .venv/bin/python bench/qat.py --only int2-ptq int3-ptq          # some rows
    .venv/bin/python bench/qat.py --only int2-rtn --steps 200 --lr 1e-4 --out bench/results/qat-lr1e-4.json
    .venv/bin/python bench/qat.py --quick                           # the wiring: 4 rows, 3 steps of 2 × 128 tokens
    .venv/bin/python bench/qat.py --report                          # the Markdown of the rows measured so far
    python bench/qat.py --device cuda                               # train (and quantize the PTQ starts) on a GPU

``--quick`` runs the rows int2-ptq, int2-rtn-damp-freeze, int3-rtn and int2-rtn-lora (one of each path), trains 3
steps of 2 × 128-token windows (a checkpoint at step 2), scores 2 eval windows and, instead of the GPTQ runs (minutes each),
starts the PTQ row from a round-to-nearest run saved by the same ``quantize`` path: it checks the wiring only. Results: bench/results/qat.json and qat.md beside it (``--quick``: qat-quick.*), rewritten
after every row; a rerun skips rows measured with the same settings unless ``--remeasure ROW`` names them. Every row (and every PTQ quantization) runs in
its own process, so its peak RSS is its own. Work files: runs/bench-qat[-quick]/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from methods import RECIPES as PTQ_RECIPES  # noqa: E402  (bench/methods.py: the PTQ recipes of the tables)

from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
THREADS = 2
GROUP_SIZE = 64
EVAL_TOKENS, QUICK_EVAL_TOKENS, WINDOW = 8192, 1024, 512  # 16 (quick: 2) eval windows of 512 tokens
ROWS: dict[str, dict] = {
    "int2-rtn": {"format": "int2_asym", "init": "rtn"},
    "int2-ptq": {"format": "int2_asym", "init": "gptq-int2_asym-g64-clip-ls4"},
    "int2-rtn-damp-freeze": {"format": "int2_asym", "init": "rtn", "damp_freeze": True},
    "int3-ptq": {"format": "int3", "init": "gptq-int3-g64-clip-ls4"},
    "int3-rtn": {"format": "int3", "init": "rtn"},
    "int2-rtn-lora": {"format": "int2_asym", "init": "rtn", "method": "qat-lora"},
    "ternary-rtn": {"format": "ternary", "init": "rtn"},
    "float-full": {"format": None, "init": "source", "method": "full"},  # the control: a float fine-tune, same tokens
}
# The targets (2.0 × and 1.1 × the source's ppl 15.1; ternary's stretch 10 ×) and where the PTQ figures they are set against live:
# (recipe in bench/methods.py, results file). The first is the figure the target beats; the second, when given, is
# the CPU measurement of the very recipe QAT starts from.
TARGETS = {"int2_asym": 30.2, "int3": 16.6, "ternary": 151.0}
PTQ_REFERENCES = {
    "int2_asym": [("gptq-int2_asym-g64-clip-ls4", "methods-s4.json")],
    "int3": [("gptq-int3-g64-clip-ls4-bt", "methods-gpu.json"), ("gptq-int3-g64-clip-ls4", "methods-s3.json")],
}
GGUF_EXACT = {"int2_asym": "Q4_1", "int3_asym": "Q4_1", "int2": "Q4_0", "int3": "Q4_0", "ternary": "Q4_0"}  # export/gguf_types.py's rules
QUICK_ROWS = ("int2-ptq", "int2-rtn-damp-freeze", "int3-rtn", "int2-rtn-lora")  # one of each path: PTQ start,
# damp/freeze, Q4_0 export, qat-lora
OSCILLATION_TAIL = 0.10  # the last fraction of steps averaged for the "final" oscillating fraction
DEFAULT_LR, DEFAULT_DAMPENING, DEFAULT_FREEZE = 5e-5, 100.0, 0.02
DEFAULT_LORA_RANK, DEFAULT_LORA_LR = 16, 1e-4  # qat-lora rows: TuneConfig's default lr for adapters; not tuned here


# --- settings and references ------------------------------------------------------------------------


def eval_tokens(args) -> int:
    return QUICK_EVAL_TOKENS if args.quick else EVAL_TOKENS


def work_dir(args) -> Path:
    return args.runs or Path("runs/bench-qat-quick" if args.quick else "runs/bench-qat")


def ptq_recipe(name: str, args) -> dict:
    """The recipe of a PTQ start: bench/methods.py's; ``--quick``: round-to-nearest of the same spec (the wiring)."""
    recipe = PTQ_RECIPES[name]
    if args.quick:
        return {"format": recipe["format"], "group_size": recipe["group_size"]}
    return recipe


def ptq_folder(name: str, args) -> Path:
    """Where the PTQ start ``name`` is cached (``--quick``: its round-to-nearest stand-in, named so)."""
    return work_dir(args) / "ptq" / (f"{name}-rtn-stand-in" if args.quick else name)


def method_config(row: str, args) -> dict:
    """The qat (or qat-lora) method config of a row (``init``: "rtn" or the PTQ run's folder); the control's "full"."""
    spec = ROWS[row]
    if spec.get("method") == "full":
        return {"name": "full"}
    init = "rtn" if spec["init"] == "rtn" else str(ptq_folder(spec["init"], args))
    config = {"name": spec.get("method", "qat"), "format": spec["format"], "group_size": GROUP_SIZE, "init": init}
    if config["name"] == "qat-lora":
        config["rank"] = args.lora_rank
    if spec.get("damp_freeze"):
        config.update(dampening=args.dampening, freeze_threshold=args.freeze_threshold)
    return config


def tune_config(row: str, args, data: dict) -> dict:
    return {"method": method_config(row, args), "task": data["path"], "train_examples": data["n_records"],
            "test_examples": 0, "max_steps": args.steps, "batch_size": args.batch_size, "max_length": args.seq_len,
            "lr": args.lora_lr if ROWS[row].get("method") == "qat-lora" else args.lr, "warmup_steps": args.warmup,
            "seed": args.seed, "eval_before": False,
            "retention_max_tokens": 0, "checkpoint_every": args.checkpoint_every}


def row_key(row: str, args, data: dict) -> dict:
    """What decides a row's figures: a stored row is reused only under the same key."""
    spec = ROWS[row]
    return {"tune": tune_config(row, args, data), "data_sha256": data["sha256"], "eval_tokens": eval_tokens(args),
            "window": WINDOW, "device": args.device, "quick": args.quick,
            "ptq_recipe": ptq_recipe(spec["init"], args) if is_ptq_start(spec) else None}


def is_ptq_start(spec: dict) -> bool:
    """Whether a row starts from a PTQ run (not RTN, not the float source)."""
    return spec["init"] not in ("rtn", "source")


def ptq_references() -> dict:
    """The PTQ figures of the 16-window tables, read from bench/results (None where a file or row is absent)."""
    out = {}
    for fmt, sources in PTQ_REFERENCES.items():
        out[fmt] = [read_reference(name, RESULTS / file) for name, file in sources]
    return out


def read_reference(name: str, path: Path) -> dict:
    found = {"recipe": name, "file": f"bench/results/{path.name}", "ppl": None, "source_ppl": None}
    if not path.is_file():
        return found
    saved = json.loads(path.read_text())
    settings = saved.get("settings", {})
    if saved.get("quick") or settings.get("max_tokens") != EVAL_TOKENS or settings.get("window") != WINDOW:
        return found
    rows = {r["name"]: r for r in saved.get("rows", [])}
    if name in rows:
        found.update(ppl=rows[name]["ppl"], device=rows[name].get("quantize_device", "cpu"))
    if "source fp32" in rows:
        found["source_ppl"] = rows["source fp32"]["ppl"]
    return found


# --- training data ----------------------------------------------------------------------------------


def prepare_data(args, work: Path) -> dict:
    """The training JSONL: ``--seq-len``-token windows of the text, decoded, one {"text"} record each (kept while
    the same)."""
    from weightwise.data.corpora import corpus, join_documents
    from weightwise.evaluate import token_windows
    from weightwise.io.models import load_tokenizer

    label = "pydoc-calib" if args.text == "pydoc" else Path(args.text).stem
    path = work / "data" / f"{label}-{args.seq_len}.jsonl"
    tokenizer = load_tokenizer("default")
    docs = corpus("pydoc", "calib") if args.text == "pydoc" else corpus(args.text, "all")
    windows = token_windows(tokenizer, join_documents(docs), window=args.seq_len)
    text = "".join(json.dumps({"text": tokenizer.decode(ids)}) + "\n" for ids in windows.tolist())
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)
    return {"path": str(path), "text": args.text, "split": "calib" if args.text == "pydoc" else "all",
            "n_records": len(windows), "tokens": int(windows.numel()), "sha256": hashlib.sha256(text.encode()).hexdigest()}


# --- the PTQ starts (own process) -------------------------------------------------------------------


def ensure_ptq(name: str, args) -> dict:
    """Quantize the PTQ start ``name`` with weightwise's ``quantize`` and save it, unless its run is there."""
    from weightwise.io.folders import save
    from weightwise.io.models import load_model, model_source_info
    from weightwise.quantize import quantization_record, quantize

    folder = ptq_folder(name, args)
    info_path = folder.parent / f"{folder.name}.json"
    recipe = ptq_recipe(name, args)
    if (folder / "manifest.json").is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("recipe") == recipe:
            return info
    model, tokenizer = load_model("default")
    started = time.perf_counter()
    device = None if args.device == "cpu" else args.device
    qmodel = quantize(model, recipe, tokenizer=tokenizer, checkpoint_dir=folder.parent / f".{folder.name}.partial", device=device)
    save(qmodel, folder, tokenizer=tokenizer, source=model_source_info("default"))
    info = {"recipe": recipe, "folder": str(folder), "quantize_seconds": quantization_record(qmodel).quantize_seconds,
            "wall_seconds": time.perf_counter() - started, "device": args.device, "peak_rss_mb": peak_rss_mb(),
            "quick_stand_in": args.quick}
    write_json_atomic(info_path, info)
    return info


# --- one row (own process) --------------------------------------------------------------------------


def peak_rss_mb() -> float:
    from weightwise.tune.steps import peak_rss_mb as rss

    return rss()


def train_row(row: str, args, data: dict, out: Path) -> dict:
    """`tune` with qat; a finished run of the same config is reused, a checkpoint of it resumed."""
    from weightwise.io.models import load_model, model_source_info
    from weightwise.tune.api import tune
    from weightwise.tune.config import TuneConfig

    config = TuneConfig(**tune_config(row, args, data))
    config_file = out / "tune_config.json"
    same = config_file.is_file() and json.loads(config_file.read_text())["config"] == config.model_dump()
    if same and (out / "manifest.json").is_file() and (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text()) | {"reused": True}
    model, tokenizer = load_model("default")
    model.to(args.device)
    started = time.perf_counter()
    metrics = tune(model, tokenizer, config, out, overwrite=config_file.is_file() and not same,
                   progress=Progress(row), source=model_source_info("default"))  # a float run loads base + patch
    metrics["wall_seconds"] = time.perf_counter() - started
    if args.device.startswith("cuda"):
        metrics["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    write_json_atomic(out.parent / "train.json", metrics)
    return metrics


class Progress:
    """Prints a row's steps (every 10th), its checkpoints, and a measured estimate of the time left (from the median
    step time so far) after 5 steps and every 50."""

    def __init__(self, row: str):
        self.row, self.seconds = row, []

    def __call__(self, phase: str, done: int, total: int, info: dict) -> None:
        if phase == "train" and "loss" in info:
            self.seconds.append(info["step_seconds"])
            if done == 1 or done % 10 == 0 or done == total:
                extra = "".join(f", {k[4:]} {info[k]:.4f}" for k in ("qat_oscillating", "qat_frozen", "qat_dampening")
                                if k in info)
                print(f"[{self.row}] step {done}/{total}: loss {info['loss']:.4f}, {info['tokens_per_second']:.0f} tok/s, "
                      f"grad norm {_num(info.get('grad_norm'))}{extra}", flush=True)
            if done < total and (len(self.seconds) == 5 or done % 50 == 0):
                step = statistics.median(self.seconds)
                print(f"[{self.row}] measured: {step:.1f} s/step (median of {len(self.seconds)}), about "
                      f"{step * (total - done) / 60:.0f} min of training left", flush=True)
        elif "event" in info:
            print(f"[{self.row}] {info['event']} at step {info['step']}", flush=True)


def step_log(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def oscillation(records: list[dict]) -> dict:
    """The oscillating fraction at the last step and averaged over the last OSCILLATION_TAIL of steps; frozen at the end."""
    records = [r for r in records if "qat_oscillating" in r]
    if not records:
        return {}
    tail = records[-max(1, round(OSCILLATION_TAIL * len(records))):]
    return {"oscillating_last": records[-1]["qat_oscillating"],
            "oscillating_tail_mean": statistics.fmean(r["qat_oscillating"] for r in tail), "tail_steps": len(tail),
            "frozen_last": records[-1]["qat_frozen"], "dampening_last": records[-1].get("qat_dampening")}


def score(model, tokenizer, source, args) -> dict:
    """ppl, KL and top-1 of ``model`` against the float ``source`` on the eval windows (the PTQ tables' protocol)."""
    from weightwise.evaluate import evaluate

    result = evaluate(model, tokenizer, reference=source, max_tokens=eval_tokens(args), window=WINDOW, measure_speed=False)
    return result.model_dump(include={"ppl", "mean_nll", "n_tokens_scored", "n_windows", "reference_ppl", "kl_mean",
                                      "top1_agreement", "bits_per_weight", "total_bytes", "eval_seconds"})


def init_score(row: str, args, source, tokenizer, source_ppl: float) -> dict:
    """The starting point scored like the result: RTN quantized in memory or the PTQ start's saved run; a float row's
    start is the source, whose ppl the result's evaluation already measured (``source_ppl``)."""
    from weightwise.io.models import load_model
    from weightwise.quantize import quantize

    spec = ROWS[row]
    if spec["init"] == "source":
        return {"ppl": source_ppl}
    if spec["init"] == "rtn":
        start = quantize(source, {"format": spec["format"], "group_size": GROUP_SIZE})
    else:
        start, _ = load_model(ptq_folder(spec["init"], args))
    return score(start, tokenizer, source, args)


def gguf_row(model, tokenizer, fmt: str, path: Path, args) -> dict:
    """Export the run to GGUF where a type holds it exactly, and measure it in llama.cpp when llama-cpp-python is there."""
    if fmt is None:
        return {"skipped": "float: not exported"}
    if fmt not in GGUF_EXACT:
        return {"skipped": f"no exact GGUF type for {fmt} (export/gguf_types.py)"}
    from weightwise.evaluate import token_windows
    from weightwise.evaluate.config import EvalConfig
    from weightwise.export import export
    from weightwise.export.gguf import GGUFExportConfig
    from weightwise.io.defaults import default_gguf_path

    started = time.perf_counter()
    report = export(model, tokenizer, "gguf", path, gguf=GGUFExportConfig(type="auto", embeddings="f16"),
                    tokenizer_gguf=default_gguf_path(), overwrite=True)
    linear = [t for t in report["tensors"] if t["gguf_name"].startswith("blk.") and t["type"] == GGUF_EXACT[fmt]]
    out = {"path": str(path), "type": GGUF_EXACT[fmt], "file_bytes": report["file_bytes"],
           "exact_tensors": sum(t["how"] == "exact" for t in report["tensors"]), "tensors": len(report["tensors"]),
           "linear_tensors_of_type": len(linear), "fallback_layers": len(report["fallback_layers"]),
           "max_abs_diff_linear": max((t["max_abs_diff"] for t in linear), default=None),
           "export_seconds": time.perf_counter() - started}
    try:
        from export import llama_ppl  # bench/export.py: the llama.cpp harness (imports llama_cpp)
    except ImportError as err:
        return out | {"llama_cpp": f"not measured: {err}"}
    windows = token_windows(tokenizer, EvalConfig(max_tokens=eval_tokens(args)).load_text(), window=WINDOW,
                            max_tokens=eval_tokens(args))
    return out | {"llama_cpp": llama_ppl(path, windows)}


def run_row(row: str, args, data: dict) -> dict:
    """Train, then measure the saved run (and its start, and its GGUF export)."""
    from weightwise.io.models import load_model

    torch.set_num_threads(args.threads)
    work = work_dir(args) / row
    out = work / "tune"
    started = time.perf_counter()
    metrics = train_row(row, args, data, out)
    train = metrics["train"]
    record = {"train": {k: train.get(k) for k in ("steps", "steps_run", "start_step", "global_batch", "seconds",
                                                  "tokens", "tokens_per_second", "step_seconds_median", "loss_first",
                                                  "loss_last", "peak_rss_mb")},
              "tune_seconds": metrics["seconds"], "resumed_from_step": metrics.get("resumed_from_step"),
              "reused_finished_run": bool(metrics.get("reused")), "trained_entries": metrics["trained_entries"],
              "optimizer_state_bytes": metrics["optimizer_state_bytes"],
              "cuda_peak_allocated_mb": metrics.get("cuda_peak_allocated_mb")}
    log = step_log(out)
    record["train"]["tokens_all_steps"] = sum(r["tokens"] for r in log)  # the log spans a resumed run's earlier steps
    record["epochs"] = args.steps * args.batch_size / data["n_records"]
    record["oscillation"] = oscillation(log)
    record["loss_curve"] = [{"step": r["step"], "loss": r["loss"]} for r in log[:: max(1, len(log) // 20)]] + (
        [{"step": log[-1]["step"], "loss": log[-1]["loss"]}] if log else [])
    source, tokenizer = load_model("default")
    run, run_tokenizer = load_model(out)  # the saved artefact: a qat run's quantized model/, a float run's base + patch
    print(f"[{row}] evaluating the saved run {out}", flush=True)
    record["result"] = score(run, run_tokenizer, source, args)
    print(f"[{row}] ppl {record['result']['ppl']:.3f} (source {record['result']['reference_ppl']:.3f}); scoring the start",
          flush=True)
    record["init"] = init_score(row, args, source, tokenizer, record["result"]["reference_ppl"])
    del source
    print(f"[{row}] start ppl {record['init']['ppl']:.3f}; GGUF export", flush=True)
    try:
        record["gguf"] = gguf_row(run, run_tokenizer, ROWS[row]["format"], work / "model.gguf", args)
    except Exception as err:  # noqa: BLE001 - the measured ppl stands without the export
        traceback.print_exc()
        record["gguf"] = {"error": f"{type(err).__name__}: {err}"}
    record["row_seconds"] = time.perf_counter() - started
    record["process_peak_rss_mb"] = peak_rss_mb()
    record["device"] = device_info(args)
    return record


def device_info(args) -> dict:
    info = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor() or None,
            "load_average_1min": os.getloadavg()[0]}
    if args.device.startswith("cuda"):
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


# --- the orchestration ------------------------------------------------------------------------------


def subprocess_json(mode: str, name: str, args, out: Path) -> dict:
    """Run ``--{mode} name`` of this script in its own process; its JSON result (raises on failure)."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, *args.argv, f"--{mode}", name, "--worker-out", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def prior_throughput(results: dict, args) -> tuple[float | None, str]:
    """Training tokens/s for the estimate: earlier rows at this sequence length, else bench/results/tune.json's full
    fine-tuning (short arithmetic examples, a rough stand-in)."""
    seen = [r["train"]["tokens_per_second"] for r in results["rows"].values()
            if r.get("train", {}).get("tokens_per_second") and r["key"]["tune"]["max_length"] == args.seq_len
            and r["key"]["device"] == args.device and not r.get("train_reused")]
    if seen:
        return statistics.median(seen), f"median of {len(seen)} earlier row(s)"
    tune_json = RESULTS / "tune.json"
    if tune_json.is_file():
        full = json.loads(tune_json.read_text()).get("rows", {}).get("full", {}).get("train", {})
        if full.get("tokens_per_second"):
            return full["tokens_per_second"], "bench/results/tune.json full fine-tuning (arithmetic, short sequences)"
    return None, "no throughput measured yet"


def estimate(row: str, results: dict, args) -> str:
    tokens = args.steps * args.batch_size * args.seq_len
    rate, why = prior_throughput(results, args)
    if rate is None:
        return f"[{row}] {tokens:,} training tokens; no estimate ({why})"
    return (f"[{row}] estimate: {tokens:,} training tokens at {rate:.0f} tok/s ({why}) ≈ {tokens / rate / 60:.0f} min of "
            "training, plus loading, two evaluations and the GGUF export (a few minutes)"
            + (", plus the PTQ quantization when its run is not cached" if is_ptq_start(ROWS[row]) else ""))


def measure(row: str, args, data: dict, results: dict, save) -> None:
    key = row_key(row, args, data)
    stored = results["rows"].get(row)
    if stored and stored.get("key") == key and "result" in stored and row not in args.remeasure:
        print(f"[{row}] measured before with these settings: ppl {stored['result']['ppl']:.3f}", flush=True)
        return
    print(estimate(row, results, args), flush=True)
    work = work_dir(args)
    record = {"key": key}
    try:
        init = ROWS[row]["init"]
        if is_ptq_start(ROWS[row]):
            record["ptq"] = subprocess_json("ptq-worker", init, args, work / f"{init}.ptq-worker.json")
        record.update(subprocess_json("worker", row, args, work / row / "row.json"))
    except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
        traceback.print_exc()
        record["error"] = f"{type(err).__name__}: {err}"
    record["train_reused"] = record.get("reused_finished_run", False)
    results["rows"][row] = record
    save()
    if "result" in record:
        print(f"[{row}] ppl {record['result']['ppl']:.3f} from {record['init']['ppl']:.3f}, "
              f"{record['row_seconds']:.0f} s", flush=True)


# --- the report -------------------------------------------------------------------------------------


def _num(value, fmt=".3f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(results: dict) -> str:
    s, refs = results["settings"], results["references"]
    head = ("**Wiring run (`--quick`), not a result**: " if s["quick"] else "") + (
        f"SmolLM2-135M-Instruct, qat (LSQ/LSQ+ scales, AdamW lr {s['lr']:g}, {s['warmup']} warmup steps), "
        f"{s['steps']} steps × {s['batch_size']} × {s['seq_len']} tokens of {results['data']['text']} "
        f"({results['data']['split']} split, {results['data']['tokens']:,} tokens in {results['data']['n_records']} "
        f"windows), seed {s['seed']}; ppl of the saved run on {eval_tokens_of(s) // WINDOW} × {WINDOW} tokens of the pydoc "
        f"eval split, on the CPU{' (quick: the PTQ starts are round-to-nearest runs)' if s['quick'] else ''}.")
    lines = [head, "", "| row | format | start | b/w | train tokens | steps | start ppl | QAT ppl (saved run) | KL | "
             "target | PTQ reference | GGUF | llama.cpp ppl | wall s | train peak RSS MB | device |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|"]
    for name in ROWS:
        r = results["rows"].get(name)
        if r is None:
            continue
        fmt = ROWS[name]["format"] or "float32"
        if "result" not in r:
            lines.append(f"| {name} | {fmt} | {ROWS[name]['init']} | – | – | – | – | {r.get('error', 'not finished')} "
                         "| – | – | – | – | – | – | – | – |")
            continue
        res, train, gguf = r["result"], r["train"], r.get("gguf", {})
        target = TARGETS.get(fmt)
        met = "" if target is None or s["quick"] else (" ✓" if res["ppl"] <= target else " ✗")
        start = ROWS[name]["init"] + (" (RTN stand-in)" if r.get("ptq", {}).get("quick_stand_in") else "")
        ref = "; ".join(f"{x['recipe']} {_num(x['ppl'])}" if x["ppl"] is not None else f"{x['recipe']}: not measured"
                        for x in refs.get(fmt, [])) or "–"
        llama = gguf.get("llama_cpp")
        llama_ppl = _num(llama["ppl"]) if isinstance(llama, dict) else (llama or gguf.get("skipped") or gguf.get("error") or "–")
        lines.append(
            f"| {name} | {fmt}{'' if fmt == 'float32' else f' g{GROUP_SIZE}'} | {start} | {res['bits_per_weight']:.3f} | "
            f"{train['tokens_all_steps']:,} | {train['steps']} | {_num(r['init'].get('ppl'))} | {res['ppl']:.3f}{met} | "
            f"{res['kl_mean']:.4f} | {_num(target, '.1f')} | {ref} | {gguf.get('type', '–')} "
            f"{_num(gguf.get('file_bytes') and gguf['file_bytes'] / 1e6, '.1f')} MB | {llama_ppl} | "
            f"{r['row_seconds']:.0f} | {train['peak_rss_mb']:.0f} | {r['device']['device']} |")
    osc = [n for n in ("int2-rtn", "int2-rtn-damp-freeze") if "result" in results["rows"].get(n, {})]
    if osc:
        lines += ["", "Oscillations at 2 bits (int2_asym g64 from RTN, the same tokens):", "",
                  "| row | dampening | freeze threshold | oscillating, last step | oscillating, mean of last 10 % | "
                  "frozen | QAT ppl |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name in osc:
            r = results["rows"][name]
            o, method = r["oscillation"], r["key"]["tune"]["method"]
            lines.append(f"| {name} | {method.get('dampening', 0)} | {method.get('freeze_threshold') or '–'} | "
                         f"{_num(o.get('oscillating_last'), '.5f')} | {_num(o.get('oscillating_tail_mean'), '.5f')} | "
                         f"{_num(o.get('frozen_last'), '.5f')} | {r['result']['ppl']:.3f} |")
    arms = [n for n in ("int2-rtn", "int2-rtn-lora") if "result" in results["rows"].get(n, {})]
    if arms:
        lines += ["", "QAT against QAT-LoRA (int2_asym g64 from RTN, the same tokens):", "",
                  "| row | method | lr | trained parameters | optimizer state MB | train peak RSS MB | CUDA peak MB | "
                  "QAT ppl |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name in arms:
            r = results["rows"][name]
            tune, method = r["key"]["tune"], r["key"]["tune"]["method"]
            label = method["name"] + (f" rank {method['rank']}" if "rank" in method else "")
            state = r.get("optimizer_state_bytes")
            lines.append(f"| {name} | {label} | {tune['lr']:g} | {r['trained_entries']:,} | "
                         f"{_num(state and state / 1e6, '.1f')} | {r['train']['peak_rss_mb']:.0f} | "
                         f"{_num(r.get('cuda_peak_allocated_mb'), '.0f')} | {r['result']['ppl']:.3f} |")
    return "\n".join(lines)


def eval_tokens_of(settings: dict) -> int:
    return QUICK_EVAL_TOKENS if settings["quick"] else EVAL_TOKENS


# --- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="rows int2-ptq, int2-rtn-damp-freeze, int3-rtn, "
                        "int2-rtn-lora; 3 steps of 2 × 128 tokens, 2 eval windows, RTN stand-ins for the PTQ starts: the wiring only (results in "
                        "bench/results/qat-quick.*)")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), metavar="ROW", help=f"rows: {', '.join(ROWS)}")
    parser.add_argument("--remeasure", nargs="+", default=[], choices=list(ROWS), metavar="ROW",
                        help="rows to measure again even when stored with the same settings (e.g. once llama-cpp-python "
                        "is installed, for a row whose llama.cpp ppl is missing)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default 300; quick 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per step (default 4; quick 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per training window (default 512; quick 128)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: a tenth of the steps, ≤ 20)")
    parser.add_argument("--dampening", type=float, default=DEFAULT_DAMPENING, help="the damp-freeze row's dampening weight")
    parser.add_argument("--freeze-threshold", type=float, default=DEFAULT_FREEZE,
                        help="the damp-freeze row's freezing threshold (oscillation frequency, momentum 0.01)")
    parser.add_argument("--lora-rank", type=int, default=DEFAULT_LORA_RANK, help="the qat-lora row's adapter rank")
    parser.add_argument("--lora-lr", type=float, default=DEFAULT_LORA_LR, help="the qat-lora row's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", default="pydoc", help="training text: 'pydoc' (its calib split) or a .txt/.md/.jsonl file")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="tune checkpoints (default 50; quick 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where training (and PTQ) runs; "
                        "evaluation and export run on the CPU")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads")
    parser.add_argument("--runs", type=Path, default=None, help="work folder (default runs/bench-qat[-quick])")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/qat.json; --quick: "
                        "qat-quick.json); the Markdown goes beside it")
    parser.add_argument("--report", action="store_true", help="only rewrite and print the Markdown of the results")
    parser.add_argument("--worker", metavar="ROW", help=argparse.SUPPRESS)
    parser.add_argument("--ptq-worker", metavar="RECIPE", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"steps": 3, "batch_size": 2, "seq_len": 128, "checkpoint_every": 2}
    full = {"steps": 300, "batch_size": 4, "seq_len": 512, "checkpoint_every": 50}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.warmup is None:
        args.warmup = min(20, args.steps // 10)
    args.argv = [a for a in argv if a not in ("--report",)]
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / ("qat-quick.json" if args.quick else "qat.json")
    if args.report:
        results = json.loads(out.read_text())
        write_text_atomic(out.with_suffix(".md"), markdown(results) + "\n")
        print(markdown(results))
        return
    work = work_dir(args)
    work.mkdir(parents=True, exist_ok=True)
    if args.ptq_worker:
        write_json_atomic(args.worker_out, ensure_ptq(args.ptq_worker, args))
        return
    data = prepare_data(args, work)
    if args.worker:
        write_json_atomic(args.worker_out, run_row(args.worker, args, data))
        return
    started = time.perf_counter()
    previous = json.loads(out.read_text()) if out.is_file() else {}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("worker", "ptq_worker", "worker_out", "argv", "report")}
    results = {"settings": settings, "data": data, "references": ptq_references(), "targets": TARGETS,
               "versions": environment_versions(), "rows": previous.get("rows", {})}

    def save() -> None:
        results["seconds_this_run"] = time.perf_counter() - started
        write_json_atomic(out, results)
        write_text_atomic(out.with_suffix(".md"), markdown(results) + "\n")

    print(f"training data: {data['n_records']} windows of {args.seq_len} tokens ({data['tokens']:,} tokens) in {data['path']}",
          flush=True)
    for row in [r for r in ROWS if (r in args.only if args.only else (not args.quick or r in QUICK_ROWS))]:
        measure(row, args, data, results, save)
    save()
    print(markdown(results))
    print(f"\n{time.perf_counter() - started:.0f} s; results in {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
