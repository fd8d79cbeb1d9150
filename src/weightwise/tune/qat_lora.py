"""QAT-LoRA (``method: qat-lora``; L4Q, Jeon et al. 2024, arXiv 2402.04902, in the line of QA-LoRA): each targeted
Linear keeps its float weight W0 frozen and trains a low-rank pair (A, B) and its quantizer's group scales and
offsets; forward uses fake_quant(W0 + (alpha/r)·B·A) with qat's straight-through and LSQ/LSQ+ gradients (fakequant.py).

The merged weight is quantized while training, so the result is what qat writes: an ordinary quantized run
``OUT/model`` of the final codes and stored scales (``io.folders.save``), no adapter left at inference, with the same
logits as the trained model bit for bit. The optimizer holds state for the adapters and scales only: a fraction of
qat's, whose latent weights each carry two Adam moments and a gradient.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from weightwise.formats.base import QuantSpec
from weightwise.tune.base import freeze
from weightwise.tune.qat import FakeQuantLinear, QuantizedRunMethod, initial_quantizers

logger = logging.getLogger(__name__)


class LoraFakeQuantLinear(FakeQuantLinear):
    """A :class:`FakeQuantLinear` whose latent weight is W0 + (alpha/r)·B·A: ``weight`` is W0, frozen; ``lora_A``
    (r, in) is drawn as peft draws it (Kaiming-uniform, from ``generator``) and ``lora_B`` (out, r) starts at zero,
    so training starts from the quantized W0."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 bias: nn.Parameter | None, spec: QuantSpec, learn_scales: bool, rank: int, alpha: float,
                 generator: torch.Generator, freezing: bool = False):
        super().__init__(weight, scales, offsets, bias, spec, learn_scales, freezing)
        self.weight.requires_grad_(False)
        rows, cols = self.shape
        a = torch.empty(rank, cols)
        nn.init.kaiming_uniform_(a, a=5**0.5, generator=generator)
        self.lora_A = nn.Parameter(a.to(self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank, device=self.weight.device))
        self.scaling = alpha / rank

    def latent(self) -> torch.Tensor:
        """The merged weight W0 + (alpha/r)·B·A (differentiable in A and B): what FakeQuantLinear's grid, forward and
        result quantize."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


class QATLoraMethod(QuantizedRunMethod):
    """The loop's hooks for qat-lora: AdamW on the adapters (with the config's weight decay) and on the scales and
    offsets (without, LSQ/LSQ+); the frozen W0 has no gradient and no optimizer state. Oscillation handling and
    distillation: :class:`QuantizedRunMethod`'s, on the merged weight's codes."""

    def prepare(self, model, targets, resume=None):
        freeze(model)
        settings = self.settings
        spec = settings.spec
        self.started = time.perf_counter()
        self.check_layouts(targets)
        # W0 comes from the init also when resuming (a checkpoint holds the trained tensors only)
        start = initial_quantizers(model, targets, spec, settings.init)
        generator = torch.Generator().manual_seed(self.config.seed)
        self.model = model
        freezing = settings.freeze_threshold is not None
        self.layers = {name: LoraFakeQuantLinear(*start[name], linear.bias, spec, settings.learn_scales, settings.rank,
                                                 settings.resolved_alpha, generator, freezing)
                       for name, linear in targets.items()}
        for name, layer in self.layers.items():
            model.set_submodule(name, layer)
        self.adapters = {f"{name}.{key}": getattr(layer, key) for name, layer in self.layers.items()
                         for key in ("lora_A", "lora_B")}
        self.quantizers = {} if not settings.learn_scales else {
            f"{name}.{key}": p for name, layer in self.layers.items()
            for key, p in (("scales", layer.scales), ("offsets", layer.offsets)) if p is not None}
        self.params = {**self.adapters, **self.quantizers}
        self.build_optimizer(resume)
        self.start_training(targets, resume)  # W0 stays the Linears' own weight (frozen): the teacher's, unchanged
        logger.info("qat-lora: %d layers to %s, rank %d, from %s (%s), %d trained parameters", len(targets),
                    spec.format, settings.rank, settings.init, "resumed" if resume is not None else "new",
                    self.trained_entries())
        return model

    def param_groups(self):
        groups = [{"params": list(self.adapters.values())}]
        return groups + ([{"params": list(self.quantizers.values()), "weight_decay": 0.0}] if self.quantizers else [])
