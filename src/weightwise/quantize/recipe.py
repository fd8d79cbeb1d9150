"""QuantRecipe: the one typed description of a quantization job, shared by the CLI, YAML and the API."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from weightwise.errors import WeightwiseError
from weightwise.formats.activations import activation_spec
from weightwise.formats.base import Granularity, Pow2Scales, QuantSpec, ScaleDtype
from weightwise.formats.registry import get_format
from weightwise.quantize.blocktune import BlockTuneConfig
from weightwise.quantize.calibration import CalibrationConfig
from weightwise.formats.lowrank import FactorDtype
from weightwise.quantize.methods import METHOD_NAMES, MethodConfig, RTNConfig
from weightwise.quantize.planning import DEFAULT_CANDIDATES, PlanCandidate, PlanStorage
from weightwise.quantize.scaling import BlockStep, smoothquant_step

RECIPE_VERSION = 1
# Per-layer settings a size target leaves to the planner (it picks them from the candidates).
_PLANNED_FIELDS = frozenset({"format", "group_size", "granularity", "scale_dtype", "lorc_rank"})


class LayerOverride(BaseModel):
    """Settings for the layers whose names match ``pattern`` (first matching override wins)."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(description="Regex searched in module names, e.g. 'mlp\\.down_proj$' or 'layers\\.0\\.'.")
    skip: bool = Field(False, description="Keep the matching layers unquantized.")
    format: str | None = Field(None, description="Format for the matching layers (default: the recipe's).")
    granularity: Granularity | None = None
    group_size: int | None = None
    scale_dtype: ScaleDtype | None = None
    pad: bool | None = None
    pow2_scales: Pow2Scales | None = None
    lorc_rank: int | None = Field(None, ge=0, description="LoRC rank for the matching layers (0 = off).")

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        return _check_regex(value)


