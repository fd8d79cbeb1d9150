"""TuneConfig: the one typed description of a fine-tuning run, shared by the CLI, YAML and the API."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TUNE_CONFIG_VERSION = 1
METHODS = ("lift", "full", "lora", "dora", "pissa", "magnitude", "random")
SPARSE_METHODS = ("lift", "magnitude", "random")
LORA_METHODS = ("lora", "dora", "pissa")
DEFAULT_DENSITY = 0.05
DEFAULT_LORA_RANK = 8

Method = Literal["lift", "full", "lora", "dora", "pissa", "magnitude", "random"]
PatchDtype = Literal["fp16", "bf16", "fp32", "int8"]

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
    method: Method = Field(
        "lift", description="lift (principal weights of a rank-reduced W, sparse Adam), magnitude or random "
        "(sparse baselines: top-k |W| / uniform masks), full (every targeted weight, AdamW), lora, dora or pissa (peft).")
    task: str = Field("arithmetic", description="'arithmetic' (DeepMind mathematics_dataset problems) or a .jsonl file "
                      "of {prompt, response} / {messages} records.")
    train_examples: int = Field(2000, ge=1, description="Training examples drawn from the task.")
    test_examples: int = Field(200, ge=0, description="Held-out problems scored by exact match before and after (0 = skip).")
    test_task: str | None = Field(None, description="Held-out problems: default the test split of 'arithmetic'; for a "
                                  ".jsonl task give a second .jsonl file (without one, exact match is skipped).")
    density: float | None = Field(
        None, gt=0, le=1, description=f"Sparse methods: fraction of each targeted matrix trained (default {DEFAULT_DENSITY} "
        "unless rank_budget is given).")
    rank_budget: int | None = Field(
        None, ge=1, description="Sparse methods: train rank_budget·(rows+cols) entries per matrix, the count a LoRA "
        "of that rank trains (instead of density); LoRA methods then default to this rank.")
    filter_rank: int = Field(128, ge=1, description="LIFT: rank of the approximation whose largest entries are trained.")
    randomized_svd: bool = Field(False, description="LIFT: randomized instead of exact truncated SVD (faster on large matrices).")
    refresh_every: int = Field(0, ge=0, description="Sparse methods: recompute the masks from the current weights every N "
                               "optimizer steps (moments of kept entries survive, new entries start at 0); 0 = never.")
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
    lora_rank: int | None = Field(
        None, ge=1, description=f"LoRA methods: adapter rank (default: rank_budget if given, so the trained counts match, "
        f"else {DEFAULT_LORA_RANK}).")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA methods: scaling numerator alpha (default: 2 × rank).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA methods: dropout on the adapter input.")
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

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        if self.version != TUNE_CONFIG_VERSION:
            raise ValueError(f"tune config version {self.version} is not supported (this weightwise reads "
                             f"version {TUNE_CONFIG_VERSION})")
        if self.density is not None and self.rank_budget is not None:
            raise ValueError("give density or rank_budget, not both")
        return self

    @property
    def sparse(self) -> bool:
        return self.method in SPARSE_METHODS

    @property
    def budget(self) -> dict:
        """The keyword arguments of ``lift.budget_k``: the density (default 5 %) or the rank budget."""
        if self.rank_budget is not None:
            return {"rank_budget": self.rank_budget}
        return {"density": DEFAULT_DENSITY if self.density is None else self.density}

    @property
    def resolved_lora_rank(self) -> int:
        return self.lora_rank or self.rank_budget or DEFAULT_LORA_RANK

    @property
    def resolved_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.resolved_lora_rank

    def training_key(self) -> dict:
        """The fields that decide the trained weights (a checkpoint resumes only when they are equal)."""
        return self.model_dump(exclude=set(_RUN_ONLY_FIELDS))

    @classmethod
    def from_yaml(cls, path: str | Path, **updates) -> TuneConfig:
        """Load a YAML config; ``updates`` (e.g. from command-line options) replace its fields."""
        from weightwise.quantize.recipe import recipe_from_yaml

        return recipe_from_yaml(cls, path, updates)
