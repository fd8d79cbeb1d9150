"""Registry of data-selection scorers: a typed config (pydantic, discriminated by ``name``) → its handler.

Two kinds of handler, like quantization methods over pure kernels:

- **batch** scorers (``loss``, ``el2n``, ``ifd``, ``grand``, ``rds``, ``less``) score one batch of examples
  at a time from the model's outputs (:class:`~weightwise.select.batch.ModelBatch`), after an optional
  ``prepare`` that computes what every batch needs once (the target set's features, a parameter subset).
  Their per-example scores depend only on the example, the model and the prepared state, so they are
  cached and resumable, and can run on Ray workers.
- **pool** scorers (``length``, ``dsir``, ``prototype``) need the whole pool at once (a fitted n-gram model,
  k-means centroids) and are cheap; they are recomputed on every run.

Every config has ``weight`` (its share in the weighted rank average) and ``prefer`` (which end of the score
is kept: each scorer's default is what its paper keeps). Adding a scorer = a kernel module + a config class
+ one registry line + tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightwise.errors import WeightwiseError

Prefer = Literal["high", "low"]


class _Scorer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[Literal["batch", "pool"]] = "batch"
    needs_target: ClassVar[bool] = False
    reads_pool: ClassVar[bool] = False  # a batch scorer whose prepared state depends on the pool (part of its cache key)

    weight: float = Field(1.0, gt=0, description="Share of this scorer in the weighted rank average.")

    def key(self) -> dict:
        """The fields that decide the scores (not ``weight`` or ``prefer``): part of the cache key."""
        return self.model_dump(exclude={"weight", "prefer"})


class LossConfig(_Scorer):
    """Mean NLL of the response given the prompt (the loss a fine-tune would start from)."""

    name: Literal["loss"] = "loss"
    prefer: Prefer = Field("high", description="high: the examples the model gets most wrong (hardest).")


class EL2NConfig(_Scorer):
    """Mean ‖softmax − one-hot‖₂ over the response tokens (Data Diet, Paul et al. 2021, arXiv 2107.07075, for LMs)."""

    name: Literal["el2n"] = "el2n"
    prefer: Prefer = Field("high", description="high: Data Diet keeps the largest error norms.")


class IFDConfig(_Scorer):
    """Instruction-following difficulty: NLL(response | prompt) / NLL(response) (Cherry-LLM, Li et al. 2023,
    arXiv 2308.12032). Above 1 the prompt does not help predict the response."""

    name: Literal["ifd"] = "ifd"
    prefer: Prefer = Field("high", description="high: Cherry-LLM keeps the highest IFD (after dropping IFD > 1).")
    drop_above_one: bool = Field(True, description="Give IFD > 1 (a prompt that misleads) no score: such examples are dropped.")


class GraNdConfig(_Scorer):
    """Norm of the per-example loss gradient (GraNd, Paul et al. 2021), restricted to a parameter subset:
    the principal-weight entries LIFT would train (rank-r approximation, top density by magnitude)."""

    name: Literal["grand"] = "grand"
    prefer: Prefer = Field("high", description="high: the examples that move the trained weights most.")
    targets: list[str] = Field(default_factory=lambda: [r"\.mlp\.down_proj$"],
                               description="Regexes of Linear module names whose gradient is measured.")
    density: float = Field(0.05, gt=0, le=1, description="Fraction of each matrix's entries measured (LIFT mask).")
    filter_rank: int = Field(32, ge=1, description="Rank of the approximation whose largest entries form the mask.")


class RDSConfig(_Scorer):
    """Representation-based selection: cosine of the example's mean-pooled last hidden state to the target
    set's mean (RDS, the strongest simple selector in Ivison et al. 2025, arXiv 2503.01807)."""

    name: Literal["rds"] = "rds"
    needs_target: ClassVar[bool] = True
    prefer: Prefer = Field("high", description="high: the examples most like the target set.")


class LESSConfig(_Scorer):
    """LESS (Xia et al. 2024, arXiv 2402.04333): low-rank (LoRA) gradient features of each example, randomly
    projected, Adam-preconditioned by a short warm-up's moments, cosine to the target set's mean gradient."""

    name: Literal["less"] = "less"
    needs_target: ClassVar[bool] = True
    reads_pool: ClassVar[bool] = True
    prefer: Prefer = Field("high", description="high: gradients most aligned with the target set's.")
    lora_rank: int = Field(8, ge=1, description="Rank of the LoRA adapters whose gradients are the features.")
    targets: list[str] = Field(default_factory=lambda: [r"\.self_attn\.(q|v)_proj$"],
                               description="Regexes of Linear module names that get adapters.")
    projection_dim: int = Field(1024, ge=8, description="Dimension of the random projection of the gradients.")
    warmup_steps: int = Field(8, ge=0, description="Adam warm-up steps of the adapters, for the optimizer moments (0: plain gradient features).")
    warmup_examples: int = Field(64, ge=1, description="Size of the seeded sample of the pool the warm-up trains on (LESS warms up on "
                                 "a small share of the training pool).")
    seed: int = Field(0, description="Seed of the adapters' init and the projection.")


