"""QuantizedLinear: a drop-in nn.Module that stores packed codes and scales and dequantizes in forward.

Only the packed form is kept in memory, so a quantized model's weight bytes really shrink; the cost
is one dequantization per forward call, unless :func:`dequantized_once` holds the float weights for a
stretch of many calls (calibration, generation, evaluation). Optional low-rank compensation factors
(LoRC) are added to the dequantized weight. An optional activation format (``act_format``)
fake-quantizes the input per token before the matmul (simulated W8A8 / W4A8); it stores nothing.

The weight is a differentiable function of the group scales and offsets (the codes fixed):
:meth:`QuantizedLinear.weight_from` computes it for given ones, and :meth:`QuantizedLinear.use_scales`
makes forward compute it from trainable ones on every call, so a loss on the outputs trains them
(block tuning; quantization-aware training); :meth:`QuantizedLinear.set_scales` stores the result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields

import psutil
import torch
import torch.nn.functional as F
from torch import nn

from weightwise.formats.activations import activation_spec, fake_quantize_activations
from weightwise.formats.base import QuantizedTensor, QuantSpec
from weightwise.formats.quantizer import dequantize_with, encode_scale, float_scales, stored_layout
from weightwise.formats.lowrank import FactorDtype, LowRankFactors
from weightwise.records import LayerRecord

logger = logging.getLogger(__name__)

_TENSOR_FIELDS = tuple(f.name for f in fields(QuantizedTensor) if f.name not in ("shape", "spec"))

# Returns the float32 group scales (R, G) and offsets (None for symmetric formats) forward should use.
ScaleSource = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def _lowrank_layout(out_features: int, in_features: int, rank: int, dtype: FactorDtype) -> dict:
    """(shape, dtype) of the stored LoRC tensors, by LowRankFactors field."""
    if dtype == "fp16":
        return {"a": ((out_features, rank), torch.float16), "b": ((rank, in_features), torch.float16)}
    return {"a": ((out_features, rank), torch.int8), "b": ((rank, in_features), torch.int8),
            "a_scales": ((out_features,), torch.float16), "b_scales": ((rank,), torch.float16)}


class QuantizedLinear(nn.Module):
    """y = [actq](x) · (dequant(codes, scales[, offsets]) [+ A·B])ᵀ + bias."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
                 lowrank: tuple[int, FactorDtype] | None = None, device=None, act_format: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec, self.lowrank = in_features, out_features, spec, lowrank
        if act_format is not None:
            activation_spec(act_format)  # refuse an unknown format now, not at the first forward
        self.act_format = act_format
        self._weight_cache: torch.Tensor | None = None  # set only through hold_weight()
        self._scale_source: ScaleSource | None = None  # set only through use_scales()
        for name in _TENSOR_FIELDS:
            self.register_buffer(name, None)
        for name, (size, dtype) in stored_layout((out_features, in_features), spec).items():
            self.register_buffer(name, torch.zeros(size, dtype=dtype, device=device))
        if lowrank is not None:
            for name, (size, dtype) in _lowrank_layout(out_features, in_features, *lowrank).items():
                self.register_buffer(f"lowrank_{name}", torch.zeros(size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                       factors: LowRankFactors | None = None, factor_dtype: FactorDtype = "fp16",
                       act_format: str | None = None) -> "QuantizedLinear":
        out_features, in_features = qt.shape
        lowrank = None if factors is None else (factors.rank, factor_dtype)
        module = cls(in_features, out_features, qt.spec, bias=bias is not None, lowrank=lowrank, device=qt.packed_codes.device,
                     act_format=act_format)
        for name in _TENSOR_FIELDS:
            value = getattr(qt, name)
            if value is not None:
                getattr(module, name).copy_(value)
        if factors is not None:
            for name in _lowrank_layout(out_features, in_features, *lowrank):
                getattr(module, f"lowrank_{name}").copy_(getattr(factors, name))
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(torch.float32))
        return module

    @classmethod
    def empty_like(cls, linear: nn.Linear, record: LayerRecord) -> "QuantizedLinear":
        """An unfilled module for ``linear`` shaped by its ``record`` (spec, optional LoRC and act_format), for loading."""
        lorc = record.lorc
        return cls(linear.in_features, linear.out_features, record.spec, bias=linear.bias is not None,
                   lowrank=None if lorc is None else (lorc.rank, lorc.dtype), act_format=record.act_format)

    def quantized_tensor(self) -> QuantizedTensor:
        tensors = {name: getattr(self, name) for name in _TENSOR_FIELDS}
        return QuantizedTensor(shape=(self.out_features, self.in_features), spec=self.spec, **tensors)

    def lowrank_factors(self) -> LowRankFactors | None:
        if self.lowrank is None:
            return None
        names = _lowrank_layout(self.out_features, self.in_features, *self.lowrank)
        return LowRankFactors(**{name: getattr(self, f"lowrank_{name}") for name in names})

    @property
    def free_scales(self) -> bool:
        """Whether the scales may take any float value (not MX exponents, not power-of-two constrained), so
        that :meth:`set_scales` can store tuned ones."""
        s = self.spec
        return s.number_format.scaling != "mx" and s.pow2_scales == "none" and s.resolved_scale_dtype != "e8m0"

    def stored_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The float32 group scales (R, G) and offsets (None for symmetric formats) as stored."""
        return float_scales(self.quantized_tensor())

    def weight_from(self, scales: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight from the stored codes with float32 group ``scales`` and ``offsets`` (shaped as
        :meth:`stored_scales`) instead of the stored ones, plus the low-rank term: differentiable in them."""
        weight = dequantize_with(self.quantized_tensor(), scales, offsets)
        factors = self.lowrank_factors()
        return weight if factors is None else weight + factors.delta()

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_from(*self.stored_scales())

    def set_scales(self, scales: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        """Store float32 group ``scales`` and ``offsets`` (e.g. tuned ones), rounded to the storage dtype."""
        if not self.free_scales:
            raise ValueError(f"scales of format {self.spec.format} (scale dtype {self.spec.resolved_scale_dtype}, "
                             f"pow2_scales {self.spec.pow2_scales}) cannot be set freely")
        dtype = self.spec.resolved_scale_dtype
        with torch.no_grad():
            self.scales.copy_(encode_scale(scales, dtype))
            if offsets is not None:
                self.offsets.copy_(encode_scale(offsets, dtype))

    @property
    def scale_source(self) -> ScaleSource | None:
        """What forward computes its weight from instead of the stored scales, if anything (see :meth:`use_scales`)."""
        return self._scale_source

    def use_scales(self, source: ScaleSource | None) -> None:
        """Make every forward call compute its weight as ``weight_from(*source())``: with trainable scales and
        offsets behind ``source``, a loss on the outputs differentiates through them; None uses the stored ones.
        Takes precedence over a held weight."""
        self._scale_source = source

    @property
    def held_weight(self) -> torch.Tensor | None:
        """The float weight forward uses instead of dequantizing, if one is held."""
        return self._weight_cache

    def hold_weight(self, weight: torch.Tensor | None) -> None:
        """Make forward use ``weight`` (the float weight dequantized once) instead of dequantizing the stored
        codes on every call; None dequantizes again."""
        self._weight_cache = weight

    def stored_bits(self) -> int:
        """Bits of every stored weight tensor (codes, scales, offsets, shifts, low-rank factors), not the bias."""
        return sum(8 * t.numel() * t.element_size() for t in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._scale_source is not None:
            weight = self.weight_from(*self._scale_source())
        else:
            weight = self._weight_cache if self._weight_cache is not None else self.dequantized_weight()
        if self.act_format is not None:
            x = fake_quantize_activations(x, self.act_format)
        return F.linear(x, weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        s = self.spec
        where = f"g{s.resolved_group_size}" if s.granularity == "group" else s.granularity
        extra = f", lorc rank {self.lowrank[0]} {self.lowrank[1]}" if self.lowrank else ""
        extra += f", act={self.act_format}" if self.act_format else ""
        return f"in={self.in_features}, out={self.out_features}, format={s.format}, {where}, scales={s.resolved_scale_dtype}{extra}"


@contextmanager
def dequantized_once(module: nn.Module, max_bytes: int | None = None) -> Iterator[bool]:
    """Dequantize every QuantizedLinear in ``module`` once for many forward calls (calibration passes,
    generation, evaluation) instead of once per call; same outputs bit for bit. Yields whether it did.

    The float weights (float32, 4 bytes a parameter) are held only if they fit: in ``max_bytes`` when
    given, else in half the memory now free on each device that holds them, leaving the rest for
    activations and caches. If they do not fit, forward calls dequantize as usual (logged). Layers that
    already hold a weight (an enclosing call) keep it; layers computing theirs from trained scales
    (:meth:`QuantizedLinear.use_scales`) are left alone. On exit the float weights are dropped, so memory
    returns to the packed size.
    """
    layers = [m for m in module.modules()
              if isinstance(m, QuantizedLinear) and m.held_weight is None and m.scale_source is None]
    needed = _float_weight_bytes(layers)
    if max_bytes is not None:
        fits = sum(needed.values()) <= max_bytes
    else:
        fits = all(size <= _free_bytes(device) // 2 for device, size in needed.items())
    if not fits:
        layers = []
        logger.warning("dequantizing on every forward call: the float weights (%.0f MB) do not fit in %s",
                       sum(needed.values()) / 2**20,
                       f"max_bytes {max_bytes}" if max_bytes is not None else "half the free memory")
    try:
        for layer in layers:
            layer.hold_weight(layer.dequantized_weight())
        yield fits
    finally:
        for layer in layers:
            layer.hold_weight(None)


def _float_weight_bytes(layers: list[QuantizedLinear]) -> dict[torch.device, int]:
    """Bytes of the float32 weights that ``layers`` dequantize to, by the device holding them."""
    needed: dict[torch.device, int] = {}
    for layer in layers:
        device = layer.packed_codes.device
        needed[device] = needed.get(device, 0) + 4 * layer.out_features * layer.in_features
    return needed


def _free_bytes(device: torch.device) -> int:
    """Memory free now on ``device``: the GPU's own for CUDA, the host's otherwise."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available
