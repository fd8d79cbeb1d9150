"""Registry of quantization methods: a typed config (pydantic, discriminated by ``name``) → its handler.

A handler is a thin adapter around a pure function of a weight matrix, its QuantSpec and, for
calibrated methods, the input statistics of the layer (see ``quantize.calibration``). Adding a method
= a new module here + a config class + one registry line + tests. A calibrated method's config may also
define ``prepare_block(block, block_name, specs, stats, family) -> stats``, run on each decoder block
before its layers are quantized (AWQ folds its scales there; see ``quantize.scaling``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from weightwise.errors import WeightwiseError
from weightwise.formats.base import QuantizedTensor, QuantSpec
from weightwise.formats.quantizer import compute_scales, to_groups
from weightwise.quantize.methods.awq import clip_summary, search_clip, search_scales
from weightwise.quantize.methods.fpsearch import search_fp_format
from weightwise.quantize.methods.gptq import gptq, gptq_rounds
from weightwise.quantize.methods.rtn import rtn


class RTNConfig(BaseModel):
    """Round-to-nearest: no calibration."""

    model_config = ConfigDict(extra="forbid")
    needs_calibration: ClassVar[bool] = False

    name: Literal["rtn"] = "rtn"


_CLIP_RATIO = ("GPTQ clip_search is not supported with pow2_scales 'ratio' (a group's scale is its row scale times a "
               "power of two, which the clip search cannot shrink freely): turn clip_search off or use pow2_scales 'none' or 'all'")


class GPTQConfig(BaseModel):
    """GPTQ (Frantar et al. 2022): column-wise quantization with Hessian-based error feedback."""

    model_config = ConfigDict(extra="forbid")
    needs_calibration: ClassVar[bool] = True

    name: Literal["gptq"] = "gptq"
    damp: float = Field(0.01, gt=0, description="Dampening added to H's diagonal, relative to its mean (×10 on each failed Cholesky).")
    block_size: int = Field(128, ge=1, description="Columns per lazy-update block.")
    act_order: bool = Field(True, description="Quantize columns in order of decreasing Hessian diagonal (its effect is measured in bench/README.md).")
    static_groups: bool = Field(True, description="Group scales from the weights before GPTQ (True) or refitted at each group's first column (False).")
    refit_scales: bool = Field(False, description="After GPTQ, refit each row's group scales (and offsets) to the chosen codes by least squares under H.")
    refit_rounds: int = Field(0, ge=0, description="With refit_scales: GPTQ passes after the first, each rounding with the previous "
                              "pass's refitted scales as static scales; the pass with the least output error is kept (costs one GPTQ each).")
    clip_search: bool = Field(False, description="Before GPTQ, search each group's range ratio (grid from 1 down to 1 − max_shrink, "
                              "least Hessian-weighted round-to-nearest error, as AWQ's clip) and round with the shrunk scales; "
                              "GPTQ still approximates the unclipped weight.")
    clip_grid: int = Field(20, ge=1, description="Clip ratios tried per group by clip_search.")
    max_shrink: float = Field(0.3, ge=0, lt=1, description="Largest fraction of a group's range clip_search may cut.")

    @model_validator(mode="after")
    def _rounds_need_refit(self) -> "GPTQConfig":
        if self.refit_rounds and not self.refit_scales:
            raise ValueError("refit_rounds alternates GPTQ with least-squares scales: set refit_scales: true as well")
        return self

    def check_spec(self, spec: QuantSpec) -> None:
        """clip_search shrinks each group's own scale, which pow2_scales 'ratio' ties to its row's: refuse the pair."""
        if self.clip_search and spec.pow2_scales == "ratio":
            raise ValueError(_CLIP_RATIO)


class FPSearchConfig(BaseModel):
    """LLM-FP4 format search (Liu et al. 2023): per layer, the exponent/mantissa split of the recipe format's
    bit width and the clipping ratio with the least output error tr(ΔW H ΔWᵀ), then round-to-nearest."""

    model_config = ConfigDict(extra="forbid")
    needs_calibration: ClassVar[bool] = True

    name: Literal["fpsearch"] = "fpsearch"
    clip_grid: list[float] = Field(
        default_factory=lambda: [1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6],
        description="Clipping ratios tried per split: each group is clamped to ratio × its absmax before rounding "
        "(1.0, no clipping, is always tried). Cost: one quantization and one error evaluation per split × ratio.",
    )

    @field_validator("clip_grid")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if not value or not all(0 < r <= 1 for r in value):
            raise ValueError(f"clip ratios must lie in (0, 1], got {value}")
        return value

    def check_spec(self, spec: QuantSpec) -> None:
        """The search varies a minifloat's exponent split: refuse any other format family."""
        if spec.number_format.family != "minifloat":
            raise ValueError(f"method fpsearch searches minifloat exponent/mantissa splits: use a minifloat format "
                             f"(fp4_e2m1, fp5_e2m2, fp6_e3m2, fp8_e4m3, ...) whose bit width sets the search, not '{spec.format}'")


