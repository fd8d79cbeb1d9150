"""Crash safety: weightwise commands killed (SIGKILL) at random moments and rerun until they finish.

Each command runs as a subprocess (``python -m weightwise.cli``, one thread) on a tiny random Llama built here
(a byte-level BPE tokenizer, a calibration text cut from CPython's pydoc topics, a small JSONL task, a quantized run
and a weight patch made through the Python API). Per command, one uninterrupted reference run first; then each trial
runs the same command into a fresh folder, kills it 1 .. ``--max-kills`` times, each at a moment drawn uniformly from
the first 1.1 × (the time the reference held its output lock) after the lock appears (seeded ``random.Random``),
and reruns it until a run exits by itself, or a killed run had already written its whole output. Checked:

- (a) the finished output equals the reference's: every file byte for byte, except the JSON fields that legitimately
  differ after an interruption (``ALLOWED_TO_DIFFER``: creation dates, timings, resume points, per-process step and
  token accounting); JSON files are compared with those fields removed; safetensors files byte for byte (tensors
  are compared one by one only to name what differs);
- (b) no partial output under the final name: the output's final paths (``products``) are polled every 5 ms while a
  command runs and checked again after each kill; whenever one is present it must be whole (a folder with every
  file of the reference's, JSON that parses, safetensors that load, other files of the reference's size);
- the rerun is never refused (a stale lock of the killed process, an "exists" check) and, once finished, nothing is
  left beside or inside the output (lock files, temporary folders, checkpoints).

Commands: ``quantize`` (GPTQ int4 g32, calibrated, streamed, resumes per decoder block), ``quantize-memory`` (the
same with ``--no-stream``: the whole model in memory), ``tune`` (LIFT, checkpoints every 2 steps, resumes),
``tune-lora`` (peft LoRA rank 4: the result is an adapter folder), ``tune-qat`` (QAT int2_asym g32: the result is a
quantized run), ``export`` (GGUF with ``--overwrite``, so that the command is the same for every rerun),
``export-stream`` (the same, block by block), ``export-ct`` (compressed-tensors folder), ``patch`` (``patch apply``)
and ``select`` (loss and EL2N scores of the task's examples, resumes from its score cache; its report's seconds
and rates are not compared).

    .venv/bin/python bench/crash.py --trials 20          # every command (JSON + Markdown: bench/results/crash.*)
    .venv/bin/python bench/crash.py --trials 2 --commands quantize export --out /tmp/crash   # a look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuzz import bpe_tokenizer

RESULTS = Path(__file__).parent / "results"
COMMANDS = ("quantize", "quantize-memory", "tune", "tune-lora", "tune-qat", "export", "export-stream", "export-ct", "patch",
            "select")

# JSON fields (dotted paths, per file name) that may differ between an interrupted and an uninterrupted run.
ALLOWED_TO_DIFFER: dict[str, tuple[str, ...]] = {
    "manifest.json": ("created", "quantize_seconds", "calibration.resumed_at_block",  # quantize
                      "seconds", "scoring.*.seconds", "scoring.*.examples", "scoring.*.examples_per_second",  # select:
                      "scoring.*.prepare_seconds", "scoring.*.reused_from_cache"),  # examples scored by this run
    "metrics.json": ("seconds", "resumed_from_step", "train.steps_run", "train.start_step", "train.tokens",
                     "train.seconds", "train.tokens_per_second", "train.step_seconds_median", "train.peak_rss_mb"),
    "metrics.jsonl": ("tokens_per_second", "step_seconds", "peak_rss_mb"),
}
NOT_COMPARED = ("tensorboard",)  # event files are named by wall time and host; a resumed run writes a second one
# Text files compared with these patterns' matches blanked out: select's report gives the run's seconds and rates.
MASKED: dict[str, tuple[str, ...]] = {
    "report.md": (r"; [0-9.]+ s\)", r"\| [0-9.]+ \| (?:[0-9.]+|–) \|$"),
}


# --- the fixture: a tiny model and its inputs ------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    """The inputs of the commands, in ``root``."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def calib(self) -> Path:
        return self.root / "calib.txt"

    @property
    def task(self) -> Path:
        return self.root / "task.jsonl"

    @property
    def run(self) -> Path:
        return self.root / "run-int4"

    @property
    def patch(self) -> Path:
        return self.root / "patch.safetensors"


