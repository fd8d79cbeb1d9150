"""tune(model, tokenizer, config, output_dir): fine-tune on a task with one of the registered methods,
evaluate before and after, write the result (sparse patch or peft adapter), metrics and a manifest.

Output folder ``OUT``:

- ``tune_config.json`` (the hyperparameters and base model hash, written first);
- task ``sampled``: ``sampled.jsonl`` (the texts sampled from the model, read back as a text task) and
  ``sampled.json`` (the settings they were sampled with), reused by a rerun under the same settings;
- ``metrics.jsonl`` (one line per optimizer step) and ``tensorboard/`` when TensorBoard is installed;
- ``checkpoints/step-N/`` while the run goes on (deleted at the end unless ``keep_checkpoints``);
- at the end ``patch.safetensors`` (sparse and full methods), ``adapter/`` (peft) or ``model/`` (qat: a quantized
  run, with the tokenizer), ``metrics.json`` and, last, ``manifest.json``: a folder with a manifest is a finished run.

Rerunning on a folder that holds a checkpoint of the same config and base model resumes from it and ends
with the same weights as an uninterrupted run; a folder of another run is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from weightwise.architectures import family_of, matches
from weightwise.data.sampled import SAMPLED_TASK, sample_texts
from weightwise.data.tasks import encode_examples, pad_id, task_examples
from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import (
    MANIFEST_NAME,
    TUNE_RUN_KIND,
    output_lock,
    state_dict_fingerprint,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from weightwise.tune.checkpoint import TuneCheckpoints, set_rng_state
from weightwise.comm import Comm
from weightwise.tune.config import TuneConfig
from weightwise.tune.loop import Schedule, train
from weightwise.tune.methods import make_method

logger = logging.getLogger(__name__)

CONFIG_FILE = "tune_config.json"
METRICS_LOG = "metrics.jsonl"
METRICS_FILE = "metrics.json"
SAMPLED_FILE, SAMPLED_SETTINGS = "sampled.jsonl", "sampled.json"

Progress = Callable[[str, int, int, dict], None]  # (phase, done, total, info)


def target_modules(model: nn.Module, config: TuneConfig) -> dict[str, nn.Linear]:
    """The Linear layers trained, by name: ``config.targets`` or the family's decoder-block linears."""
    if config.targets is not None:
        patterns, keep = config.targets, ()
    else:
        family = family_of(getattr(getattr(model, "config", None), "model_type", "unknown"))
        patterns, keep = [family.linears], family.keep
    found = {name: module for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and matches(name, patterns) and not matches(name, keep)}
    if not found:
        raise WeightwiseError("no Linear layer matches the tune targets; check the --targets patterns")
    return found


def tune(
    model: nn.Module,
    tokenizer,
    config: TuneConfig | dict | str | Path,
    output_dir: str | Path,
    *,
    progress: Progress | None = None,
    overwrite: bool = False,
    source: dict | None = None,
    comm: Comm | None = None,
) -> dict:
    """Fine-tune ``model`` in place on ``config.task`` and write the run folder ``output_dir``.

    Sparse and full methods change the targeted weights in place; lora/dora/pissa inject peft adapter
    layers into ``model`` (so ``model`` runs with them); qat replaces the targets by fake-quantized layers
    (so ``model`` runs as its saved quantized run). Returns the metrics also written to metrics.json:
    training summary, trained entries, optimizer state bytes, and before/after exact match and retention
    perplexity. ``progress(phase, done, total, info)`` is called on process 0 only (phases: "eval before",
    "masks" (sparse methods, per layer), "train", "eval after"; ``info`` carries the loop's step record, or
    {"event": "resumed" | "checkpoint", "step", ("path")}).
    Under a launcher (``torchrun``, ``accelerate launch``; see comm.py) every process calls ``tune`` alike on
    its own copy of the model; process 0 writes the files.
    """
    started = time.perf_counter()
    config = _as_config(config)
    comm = comm or Comm.from_environment(next(model.parameters()).device)
    out = Path(output_dir)
    with output_lock(out) if comm.is_main else nullcontext():  # process 0 writes, so it alone holds the lock
        return _tune(model, tokenizer, config, out, progress, overwrite, source, comm, started)


