"""TuneConfig: the one typed description of a fine-tuning run, shared by the CLI, YAML and the API.

The method and its own settings are one typed config per method (``method``, discriminated by ``name``):
the sparse methods (lift, magnitude, random) carry a budget, lift its filter too, the peft adapters (lora,
dora, pissa) a rank, qat the quantization spec of its result and its oscillation handling, qat-lora both a rank and
that spec. The flat fields of version 1 (``density``, ``lora_rank``, ...) still work as shortcuts.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from weightwise.formats.base import Granularity, QuantSpec

TUNE_CONFIG_VERSION = 2
DEFAULT_DENSITY = 0.05
DEFAULT_LORA_RANK = 8

PatchDtype = Literal["fp16", "bf16", "fp32", "int8"]


class TuneMethodConfig(BaseModel):
    """What every method config has: its ``name`` (the discriminator; each subclass fixes it), ``sparse``
    (whether it trains masked entries with a budget) and ``reparametrizable`` (whether it trains the targets'
    weights themselves, so that ``reparam`` can train them through a function W = f(V))."""

    model_config = ConfigDict(extra="forbid")
    sparse: ClassVar[bool] = False
    reparametrizable: ClassVar[bool] = False

    name: str


class SparseMethodConfig(TuneMethodConfig):
    """Settings of the sparse methods: k entries per targeted matrix, by density or rank budget."""

    sparse: ClassVar[bool] = True
    reparametrizable: ClassVar[bool] = True

    density: float | None = Field(
        None, gt=0, le=1, description=f"Fraction of each targeted matrix trained (default {DEFAULT_DENSITY} unless "
        "rank_budget is given).")
    rank_budget: int | None = Field(
        None, ge=1, description="Train rank_budget·(rows+cols) entries per matrix, the count a LoRA of that rank trains "
        "(instead of density).")
    refresh_every: int = Field(0, ge=0, description="Recompute the masks from the current weights every N optimizer "
                               "steps (moments of kept entries survive, new entries start at 0); 0 = never.")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.density is not None and self.rank_budget is not None:
            raise ValueError("give density or rank_budget, not both")
        return self

    @property
    def budget(self) -> dict:
        """The keyword arguments of ``lift.budget_k``: the density (default 5 %) or the rank budget."""
        if self.rank_budget is not None:
            return {"rank_budget": self.rank_budget}
        return {"density": DEFAULT_DENSITY if self.density is None else self.density}


class LiftConfig(SparseMethodConfig):
    """LIFT: the k largest entries of each matrix's rank-r approximation (principal weights), sparse Adam."""

    name: Literal["lift"] = "lift"
    filter_rank: int = Field(128, ge=1, description="Rank of the approximation whose largest entries are trained.")
    randomized_svd: bool = Field(False, description="Randomized instead of exact truncated SVD (faster on large matrices).")


class MagnitudeConfig(SparseMethodConfig):
    """Sparse baseline: the k largest |W| of each matrix."""

    name: Literal["magnitude"] = "magnitude"


class RandomMaskConfig(SparseMethodConfig):
    """Sparse baseline: k entries of each matrix drawn uniformly (seeded)."""

    name: Literal["random"] = "random"


class FullConfig(TuneMethodConfig):
    """Full fine-tuning: every entry of the targeted weights, AdamW."""

    name: Literal["full"] = "full"
    reparametrizable: ClassVar[bool] = True


class LowRankConfig(TuneMethodConfig):
    """The rank and scaling of a trained low-rank pair B·A (the peft adapters, qat-lora)."""

    rank: int = Field(DEFAULT_LORA_RANK, ge=1, description=f"Adapter rank (default {DEFAULT_LORA_RANK}; the flat "
                      "rank_budget shortcut sets it when no rank is given, so the trained counts match).")
    alpha: float | None = Field(None, gt=0, description="Scaling numerator alpha (default: 2 × rank).")

    @property
    def resolved_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class AdapterMethodConfig(LowRankConfig):
    """Settings of the peft adapters; ``use_dora`` / ``pissa_init`` say which variant a subclass is."""

    use_dora: ClassVar[bool] = False
    pissa_init: ClassVar[bool] = False

    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")


