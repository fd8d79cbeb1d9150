"""The typed record of a quantization run: what was done to each layer and how the run went.

:func:`weightwise.quantize` attaches a :class:`QuantizationRecord` to the model it returns; saving writes it to
the run folder's manifest and loading reads it back unchanged (every field survives the round trip). Code reads
it through :func:`quantization_record`, never by poking attributes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weightwise.formats.base import QuantSpec
from weightwise.formats.lowrank import FactorDtype

RECORD_ATTRIBUTE = "weightwise_quantization"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LowRankRecord(_Record):
    rank: int = Field(ge=1, description="Rank of the stored LoRC factors.")
    dtype: FactorDtype = Field(description="Storage of the factors.")


class BlockTuneResult(_Record):
    """Mean squared block-output error on the calibration data before and after block tuning."""

    loss_before: float
    loss_after: float
    kept: bool = Field(description="Whether the tuned parameters were kept (they lowered the loss).")


class LayerRecord(_Record):
    """One quantized layer: its spec and storage, its error, and the method's notes."""

    spec: QuantSpec
    stored_bits: int = Field(description="Bits of every stored weight tensor (codes, scales, offsets, factors).")
    sqnr_db: float | None = Field(description="Weight signal-to-quantization-noise ratio in dB; None when exact.")
    lorc: LowRankRecord | None = None
    act_format: str | None = Field(None, description="Simulated activation format of the layer's input.")
    diagnostics: dict[str, Any] = Field(default_factory=dict, description="The method's own notes (GPTQ damping, "
                                        "refit rounds, clip ratios, the fp search's choice).")
    folded: list[dict[str, Any]] | None = Field(None, description="Scales migrated into this layer's input "
                                                "(SmoothQuant, AWQ), one entry per step.")
    block_tune: BlockTuneResult | None = None

    @property
    def label(self) -> str:
        """Short description of the stored format, e.g. 'int3 g64' or 'int8 channel + lorc8'."""
        spec = self.spec
        where = f"g{spec.resolved_group_size}" if spec.granularity == "group" else spec.granularity
        return f"{spec.format} {where}" + (f" + lorc{self.lorc.rank}" if self.lorc else "")


class CalibrationRecord(_Record):
    """The calibration settings used and how much data they gave."""

    model_config = ConfigDict(extra="allow")  # the CalibrationConfig fields, as that config defines them
    tokens: int
    resumed_at_block: int = 0


class PlanChoice(_Record):
    choice: str
    bits: int
    predicted_error: float


class PlanRecord(_Record):
    """The mixed-precision plan: the budget, what it cost and each layer's chosen candidate."""

    target_bpw: float | None
    target_mb: float | None
    budget_bits: int
    total_bits: int
    bits_per_weight: float
    predicted_error: float
    optimal: bool
    choices: dict[str, PlanChoice]


class QuantizationRecord(_Record):
    """Recipe, per-layer records, source fingerprint, timings, device, calibration and plan of one run."""

    recipe: dict[str, Any] = Field(description="The QuantRecipe's fields, as validated.")
    layers: dict[str, LayerRecord]
    source_fingerprint: str
    quantize_seconds: float
    device: str
    calibration: CalibrationRecord | None = None
    plan: PlanRecord | None = None

    @property
    def formats(self) -> Counter:
        """How many layers use each stored format label."""
        return Counter(layer.label for layer in self.layers.values())

    @property
    def format_label(self) -> str:
        """The run's real formats: 'int4 g64' when uniform, else 'mixed: int3 g64 ×100, int2_asym g64 ×110'."""
        counts = self.formats
        if len(counts) == 1:
            return next(iter(counts))
        return "mixed: " + ", ".join(f"{label} ×{n}" for label, n in counts.most_common())

    def summary(self) -> dict[str, Any]:
        """What a person wants to see first: layer count, SQNR, formats, time, device, plan."""
        finite = [layer.sqnr_db for layer in self.layers.values() if layer.sqnr_db is not None]
        searched = Counter(
            f"{layer.diagnostics['fp_search']['format']} clip {layer.diagnostics['fp_search']['clip_ratio']:g}"
            for layer in self.layers.values() if "fp_search" in layer.diagnostics
        )
        return {
            "layers": len(self.layers),
            "exact_layers": len(self.layers) - len(finite),
            "sqnr_db_min": min(finite) if finite else None,
            "sqnr_db_mean": sum(finite) / len(finite) if finite else None,
            "formats": self.format_label,
            "act_format": self.recipe.get("act_format"),
            "fp_search_choices": dict(sorted(searched.items())),
            "quantize_seconds": self.quantize_seconds,
            "device": self.device,
            "plan": None if self.plan is None else {
                "bits_per_weight": self.plan.bits_per_weight, "budget_bits": self.plan.budget_bits, "optimal": self.plan.optimal,
            },
        }


def quantization_record(model: nn.Module) -> QuantizationRecord | None:
    """The record :func:`weightwise.quantize` attached to a quantized model (None for a float model)."""
    return getattr(model, RECORD_ATTRIBUTE, None)


def attach_record(model: nn.Module, record: QuantizationRecord) -> None:
    """Attach ``record`` to ``model`` (the one place that sets it)."""
    setattr(model, RECORD_ATTRIBUTE, record)


def drop_record(model: nn.Module) -> None:
    """Remove the record from ``model`` (a dense copy of a quantized model is no longer that run)."""
    if hasattr(model, RECORD_ATTRIBUTE):
        delattr(model, RECORD_ATTRIBUTE)