def _tune(model: nn.Module, tokenizer, config: TuneConfig, out: Path, progress: Progress | None, overwrite: bool,
          source: dict | None, comm: Comm, started: float) -> dict:
    """The body of :func:`tune`, run under the output's lock."""
    report = progress if (progress is not None and comm.is_main) else (lambda *args: None)
    targets = target_modules(model, config)
    train_examples, test_examples = _examples(config)
    encoded = None if train_examples is None else encode_examples(train_examples, tokenizer, config.max_length)
    schedule = Schedule.of(config.train_examples if encoded is None else len(encoded), config)  # sampled: never dropped
    base_hash = state_dict_fingerprint(model)
    key = {"config": config.training_key(), "base_model_hash": base_hash}
    checkpoints = TuneCheckpoints(out, key)
    resume = _open_output(out, checkpoints, overwrite, comm)
    if comm.is_main:
        write_json_atomic(out / CONFIG_FILE, {"config": config.model_dump(), "base_model_hash": base_hash, "source": source})
        _truncate_log(out / METRICS_LOG, resume["step"] if resume else 0)
    comm.barrier()
    if encoded is None:
        encoded = encode_examples(_sampled_examples(model, tokenizer, config, out, base_hash, comm), tokenizer,
                                  config.max_length)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        if resume is not None:
            before = resume["state"].get("before")
            report("train", resume["step"], schedule.total_steps, {"event": "resumed", "step": resume["step"]})
        elif config.eval_before:
            report("eval before", 0, 1, {})
            before = _evaluate(model, tokenizer, test_examples, config, comm)
        else:
            before = None
        method = make_method(config, comm, progress=lambda done, total: report("masks", done, total, {}))
        trained_model = method.prepare(model, targets, resume)
        if resume is not None:
            set_rng_state(resume["rng"], device)
        logger.info("%s: %d trained entries, %d optimizer state bytes", config.method.name, method.trained_entries(),
                    method.optimizer_state_bytes())
        with _StepLog(out, comm.is_main) as log:
            def on_step(record: dict) -> None:
                log.write(record)
                report("train", record["step"], record["total"], record)

            summary = train(trained_model, method, encoded, config, pad_token_id=pad_id(tokenizer),
                            start_step=resume["step"] if resume else 0,
                            first_loss=resume["state"].get("loss_first") if resume else None, comm=comm, checkpoints=checkpoints,
                            checkpoint_info={"config": config.model_dump(), "before": before}, on_step=on_step,
                            on_checkpoint=lambda step, path: report("train", step, schedule.total_steps,
                                                                    {"event": "checkpoint", "step": step, "path": path}))
        method.finish()
        report("eval after", 0, 1, {})
        after = _evaluate(trained_model, tokenizer, test_examples, config, comm)
    metrics = {
        "method": config.method.name,
        "train": summary,
        "trained_entries": method.trained_entries(),
        "targeted_entries": sum(m.weight.numel() for m in targets.values()),
        "optimizer_state_bytes": method.optimizer_state_bytes(),
        "before": before,
        "after": after,
        "resumed_from_step": resume["step"] if resume else None,
        "processes": comm.world,
        "seconds": time.perf_counter() - started,
    }
    metrics["trained_fraction"] = metrics["trained_entries"] / metrics["targeted_entries"]
    if comm.is_main:
        metadata = {"base_model_hash": base_hash, "method": config.method.name,
                    **(config.method.budget if config.method.sparse else {}),
                    "config": config.model_dump(), "metrics": _headline(metrics)}
        files = method.save_result(out, metadata, config.patch_dtype, tokenizer)
        metrics["files"] = files
        write_json_atomic(out / METRICS_FILE, metrics)
        if not config.keep_checkpoints:  # before the manifest: a run killed in between starts again, and a finished
            checkpoints.clear()          # run never keeps checkpoints it was not asked to keep
        write_manifest(out, TUNE_RUN_KIND, name=out.name, config=config.model_dump(), base_model_hash=base_hash,
                       source=source, files=files, metrics=_headline(metrics))
    comm.barrier()
    return metrics


def _as_config(config) -> TuneConfig:
    from weightwise.quantize.recipe import validated

    if isinstance(config, TuneConfig):
        return config
    if isinstance(config, dict):
        return validated(TuneConfig, config)
    return TuneConfig.from_yaml(config)


def _open_output(out: Path, checkpoints: TuneCheckpoints, overwrite: bool, comm: Comm) -> dict | None:
    """Decide (on every process alike, from the files) whether to resume, start afresh or refuse."""
    exists = out.exists()
    if exists and not out.is_dir():
        raise WeightwiseError(f"output '{out}' exists and is not a folder; remove it or choose another -o path")
    state = checkpoints.latest_state() if exists else None
    ours = exists and (out / CONFIG_FILE).is_file()
    if exists and not overwrite:
        if (out / MANIFEST_NAME).is_file():
            raise WeightwiseError(f"'{out}' holds a finished run; pass --overwrite to replace it or choose another -o path")
        if state is not None and not checkpoints.matches(state):
            raise WeightwiseError(f"'{out}' holds a checkpoint of another config or base model; rerun the same command "
                                  "to resume it, pass --overwrite to start afresh, or choose another -o path")
        if state is None and not ours and any(out.iterdir()):
            raise WeightwiseError(f"'{out}' is not empty and not a weightwise tune run; choose another -o path or pass --overwrite")
    comm.barrier()
    if overwrite and exists and comm.is_main:
        shutil.rmtree(out)
    if comm.is_main:
        out.mkdir(parents=True, exist_ok=True)
    comm.barrier()
    return None if overwrite or state is None else checkpoints.load()