def build_fixture(root: Path, *, hidden: int = 128, layers: int = 4) -> Fixture:
    """A tiny random Llama (``hidden`` wide, ``layers`` decoder blocks) with a byte-level BPE tokenizer, ~24 KB of
    calibration text, a 32-example JSONL task, an RTN int4 g32 run of the model and a weight patch made for it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from weightwise.io.artifacts import state_dict_fingerprint
    from weightwise.io.folders import save
    from weightwise.quantize import quantize
    from weightwise.tune.patch import WeightPatch

    fixture = Fixture(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(fixture.model)
    tokenizer.save_pretrained(fixture.model)

    from pydoc_data.topics import topics

    fixture.calib.write_text("\n\n".join(topics[key] for key in sorted(topics))[:24_000], encoding="utf-8")
    fixture.task.write_text("".join(json.dumps({"prompt": f"{a}+{a}", "response": str(2 * a)}) + "\n"
                                    for a in range(10, 42)), encoding="utf-8")
    save(quantize(model, {"format": "int4", "group_size": 32}), fixture.run, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(1)
    tuned = {name: t + 1e-3 * torch.randn(t.shape, generator=generator) for name, t in model.state_dict().items()
             if name.endswith("proj.weight")}
    base = {name: model.state_dict()[name] for name in tuned}
    WeightPatch.from_models(base, tuned, {"base_model_hash": state_dict_fingerprint(model)}).save(fixture.patch, "fp32")
    return fixture


def command_args(command: str, fixture: Fixture, out: Path) -> list[str]:
    """The `weightwise` arguments of ``command`` writing ``out``."""
    if command == "quantize":
        return ["quantize", str(fixture.model), "-f", "int4", "-g", "32", "--method", "gptq",
                "--calib", f"{fixture.calib}:16x64", "--device", "cpu", "-o", str(out)]
    if command == "quantize-memory":
        return [*command_args("quantize", fixture, out), "--no-stream"]
    tune = ["tune", str(fixture.model), "--task", str(fixture.task), "--train-examples", "32", "--batch-size", "4",
            "--steps", "12", "--checkpoint-every", "2", "--test-examples", "0", "--retention-max-tokens", "0",
            "--device", "cpu", "-o", str(out)]
    if command == "tune":
        return [*tune, "--method", "lift", "--density", "0.05", "--filter-rank", "8", "--refresh-every", "3",
                "--lr", "0.005", "--patch-dtype", "fp32"]
    if command == "tune-lora":
        return [*tune, "--method", "lora", "--lora-rank", "4", "--lr", "0.005"]
    if command == "tune-qat":
        return [*tune, "--method", "qat", "-f", "int2_asym", "-g", "32", "--lr", "0.001"]
    if command == "export":
        return ["export", str(fixture.run), "--to", "gguf", "--overwrite", "-o", str(out)]
    if command == "export-stream":
        return ["export", str(fixture.run), "--to", "gguf", "--stream", "--overwrite", "-o", str(out)]
    if command == "export-ct":
        return ["export", str(fixture.run), "--to", "compressed-tensors", "--overwrite", "-o", str(out)]
    if command == "patch":
        return ["patch", "apply", str(fixture.model), str(fixture.patch), "-o", str(out)]
    if command == "select":
        return ["select", str(fixture.task), "--scorer", "loss", "--scorer", "el2n:0.5", "--model", str(fixture.model),
                "--budget", "12", "--batch-size", "2", "--dedup", "exact", "-o", str(out)]
    raise ValueError(command)


def output_name(command: str) -> str:
    return "model.gguf" if command in ("export", "export-stream") else "out"


def products(command: str, out: Path) -> list[Path]:
    """The paths under their final names that a run's result consists of: each, when present, must be complete."""
    if command.startswith("tune"):
        result = {"tune": "patch.safetensors", "tune-lora": "adapter", "tune-qat": "model"}[command]
        return [out / result, out / "metrics.json", out / "manifest.json"]
    if command in ("export", "export-stream"):
        return [out, out.with_name(out.name + ".json")]
    return [out]


