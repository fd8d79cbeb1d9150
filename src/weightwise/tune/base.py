"""The base of every fine-tuning method (methods.py, qat.py): the hooks the loop calls (:class:`TuneMethod`; the
hooks are described in methods.py) and the AdamW methods' shared optimizer, state and counts (:class:`AdamWMethod`).

A module of its own so that a method in another module (qat.py) and the registry in methods.py can both import it.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from weightwise.evaluate.perplexity import example_nll
from weightwise.comm import Comm
from weightwise.tune.compander import CompandedWeights
from weightwise.tune.config import TuneConfig
from weightwise.tune.steps import StepHooks, TorchOptimizerHooks


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def micro_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of the labelled next-token predictions of one micro-batch (fp32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return example_nll(logits, batch["labels"])[0].sum()


class TuneMethod(StepHooks):
    """The hooks the loop calls; see methods.py. ``settings`` is ``config.method``, the method's own config;
    ``companded`` the targets' weight reparameterisation (``config.reparam``) of a method that trains through one."""

    companded: CompandedWeights | None = None

    def __init__(self, config: TuneConfig, comm: Comm | None = None, progress: Callable[[int, int], None] | None = None):
        self.config = config
        self.settings = config.method
        self.comm = comm or Comm()
        self.progress = progress  # (done, total) while the method prepares layer by layer (sparse masks)

    @abstractmethod
    def prepare(self, model: nn.Module, targets: dict[str, nn.Linear], resume: dict | None = None) -> nn.Module:
        """Freeze ``model``, make the trained tensors trainable, build the optimizer (restored from ``resume``,
        a checkpoint of :meth:`state`); returns the module the loop runs."""

    def micro_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of one micro-batch, which loop.py divides by the global batch's labelled tokens: its
        cross-entropy (:func:`micro_loss`); qat can mix in distillation from the float model."""
        return micro_loss(model, batch)

    def finish(self) -> None:
        """Training is over: leave the model's trained weights plain (the reparameterisation removed) for
        evaluation, saving and the caller."""
        if self.companded is not None:
            self.companded.remove()

    @abstractmethod
    def state(self) -> dict:
        """Checkpoint content: tensors (safetensors) and JSON scalars, ``prepare(..., resume=state)`` restores it."""

    @abstractmethod
    def trainable_tensors(self) -> list[torch.Tensor]:
        """The tensors that are trained, made identical on every process before the first step."""

    @abstractmethod
    def trained_entries(self) -> int:
        """Entries trained now (masked entries, every targeted entry, or adapter parameters)."""

    @abstractmethod
    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state (moments, and mask indices for sparse methods)."""

    @abstractmethod
    def save_result(self, out_dir: Path, metadata: dict, patch_dtype: str, tokenizer=None) -> list[str]:
        """Write the result into ``out_dir`` (``tokenizer`` goes with a result that is a whole model); returns the
        names written."""


class AdamWMethod(TorchOptimizerHooks, TuneMethod):
    """Shared by full, LoRA and QAT: torch AdamW over ``self.params`` (name → parameter), in the groups of
    :meth:`param_groups`."""

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups; their parameters, in order, are those of ``self.params``."""
        return [{"params": list(self.params.values())}]

    def build_optimizer(self, resume: dict | None) -> None:
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay, foreach=False)
        if resume is not None:
            tensors = resume["tensors"]
            for name, p in self.params.items():
                with torch.no_grad():
                    p.copy_(tensors[f"value.{name}"].to(device=p.device, dtype=p.dtype))
            state = self.optimizer.state_dict()
            state["state"] = {
                i: {key: tensors[f"optim.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
                for i, name in enumerate(self.params) if f"optim.{name}.step" in tensors
            }
            self.optimizer.load_state_dict(state)

    def state(self):
        tensors = {f"value.{name}": p.detach() for name, p in self.params.items()}
        by_index = self.optimizer.state_dict()["state"]
        for i, name in enumerate(self.params):
            for key, value in by_index.get(i, {}).items():
                tensors[f"optim.{name}.{key}"] = value
        return {"tensors": tensors, "scalars": {}}

    def trainable_tensors(self):
        return [p.data for p in self.params.values()]

    def trained_entries(self):
        return sum(p.numel() for p in self.params.values())

    def optimizer_state_bytes(self):
        return sum(t.nbytes for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