class AWQConfig(BaseModel):
    """AWQ (Lin et al. 2023): per decoder block, per-input-channel scales searched to minimise the layers'
    output error and folded into the preceding norm/linear (architecture data: scaling groups); then per
    layer a clip search of each group's range, then round-to-nearest or GPTQ in the rescaled basis."""

    model_config = ConfigDict(extra="forbid")
    needs_calibration: ClassVar[bool] = True

    name: Literal["awq"] = "awq"
    grid: int = Field(20, ge=1, description="Scale exponents α tried per scaling group: 0, 1/grid, …, (grid−1)/grid (s = 1 is always tried too).")
    duo_scaling: bool = Field(True, description="s = mean|x|^α / w^(1−α), w the channel's mean relative weight magnitude (else s = mean|x|^α).")
    clip: bool = Field(True, description="Search a clipping ratio per weight group before rounding.")
    clip_grid: int = Field(20, ge=1, description="Clip ratios tried per group, evenly from 1 down to 1 − max_shrink.")
    max_shrink: float = Field(0.5, ge=0, lt=1, description="Largest fraction of a group's range the clip search may cut.")
    then: Literal["rtn", "gptq"] = Field("rtn", description="How the rescaled (and clipped) weights are rounded: rtn, or gptq with its options in `gptq`.")
    gptq: GPTQConfig = Field(default_factory=GPTQConfig, description="GPTQ options used when then=gptq.")

    def prepare_block(self, block, block_name: str, specs: dict, stats: dict, family) -> dict:
        """Search and fold the scales of every scaling group of ``block``; the rescaled statistics."""
        from weightwise.quantize.scaling import migrate_scales  # wiring module: imports this package

        def rule(weights, shared, group_specs):
            return search_scales(weights, shared["hessian"], shared["act_abs_mean"], group_specs, self.grid, self.duo_scaling)

        return migrate_scales(block, block_name, specs, stats, family, rule, "awq")


MethodConfig = Annotated[Union[RTNConfig, GPTQConfig, FPSearchConfig, AWQConfig], Field(discriminator="name")]

Handler = Callable[[BaseModel, torch.Tensor, QuantSpec, "dict | None"], "tuple[QuantizedTensor, dict]"]


def _rtn(config: RTNConfig, weight: torch.Tensor, spec: QuantSpec, stats: dict | None) -> tuple[QuantizedTensor, dict]:
    return rtn(weight, spec), {}


def _gptq(config: GPTQConfig, weight: torch.Tensor, spec: QuantSpec, stats: dict | None) -> tuple[QuantizedTensor, dict]:
    hessian, initial, diagnostics = stats["hessian"], None, {}
    if config.clip_search and spec.pow2_scales == "ratio":
        raise WeightwiseError(_CLIP_RATIO)
    if config.clip_search:
        clipped, ratios = search_clip(weight, hessian, spec, config.clip_grid, config.max_shrink)
        initial = compute_scales(to_groups(clipped, spec), spec.number_format, spec.resolved_scale_dtype, spec.pow2_scales)
        diagnostics["clip"] = clip_summary(ratios)
    options = {"damp": config.damp, "block_size": config.block_size, "act_order": config.act_order,
               "static_groups": config.static_groups, "initial_scales": initial}
    if config.refit_scales:
        qt, more = gptq_rounds(weight, spec, hessian, config.refit_rounds, **options)
    else:
        qt, more = gptq(weight, spec, hessian, **options)
    return qt, {**diagnostics, **more}


def _fpsearch(config: FPSearchConfig, weight: torch.Tensor, spec: QuantSpec, stats: dict | None) -> tuple[QuantizedTensor, dict]:
    fields = spec.model_dump(exclude={"format"})
    fields["group_size"] = spec.resolved_group_size  # the recipe format's default group, whichever split wins
    result = search_fp_format(weight, stats["hessian"], spec.number_format.bits, fields, config.clip_grid)
    chosen = result.errors[result.spec.format][result.clip_ratio]
    table = {name: {f"{r:g}": e for r, e in by_ratio.items()} for name, by_ratio in result.errors.items()}
    return result.quantized, {"fp_search": {"format": result.spec.format, "clip_ratio": result.clip_ratio,
                                            "output_error": chosen, "errors": table}}


def _awq(config: AWQConfig, weight: torch.Tensor, spec: QuantSpec, stats: dict | None) -> tuple[QuantizedTensor, dict]:
    diagnostics = {}
    if config.clip:
        weight, ratios = search_clip(weight, stats["hessian"], spec, config.clip_grid, config.max_shrink)
        diagnostics["clip"] = clip_summary(ratios)
    qt, more = run_method(config.gptq if config.then == "gptq" else RTNConfig(), weight, spec, stats)
    return qt, {**diagnostics, **more}


METHODS: dict[type[BaseModel], Handler] = {RTNConfig: _rtn, GPTQConfig: _gptq, FPSearchConfig: _fpsearch, AWQConfig: _awq}
METHOD_NAMES: tuple[str, ...] = tuple(cls.model_fields["name"].default for cls in METHODS)


def run_method(config: BaseModel, weight: torch.Tensor, spec: QuantSpec, stats: dict | None) -> tuple[QuantizedTensor, dict]:
    """Quantize one weight with the method ``config`` names; returns the tensor and diagnostics."""
    return METHODS[type(config)](config, weight, spec, stats)