class LengthConfig(_Scorer):
    """Number of characters of the response (the 'long is more' baseline, Zhao et al. 2024, arXiv 2402.04833)."""

    name: Literal["length"] = "length"
    kind: ClassVar[Literal["batch", "pool"]] = "pool"
    prefer: Prefer = Field("high", description="high: the longest responses.")


class DSIRConfig(_Scorer):
    """Importance weight log p_target(x) − log p_pool(x) under hashed unigram+bigram models (DSIR, Xie et al. 2023,
    arXiv 2302.03169)."""

    name: Literal["dsir"] = "dsir"
    kind: ClassVar[Literal["batch", "pool"]] = "pool"
    needs_target: ClassVar[bool] = True
    prefer: Prefer = Field("high", description="high: the examples the target distribution makes most likely.")
    buckets: int = Field(10000, ge=16, description="Hash buckets of the n-gram features.")
    ngrams: int = Field(2, ge=1, le=3, description="Longest n-gram counted.")


class PrototypeConfig(_Scorer):
    """Distance to the nearest k-means centroid of all-MiniLM-L6-v2 embeddings (self-supervised prototypes,
    Sorscher et al. 2022, arXiv 2206.14486)."""

    name: Literal["prototype"] = "prototype"
    kind: ClassVar[Literal["batch", "pool"]] = "pool"
    prefer: Prefer = Field("high", description="high: the least prototypical (hardest) examples.")
    clusters: int = Field(16, ge=1, description="k of k-means (capped at the pool size).")
    seed: int = Field(0, description="Seed of k-means' initialisation.")


ScorerConfig = Annotated[
    Union[LossConfig, EL2NConfig, IFDConfig, GraNdConfig, RDSConfig, LESSConfig, LengthConfig, DSIRConfig,
          PrototypeConfig],
    Field(discriminator="name"),
]


@dataclass(frozen=True)
class ScorerHandler:
    """How a scorer runs. Batch scorers: ``prepare(config, context) -> state`` once, then
    ``score_batch(config, batch, state) -> (B,) scores``. Pool scorers: ``score_pool(config, examples, context)``."""

    prepare: Callable[[Any, Any], Any] | None = None
    score_batch: Callable[[Any, Any, Any], np.ndarray] | None = None
    score_pool: Callable[[Any, list, Any], np.ndarray] | None = None


def _handlers() -> dict[type[BaseModel], ScorerHandler]:
    from weightwise.select.scorers import gradient, model, target, text

    return {
        LossConfig: ScorerHandler(score_batch=model.loss_scores),
        EL2NConfig: ScorerHandler(score_batch=model.el2n_scores),
        IFDConfig: ScorerHandler(score_batch=model.ifd_scores),
        GraNdConfig: ScorerHandler(prepare=gradient.prepare_grand, score_batch=gradient.grand_scores),
        RDSConfig: ScorerHandler(prepare=target.prepare_rds, score_batch=target.rds_scores),
        LESSConfig: ScorerHandler(prepare=gradient.prepare_less, score_batch=gradient.less_scores),
        LengthConfig: ScorerHandler(score_pool=text.length_scores),
        DSIRConfig: ScorerHandler(score_pool=target.dsir_scores),
        PrototypeConfig: ScorerHandler(score_pool=text.prototype_scores),
    }


SCORER_CONFIGS: tuple[type[_Scorer], ...] = (LossConfig, EL2NConfig, IFDConfig, GraNdConfig, RDSConfig, LESSConfig,
                                             LengthConfig, DSIRConfig, PrototypeConfig)
SCORER_NAMES: tuple[str, ...] = tuple(cls.model_fields["name"].default for cls in SCORER_CONFIGS)


def scorer_handler(config: BaseModel) -> ScorerHandler:
    """The handler of a scorer config (the registry lookup)."""
    try:
        return _handlers()[type(config)]
    except KeyError:
        raise WeightwiseError(f"{type(config).__name__} is not a registered scorer: use one of {', '.join(SCORER_NAMES)}") from None


def scorer_config(name: str, **fields: Any) -> _Scorer:
    """A scorer config by name, e.g. ``scorer_config("ifd", weight=0.5)``."""
    for cls in SCORER_CONFIGS:
        if cls.model_fields["name"].default == name:
            return cls(**fields)
    raise WeightwiseError(f"unknown scorer {name!r}: use one of {', '.join(SCORER_NAMES)}")


def parse_scorer(spec: str) -> _Scorer:
    """A scorer from ``NAME[:WEIGHT[:high|low]]``, e.g. ``ifd:1``, ``rds:0.5``, ``loss:1:low``."""
    name, *rest = spec.split(":")
    if len(rest) > 2:
        raise WeightwiseError(f"scorer {spec!r} has too many parts: write NAME[:WEIGHT[:high|low]]")
    fields: dict[str, Any] = {}
    if rest and rest[0]:
        try:
            fields["weight"] = float(rest[0])
        except ValueError:
            raise WeightwiseError(f"scorer {spec!r}: weight {rest[0]!r} is not a number") from None
        if not fields["weight"] > 0:
            raise WeightwiseError(f"scorer {spec!r}: the weight must be positive")
    if len(rest) == 2:
        if rest[1] not in ("high", "low"):
            raise WeightwiseError(f"scorer {spec!r}: keep 'high' or 'low' scores, not {rest[1]!r}")
        fields["prefer"] = rest[1]
    return scorer_config(name, **fields)