def resumable(command: str, out: Path) -> bool:
    """Whether a run's checkpoint is there for the next run to resume from."""
    if command.startswith("quantize"):
        return (out.with_name(f".{out.name}.partial") / "progress.json").is_file()
    if command.startswith("tune"):
        return any(out.glob("checkpoints/step-*/state.json"))
    if command == "select":  # the score cache: one file of scores per scorer, appended batch by batch
        return any(path.read_text(encoding="utf-8", errors="replace").count("\n") >= 2  # a header and a batch
                   for path in out.parent.glob(f".{out.name}.score-cache/*.jsonl"))
    return False


def leftovers(command: str, out: Path) -> list[str]:
    """What a finished run should not have left: hidden files beside the output (locks, temporaries, checkpoints)
    and, for tune, its checkpoints folder."""
    found = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))
    if command.startswith("tune") and (out / "checkpoints").exists():
        found.append(f"{out.name}/checkpoints")
    return found


# --- comparing outputs ----------------------------------------------------------------------------------------------


def _drop(obj, path: tuple[str, ...]):
    """``obj`` without the field at ``path`` (``*`` matches every key)."""
    if not isinstance(obj, dict) or not path:
        return obj
    head, rest = path[0], path[1:]
    keys = list(obj) if head == "*" else [head]
    obj = dict(obj)
    for key in keys:
        if key in obj:
            if rest:
                obj[key] = _drop(obj[key], rest)
            else:
                del obj[key]
    return obj


def _comparable_json(text: str, name: str):
    allowed = [tuple(p.split(".")) for p in ALLOWED_TO_DIFFER.get(name, ())]
    values = [json.loads(line) for line in text.splitlines() if line.strip()] if name.endswith(".jsonl") else [json.loads(text)]
    for path in allowed:
        values = [_drop(value, path) for value in values]
    return values


