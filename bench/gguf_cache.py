"""Benchmark: peak memory and time of opening a GGUF file for the first time (its fp32 safetensors cache written).

Each row opens a GGUF file with ``load_skeleton`` (which builds the cache and then reads nothing more: what is measured
is the conversion) in its own process under ``/usr/bin/time -v``, with an empty cache folder, from the code at a git
revision (``src`` exported with ``git archive``, run through ``PYTHONPATH``):

- ``before``: ``--before`` (default the last commit whose conversion went through transformers' whole-file load);
- ``after``: ``--after`` (default HEAD: the conversion tensor by tensor, ``io/gguf_read.py``).

The two caches are then compared tensor by tensor (bit for bit). Results: bench/results/gguf-cache.json and .md.

    .venv/bin/python bench/gguf_cache.py                       # the default model's file, ~2 min on 2 cores
    .venv/bin/python bench/gguf_cache.py --gguf runs/bench-memory-7b/rtn.gguf --only after   # 27 GB of cache
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from memory import export_revision, parse_time, same_tensors

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "60e13ef"  # the last commit that converted a GGUF file through transformers' whole-file load


def run_row(src: Path, gguf: Path, cache: Path, threads: int) -> dict:
    """load_skeleton(gguf) from the code in ``src`` with an empty cache at ``cache``: its measurements."""
    shutil.rmtree(cache, ignore_errors=True)
    code = "import sys; from weightwise.io.models import load_skeleton; load_skeleton(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(src), "WEIGHTWISE_CACHE": str(cache), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, str(gguf)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit("load failed:\n" + "\n".join(done.stderr.splitlines()[-20:]))
    folders = [p for p in (cache / "gguf").iterdir() if p.is_dir()]
    return {**parse_time(done.stderr), "cache_bytes": sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))}


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"First load of `{s['gguf']}` ({s['gguf_bytes'] / 1e6:.0f} MB) with an empty cache, {s['threads']} threads, "
             "peak RSS from `/usr/bin/time -v`:", "",
             "| row | revision | peak RSS (MiB) | wall (s) | user (s) | system (s) | cache (MB) |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in results["rows"].items():
        lines.append(f"| {name} | {row['revision']} | {row['peak_rss_mb']:.0f} | {row['wall_s']:.1f} | {row['user_s']:.1f} | "
                     f"{row['system_s']:.1f} | {row['cache_bytes'] / 1e6:.0f} |")
    if results.get("same_tensors") is not None:
        lines += ["", f"Same tensors in both caches, bit for bit: {'yes' if results['same_tensors'] else '**no**'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="the GGUF file (default: the default model's)")
    parser.add_argument("--before", default=BEFORE, help=f"git revision of the 'before' row (default {BEFORE})")
    parser.add_argument("--after", default="HEAD", help="git revision of the 'after' row (default HEAD)")
    parser.add_argument("--only", choices=["before", "after"], action="append", help="rows to run (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-gguf-cache", help="the rows' caches")
    args = parser.parse_args()
    from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic
    from weightwise.io.defaults import default_gguf_path

    gguf = (args.gguf or default_gguf_path()).resolve()
    default = args.gguf is None
    out = ROOT / "bench" / "results" / ("gguf-cache.json" if default else "gguf-cache-other.json")
    settings = {"gguf": "default model" if default else str(gguf), "gguf_bytes": gguf.stat().st_size, "threads": args.threads}
    results = {"settings": settings, "rows": {}, "versions": environment_versions()}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or ["before", "after"]:
            rev = args.before if name == "before" else args.after
            revision = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                                      capture_output=True, text=True).stdout.strip()
            src = export_revision(revision, Path(tmp) / name)
            results["rows"][name] = {**run_row(src, gguf, args.work / name, args.threads), "revision": revision}
            print(f"{name}: peak RSS {results['rows'][name]['peak_rss_mb']:.0f} MiB", flush=True)
    caches = [next(p for p in (args.work / name / "gguf").iterdir() if p.is_dir()) for name in results["rows"]]
    results["same_tensors"] = same_tensors(*caches) if len(caches) == 2 else None
    for name in results["rows"]:
        shutil.rmtree(args.work / name, ignore_errors=True)  # a model's worth of fp32 each
    write_json_atomic(out, results)
    write_text_atomic(out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
