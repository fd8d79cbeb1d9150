"""Fine-tuning methods as hooks of the one optimisation loop (steps.py, run by loop.py): a registry method
config type → class.

Every method trains the same targets (by default the Linear layers of the decoder blocks; embeddings,
norms and lm_head stay frozen) and offers the same hooks:

- ``prepare(model, targets, resume)`` freezes the model, makes the trained tensors trainable, builds the
  optimizer (from a checkpoint's tensors when ``resume`` is given) and returns the module to run;
- ``gradients()`` the gradients of one optimizer step (the loop sums them over processes and clips them);
- ``step(lr)`` / ``zero_grad()``; ``refresh(index)`` every ``refresh_every`` steps (sparse methods: recompute the masks);
- ``state()`` / the ``resume`` argument: everything a checkpoint needs to continue bit for bit;
- ``step_metrics()`` numbers of the step just taken for its record (qat: oscillating and frozen fractions);
- ``save_result(out_dir, metadata, patch_dtype, tokenizer)``: a sparse weight patch, a peft adapter, or (qat,
  qat-lora) a quantized model folder.

Sparse methods (lift, magnitude, random) keep Adam moments for the k masked entries only (SparseAdam);
full fine-tuning uses AdamW on every targeted weight; lora, dora and pissa wrap the model with peft;
qat (qat.py) trains latent weights and scales through fake quantization, qat-lora (qat_lora.py) a low-rank pair
added to frozen weights and the scales. The base classes are in base.py.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from weightwise.io.artifacts import atomic_output_dir, write_json_atomic
from weightwise.tune import compander
from weightwise.tune.base import AdamWMethod, TuneMethod, freeze
from weightwise.comm import Comm
from weightwise.tune.config import (
    DoraConfig,
    FullConfig,
    LiftConfig,
    LoraConfig,
    MagnitudeConfig,
    PissaConfig,
    QATConfig,
    QATLoraConfig,
    RandomMaskConfig,
    TuneConfig,
    TuneMethodConfig,
)
from weightwise.tune.lift import budget_k, magnitude_mask, principal_mask, random_mask
from weightwise.tune.qat import QATMethod
from weightwise.tune.qat_lora import QATLoraMethod

logger = logging.getLogger(__name__)

PATCH_FILE = "patch.safetensors"
ADAPTER_DIR = "adapter"


def mask_seed(seed: int, refresh_index: int, layer_index: int) -> int:
    """Seed of the random mask of one layer at one refresh: a pure function of the run's seed, so a
    resumed run draws the masks an uninterrupted one would."""
    return (seed * 1_000_003 + refresh_index * 10_007 + layer_index) % (2**63)


def extend_union(indices: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add ``mask`` to the sorted flat ``indices`` ever trained, whose base values are ``base``.

    Entries new to the union were never trained, so their current value in ``weight`` is still the base value.
    """
    union = torch.cat([indices, mask]).unique(sorted=True)
    new = ~torch.isin(union, indices)
    values = torch.empty(union.numel(), dtype=base.dtype, device=base.device)
    values[~new] = base
    values[new] = weight.detach().reshape(-1)[union[new]]
    return union, values


# --- sparse methods: lift, magnitude, random ------------------------------------------------------