def _first_json_difference(a, b, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}.{key} only in {'ours' if key in a else 'the reference'}"
            if a[key] != b[key]:
                return _first_json_difference(a[key], b[key], f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_json_difference(x, y, f"{where}[{i}]")
    return f"{where or 'value'}: {str(a)[:80]} != {str(b)[:80]}"


def compare_file(ours: Path, ref: Path, folders: tuple[Path, Path]) -> str | None:
    """None when ``ours`` equals ``ref`` (JSON up to ``ALLOWED_TO_DIFFER`` and with the trial's folder ``folders[0]``
    read as the reference's ``folders[1]``; anything else byte for byte), else why not."""
    if not ours.is_file():
        return f"{ours.name}: missing"
    a, b = ours.read_bytes(), ref.read_bytes()
    if a == b:
        return None
    name = ours.name
    if name.endswith((".json", ".jsonl")):
        try:
            mine = a.decode().replace(str(folders[0]), str(folders[1]))
            x, y = _comparable_json(mine, name), _comparable_json(b.decode(), name)
        except (ValueError, UnicodeDecodeError) as err:
            return f"{name}: not valid JSON ({err})"
        return None if x == y else f"{name}: {_first_json_difference(x, y)}"
    if name.endswith(".safetensors"):
        return f"{name}: {_safetensors_difference(a, b)}"
    if name in MASKED:
        x, y = (_masked(text.decode(errors="replace"), MASKED[name]) for text in (a, b))
        differing = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if differing is None and len(x) == len(y):
            return None
        return f"{name}: line {differing + 1 if differing is not None else min(len(x), len(y)) + 1} differs"
    return f"{name}: {len(a)} bytes differ from the reference's {len(b)}"


def _masked(text: str, patterns: tuple[str, ...]) -> list[str]:
    """``text``'s lines with every match of ``patterns`` blanked out."""
    lines = text.splitlines()
    for pattern in patterns:
        lines = [re.sub(pattern, "«masked»", line) for line in lines]
    return lines


def _safetensors_difference(a: bytes, b: bytes) -> str:
    import safetensors.torch
    import torch

    try:
        x, y = safetensors.torch.load(a), safetensors.torch.load(b)
    except Exception as err:  # a truncated file: exactly what is looked for
        return f"unreadable ({err})"
    for key in sorted(set(x) | set(y)):
        if key not in x or key not in y or x[key].dtype != y[key].dtype or not torch.equal(x[key], y[key]):
            return f"tensor {key} differs"
    return "same tensors, other bytes (header or metadata)"


def compare_outputs(command: str, out: Path, ref: Path) -> list[str]:
    """Every difference between a finished output and the reference's (empty: identical)."""
    folders = (out.parent, ref.parent)
    if command in ("export", "export-stream"):
        return [d for p, r in zip(products(command, out), products(command, ref)) if (d := compare_file(p, r, folders))]
    if not out.is_dir():
        return [f"{out.name}: missing"]
    names = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    ref_names = {p.relative_to(ref) for p in ref.rglob("*") if p.is_file()}
    differences = []
    for rel in sorted(names | ref_names):
        if rel.parts[0] in NOT_COMPARED:
            continue
        if rel not in ref_names:
            differences.append(f"{rel}: not in the reference")
        elif (d := compare_file(out / rel, ref / rel, folders)) is not None:
            differences.append(str(rel.parent / d) if rel.parent != Path(".") else d)
    return differences


def _unreadable(path: Path, reference: Path) -> str | None:
    """Why ``path`` is not a whole file (JSON that does not parse, a safetensors file that does not load, another
    file of another size than the reference's), or None."""
    try:
        data = path.read_bytes()
        if path.name.endswith(".jsonl"):
            [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        elif path.name.endswith(".json"):
            json.loads(data)
        elif path.name.endswith(".safetensors"):
            import safetensors.torch

            safetensors.torch.load(data)
        elif path.name in MASKED:  # its timings change its size: whole when its lines are the reference's, masked
            if _masked(data.decode(), MASKED[path.name]) != _masked(reference.read_text(), MASKED[path.name]):
                return f"{path.name}: other lines than the reference's"
        elif len(data) != reference.stat().st_size:
            return f"{path.name}: {len(data)} bytes, the reference {reference.stat().st_size}"
    except FileNotFoundError:
        return None  # replaced meanwhile: the next look sees the new one
    except Exception as err:  # noqa: BLE001 — any failure to read it back is what is looked for
        return f"{path.name}: unreadable ({type(err).__name__}: {str(err)[:80]})"
    return None


def partial_outputs(command: str, out: Path, ref: Path) -> list[str]:
    """What is visible under a final name without being whole: a product folder without every file of the
    reference's, a file that does not read back, a finished tune run (manifest.json) without its other products.
    Empty: every product is absent or whole."""
    found = []
    for product, reference in zip(products(command, out), products(command, ref)):
        if not product.exists():
            continue
        if product.is_dir():
            names = {p.relative_to(product) for p in product.rglob("*") if p.is_file()}
            wanted = {p.relative_to(reference) for p in reference.rglob("*") if p.is_file()}
            found += [f"{product.name}/{rel}: missing" for rel in sorted(wanted - names)]
            found += [f"{product.name}/{d}" for rel in sorted(names & wanted)
                      if (d := _unreadable(product / rel, reference / rel))]
        elif (d := _unreadable(product, reference)) is not None:
            found.append(d)
    if command.startswith("tune") and (out / "manifest.json").exists():
        found += [f"{p.name}: missing beside manifest.json" for p in products(command, out) if not p.exists()]
    return found


def complete(command: str, out: Path, ref: Path) -> bool:
    """Whether every product is there and whole: the command's work is done."""
    return all(p.exists() for p in products(command, out)) and not partial_outputs(command, out, ref)


def _signature(paths: list[Path]) -> tuple:
    """Cheap stat signature of the products, to validate them again only when they change."""
    sig = []
    for path in paths:
        try:
            files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
            sig.append(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in files))
        except FileNotFoundError:
            sig.append(("changing",))
    return tuple(sig)


# --- running, killing, rerunning ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One process: how it ended and what the watcher saw."""

    returncode: int
    seconds: float
    lock_seconds: float | None  # when the output's lock file first appeared
    held_seconds: float | None  # how long it was seen held
    killed: bool
    resumable_before: bool
    partial: list[str] = field(default_factory=list)
    error: str = ""


def run_once(command: str, fixture: Fixture, out: Path, ref: Path | None, kill_after: float | None, log: Path,
             poll: float = 0.005, armed: Callable[[], bool] | None = None) -> Run:
    """Run ``command`` into ``out``; with ``kill_after``, SIGKILL it that many seconds after its lock appears (or
    after ``armed()`` first holds). With ``ref``, the products are checked for partial content whenever they
    change, and after the kill."""
    lock = out.with_name(f".{out.name}.lock")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    before = resumable(command, out)
    watched, seen, partial = products(command, out), None, []
    with open(log, "ab") as sink:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "weightwise.cli", *command_args(command, fixture, out)],
                                stdout=sink, stderr=subprocess.STDOUT, env=env)
        lock_at = released_at = kill_at = None
        killed = False
        while proc.poll() is None:
            now = time.monotonic()
            held = lock.exists()
            if lock_at is None and held:
                lock_at = now - started
            elif lock_at is not None and released_at is None and not held:
                released_at = now - started
            if kill_after is not None and kill_at is None and (armed() if armed is not None else held):
                kill_at = now + kill_after
            if kill_at is not None and now >= kill_at:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed = proc.returncode == -signal.SIGKILL
                break
            if ref is not None and (sig := _signature(watched)) != seen:
                seen = sig
                partial += partial_outputs(command, out, ref)
            time.sleep(poll)
        seconds = time.monotonic() - started
    held_seconds = None if lock_at is None else (released_at or seconds) - lock_at
    if ref is not None:
        partial += partial_outputs(command, out, ref)
    error = ""
    if proc.returncode not in (0, -signal.SIGKILL):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit {proc.returncode}"
    return Run(proc.returncode, seconds, lock_at, held_seconds, killed, before, sorted(set(partial)), error)