def _truncate_log(path: Path, step: int) -> None:
    """Keep the step lines of ``metrics.jsonl`` up to ``step`` (a resumed run rewrites the later ones)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class _StepLog:
    """Appends each step record to metrics.jsonl (and TensorBoard scalars when tensorboard is installed)."""

    def __init__(self, out: Path, active: bool):
        self.out, self.active = out, active
        self.file = self.writer = None

    def __enter__(self):
        if self.active:
            self.file = (self.out / METRICS_LOG).open("a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(self.out / "tensorboard"))
        return self

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_second", "step_seconds"):
                self.writer.add_scalar(f"train/{key}", record[key], record["step"])

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _examples(config: TuneConfig):
    """(training examples, held-out examples) of the task; the training ones are None for task 'sampled', which
    needs the model and the run folder (:func:`_sampled_examples`)."""
    sampled = config.task == SAMPLED_TASK
    train_examples = None if sampled else task_examples(config.task, "train", config.train_examples, seed=None)
    test_task = config.test_task or (config.task if config.task == "arithmetic" else None)
    test_examples = task_examples(test_task, "test", config.test_examples) if test_task and config.test_examples else []
    return train_examples, test_examples


def _sampled_examples(model: nn.Module, tokenizer, config: TuneConfig, out: Path, base_hash: str, comm: Comm) -> list:
    """Task 'sampled': ``train_examples`` texts of ``max_length`` tokens (one left for the end-of-sequence token)
    sampled from the model before tuning (data.sampled, seeded by ``seed``), written by process 0 to
    ``OUT/sampled.jsonl`` unless that file was sampled under the same settings from the same model, then read back
    as a text task: a resumed run trains on the very text the first one sampled."""
    settings = {"base_model_hash": base_hash, "texts": config.train_examples, "tokens": config.max_length - 1,
                "temperature": config.sample_temperature, "seed": config.seed, "batch_size": config.batch_size}
    path, saved = out / SAMPLED_FILE, out / SAMPLED_SETTINGS
    if comm.is_main and not (path.is_file() and saved.is_file() and json.loads(saved.read_text()) == settings):
        logger.info("sampling %d texts of %d tokens from the model (temperature %g)", settings["texts"],
                    settings["tokens"], settings["temperature"])
        texts = sample_texts(model, tokenizer, settings["texts"], settings["tokens"], temperature=settings["temperature"],
                             batch_size=config.batch_size, seed=config.seed)
        saved.unlink(missing_ok=True)  # the settings last: a run killed in between samples again
        write_text_atomic(path, "".join(json.dumps({"text": text}) + "\n" for text in texts))
        write_json_atomic(saved, settings)
    comm.barrier()
    return task_examples(str(path), "train", config.train_examples)


def _evaluate(model: nn.Module, tokenizer, examples, config: TuneConfig, comm: Comm) -> dict | None:
    """Exact match on the held-out examples and retention perplexity on the pydoc eval split (process 0)."""
    result = None
    if comm.is_main:
        result = {}
        if examples:
            from weightwise.evaluate.tasks import exact_match

            result["exact_match"] = exact_match(model, tokenizer, examples, max_new_tokens=config.max_new_tokens,
                                                batch_size=config.eval_batch_size)
        if config.retention_max_tokens:
            from weightwise.evaluate import evaluate

            ppl = evaluate(model, tokenizer, max_tokens=config.retention_max_tokens, window=config.retention_window,
                           measure_speed=False)
            result["retention"] = {"ppl": ppl.ppl, "n_tokens_scored": ppl.n_tokens_scored}
    comm.barrier()
    return result


def _headline(metrics: dict) -> dict:
    """The few numbers a manifest and a patch's metadata carry."""
    def pick(side):
        if not side:
            return None
        return {"exact_match": (side.get("exact_match") or {}).get("accuracy"),
                "retention_ppl": (side.get("retention") or {}).get("ppl")}

    train_summary = metrics["train"]
    return {"loss_first": train_summary["loss_first"], "loss_last": train_summary["loss_last"], "steps": train_summary["steps"],
            "trained_entries": metrics["trained_entries"], "trained_fraction": metrics["trained_fraction"],
            "optimizer_state_bytes": metrics["optimizer_state_bytes"], "before": pick(metrics["before"]),
            "after": pick(metrics["after"])}