class SparseMethod(TuneMethod):
    """Train k entries per targeted matrix, chosen by :meth:`mask`, with SparseAdam.

    The entries ever trained (the union of all masks so far) are tracked with their base values, so
    the result patch is exact without a copy of the base weights. Under the compander (``config.reparam``) the
    masks and base values are of the weights W, while SparseAdam trains the latents V at the masked entries
    (f is elementwise and its α, β fixed, so W changes only there).
    """

    def prepare(self, model, targets, resume=None):
        from weightwise.tune.optim import SparseAdam

        freeze(model)
        self.targets = targets
        self.params = {name: module.weight for name, module in targets.items()}
        if resume is None:
            masks = self._masks(0)
            self.touched = {name: (idx, self.params[name].detach().view(-1)[idx].clone()) for name, idx in masks.items()}
        else:
            tensors = resume["tensors"]
            masks = {name: tensors[f"optim.{name}.indices"] for name in self.params}
            self.touched = {}
            for name, p in self.params.items():
                idx = tensors[f"touched.{name}"].to(p.device)
                self.touched[name] = (idx, p.detach().view(-1)[idx].clone())
        self.companded = compander.attach(targets, self.config.reparam)
        if self.companded is not None:
            self.params = self.companded.latents()
        for name, p in self.params.items():
            p.requires_grad_(True)
            if resume is not None:
                p.detach().view(-1)[self.touched[name][0]] = resume["tensors"][f"value.{name}"].to(device=p.device,
                                                                                               dtype=p.dtype)
        self.optimizer = SparseAdam(self.params, masks, lr=self.config.lr, weight_decay=self.config.weight_decay)
        if resume is not None:
            optim = {key.removeprefix("optim."): value for key, value in {**resume["tensors"], **resume["scalars"]}.items()
                     if key.startswith("optim.")}
            self.optimizer.load_state_dict(optim)
        self.optimizer.attach_hooks()
        return model

    @abstractmethod
    def mask(self, weight: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """Sorted flat indices of the k entries of ``weight`` to train (randomness only from ``generator``)."""

    @property
    def refresh_every(self):
        return self.settings.refresh_every

    def _weight(self, name: str) -> torch.Tensor:
        """The current weight W of target ``name`` (f(V) + r under the compander)."""
        with torch.no_grad():
            return self.targets[name].weight.detach()

    def _masks(self, refresh_index: int) -> dict[str, torch.Tensor]:
        """Masks from the current weights, computed on process 0 and broadcast (identical everywhere)."""
        masks = {}
        for i, (name, p) in enumerate(self.params.items()):
            k = budget_k(tuple(p.shape), **self.settings.budget)
            if self.comm.is_main:
                generator = torch.Generator().manual_seed(mask_seed(self.config.seed, refresh_index, i))
                masks[name] = self.mask(self._weight(name), k, generator).to(p.device)
            else:
                masks[name] = torch.empty(k, dtype=torch.long, device=p.device)
            if self.progress is not None:
                self.progress(i + 1, len(self.params))
        self.comm.broadcast(list(masks.values()))
        return masks

    def refresh(self, index):
        masks = self._masks(index)
        totals = {"kept": 0, "new": 0, "dropped": 0}
        for name, idx in masks.items():
            counts = self.optimizer.remask(name, idx)
            for key in totals:
                totals[key] += counts[key]
            self.touched[name] = extend_union(*self.touched[name], idx, self._weight(name))
        if not self.comm.identical(list(self.state()["tensors"].values())):
            raise RuntimeError(f"the processes hold different masks after refresh {index}")
        return totals

    def gradients(self):
        return list(self.optimizer.grad_buffers().values())

    def step(self, lr):
        self.optimizer.lr = lr
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad()

    def state(self):
        tensors, scalars = {}, {}
        for name, p in self.params.items():
            idx = self.touched[name][0]
            tensors[f"touched.{name}"] = idx
            tensors[f"value.{name}"] = p.detach().view(-1)[idx]
        for key, value in self.optimizer.state_dict().items():
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"optim.{key}"] = value
        return {"tensors": tensors, "scalars": scalars}

    def trainable_tensors(self):
        return [p.data for p in self.params.values()]

    def trained_entries(self):
        return sum(idx.numel() for idx in self.optimizer.masks.values())

    def ever_trained(self) -> dict[str, torch.Tensor]:
        """Flat indices of every entry trained so far (the union of the masks), per weight."""
        return {name: idx for name, (idx, _) in self.touched.items()}

    def optimizer_state_bytes(self):
        return self.optimizer.state_bytes()

    def save_result(self, out_dir, metadata, patch_dtype, tokenizer=None):
        from weightwise.tune.patch import WeightPatch

        entries, shapes = {}, {}
        for name, p in self.params.items():
            idx, base = self.touched[name]
            delta = self._weight(name).view(-1)[idx].float() - base.float()
            changed = delta != 0
            entries[f"{name}.weight"] = (idx[changed].cpu(), delta[changed].cpu())
            shapes[f"{name}.weight"] = tuple(p.shape)
        WeightPatch(entries=entries, shapes=shapes, metadata=metadata).save(out_dir / PATCH_FILE, value_dtype=patch_dtype)
        return [PATCH_FILE]


class LiftMethod(SparseMethod):
    def mask(self, weight, k, generator):
        return principal_mask(weight, k, filter_rank=self.settings.filter_rank, randomized=self.settings.randomized_svd,
                              generator=generator)


class MagnitudeMethod(SparseMethod):
    def mask(self, weight, k, generator):
        return magnitude_mask(weight, k)


class RandomMethod(SparseMethod):
    def mask(self, weight, k, generator):
        return random_mask(weight, k, generator=generator)


# --- dense optimizers: full fine-tuning and the peft adapters ---------------------------------------


