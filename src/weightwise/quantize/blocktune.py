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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weightwise.formats.base import QuantSpec
from weightwise.formats.quantizer import (
    decode_scale,
    encode_scale,
    from_groups,
    group_layout,
    unpacked_codes,
)
from weightwise.quantize.calibration import CapturedBatch, run_block
from weightwise.qlinear import QuantizedLinear


class BlockTuneConfig(BaseModel):
    """Gradient-descent fit of each quantized block's scales, offsets, biases and norms to the float block's outputs."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(8, ge=1, description="Passes over the calibration batches per block.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate (relative: log-scales, offsets in scale units, biases, norms).")
    tune_norms: bool = Field(True, description="Also fit the block's other 1-D float parameters (norm weights and biases).")
    seed: int = Field(0, description="Seed of the batch order.")


def tunable(spec: QuantSpec) -> bool:
    """Free float scales (not MX exponents, not power-of-two constrained)."""
    return (spec.number_format.scaling != "mx" and spec.pow2_scales == "none"
            and spec.resolved_scale_dtype != "e8m0")


class _ScaledWeight:
    """A QuantizedLinear's weight as a differentiable function of (log-scale, offset shift)."""

    def __init__(self, layer: QuantizedLinear):
        qt = layer.quantized_tensor()
        self.layer, self.shape, self.dtype = layer, qt.shape, layer.spec.resolved_scale_dtype
        rows, groups, g = group_layout(qt.shape, layer.spec)
        codes = unpacked_codes(qt)
        codes = F.pad(codes, (0, groups * g - qt.shape[1])) if groups * g != qt.shape[1] else codes
        self.values = layer.spec.number_format.code_values(codes.reshape(rows, groups, g)).to(torch.float32)
        self.scale0 = decode_scale(qt.scales, self.dtype)
        self.offset0 = None if qt.offsets is None else decode_scale(qt.offsets, self.dtype)
        self.log_scale = torch.zeros_like(self.scale0, requires_grad=True)
        self.shift = None if self.offset0 is None else torch.zeros_like(self.offset0, requires_grad=True)
        factors = layer.lowrank_factors()
        self.extra = None if factors is None else factors.delta().to(torch.float32)

    def parameters(self) -> list[torch.Tensor]:
        return [self.log_scale] + ([] if self.shift is None else [self.shift])

    def offsets(self) -> torch.Tensor | None:
        return None if self.offset0 is None else self.offset0 + self.scale0 * self.shift

    def weight(self) -> torch.Tensor:
        w = self.values * (self.scale0 * self.log_scale.exp()).unsqueeze(-1)
        if self.offset0 is not None:
            w = w + self.offsets().unsqueeze(-1)
        w = from_groups(w, self.shape)
        return w if self.extra is None else w + self.extra

    def store(self) -> None:
        """Write the tuned scales and offsets, rounded to the storage dtype, into the layer."""
        with torch.no_grad():
            self.layer.scales.copy_(encode_scale(self.scale0 * self.log_scale.exp(), self.dtype))
            if self.offset0 is not None:
                self.layer.offsets.copy_(encode_scale(self.offsets(), self.dtype))


def _block_loss(block: nn.Module, inputs: list[CapturedBatch], targets: list[torch.Tensor]) -> float:
    """Mean squared error of the block's outputs (weights dequantized once for all batches) against ``targets``."""
    total = sum(float(F.mse_loss(out, target, reduction="sum")) for (out, _, _), target in zip(run_block(block, inputs), targets))
    return total / max(sum(target.numel() for target in targets), 1)


def tune_block(block: nn.Module, inputs: list[CapturedBatch], targets: list[torch.Tensor], config: BlockTuneConfig) -> dict:
    """Fit the quantized ``block``'s scales, offsets, biases (and norms) so that its outputs on ``inputs`` match
    ``targets`` (the float block's); in place. Returns {"loss_before", "loss_after", "kept"} (mean squared error)."""
    layers = [m for m in block.modules() if isinstance(m, QuantizedLinear) and tunable(m.spec)]
    weights = [_ScaledWeight(layer) for layer in layers]
    quantized_params = {id(p) for m in block.modules() if isinstance(m, QuantizedLinear) for p in m.parameters()}
    floats = [p for m in block.modules() if isinstance(m, QuantizedLinear) for p in m.parameters()]
    if config.tune_norms:
        floats += [p for p in block.parameters() if p.ndim == 1 and id(p) not in quantized_params]
    saved = [p.detach().clone() for p in floats]
    before = _block_loss(block, inputs, targets)
    params = [t for w in weights for t in w.parameters()] + floats
    if not params:
        return {"loss_before": before, "loss_after": before, "kept": False}
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    frozen = [p for p in floats if not p.requires_grad]  # e.g. a model loaded frozen: differentiable for the fit only
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(config.epochs):
                for i in torch.randperm(len(inputs), generator=generator).tolist():
                    hidden, args, kwargs = inputs[i]
                    for w in weights:
                        w.layer.hold_weight(w.weight())
                    out = block(hidden, *args, **kwargs)
                    loss = F.mse_loss(out[0] if isinstance(out, tuple) else out, targets[i])
                    grads = torch.autograd.grad(loss, params)
                    for p, grad in zip(params, grads):
                        p.grad = grad
                    optimizer.step()
    finally:
        for w in weights:
            w.layer.hold_weight(None)
        for p in frozen:
            p.requires_grad_(False)
    originals = [(w.layer.scales.clone(), None if w.layer.offsets is None else w.layer.offsets.clone()) for w in weights]
    for w in weights:
        w.store()
    for p in params:
        p.grad = None
    after = _block_loss(block, inputs, targets)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for w, (scales, offsets) in zip(weights, originals):
                w.layer.scales.copy_(scales)
                if offsets is not None:
                    w.layer.offsets.copy_(offsets)
            for p, value in zip(floats, saved):
                p.copy_(value)
    return {"loss_before": before, "loss_after": after if kept else before, "kept": kept}