class LoraConfig(AdapterMethodConfig):
    """LoRA (peft): low-rank adapters on the targeted Linear layers."""

    name: Literal["lora"] = "lora"


class DoraConfig(AdapterMethodConfig):
    """DoRA (peft): weight-decomposed LoRA."""

    name: Literal["dora"] = "dora"
    use_dora: ClassVar[bool] = True


class PissaConfig(AdapterMethodConfig):
    """PiSSA (peft): adapters initialised from the principal singular vectors, the base keeping the residual."""

    name: Literal["pissa"] = "pissa"
    pissa_init: ClassVar[bool] = True


QAT_FORMATS = "int2..int8 (signed), int2_asym..int8_asym or ternary"


class QuantizerTrainingConfig(TuneMethodConfig):
    """What the quantization-aware methods (qat, qat-lora) share: the integer grid of their result (a quantized run
    of ``spec``), where training starts, whether the group scales and offsets are learned, the handling of weights
    that oscillate between two codes (tracked; damped or frozen) and distillation from the float model."""

    format: str = Field("int4", description=f"Integer format of the result ({QAT_FORMATS}).")
    granularity: Granularity = Field("group", description=QuantSpec.model_fields["granularity"].description)
    group_size: int | None = Field(None, description=QuantSpec.model_fields["group_size"].description)
    init: str = Field("rtn", description="Start from round-to-nearest of the weights ('rtn') or from a weightwise "
                      "quantized run of the same model and spec (a folder: its scales and dequantized weights).")
    learn_scales: bool = Field(True, description="Train the group scales and offsets (LSQ/LSQ+, gradients scaled by "
                               "1/sqrt(group size × largest code)); false keeps the initial ones.")
    oscillation_momentum: float = Field(0.01, gt=0, le=1, description="Momentum of the per-weight moving average of "
                                        "oscillations (a code change that reverses the previous one).")
    dampening: float = Field(0.0, ge=0, description="Weight of the dampening loss: the mean squared distance of each "
                             "latent weight (clipped to the grid's range) to its bin centre, in units of its scale; 0 = off.")
    freeze_threshold: float | None = Field(None, gt=0, lt=1, description="Freeze a weight at its moving-average code "
                                           "once its oscillation frequency exceeds this; null = never.")
    distill_weight: float = Field(0.0, ge=0, le=1, description="Knowledge distillation from the float model: the loss is "
                                  "(1 − w) × the task loss + w × T² × KL(teacher ‖ student) on the positions the task "
                                  "loss scores, the teacher being the model before fake quantization (frozen, eval "
                                  "mode, no gradients); 0 = off, 1 = distillation alone.")
    distill_temperature: float = Field(1.0, gt=0, description="Temperature T dividing both models' logits in the "
                                       "distillation loss (higher: softer distributions).")

    @model_validator(mode="after")
    def _integer_grid(self):
        fmt = self.spec.number_format
        values = [v for v in fmt.values if not math.isnan(v)]  # in code order
        # consecutive integers with codes in value order (int*, ternary): the straight-through and LSQ gradients
        # (round(y) − y), the bin centres and the direction of a code change all assume it
        if fmt.scaling == "mx" or values != [values[0] + i for i in range(len(values))]:
            raise ValueError(f"{self.name} trains integer grids, not format '{self.format}': use {QAT_FORMATS}")
        return self

    @property
    def spec(self) -> QuantSpec:
        """The quantization spec of the result."""
        return QuantSpec(format=self.format, granularity=self.granularity, group_size=self.group_size)


