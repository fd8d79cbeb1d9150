"""Fine-tuning on text examples through the one optimisation loop (steps.py). Methods differ only by their
hooks (methods.py); this module owns the data order, gradient accumulation, the loss, the learning rate
schedule and checkpoints; steps.py the backward passes, cross-process sum, clipping, updates and refreshes.

Data order: epoch e visits the examples in ``randperm(n, seed(e))`` order, cut into global batches of
``batch_size × grad_accum``; the last partial batch of an epoch is dropped. The position in the data is
therefore a function of the step, which is all a checkpoint needs to resume.

Loss: the method's :meth:`~weightwise.tune.base.TuneMethod.micro_loss` (cross-entropy on the answer tokens only,
labels -100 elsewhere; qat may mix in distillation), summed, divided by the number of answer tokens of the whole
global batch. Every process knows that count, so after summing gradients
over micro-batches and processes the result is the gradient of the global batch's mean loss, whether one
process runs batches of b or two run b/2 each (process r takes rows [r·b/w, (r+1)·b/w) of each micro-batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from weightwise.data.tasks import IGNORE_INDEX, collate
from weightwise.errors import WeightwiseError
from weightwise.tune.checkpoint import TuneCheckpoints, rng_state
from weightwise.comm import Comm
from weightwise.tune.config import TuneConfig
from weightwise.tune.methods import TuneMethod
from weightwise.tune.steps import Step, StepCallback, run_steps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps a run takes over ``n_examples``."""

    n_examples: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, n_examples: int, config: TuneConfig) -> Schedule:
        global_batch = config.batch_size * config.grad_accum
        steps_per_epoch = n_examples // global_batch
        if steps_per_epoch == 0:
            raise WeightwiseError(f"{n_examples} training examples do not fill one global batch of {global_batch} "
                                  "(batch_size × grad_accum): use more examples or a smaller batch")
        total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
        return cls(n_examples, global_batch, steps_per_epoch, total)

    def position(self, step: int) -> dict:
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch": batch}


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``n`` examples (a pure function of seed and epoch)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(n, generator=generator)


def global_batch(step: int, schedule: Schedule, seed: int) -> list[int]:
    """Example indices of the global batch of optimizer step ``step``."""
    position = schedule.position(step)
    order = epoch_order(schedule.n_examples, seed, position["epoch"])
    start = position["batch"] * schedule.global_batch
    return order[start : start + schedule.global_batch].tolist()


def learning_rate(step: int, config: TuneConfig) -> float:
    """Linear warmup over ``warmup_steps``, then constant."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def answer_token_count(example: dict) -> int:
    """Tokens whose loss is taken: labelled positions after the first (position 0 is never predicted)."""
    return int((example["labels"][1:] != IGNORE_INDEX).sum())


def train(
    model: nn.Module,
    method: TuneMethod,
    examples: list[dict[str, torch.Tensor]],
    config: TuneConfig,
    *,
    pad_token_id: int,
    start_step: int = 0,
    first_loss: float | None = None,
    comm: Comm | None = None,
    checkpoints: TuneCheckpoints | None = None,
    checkpoint_info: dict | None = None,
    on_step: StepCallback | None = None,
    on_checkpoint: Callable[[int, str], None] | None = None,
) -> dict:
    """Run optimizer steps ``start_step`` .. end on ``model`` (prepared by ``method``); returns a summary.

    ``first_loss``: a resumed run's step-1 loss (its checkpoint's ``loss_first``), so that the summary's
    ``loss_first`` is the run's, not this process's first step's; each checkpoint stores it.

    ``on_step(record)`` receives each step's metrics (step, total, loss, lr, grad_norm, data position, tokens,
    tokens_per_second, step_seconds, peak_rss_mb, and the refresh counts when the masks moved);
    ``on_checkpoint(step, path)`` follows each checkpoint, written by process 0 with ``checkpoint_info``
    besides the method's state.
    """
    comm = comm or Comm()
    schedule = Schedule.of(len(examples), config)
    if config.batch_size % comm.world:
        raise WeightwiseError(f"batch_size {config.batch_size} does not split over {comm.world} processes: "
                              "use a multiple of the process count")
    per_rank = config.batch_size // comm.world
    device = next(model.parameters()).device
    counts = [answer_token_count(ex) for ex in examples]
    lengths = [len(ex["input_ids"]) for ex in examples]
    if comm.world > 1:
        comm.broadcast(method.trainable_tensors())

    def steps() -> Iterator[Step]:
        for step in range(start_step, schedule.total_steps):
            indices = global_batch(step, schedule, config.seed)
            n_answer = max(1, sum(counts[i] for i in indices))
            micro = [indices[m * config.batch_size : (m + 1) * config.batch_size] for m in range(config.grad_accum)]
            shards = [(rows[comm.rank * per_rank : (comm.rank + 1) * per_rank], n_answer) for rows in micro]
            yield Step(step, shards, schedule.position(step), sum(lengths[i] for i in indices))

    def loss(micro: tuple[list[int], int]) -> torch.Tensor:
        """The micro-batch's summed answer-token loss over the answer tokens of the whole global batch."""
        shard, n_answer = micro
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in shard], pad_token_id).items()}
        return method.micro_loss(model, batch) / n_answer

    run_first_loss = first_loss

    def record(step: dict) -> None:
        nonlocal run_first_loss
        if run_first_loss is None:
            run_first_loss = step["loss"]
        if on_step is not None:
            on_step(step)

    def checkpoint(done: int) -> None:
        if checkpoints is not None and config.checkpoint_every and done % config.checkpoint_every == 0 \
                and done < schedule.total_steps:
            if comm.is_main:
                info = {**(checkpoint_info or {}), "data_position": schedule.position(done), "loss_first": run_first_loss}
                path = checkpoints.save(done, method.state(), rng_state(device), info)
                if on_checkpoint is not None:
                    on_checkpoint(done, str(path))
            comm.barrier()

    was_training = model.training
    model.train()
    try:
        summary = run_steps(method, steps(), loss, total=schedule.total_steps,
                            learning_rate=lambda step: learning_rate(step, config), max_grad_norm=config.max_grad_norm,
                            comm=comm, on_step=record, after_step=checkpoint)
    finally:
        model.train(was_training)
    if not comm.identical(list(method.state()["tensors"].values())):
        raise RuntimeError("the processes ended with different trained weights, masks or optimizer states")
    return {"steps": schedule.total_steps, "steps_run": summary.pop("steps_run"), "start_step": start_step,
            "steps_per_epoch": schedule.steps_per_epoch, "global_batch": schedule.global_batch, **summary,
            "loss_first": run_first_loss}
