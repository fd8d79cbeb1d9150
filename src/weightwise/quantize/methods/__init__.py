"""Registry of quantization methods: a typed config (pydantic, discriminated by ``name``) → its handler.

A handler is a thin adapter around a pure function of a weight matrix, its QuantSpec and, for
calibrated methods, the input statistics of the layer (see ``quantize.calibration``). Adding a method
= a new module here + a config class + one registry line + tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from weightwise.formats.base import QuantizedTensor, QuantSpec
from weightwise.quantize.methods.gptq import gptq
from weightwise.quantize.methods.rtn import rtn


class RTNConfig(BaseModel):
    """Round-to-nearest: no calibration."""

    model_config = ConfigDict(extra="forbid")
    needs_calibration: ClassVar[bool] = False

    name: Literal["rtn"] = "rtn"


class GPTQConfig(BaseModel):
    """GPTQ (Frantar et al. 2022): column-wise quantization with Hessian-based error feedback."""

    model_config = ConfigDict(extra="forbid")
    needs_calibration: ClassVar[bool] = True

    name: Literal["gptq"] = "gptq"
    damp: float = Field(0.01, gt=0, description="Dampening added to H's diagonal, relative to its mean (×10 on each failed Cholesky).")
    block_size: int = Field(128, ge=1, description="Columns per lazy-update block.")
    act_order: bool = Field(True, description="Quantize columns in order of decreasing Hessian diagonal (its effect is measured in bench/README.md).")
    static_groups: bool = Field(True, description="Group scales from the weights before GPTQ (True) or refitted at each group's first column (False).")


MethodConfig = Annotated[Union[RTNConfig, GPTQConfig], Field(discriminator="name")]

Handler = Callable[[BaseModel, torch.Tensor, QuantSpec, "dict | None"], "tuple[QuantizedTensor, dict]"]


def _rtn(config: RTNConfig, weight: torch.Tensor, spec: QuantSpec, stats: dict | None) -> tuple[QuantizedTensor, dict]:
    return rtn(weight, spec), {}


def _gptq(config: GPTQConfig, weight: torch.Tensor, spec: QuantSpec, stats: dict | None) -> tuple[QuantizedTensor, dict]:
    return gptq(weight, spec, stats["hessian"], damp=config.damp, block_size=config.block_size,
                act_order=config.act_order, static_groups=config.static_groups)


METHODS: dict[type[BaseModel], Handler] = {RTNConfig: _rtn, GPTQConfig: _gptq}
METHOD_NAMES: tuple[str, ...] = tuple(cls.model_fields["name"].default for cls in METHODS)


def run_method(config: BaseModel, weight: torch.Tensor, spec: QuantSpec, stats: dict | None) -> tuple[QuantizedTensor, dict]:
    """Quantize one weight with the method ``config`` names; returns the tensor and diagnostics."""
    return METHODS[type(config)](config, weight, spec, stats)