class QATConfig(QuantizerTrainingConfig):
    """Quantization-aware training (qat.py): latent float weights and (LSQ/LSQ+) learned scales and offsets of the
    targeted Linears, trained through their fake-quantized weights; the result is a quantized run of ``spec``.

    Oscillations of weights between two grid points (Nagel et al. 2022, arXiv 2203.11086) are tracked, and can be
    damped (a pull towards the bin centre) or frozen (fixed to their most frequent code). The loss can mix in knowledge
    distillation from the float model (``distill_weight``, ``distill_temperature``; tune/distill.py).
    """

    name: Literal["qat"] = "qat"
    reparametrizable: ClassVar[bool] = True


class QATLoraConfig(QuantizerTrainingConfig, LowRankConfig):
    """QAT-LoRA (qat_lora.py; L4Q, arXiv 2402.04902): each targeted Linear's float weight W0 stays frozen while a
    rank-r pair B·A and the (LSQ/LSQ+) scales and offsets train through fake_quant(W0 + alpha/r·B·A); the result
    is a quantized run of ``spec`` (the adapters merged into its codes), like qat's, from far fewer trained numbers.
    Oscillations of the merged weight's codes are tracked, damped or frozen, and distillation mixes in, as in qat.
    """

    name: Literal["qat-lora"] = "qat-lora"


METHOD_CONFIGS: tuple[type[TuneMethodConfig], ...] = (
    LiftConfig, MagnitudeConfig, RandomMaskConfig, FullConfig, LoraConfig, DoraConfig, PissaConfig, QATConfig,
    QATLoraConfig)
MethodConfig = Annotated[Union[METHOD_CONFIGS], Field(discriminator="name")]  # noqa: UP007 (a Union of the tuple)
METHOD_NAMES: tuple[str, ...] = tuple(cls.model_fields["name"].default for cls in METHOD_CONFIGS)
_BY_NAME = dict(zip(METHOD_NAMES, METHOD_CONFIGS))

# The flat fields of version 1 (and the tune command's flags): shortcut → the method-config field it sets.
SHORTCUTS = {"density": "density", "rank_budget": "rank_budget", "filter_rank": "filter_rank",
             "randomized_svd": "randomized_svd", "refresh_every": "refresh_every", "lora_rank": "rank",
             "lora_alpha": "alpha", "lora_dropout": "dropout", "format": "format", "group_size": "group_size",
             "init": "init", "distill_weight": "distill_weight", "distill_temperature": "distill_temperature"}


def shortcut_readers(shortcut: str) -> list[str]:
    """The methods that read a flat shortcut (rank_budget: the sparse ones, and the adapters as their default rank)."""
    field = SHORTCUTS[shortcut]
    return [name for name, cls in _BY_NAME.items()
            if field in cls.model_fields or (shortcut == "rank_budget" and "rank" in cls.model_fields)]


def shortcut_description(shortcut: str) -> str:
    """The help of a flat shortcut: the methods that read it and their field's description."""
    cls = next(c for c in METHOD_CONFIGS if SHORTCUTS[shortcut] in c.model_fields)
    description = cls.model_fields[SHORTCUTS[shortcut]].description
    return f"{', '.join(shortcut_readers(shortcut))}: {description[:1].lower()}{description[1:]}"