class FullMethod(AdamWMethod):
    """Every entry of the targeted weights (the decoder blocks' linears by default), AdamW; the result is
    a dense patch (every changed entry), kept against a copy of the base weights. Under the compander
    (``config.reparam``) AdamW trains the latents V (and, with ``learn``, α and β without weight decay)."""

    def prepare(self, model, targets, resume=None):
        freeze(model)
        self.targets = targets
        self.base = {name: module.weight.detach().clone() for name, module in targets.items()}
        self.companded = compander.attach(targets, self.config.reparam)
        self.params = ({name: module.weight for name, module in targets.items()} if self.companded is None
                       else {**self.companded.latents(), **self.companded.hyperparameters()})
        for p in self.params.values():
            p.requires_grad_(True)
        self.build_optimizer(resume)
        return model

    def param_groups(self):
        if self.companded is None:
            return super().param_groups()
        latents, hyper = self.companded.latents(), self.companded.hyperparameters()
        return [{"params": list(latents.values())}] + ([{"params": list(hyper.values()), "weight_decay": 0.0}] if hyper else [])

    def save_result(self, out_dir, metadata, patch_dtype, tokenizer=None):
        from weightwise.tune.patch import WeightPatch

        base = {f"{name}.weight": w for name, w in self.base.items()}
        tuned = {f"{name}.weight": module.weight.detach() for name, module in self.targets.items()}
        WeightPatch.from_models(base, tuned, metadata).save(out_dir / PATCH_FILE, value_dtype=patch_dtype)
        return [PATCH_FILE]


class LoraMethod(AdamWMethod):
    """peft LoRA on the targeted Linear layers; the config's ``use_dora`` (DoRA, weight-decomposed) or
    ``pissa_init`` (PiSSA, adapters initialised from the principal singular vectors, the base keeping the residual).

    The result is a standard peft adapter folder. A PiSSA adapter is converted on save into a LoRA
    (of twice the rank) that applies to the original base weights, so any peft user can load it.
    """

    def prepare(self, model, targets, resume=None):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        freeze(model)
        adapter = self.settings
        lora = PeftLoraConfig(
            r=adapter.rank, lora_alpha=adapter.resolved_alpha, lora_dropout=adapter.dropout, target_modules=list(targets),
            use_dora=adapter.use_dora, init_lora_weights="pissa" if adapter.pissa_init else True,
        )
        self.model = get_peft_model(model, lora)
        self.params = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.initial = {name: p.detach().clone() for name, p in self.params.items()} if adapter.pissa_init else None
        self.build_optimizer(resume)
        return self.model

    def save_result(self, out_dir, metadata, patch_dtype, tokenizer=None):
        """The adapter folder, written beside and renamed into place whole (never seen half-written)."""
        with atomic_output_dir(out_dir / ADAPTER_DIR) as target:
            if self.initial is None:
                self.model.save_pretrained(target)
            else:
                with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                    # the conversion loads the initial adapter beside the trained one, and peft warns about its own step
                    warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
                    self._save_initial_adapter(Path(tmp) / "initial")
                    self.model.save_pretrained(target, path_initial_model_for_weight_conversion=str(Path(tmp) / "initial"))
            _sort_target_modules(target / "adapter_config.json")
        return [ADAPTER_DIR]

    @torch.no_grad()
    def _save_initial_adapter(self, path: Path) -> None:
        """The PiSSA adapter as initialised (peft converts the trained one against it)."""
        trained = {name: p.detach().clone() for name, p in self.params.items()}
        adapter = self.model.peft_config["default"]
        init = adapter.init_lora_weights
        try:
            for name, p in self.params.items():
                p.copy_(self.initial[name])
            adapter.init_lora_weights = True
            self.model.save_pretrained(path)
        finally:
            adapter.init_lora_weights = init
            for name, p in self.params.items():
                p.copy_(trained[name])


def _sort_target_modules(config_file: Path) -> None:
    """peft keeps ``target_modules`` as a set and writes it in the set's order, which changes from process to
    process (string hashing): sorted, the same run writes the same bytes (peft reads it back as a set)."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        write_json_atomic(config_file, config)


METHODS: dict[type[TuneMethodConfig], type[TuneMethod]] = {
    LiftConfig: LiftMethod, MagnitudeConfig: MagnitudeMethod, RandomMaskConfig: RandomMethod, FullConfig: FullMethod,
    LoraConfig: LoraMethod, DoraConfig: LoraMethod, PissaConfig: LoraMethod, QATConfig: QATMethod,
    QATLoraConfig: QATLoraMethod,
}


def make_method(config: TuneConfig, comm: Comm | None = None, progress: Callable[[int, int], None] | None = None) -> TuneMethod:
    """The hooks of ``config.method`` (every method config type of the union has one)."""
    return METHODS[type(config.method)](config, comm, progress)
