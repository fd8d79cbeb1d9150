"""Mixed precision under a size budget: measure each layer's sensitivity to each candidate setting
(the Hessian-weighted output error tr((W−Ŵ) H (W−Ŵ)ᵀ) of round-to-nearest, with LoRC when the
candidate has a rank, scaled per layer by the recipe method's measured gain over round-to-nearest
(GPTQ), and optionally weighted per output channel by the loss gradient's second moment so that
layers compare), then let the
integer program of ``planner`` choose one candidate per layer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.export.gguf_types import gguf_storage_bits
from weightwise.formats.base import Granularity, QuantSpec
from weightwise.formats.quantizer import dequantize, group_layout, quantize_tensor, storage_bits
from weightwise.formats.lowrank import low_rank_compensation
from weightwise.quantize.methods.gptq import output_error
from weightwise.quantize.planner import Candidate, Plan, budget_from_bpw, budget_from_mb, plan_mixed_precision

logger = logging.getLogger(__name__)


class PlanCandidate(BaseModel):
    """One setting the planner may give a layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    granularity: Granularity = "group"
    group_size: int | None = None
    lorc_rank: int = Field(0, ge=0)

    def spec(self, pad: bool, pow2_scales: str) -> QuantSpec:
        return QuantSpec(format=self.format, granularity=self.granularity, group_size=self.group_size, pad=pad, pow2_scales=pow2_scales)

    @property
    def label(self) -> str:
        where = f"g{self.group_size}" if self.group_size else self.granularity
        return f"{self.format} {where}" + (f" +lorc{self.lorc_rank}" if self.lorc_rank else "")


# From ~2.5 to ~8 bits per weight. Asymmetric INT4+ with groups dividing 32 are left out on purpose:
# they reproduce the default model's Q4_1 source grid and would make its comparisons meaningless.
DEFAULT_CANDIDATES: tuple[PlanCandidate, ...] = tuple(
    PlanCandidate(**fields)
    for fields in (
        {"format": "int2_asym", "group_size": 64},
        {"format": "int2_asym", "group_size": 64, "lorc_rank": 8},
        {"format": "int2_asym", "group_size": 32},
        {"format": "int3", "group_size": 64},
        {"format": "int3", "group_size": 64, "lorc_rank": 8},
        {"format": "int3_asym", "group_size": 64},
        {"format": "int3_asym", "group_size": 32},
        {"format": "int4", "group_size": 64},
        {"format": "nf4", "group_size": 64},
        {"format": "int4_asym", "group_size": 64},
        {"format": "int5", "group_size": 64},
        {"format": "int6", "group_size": 64},
        {"format": "int8", "granularity": "channel"},
    )
)


Approximation = Callable[[torch.Tensor, QuantSpec, torch.Tensor], torch.Tensor]
PlanStorage = Literal["weightwise", "gguf"]


def round_to_nearest(weight: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor) -> torch.Tensor:
    """The dequantized round-to-nearest weight (the Hessian is not used)."""
    return dequantize(quantize_tensor(weight, spec))


def layer_candidates(weight: torch.Tensor, hessian: torch.Tensor, candidates, pad: bool, pow2_scales: str,
                     lorc_dtype: str, row_weights: torch.Tensor | None = None, gain: float = 1.0,
                     storage: PlanStorage = "weightwise") -> list[Candidate]:
    """Stored bits and predicted output error of ``weight`` under each candidate that fits its shape.

    Round-to-nearest stands in for the method; ``row_weights`` weight the output channels' errors (see
    ``output_error``); every error is multiplied by ``gain`` (see ``method_gain``). With ``storage="gguf"`` a
    candidate costs the bits of its exact GGUF type (int2–4 cost Q4_0's 4.5 bits/weight) and candidates without
    one (nf4, LoRC, groups not a multiple of 32, ...) are skipped.
    """
    out = []
    for cand, spec in fitting_candidates(weight, candidates, pad, pow2_scales):
        if storage == "gguf":
            bits = None if cand.lorc_rank else gguf_storage_bits(tuple(weight.shape), spec)
            if bits is None:
                continue
        else:
            bits = storage_bits(tuple(weight.shape), spec)
        approx = round_to_nearest(weight, spec, hessian)
        if cand.lorc_rank:
            factors = low_rank_compensation(weight - approx, cand.lorc_rank, lorc_dtype)
            approx, bits = approx + factors.delta(), bits + factors.stored_bits()
        error = gain * output_error(weight, approx, hessian, row_weights)
        out.append(Candidate(cand.label, bits, error, {"candidate": cand}))
    return out