def _nest_shortcuts(data: dict) -> dict:
    """``data`` with its method as a mapping and the flat shortcuts moved into it (flat values win over nested ones).

    A shortcut the method does not read is an error (version 1 ignored it silently); a version-1 dump lists
    every flat field, so there it is dropped as that version did. None means 'not given'.
    """
    version = data.get("version", TUNE_CONFIG_VERSION)
    flat = {key: data[key] for key in SHORTCUTS if key in data}
    method = data.get("method", "lift")
    if isinstance(method, str):
        fields = {"name": method}
    elif isinstance(method, TuneMethodConfig):
        fields = {"name": method.name, **method.model_dump(exclude_unset=True)}
    elif isinstance(method, dict):
        fields = {"name": "lift", **method}
    else:
        return data  # pydantic reports the wrong type
    name = fields["name"]
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHOD_NAMES)})")
    known = _BY_NAME[name].model_fields
    rank_given = "rank" in fields or flat.get("lora_rank") is not None
    for shortcut, value in flat.items():
        field = SHORTCUTS[shortcut]
        if field not in known and shortcut == "rank_budget" and "rank" in known:
            field = None if rank_given else "rank"  # an adapter's rank defaults to the rank budget
        elif field not in known:
            if value is not None and version != 1:
                raise ValueError(f"{shortcut} is not a setting of method {name} (earlier versions silently ignored it): "
                                 f"remove it, or use a method that reads it ({', '.join(shortcut_readers(shortcut))})")
            field = None
        if field is not None and value is not None:
            fields[field] = value
    nested = {key: value for key, value in data.items() if key not in SHORTCUTS}
    nested["method"] = fields
    if version == 1:
        nested["version"] = TUNE_CONFIG_VERSION  # its fields are read above
    return nested