class QuantRecipe(BaseModel):
    """What to quantize, to which format, and how."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(RECIPE_VERSION, description="Recipe schema version.")
    format: str = Field("int4", description=QuantSpec.model_fields["format"].description)
    granularity: Granularity = Field("group", description=QuantSpec.model_fields["granularity"].description)
    group_size: int | None = Field(None, description=QuantSpec.model_fields["group_size"].description)
    scale_dtype: ScaleDtype | None = Field(None, description=QuantSpec.model_fields["scale_dtype"].description)
    pad: bool = Field(False, description=QuantSpec.model_fields["pad"].description)
    pow2_scales: Pow2Scales = Field("none", description=QuantSpec.model_fields["pow2_scales"].description)
    lorc_rank: int = Field(0, ge=0, description="Rank r of the low-rank compensation (LoRC) of each layer's quantization "
                           "error, stored as two factors (out×r, r×in) and counted in the size; 0 = off.")
    lorc_dtype: FactorDtype = Field("fp16", description="Storage of the LoRC factors: fp16, or int8 with fp16 per-row scales.")
    act_format: str | None = Field(
        None, description="Simulated activation quantization: each quantized layer's input is quantized and dequantized "
        "per token (one fp32 scale per token; MX formats per 32-entry block) in this format before the matmul, e.g. "
        "int8 (W8A8) or fp8_e4m3; nothing is stored. Default: activations stay in float.")
    smoothquant_alpha: float | None = Field(
        None, ge=0, le=1, description="SmoothQuant (Xiao et al. 2022) migration strength α: before a block's layers "
        "are quantized, each scaling group's input channel j is divided by s_j = max|x_j|^α / max|W_:,j|^(1−α) in the "
        "preceding norm or linear and the weights' column j multiplied by it (the float model is unchanged); moves "
        "activation outliers into the weights, for act_format. Needs calibration data. Default: off.")
    bias_correction: bool = Field(
        False, description="For layers that have a bias: quantize against the centered input statistics (the input "
        "covariance instead of the second moment) and add the mean output error (W − Ŵ)·E[x] to the bias, so the "
        "systematic part of the error is removed at no storage cost. Needs calibration data. Default: off.")
    block_tune: BlockTuneConfig | None = Field(
        None, description="After each block's layers are quantized, fit their scales, offsets and biases (and the block's "
        "norms) by gradient descent so the block's outputs match the float block's on the calibration data; the codes "
        "and the stored size do not change. Needs calibration data. Default: off.")
    method: MethodConfig = Field(
        default_factory=RTNConfig,
        description="Quantization method: rtn, gptq, fpsearch or awq (a name, or a mapping with `name` and the method's options).",
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Calibration data for methods that need it (gptq, fpsearch, awq, "
        "smoothquant_alpha)."
    )
    targets: list[str] | None = Field(
        None,
        description="Regexes of Linear module names to quantize. Default: every Linear of the decoder blocks "
        "(per model family); embeddings and lm_head are kept.",
    )
    ignore: list[str] = Field(default_factory=list, description="Regexes of module names never to quantize.")
    overrides: list[LayerOverride] = Field(default_factory=list, description="Per-layer settings by name pattern.")
    target_bpw: float | None = Field(
        None, gt=0, description="Mixed precision: average bits per weight of the quantized layers (the planner picks "
        "one candidate per layer to minimise the predicted output error under this budget).")
    target_mb: float | None = Field(None, gt=0, description="Mixed precision: size of the whole model in MB (10^6 bytes).")
    plan_gradient_samples: int = Field(
        16, ge=0, description="Mixed precision: calibration sequences whose loss gradients weight each layer's "
        "output error per channel (the planner's sensitivity, comparable across layers); 0 = plain output error.")
    plan_storage: PlanStorage = Field(
        "weightwise", description="Mixed precision: what a candidate costs — weightwise's packed storage, or 'gguf': the "
        "bits of its exact GGUF block type (int2–4 cost Q4_0's 4.5 bits/weight; candidates without an exact type are "
        "skipped), so that target_bpw budgets the linear layers of an exported GGUF file.")
    candidates: list[PlanCandidate] = Field(
        default_factory=lambda: list(DEFAULT_CANDIDATES),
        description="Settings the planner chooses from (format, granularity, group_size, lorc_rank).")

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_regexes(cls, value):
        return value if value is None else [_check_regex(p) for p in value]

    @field_validator("act_format")
    @classmethod
    def _known_act_format(cls, value: str | None) -> str | None:
        return value if value is None else activation_spec(value).format

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value):
        fields = {"name": value} if isinstance(value, str) else value
        name = fields.get("name", "rtn") if isinstance(fields, dict) else getattr(fields, "name", None)
        if name not in METHOD_NAMES:
            raise ValueError(f"unknown method '{name}' (known: {', '.join(METHOD_NAMES)})")
        return fields

    @model_validator(mode="after")
    def _specs_valid(self) -> "QuantRecipe":
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is not supported (this weightwise reads version {RECIPE_VERSION})")
        self.base_spec()
        if self.target_bpw is not None and self.target_mb is not None:
            raise ValueError("give target_bpw or target_mb, not both")
        if (self.target_bpw or self.target_mb) and self.overrides:
            raise ValueError("overrides and a size target conflict: the planner sets every layer's format")
        if self.plan_storage == "gguf" and self.target_mb is not None:
            raise ValueError("plan_storage 'gguf' budgets the linear layers' bits: give target_bpw (a GGUF file's other "
                             "tensors depend on the export's embedding type)")
        fixed = sorted(_PLANNED_FIELDS & self.model_fields_set)
        if (self.target_bpw or self.target_mb) and fixed:
            raise ValueError(f"with a size target the planner picks each layer's format, grouping, scale dtype and LoRC rank "
                             f"from `candidates`: drop {', '.join(fixed)} and list the settings to choose from as candidates")
        for override in self.overrides:
            if not override.skip:
                self._merge(override)
        check_spec = getattr(self.method, "check_spec", None)  # a method that handles only some specs (fpsearch, gptq)
        if check_spec is not None:
            if self.target_bpw is not None or self.target_mb is not None:
                specs = [candidate.spec(self.pad, self.pow2_scales) for candidate in self.candidates]
            else:
                specs = [self.base_spec(), *(self._merge(o) for o in self.overrides if not o.skip)]
            for spec in specs:
                check_spec(spec)
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this recipe runs layer-sequential calibration."""
        return (type(self.method).needs_calibration or self.smoothquant_alpha is not None or self.bias_correction
                or self.block_tune is not None)

    def block_steps(self) -> list[BlockStep]:
        """Block-level transforms run, in order, before a calibrated block's layers are quantized
        (SmoothQuant, then the method's own ``prepare_block`` such as AWQ's scale search)."""
        steps = [] if self.smoothquant_alpha is None else [smoothquant_step(self.smoothquant_alpha)]
        prepare = getattr(self.method, "prepare_block", None)
        return steps if prepare is None else [*steps, prepare]

    def base_spec(self) -> QuantSpec:
        return QuantSpec(
            format=self.format,
            granularity=self.granularity,
            group_size=self.group_size,
            scale_dtype=self.scale_dtype,
            pad=self.pad,
            pow2_scales=self.pow2_scales,
        )

    def _merge(self, override: LayerOverride) -> QuantSpec:
        fields = self.base_spec().model_dump()
        changed = override.model_dump(exclude={"pattern", "skip", "lorc_rank"}, exclude_none=True)
        if "granularity" in changed:
            fields["group_size"] = None
        if "format" in changed:  # keep the base's grouping and scale dtype unless the new format fixes them
            new = get_format(changed["format"])
            if new.block_size is not None:
                fields.update(granularity="group", group_size=None)
            if new.scale_dtype is not None or new.asymmetric and fields["scale_dtype"] == "e8m0":
                fields["scale_dtype"] = None
        fields.update(changed)
        return QuantSpec(**fields)

    def spec_for(self, name: str) -> QuantSpec | None:
        """The spec for module ``name``, or None if an override says to skip it."""
        for override in self.overrides:
            if re.search(override.pattern, name):
                return None if override.skip else self._merge(override)
        return self.base_spec()

    def lorc_rank_for(self, name: str) -> int:
        """The LoRC rank of module ``name``: the first matching override's, else the recipe's."""
        for override in self.overrides:
            if re.search(override.pattern, name):
                return self.lorc_rank if override.lorc_rank is None else override.lorc_rank
        return self.lorc_rank

    @classmethod
    def from_yaml(cls, path: str | Path, **updates) -> "QuantRecipe":
        """Load a YAML recipe; ``updates`` (e.g. from command-line options) replace its fields."""
        return recipe_from_yaml(cls, path, updates)


