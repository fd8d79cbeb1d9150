"""Benchmark: peak memory (RSS) of `weightwise quantize` on the default SmolLM2, before and after streaming.

Each row runs the real command in its own process under ``/usr/bin/time -v`` (so each peak RSS is that process's
own) and reads "Maximum resident set size", the wall-clock and CPU times. Rows:

- ``before``: the code at ``--before`` (a git revision, default the last commit before streamed quantization);
- ``in-memory``: the code at ``--after`` (default HEAD) with ``--no-stream`` (the whole model loaded, quantized in place);
- ``streamed``: the code at ``--after`` with ``--stream`` (one decoder block in memory at a time).

Each revision's ``src`` is exported with ``git archive`` into a temporary folder and run from there (``PYTHONPATH``),
so uncommitted edits in the working tree do not enter the measurement.

The recipe is the usual GPTQ one (int4, group size 64, 128 × 512 pydoc calibration tokens; ``--quick``: 16 × 512).
The outputs of the rows are compared tensor by tensor (every tensor of the run folders, bit for bit), so a row
that saves memory by computing something else shows up. The GGUF cache of the default model is built first
(not measured). Results: bench/results/memory.json and memory.md (``--quick``: memory-quick.*); rows of a run with
``--only`` merge into the earlier results.

    .venv/bin/python bench/memory.py                    # three rows, 128 × 512 calibration (~20 min on 2 cores)
    .venv/bin/python bench/memory.py --quick            # 16 × 512 calibration
    .venv/bin/python bench/memory.py --only streamed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "e04af1f"  # the last commit before streamed quantization
ROWS = {"before": [], "in-memory": ["--no-stream"], "streamed": ["--stream"]}
RECIPE = ["--method", "gptq", "--format", "int4", "--group-size", "64", "--device", "cpu"]
_TIME_FIELDS = {
    "Maximum resident set size (kbytes)": "peak_rss_kb",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Exit status": "exit_status",
}


def export_revision(rev: str, into: Path) -> Path:
    """The ``src`` folder of git revision ``rev``, extracted under ``into`` (no change to the repository)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def parse_time(stderr: str) -> dict:
    """The fields of ``/usr/bin/time -v`` output that the table reports."""
    found = {}
    for line in stderr.splitlines():
        label, _, value = line.strip().rpartition(": ")
        if label in _TIME_FIELDS:
            found[_TIME_FIELDS[label]] = value
    h_m_s = [float(part) for part in found.get("wall", "0").split(":")]
    wall = sum(part * 60 ** i for i, part in enumerate(reversed(h_m_s)))
    return {"peak_rss_mb": int(found.get("peak_rss_kb", 0)) / 1024, "wall_s": wall,
            "user_s": float(found.get("user_s", 0)), "system_s": float(found.get("system_s", 0)),
            "exit_status": int(found.get("exit_status", -1))}


def run_row(name: str, src: Path, calib: str, out: Path, threads: int) -> dict:
    """Run one quantize command from the code in ``src`` under /usr/bin/time -v; its measurements."""
    argv = ["quantize", "default", *RECIPE, "--calib", calib, *ROWS[name], "-o", str(out)]
    code = "import sys; from weightwise.cli import main; sys.argv = ['weightwise', *sys.argv[1:]]; main()"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    row = {"name": name, "command": "weightwise " + " ".join(argv), **parse_time(done.stderr)}
    if done.returncode != 0:
        tail = "\n".join(done.stderr.splitlines()[-30:])
        raise SystemExit(f"row {name} failed (exit {done.returncode}):\n{tail}")
    return row


def folder_tensors(folder: Path) -> dict:
    """Every tensor stored in a run folder's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two run folders store the same tensors (names, dtypes, shapes and bits)."""
    import torch

    ours, theirs = folder_tensors(a), folder_tensors(b)
    return ours.keys() == theirs.keys() and all(
        ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k])
        for k in ours)


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"`weightwise quantize default {' '.join(RECIPE)} --calib {s['calib']}`, {s['threads']} thread(s), "
        "peak RSS from `/usr/bin/time -v` (wall time: a shared, busy machine; user time is the steadier figure).",
        "",
        "| row | revision | extra options | peak RSS (MiB) | wall (s) | user (s) | system (s) | same tensors as in-memory |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"].values():
        same = {True: "yes", False: "**no**", None: "–"}[row.get("same_as_in_memory")]
        lines.append(f"| {row['name']} | {row.get('revision', s['before'])} | {' '.join(ROWS[row['name']]) or '–'} | {row['peak_rss_mb']:.0f} | "
                     f"{row['wall_s']:.0f} | {row['user_s']:.0f} | {row['system_s']:.0f} | {same} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 × 512 calibration tokens instead of 128 × 512")
    parser.add_argument("--only", action="append", choices=list(ROWS), help="run only these rows (repeatable)")
    parser.add_argument("--before", default=BEFORE, help=f"git revision of the 'before' row (default {BEFORE})")
    parser.add_argument("--after", default="HEAD", help="git revision of the other rows (default HEAD)")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each row's process")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-memory", help="where the rows' run folders go")
    args = parser.parse_args()
    calib = "pydoc:16x512" if args.quick else "pydoc:128x512"
    out_json = ROOT / "bench" / "results" / ("memory-quick.json" if args.quick else "memory.json")
    after = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.after], check=True, capture_output=True,
                           text=True).stdout.strip()
    settings = {"calib": calib, "threads": args.threads, "before": args.before}
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "rows": {}}
    # build the default model's safetensors cache once, outside the measured processes
    subprocess.run([sys.executable, "-c", "from weightwise.io.models import load_model; load_model('default')"],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    from weightwise.io.artifacts import environment_versions

    results["versions"] = environment_versions()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(ROWS):
            revision = args.before if name == "before" else after
            src = export_revision(revision, Path(tmp) / name)
            out = args.work / name
            row = {**run_row(name, src, calib, out, args.threads), "revision": revision}
            results["rows"][name] = row
            print(f"{name}: peak RSS {row['peak_rss_mb']:.0f} MB, wall {row['wall_s']:.0f} s", flush=True)
    reference = args.work / "in-memory"
    for name, row in results["rows"].items():
        folder = args.work / name
        row["same_as_in_memory"] = (same_tensors(folder, reference)
                                    if name != "in-memory" and folder.is_dir() and reference.is_dir() else None)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    out_json.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
