"""Block-output tuning of a quantized block's float parameters (codes fixed).

After a block's layers are quantized, each weight is ``v(code)·s + o`` per group: linear in its group's
scale and offset. With the codes frozen, the block's output is a differentiable function of the scales,
offsets, biases and norm parameters, so they can be fitted by gradient descent to make the quantized
block's outputs match the float block's on the calibration inputs. Unlike GPTQ's layer-wise objective,
this sees the whole block (attention softmax, activation function, norms) and lets one layer's error be
compensated by another's. Nothing stored changes size: the same codes, scales and offsets.

Scales are tuned multiplicatively (s = s₀·eᶿ) and offsets in units of their group's scale (o = o₀ + s₀·η),
so one learning rate suits every layer. A block whose tuned parameters (after rounding the scales to their
storage dtype) do not lower the calibration loss keeps its original ones.

The fit runs on the one optimisation loop (tune/steps.py) with :class:`BlockTuning` as its hooks: each step
is one calibration batch (``epochs`` passes in a seeded order), its loss the mean squared error against
the float block's output, its update Adam at a constant rate; the quantized layers compute their weights
from the trained scales (:meth:`QuantizedLinear.use_scales`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weightwise.qlinear import QuantizedLinear
from weightwise.quantize.calibration import CapturedBatch, run_block
from weightwise.tune.steps import Diverged, Step, TorchOptimizerHooks, run_steps

logger = logging.getLogger(__name__)


class BlockTuneConfig(BaseModel):
    """Gradient-descent fit of each quantized block's scales, offsets, biases and norms to the float block's outputs."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(8, ge=1, description="Passes over the calibration batches per block.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (relative: log-scales, offsets in scale units, biases, norms).")
    tune_norms: bool = Field(True, description="Also fit the block's other 1-D float parameters (norm weights and biases).")
    seed: int = Field(0, description="Seed of the batch order.")


class _RelativeScales:
    """A layer's scales and offsets as s₀·eᶿ and o₀ + s₀·η around the stored s₀, o₀, with θ and η trained;
    called, it returns them (the layer's scale source while it is tuned)."""

    def __init__(self, layer: QuantizedLinear):
        self.layer = layer
        self.scale0, self.offset0 = layer.stored_scales()
        self.log_scale = torch.zeros_like(self.scale0, requires_grad=True)
        self.shift = None if self.offset0 is None else torch.zeros_like(self.offset0, requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.log_scale] + ([] if self.shift is None else [self.shift])

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        scales = self.scale0 * self.log_scale.exp()
        return scales, None if self.offset0 is None else self.offset0 + self.scale0 * self.shift


class BlockTuning(TorchOptimizerHooks):
    """The loop's hooks for one block: Adam on the relative scales and offsets of its quantized layers with free
    scales, the biases of all its quantized layers and (``tune_norms``) its other 1-D float parameters."""

    def __init__(self, block: nn.Module, config: BlockTuneConfig):
        layers = [m for m in block.modules() if isinstance(m, QuantizedLinear)]
        self.block, self.config = block, config
        self.scales = [_RelativeScales(layer) for layer in layers if layer.free_scales]
        quantized_params = {id(p) for m in layers for p in m.parameters()}
        self.floats = [p for m in layers for p in m.parameters()]
        if config.tune_norms:
            self.floats += [p for p in block.parameters() if p.ndim == 1 and id(p) not in quantized_params]
        self.saved = [p.detach().clone() for p in self.floats]
        self.params = [t for s in self.scales for t in s.parameters()] + self.floats
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr) if self.params else None

    def steps(self, inputs: list[CapturedBatch]) -> Iterator[Step]:
        """``epochs`` passes over the batches, each in an order drawn from the seeded generator; one batch a step."""
        generator = torch.Generator().manual_seed(self.config.seed)
        index = 0
        for epoch in range(self.config.epochs):
            for batch, i in enumerate(torch.randperm(len(inputs), generator=generator).tolist()):
                yield Step(index, [i], {"epoch": epoch, "batch": batch}, inputs[i][0].shape[:-1].numel())
                index += 1

    @contextmanager
    def fitting(self) -> Iterator[None]:
        """While fitting: the tuned layers compute their weights from the trained scales, and exactly the trained
        tensors require grad (a model loaded frozen is differentiable for the fit only; no other .grad fills)."""
        trained = {id(p) for p in self.floats}
        flags = [(p, p.requires_grad) for p in self.block.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in trained)
            for s in self.scales:
                s.layer.use_scales(s)
            with torch.enable_grad():
                yield
        finally:
            for s in self.scales:
                s.layer.use_scales(None)
            for p, flag in flags:
                p.requires_grad_(flag)

    def store(self) -> None:
        """Write the tuned scales and offsets, rounded to the storage dtype, into the layers."""
        with torch.no_grad():
            for s in self.scales:
                s.layer.set_scales(*s())

    def restore(self) -> None:
        """Put back the stored scales and offsets and the float parameters the fit started from."""
        with torch.no_grad():
            for s in self.scales:
                s.layer.set_scales(s.scale0, s.offset0)
            for p, value in zip(self.floats, self.saved):
                p.copy_(value)


def _block_loss(block: nn.Module, inputs: list[CapturedBatch], targets: list[torch.Tensor]) -> float:
    """Mean squared error of the block's outputs (weights dequantized once for all batches) against ``targets``."""
    total = sum(float(F.mse_loss(out, target, reduction="sum")) for (out, _, _), target in zip(run_block(block, inputs), targets))
    return total / max(sum(target.numel() for target in targets), 1)


def tune_block(block: nn.Module, inputs: list[CapturedBatch], targets: list[torch.Tensor], config: BlockTuneConfig) -> dict:
    """Fit the quantized ``block``'s scales, offsets, biases (and norms) so that its outputs on ``inputs`` match
    ``targets`` (the float block's); in place. Returns {"loss_before", "loss_after", "kept"} (mean squared error)."""
    tuning = BlockTuning(block, config)
    before = _block_loss(block, inputs, targets)
    if not tuning.params:
        return {"loss_before": before, "loss_after": before, "kept": False}

    def loss(i: int) -> torch.Tensor:
        hidden, args, kwargs = inputs[i]
        out = block(hidden, *args, **kwargs)
        return F.mse_loss(out[0] if isinstance(out, tuple) else out, targets[i])

    with tuning.fitting():
        try:
            run_steps(tuning, tuning.steps(inputs), loss, total=config.epochs * len(inputs), learning_rate=lambda step: config.lr)
        except Diverged as error:  # the tuned parameters are not finite: measured below, they are not kept
            logger.warning("block tuning diverged (%s)", error)
    tuning.store()
    after = _block_loss(block, inputs, targets)
    kept = after < before
    if not kept:
        tuning.restore()
    return {"loss_before": before, "loss_after": after if kept else before, "kept": kept}
