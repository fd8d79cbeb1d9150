"""Benchmark: peak memory (RSS) of `weightwise quantize` and `weightwise eval` on a Llama-2-7B-shaped model.

The model (random bf16 weights, 13.5 GB on disk, 27 GB in fp32: more than this machine's memory) is written by
bench/make_llama7b.py when its folder is missing (not measured). Each row runs the real command in its own process
under ``/usr/bin/time -v`` and reads its peak RSS, wall clock and CPU times:

- ``rtn``: streamed round-to-nearest int4 g128;
- ``gptq``: streamed GPTQ int4 g128 with 16 × 512 pydoc calibration tokens;
- ``eval``: ``eval --stream`` of the ``rtn`` run against the float model as reference (perplexity, KL, top-1) on the
  first ``--eval-tokens`` tokens of pydoc's eval split, windows of 512: each model read block by block;
- ``export``: ``export --to compressed-tensors --stream`` of the ``rtn`` run (bf16 embeddings and head), block by block;
- ``export-gguf``: ``export --to gguf --stream`` of the ``rtn`` run (Q4_0 layers, f16 embeddings and head), block by
  block, read back and compared;
- ``gguf-eval``: ``eval --stream`` of that GGUF file with an empty cache: the file converted to the fp32 safetensors
  cache tensor by tensor (27 GB on disk, removed after the row), then evaluated block by block (no reference).

Results: bench/results/memory-7b.json and .md; rows of a run with ``--only`` merge into the earlier results
(``eval`` and ``export`` need the ``rtn`` run's folder).

A quantize row longer than a sitting can be run in segments: ``--stop-after SECONDS`` kills the command (SIGKILL)
when that time is up and records the segment; the next run of the row resumes at the next unfinished block (the
streamed quantize's checkpoint), and the finished row reports the peak RSS of the worst segment and the sums of
the segments' wall and CPU times (``segments`` says how many).

    .venv/bin/python bench/memory_7b.py --only rtn --only eval --only export    # ~10 min on 2 cores
    .venv/bin/python bench/memory_7b.py --only export-gguf --only gguf-eval     # needs ~35 GB of free disk
    .venv/bin/python bench/memory_7b.py --only gptq                # hours on 2 cores
    .venv/bin/python bench/memory_7b.py --only gptq --stop-after 3000   # a segment of at most 50 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from memory import parse_time

ROOT = Path(__file__).resolve().parent.parent
TARGET_MB = 6 * 1024


def commands(model: Path, work: Path, eval_tokens: int) -> dict[str, list[str]]:
    """The weightwise arguments of each row."""
    return {
        "rtn": ["quantize", str(model), "--format", "int4", "--group-size", "128", "--device", "cpu", "-o", str(work / "rtn")],
        "gptq": ["quantize", str(model), "--method", "gptq", "--format", "int4", "--group-size", "128", "--calib",
                 "pydoc:16x512", "--device", "cpu", "-o", str(work / "gptq")],
        "eval": ["eval", str(work / "rtn"), "--reference", str(model), "--stream", "--max-tokens", str(eval_tokens),
                 "--window", "512", "--no-speed", "-o", str(work / "eval")],
        "export": ["export", str(work / "rtn"), "--to", "compressed-tensors", "--stream", "--dtype", "bf16", "--overwrite",
                   "-o", str(work / "export")],
        "export-gguf": ["export", str(work / "rtn"), "--to", "gguf", "--stream", "--overwrite", "-o", str(work / "rtn.gguf")],
        "gguf-eval": ["eval", str(work / "rtn.gguf"), "--stream", "--max-tokens", str(eval_tokens), "--window", "512",
                      "--no-speed", "-o", str(work / "gguf-eval")],
    }


RESUMABLE = ("rtn", "gptq")  # streamed quantize: a killed run resumes at its next unfinished block


def run_row(name: str, argv: list[str], threads: int, cache: Path | None = None,
            stop_after: float | None = None) -> dict:
    """The row's command under /usr/bin/time -v: its measurements, with ``stopped`` when ``stop_after`` seconds ran
    out and the command was killed (SIGKILL, the time process left to report on it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if cache is not None:  # a fresh model cache: the GGUF file is converted within the row
        env["WEIGHTWISE_CACHE"] = str(cache)
    timer = subprocess.Popen(["/usr/bin/time", "-v", sys.executable, "-m", "weightwise.cli", *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stopped = False
    try:
        _, stderr = timer.communicate(timeout=stop_after)
    except subprocess.TimeoutExpired:
        for child in Path(f"/proc/{timer.pid}/task/{timer.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGKILL)
        _, stderr = timer.communicate()
        stopped = True
    if timer.returncode != 0 and not stopped:
        tail = "\n".join(stderr.splitlines()[-30:])
        raise SystemExit(f"row {name} failed (exit {timer.returncode}):\n{tail}")
    return {"name": name, "command": "weightwise " + " ".join(argv), **parse_time(stderr), "stopped": stopped}


def combine_segments(segments: list[dict]) -> dict:
    """One row from the segments of a resumed command: the worst peak, the summed times."""
    last = segments[-1]
    return {**last, "peak_rss_mb": max(s["peak_rss_mb"] for s in segments),
            **{key: sum(s[key] for s in segments) for key in ("wall_s", "user_s", "system_s")}, "segments": len(segments)}


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Llama-2-7B-shaped model (`{s['model']}`, random bf16 weights, 13.5 GB), {s['threads']} threads, peak RSS "
             f"from `/usr/bin/time -v`; target ≤ {TARGET_MB} MiB.", "",
             "| row | command | peak RSS (MiB) | wall (s) | user (s) | system (s) |", "|---|---|---:|---:|---:|---:|"]
    for row in results["rows"].values():
        segments = f" ({row['segments']} segments, resumed)" if row.get("segments") else ""
        lines.append(f"| {row['name']}{segments} | `{row['command']}` | {row['peak_rss_mb']:.0f} | {row['wall_s']:.0f} | "
                     f"{row['user_s']:.0f} | {row['system_s']:.0f} |")
    for name, segments in results.get("segments", {}).items():
        if segments:
            lines.append(f"| {name} (unfinished: {len(segments)} segment(s) so far) | `{segments[-1]['command']}` | "
                         f"{max(s['peak_rss_mb'] for s in segments):.0f} | {sum(s['wall_s'] for s in segments):.0f} | "
                         f"{sum(s['user_s'] for s in segments):.0f} | {sum(s['system_s'] for s in segments):.0f} |")
    figures = results["rows"].get("eval", {}).get("figures")
    if figures:  # random weights: the perplexity means nothing, the run's completion and memory do
        lines += ["", f"eval row measured ppl {figures['ppl']:.1f}, KL {figures['kl_mean']:.4f}, top-1 agreement "
                  f"{figures['top1_agreement']:.3f} on {figures['n_tokens_scored']} scored tokens (random weights)."]
    gguf = results["rows"].get("export-gguf", {}).get("figures")
    if gguf:
        lines += ["", f"export-gguf row wrote {gguf['file_bytes'] / 1e9:.2f} GB, {gguf['tensors']} tensors, "
                  f"{gguf['exact']} exact (read back equal to the run's layers)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "llama7b-random", help="the 7B-shaped folder")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-memory-7b", help="where the rows' outputs go")
    parser.add_argument("--only", action="append", choices=["rtn", "gptq", "eval", "export", "export-gguf", "gguf-eval"],
                        help="rows to run (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads")
    parser.add_argument("--eval-tokens", type=int, default=1024, help="tokens scored by the eval row")
    parser.add_argument("--stop-after", type=float, default=None,
                        help=f"seconds after which a row of {'/'.join(RESUMABLE)} is stopped, to resume at the next run")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_llama7b.py"), "-o", str(args.model)], check=True)
    out_json = ROOT / "bench" / "results" / "memory-7b.json"
    settings = {"model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
                "threads": args.threads, "eval_tokens": args.eval_tokens}
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "rows": {}}
    from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic

    results["versions"] = environment_versions()
    argvs = commands(args.model, args.work, args.eval_tokens)
    for name in args.only or list(argvs):
        cache = args.work / "cache" if name == "gguf-eval" else None
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)
        try:
            row = run_row(name, argvs[name], args.threads, cache, args.stop_after if name in RESUMABLE else None)
        finally:
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
        segments = results.setdefault("segments", {}).setdefault(name, [])
        segments.append(row)
        if row.pop("stopped"):
            print(f"{name}: stopped after {row['wall_s']:.0f} s (segment {len(segments)}, peak RSS "
                  f"{row['peak_rss_mb']:.0f} MiB); run the row again to resume", flush=True)
            write_json_atomic(out_json, results)
            continue
        row = combine_segments(segments) if len(segments) > 1 else row
        del results["segments"][name]
        if name == "eval":
            metrics = json.loads((args.work / "eval" / "metrics.json").read_text())["runs"][0]
            row["figures"] = {k: metrics[k] for k in ("ppl", "kl_mean", "top1_agreement", "n_tokens_scored")}
        if name == "export-gguf":
            report = json.loads((args.work / "rtn.gguf.json").read_text())
            row["figures"] = {"file_bytes": report["file_bytes"], "tensors": len(report["tensors"]),
                              "exact": sum(t["how"] == "exact" for t in report["tensors"])}
        results["rows"][name] = row
        print(f"{name}: peak RSS {row['peak_rss_mb']:.0f} MiB, wall {row['wall_s']:.0f} s", flush=True)
        write_json_atomic(out_json, results)
        write_text_atomic(out_json.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