def recipe_from_yaml(model_cls, path: str | Path, updates: dict):
    """Validate a YAML file (plus ``updates``) into ``model_cls``, with one-line errors naming the field.

    An update naming the method the file already gives as a mapping (``--method gptq`` over ``method: {name: gptq,
    damp: 0.1}``) keeps the file's method settings.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightwiseError(f"recipe file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise WeightwiseError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except UnicodeDecodeError as err:
        raise WeightwiseError(f"recipe {path} is not UTF-8 text (byte {err.start}): convert it to UTF-8") from None
    except RecursionError:
        raise WeightwiseError(f"recipe {path} nests too deeply to read: write a mapping of field: value") from None
    if not isinstance(data, dict):
        raise WeightwiseError(f"recipe {path} must be a mapping of field: value")
    method = data.get("method")
    if isinstance(method, dict) and updates.get("method") == method.get("name"):
        updates = {key: value for key, value in updates.items() if key != "method"}
    data.update(updates)
    return validated(model_cls, data, source=str(path))


def validated(model_cls, data: dict, source: str = "options"):
    """``model_cls`` validated from ``data``, with a pydantic error turned into one line naming the field."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise WeightwiseError(f"invalid {source}: {validation_message(err)}") from None
    except UnicodeEncodeError as err:  # a lone surrogate: YAML can spell one ("\ud800"), and undecodable argv bytes
        raise WeightwiseError(f"invalid {source}: a value holds {err.object[err.start]!r}, which is not text; "
                              "write valid Unicode") from None


def validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" + (f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else "")


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"'{pattern}' is not a valid regex: {err}") from None
    return pattern
