"""SelectConfig: the one typed description of a data-selection run, shared by the CLI, YAML and the API."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from weightwise.select.scorers import ScorerConfig
from weightwise.select.selectors import SelectorConfig, TopConfig

SELECT_CONFIG_VERSION = 1


class SelectConfig(BaseModel):
    """Which scorers rank the pool, which filters drop examples first, and how many examples are kept."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(SELECT_CONFIG_VERSION, description="Config schema version.")
    model: str = Field("default", description="Causal LM for model-based scorers (anything load_model takes).")
    scorers: list[ScorerConfig] = Field(default_factory=list, description="Scorers, combined by weighted rank "
                                        "averaging (each config's weight and prefer). None: the selector alone decides.")
    selector: SelectorConfig = Field(default_factory=TopConfig, description="How the kept examples are chosen.")
    budget: int | None = Field(None, ge=1, description="Examples to keep (give budget or fraction).")
    fraction: float | None = Field(None, gt=0, le=1, description="Fraction of the examples left after the filters to keep.")
    target: str | None = Field(None, description="JSONL file of target examples (a small dev set): needed by rds, less, dsir.")
    dedup: Literal["none", "exact", "near"] = Field("near", description="Drop exact duplicates, or exact and near "
                                                    "duplicates (MinHash), keeping the first.")
    near_threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity above which two examples are near duplicates.")
    contamination: list[str] = Field(default_factory=list, description="JSONL files of evaluation examples: pool "
                                     "examples sharing an n-gram with them are dropped.")
    contamination_ngram: int = Field(13, ge=1, description="Words per n-gram of the contamination check.")
    max_length: int = Field(256, ge=8, description="Tokens per example for model-based scorers (longer ones get no score and are dropped).")
    batch_size: int = Field(16, ge=1, description="Examples per scoring batch.")
    engine: Literal["local", "ray"] = Field("local", description="Score in this process, or on Ray Data workers (the [ray] extra).")
    workers: int = Field(1, ge=1, description="Ray: scoring actors, each holding one copy of the model.")
    on_error: Literal["skip", "fail"] = Field("skip", description="Invalid input lines: report and skip them, or stop at the first.")
    seed: int = Field(0, description="Seed of the random and diversity selectors.")
    trust_remote_code: bool = Field(False, description="Allow the model folder's own Python code (off: safer).")

    @model_validator(mode="after")
    def _consistent(self) -> SelectConfig:
        if self.version != SELECT_CONFIG_VERSION:
            raise ValueError(f"select config version {self.version} is not supported (this weightwise reads "
                             f"version {SELECT_CONFIG_VERSION})")
        if (self.budget is None) == (self.fraction is None):
            raise ValueError("give exactly one of budget (a count) and fraction")
        names = [s.name for s in self.scorers if s.needs_target]
        if names and self.target is None:
            raise ValueError(f"scorer {names[0]} compares examples with a target set: give target, a JSONL file of examples")
        return self

    @property
    def needs_model(self) -> bool:
        return any(s.kind == "batch" for s in self.scorers)

    @classmethod
    def from_yaml(cls, path: str | Path, **updates) -> SelectConfig:
        """Load a YAML config; ``updates`` (e.g. from command-line options) replace its fields."""
        from weightwise.quantize.recipe import recipe_from_yaml

        return recipe_from_yaml(cls, path, updates)