def fitting_candidates(weight: torch.Tensor, candidates, pad: bool, pow2_scales: str) -> list[tuple[PlanCandidate, QuantSpec]]:
    """The candidates (with their specs) whose group size divides the layer's rows."""
    fitting = []
    for cand in candidates:
        spec = cand.spec(pad, pow2_scales)
        try:
            group_layout(tuple(weight.shape), spec)
        except WeightwiseError:
            continue
        fitting.append((cand, spec))
    return fitting


def anchor_spec(weight: torch.Tensor, candidates, pad: bool, pow2_scales: str) -> QuantSpec:
    """The setting a layer's method gain is measured at: the first 3-bit candidate that fits, else the first that fits."""
    fitting = [spec for _, spec in fitting_candidates(weight, candidates, pad, pow2_scales)]
    if not fitting:
        raise WeightwiseError("no planner candidate fits a layer: add candidates whose group size divides its rows")
    return next((spec for spec in fitting if spec.format.startswith("int3")), fitting[0])


def method_gain(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, method: Approximation) -> float:
    """Output error of ``method`` relative to round-to-nearest's at ``spec`` (e.g. ≈ 0.3 for GPTQ at 3 bits).

    Running an expensive method (GPTQ) for every candidate of every layer costs minutes per layer on a
    CPU; measuring its gain once per layer and scaling the round-to-nearest errors of all candidates by it
    keeps the planner's ranking of layers method-aware at the cost of one method run per layer.
    """
    rtn = output_error(weight, round_to_nearest(weight, spec, hessian), hessian)
    return 1.0 if rtn == 0 else output_error(weight, method(weight, spec, hessian), hessian) / rtn


def plan_layers(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    hessians: dict[str, torch.Tensor],
    *,
    candidates,
    target_bpw: float | None,
    target_mb: float | None,
    pad: bool,
    pow2_scales: str,
    lorc_dtype: str,
    method: Approximation | None = None,
    row_weights: dict[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    storage: PlanStorage = "weightwise",
) -> tuple[Plan, dict[str, tuple[QuantSpec, int]]]:
    """The optimal plan and, per layer, its (spec, LoRC rank).

    Candidates are scored by round-to-nearest; with ``method`` (e.g. GPTQ) each layer's errors are scaled by
    that method's gain measured at the layer's anchor setting (``method_gain``). With ``device`` each layer's
    tensors are scored there, one layer at a time.
    """
    row_weights = row_weights or {}
    options = {}
    for name, weight in weights.items():
        w, hessian = weight.to(device), hessians[name].to(device)
        rows = None if row_weights.get(name) is None else row_weights[name].to(device)
        gain = 1.0 if method is None else method_gain(w, hessian, anchor_spec(w, candidates, pad, pow2_scales), method)
        options[name] = layer_candidates(w, hessian, candidates, pad, pow2_scales, lorc_dtype, row_weights=rows, gain=gain,
                                         storage=storage)
    empty = [name for name, cands in options.items() if not cands]
    if empty:
        exact = " with an exact GGUF type" if storage == "gguf" else ""
        raise WeightwiseError(f"no planner candidate{exact} fits layer {empty[0]}: add candidates whose group size divides its rows")
    n_params = sum(w.numel() for w in weights.values())
    if target_bpw is not None:
        budget = budget_from_bpw(target_bpw, n_params)
    else:
        planned_bits = sum(8 * t.numel() * t.element_size() for name, t in weights.items())
        everything = sum(8 * t.numel() * t.element_size() for t in {t.data_ptr(): t for t in model.state_dict().values()}.values())
        budget = budget_from_mb(target_mb, fixed_bits=everything - planned_bits)
    plan = plan_mixed_precision(options, budget)
    chosen = {name: (c.info["candidate"].spec(pad, pow2_scales), c.info["candidate"].lorc_rank) for name, c in plan.choices.items()}
    logger.info("plan: %.3f bits/weight, predicted error %.4g (optimal: %s)", plan.total_bits / n_params, plan.total_error, plan.optimal)
    return plan, chosen


def plan_summary(plan: Plan, n_params: int) -> dict:
    """What the manifest records of a plan (and the CLI prints)."""
    return {
        "budget_bits": plan.budget_bits,
        "total_bits": plan.total_bits,
        "bits_per_weight": plan.total_bits / n_params,
        "predicted_error": plan.total_error,
        "optimal": plan.optimal,
        "choices": {name: {"choice": c.label, "bits": c.bits, "predicted_error": c.error} for name, c in plan.choices.items()},
    }