class CompanderConfig(BaseModel):
    """Weight compander (compander.py; Cakaj, Mehnert & Yang 2023, arXiv 2306.16993): each targeted weight trains as
    W = β·tanh(α·V/β), bounded by β and expanded near zero by the slope α, V starting at f⁻¹(W) (model unchanged)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["compander"] = "compander"
    expansion: float = Field(2.0, gt=0, description="alpha, the slope at zero: near-zero weights move alpha times as "
                             "far as their latent (> 1 pushes them away from zero); the slope falls towards the bound.")
    margin: float = Field(1.25, gt=1, description="Each row's bound beta starts at margin × its largest |W|: the "
                          "furthest its weights can grow.")
    learn: bool = Field(False, description="Also train alpha (per layer) and beta (per row), without weight decay; "
                        "method full only (they move every weight, which a sparse patch cannot hold).")


# Fields that change what is trained; a checkpoint resumes only under the same values of these.
# The others (checkpoint cadence, evaluation) can change between a kill and the rerun.
_RUN_ONLY_FIELDS = frozenset({
    "checkpoint_every", "keep_checkpoints", "patch_dtype", "test_examples", "test_task", "eval_before", "max_new_tokens",
    "eval_batch_size", "retention_max_tokens", "retention_window",
})


class TuneConfig(BaseModel):
    """What to fine-tune, on which task, with which method and budget."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(TUNE_CONFIG_VERSION, description="Config schema version.")
    method: MethodConfig = Field(
        default_factory=LiftConfig,
        description="lift (principal weights of a rank-reduced W, sparse Adam), magnitude or random (sparse baselines: "
        "top-k |W| / uniform masks), full (every targeted weight, AdamW), lora, dora or pissa (peft), qat "
        "(quantization-aware training: a quantized run), qat-lora (a frozen W and a trained low-rank pair, quantized "
        "together: a quantized run): a name, or a mapping with `name` and the method's settings.")
    reparam: CompanderConfig | None = Field(
        None, description="Train the targeted weights through a reparameterisation: 'compander' (bounded, zero-expanding "
        "W = f(V); or a mapping with name and settings) for methods full, lift, magnitude and random; null = none.")
    task: str = Field("arithmetic", description="'arithmetic' (DeepMind mathematics_dataset problems), 'sampled' "
                      "(data-free, as LLM-QAT: train_examples texts of max_length tokens sampled from the model itself "
                      "before tuning, each from a uniformly drawn first token, seeded by seed, at sample_temperature; "
                      "kept in OUT/sampled.jsonl for reruns) or a .jsonl file of {prompt, response} / {messages} / "
                      "{text} records.")
    sample_temperature: float = Field(1.0, gt=0, description="Task 'sampled': temperature of the sampling (softmax of "
                                      "the logits / T; lower is more conservative text).")
    train_examples: int = Field(2000, ge=1, description="Training examples drawn from the task.")
    test_examples: int = Field(200, ge=0, description="Held-out problems scored by exact match before and after (0 = skip).")
    test_task: str | None = Field(None, description="Held-out problems: default the test split of 'arithmetic'; for a "
                                  ".jsonl task give a second .jsonl file (without one, exact match is skipped).")
    targets: list[str] | None = Field(
        None, description="Regexes of Linear module names to train. Default: every Linear of the decoder blocks "
        "(per model family); embeddings, norms and lm_head stay frozen for every method.")
    lr: float = Field(
        1e-4, gt=0, description="Peak learning rate (constant after warmup). The default suits LIFT, the sparse "
        "baselines and LoRA; full fine-tuning usually wants about 10× less (1e-5).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup over this many optimizer steps.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW-style) on the trained entries.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm of the trained entries; null = off.")
    epochs: int = Field(1, ge=1, description="Passes over the training examples (ignored when max_steps is given).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run (overrides epochs).")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch, summed over processes when distributed.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (global batch = batch_size × grad_accum).")
    max_length: int = Field(256, ge=8, description="Tokens per example (prompt + response), longer ones truncated.")
    seed: int = Field(0, description="Seed of the data order, random masks, LoRA init and dropout.")
    checkpoint_every: int = Field(50, ge=0, description="Write a resumable checkpoint every N optimizer steps (0 = never).")
    keep_checkpoints: bool = Field(False, description="Keep the last checkpoint in OUT/checkpoints after a finished run.")
    patch_dtype: PatchDtype = Field("fp16", description="Sparse/full results: storage of the patch's delta values.")
    eval_before: bool = Field(True, description="Also evaluate the model before tuning (the baseline of the deltas).")
    max_new_tokens: int = Field(16, ge=1, description="Exact match: tokens generated per answer (greedy).")
    eval_batch_size: int = Field(16, ge=1, description="Exact match: prompts per generate call.")
    retention_max_tokens: int = Field(4096, ge=0, description="Retention: tokens of the pydoc eval split scored for "
                                      "perplexity before/after (0 = skip).")
    retention_window: int = Field(512, ge=2, description="Retention: tokens per perplexity window.")

    @field_validator("targets")
    @classmethod
    def _valid_regexes(cls, value):
        if value is None:
            return value
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"'{pattern}' is not a valid regex: {err}") from None
        return value

    @field_validator("reparam", mode="before")
    @classmethod
    def _reparam_name(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @field_validator("reparam")
    @classmethod
    def _reparam_fits_method(cls, value, info):
        method = info.data.get("method")
        if value is None or method is None:
            return value
        if not method.reparametrizable:
            able = ", ".join(name for name, c in _BY_NAME.items() if c.reparametrizable)
            raise ValueError(f"{value.name} cannot reparameterise method {method.name} (it does not train the weights "
                             f"themselves): use one of {able}, or no reparam")
        if value.learn and method.sparse:
            raise ValueError(f"{value.name} learn=true moves every weight, which method {method.name}'s sparse patch "
                             "cannot hold: set learn false, or use method full")
        return value

    @model_validator(mode="before")
    @classmethod
    def _shortcuts(cls, data):
        """A method name and the flat fields of version 1 (``method="lift", density=0.1``) → the nested method."""
        return _nest_shortcuts(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        if self.version != TUNE_CONFIG_VERSION:
            raise ValueError(f"tune config version {self.version} is not supported (this weightwise reads "
                             f"versions 1 and {TUNE_CONFIG_VERSION})")
        return self

    def training_key(self) -> dict:
        """The fields that decide the trained weights (a checkpoint resumes only when they are equal)."""
        return self.model_dump(exclude=set(_RUN_ONLY_FIELDS))

    @classmethod
    def from_yaml(cls, path: str | Path, **updates) -> TuneConfig:
        """Load a YAML config; ``updates`` (e.g. from command-line options) replace its fields."""
        from weightwise.quantize.recipe import recipe_from_yaml

        return recipe_from_yaml(cls, path, updates)