def reference(command: str, fixture: Fixture, folder: Path) -> tuple[Path, Run]:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / output_name(command)
    run = run_once(command, fixture, out, None, None, folder / "log.txt")
    if run.returncode != 0 or run.held_seconds is None:
        raise SystemExit(f"the reference {command} run failed: {run.error} (log: {folder / 'log.txt'})")
    return out, run


def trial(command: str, fixture: Fixture, ref: Path, work_seconds: float, folder: Path, rng: random.Random,
          max_kills: int) -> dict:
    """Kill the command 1 .. ``max_kills`` times at random moments, rerun it until it finishes, compare."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / output_name(command)
    planned = rng.randint(1, max_kills)
    runs: list[Run] = []
    while True:
        kill_after = rng.uniform(0.0, 1.1 * work_seconds) if sum(r.killed for r in runs) < planned else None
        run = run_once(command, fixture, out, ref, kill_after, folder / "log.txt")
        runs.append(run)
        if not run.killed or complete(command, out, ref):  # killed after its work was done: nothing to rerun
            break
    exited = runs[-1].returncode == 0
    finished = exited or complete(command, out, ref)
    differences = compare_outputs(command, out, ref) if finished else ["did not finish"]
    return {
        "runs": len(runs),
        "kills": sum(r.killed for r in runs),
        "kill_seconds": [round(r.seconds - (r.lock_seconds or 0.0), 3) for r in runs if r.killed],
        "resumes": sum(r.resumable_before for r in runs[1:]),
        "finished": finished,
        "killed_after_finishing": finished and not exited,
        "refused": [r.error for r in runs if r.error],
        "identical": finished and not differences,
        "differences": differences,
        "partial": sorted({p for r in runs for p in r.partial}),
        # a process killed after its work leaves its lock file, which the next writer takes over
        "leftovers": [] if not finished else [name for name in leftovers(command, out)
                                              if exited or name != f".{out.name}.lock"],
    }


def summarize(command: str, trials: list[dict], ref_run: Run) -> dict:
    return {
        "command": command,
        "reference_seconds": round(ref_run.seconds, 2),
        "work_seconds": round(ref_run.held_seconds, 2),
        "trials": len(trials),
        "runs": sum(t["runs"] for t in trials),
        "kills": sum(t["kills"] for t in trials),
        "resumes": sum(t["resumes"] for t in trials),
        "finished": sum(t["finished"] for t in trials),
        "killed_after_finishing": sum(t["killed_after_finishing"] for t in trials),
        "identical": sum(t["identical"] for t in trials),
        "partial_seen": sum(bool(t["partial"]) for t in trials),
        "refused_reruns": sum(len(t["refused"]) for t in trials),
        "leftovers": sum(bool(t["leftovers"]) for t in trials),
    }


def markdown(rows: list[dict], settings: dict) -> str:
    lines = [
        f"# Crash safety (`bench/crash.py --trials {settings['trials']}`)",
        "",
        f"Tiny random Llama (hidden {settings['hidden']}, {settings['layers']} blocks), one thread per process, "
        f"seed {settings['seed']}, 1–{settings['max_kills']} SIGKILLs a trial, each at a moment drawn uniformly from "
        "the first 1.1 × (the time the reference run held its output lock) after the lock appears; the same command "
        "rerun until a run exits by itself (or a killed one had already finished its output). Resumes: reruns that "
        "started from a checkpoint. Partial outputs seen: trials in which a product under its final name was ever "
        "seen incomplete (polled every 5 ms and after each kill). Leftovers: trials that ended with lock files, "
        "temporaries or checkpoints beside or inside the output.",
        "",
        "| command | lock held s | trials | runs | kills | resumes | finished | of which killed after finishing "
        "| identical | partial outputs seen | refused reruns | leftovers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['command']} | {row['work_seconds']:.2f} | {row['trials']} | {row['runs']} | {row['kills']} "
                     f"| {row['resumes']} | {row['finished']} | {row['killed_after_finishing']} | {row['identical']} "
                     f"| {row['partial_seen']} | {row['refused_reruns']} | {row['leftovers']} |")
    lines += ["", "Fields allowed to differ from the uninterrupted run (JSON, by file name; everything else byte for byte):", ""]
    lines += [f"- `{name}`: {', '.join(f'`{p}`' for p in paths)}" for name, paths in ALLOWED_TO_DIFFER.items()]
    lines += [f"- not compared: `{name}/` (TensorBoard event files)" for name in NOT_COMPARED]
    problems = [(row["command"], i, t) for row in rows for i, t in enumerate(row["details"])
                if not t["identical"] or t["partial"] or t["refused"] or t["leftovers"]]
    if problems:
        lines += ["", "Problems:", ""]
        for command, i, t in problems:
            what = t["differences"][:2] + t["partial"][:2] + t["refused"][:1] + t["leftovers"][:2]
            lines.append(f"- {command} trial {i}: {'; '.join(what)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per command")
    parser.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    parser.add_argument("--max-kills", type=int, default=3, help="kills per trial: 1 .. this many (drawn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-crash"), help="work folder (emptied first)")
    parser.add_argument("--out", type=Path, default=RESULTS / "crash", help="results: OUT.json and OUT.md")
    args = parser.parse_args()

    import weightwise
    from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic

    shutil.rmtree(args.work, ignore_errors=True)
    fixture = build_fixture(args.work / "fixture", hidden=args.hidden, layers=args.layers)
    rows = []
    settings = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "weightwise_source": str(Path(weightwise.__file__).parent)}
    for command in args.commands:
        rng = random.Random(f"{args.seed}:{command}")  # a command's kill moments do not depend on the others run
        ref, ref_run = reference(command, fixture, args.work / command / "reference")
        work_seconds = ref_run.held_seconds
        print(f"{command}: reference {ref_run.seconds:.1f} s (output lock held {work_seconds:.1f} s)", flush=True)
        trials = []
        for i in range(args.trials):
            result = trial(command, fixture, ref, work_seconds, args.work / command / f"trial-{i:02d}", rng, args.max_kills)
            trials.append(result)
            flags = [k for k in ("partial", "refused", "leftovers", "differences") if result[k]]
            print(f"  trial {i}: {result['kills']} kills, {result['resumes']} resumes, "
                  f"{'identical' if result['identical'] else 'DIFFERENT'}" + (f"; {', '.join(flags)}" if flags else ""),
                  flush=True)
        rows.append({**summarize(command, trials, ref_run), "details": trials})
    write_json_atomic(args.out.with_suffix(".json"), {"settings": settings, "versions": environment_versions(),
                                                      "allowed_to_differ": ALLOWED_TO_DIFFER, "rows": rows})
    text = markdown(rows, settings)
    write_text_atomic(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
