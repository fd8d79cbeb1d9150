"""Registry of quantization methods: name → function (weight, spec, stats) → QuantizedTensor.

A method is a pure function of a weight matrix, its QuantSpec and optional calibration statistics.
Adding one = a new module here + one registry line + tests.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from weightwise.formats.base import QuantizedTensor, QuantSpec
from weightwise.quantize.methods.rtn import rtn


class Method(Protocol):
    def __call__(self, weight: torch.Tensor, spec: QuantSpec, stats: dict | None = None) -> QuantizedTensor: ...


METHODS: dict[str, Callable[..., QuantizedTensor]] = {"rtn": rtn}
