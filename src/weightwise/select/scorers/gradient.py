"""Gradient scores: GraNd (per-example gradient norm over LIFT's principal weights) and LESS (projected,
Adam-preconditioned LoRA gradients, cosine to the target set's).

The caller's model is never changed: gradients are taken with ``torch.autograd.grad`` (no ``.grad`` is
left on its parameters), ``requires_grad`` and train/eval modes are set only while scoring and restored
afterwards, and LESS's LoRA adapters live outside the model, added to the targeted Linears' outputs by
forward hooks that are removed when each pass ends.

LESS (Xia et al. 2024, arXiv 2402.04333) as written here:

- adapters: rank ``lora_rank``, A Kaiming-uniform (peft's init, seeded), B zero, scale 4 (LESS's
  lora_alpha 512 / r 128);
- warm-up: ``warmup_steps`` Adam steps (lr 2e-5, betas (0.9, 0.999), LESS's values) of the adapters on
  a seeded sample of ``warmup_examples`` pool examples (the paper warms up on 5 % of the training pool),
  cycling through its batches; on the target set when the context has no pool. One checkpoint (the end of
  the warm-up), not the paper's four per-epoch checkpoints;
- features: per-example gradients of the example's mean NLL w.r.t. all A and B, computed for a whole
  batch at once from the Linears' inputs X and output gradients G (dB = s·Gᵀ(XAᵀ), dA = s·(GB)ᵀX, per
  example, so padding changes nothing). Pool examples get the Adam update direction m′/√(v′+ε) with the
  warm-up moments (LESS's code: no bias correction, ε inside the root); target examples get the plain
  gradient, as LESS's validation features do; ``warmup_steps=0`` gives plain gradients on both sides;
- projection: a CountSketch (each coordinate added with a random sign into one of ``projection_dim``
  buckets, seeded), a sparse Johnson–Lindenstrauss map that needs O(D) memory, where a dense D×k matrix
  would not fit for a large model (TRAK's dense Rademacher projection in the paper);
- score: cosine of the unit projected feature to the unit mean of the unit target features (so ranking
  by it ranks by the mean cosine to the target examples, LESS's score for one task).

Measured: moments from a warm-up on the target set itself make the momentum term lean every pool feature
toward the target's mean gradient, and the scores bunch up (SmolLM2-135M, 8 arithmetic targets, 8 steps:
arithmetic examples 0.52–0.55, others 0.48–0.53; with ``warmup_steps=0`` 0.40–0.63 against −0.06–0.27),
which is why the warm-up samples the pool, as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weightwise.architectures import matches
from weightwise.errors import WeightwiseError
from weightwise.select.scorers.model import mean_nll
from weightwise.tune.lift import budget_k, principal_mask

LORA_SCALE = 4.0  # lora_alpha / r in LESS (512 / 128)
WARMUP_LR = 2e-5  # LESS's learning rate
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@contextmanager
def gradients_of(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Every module in eval mode and only ``params`` requiring grad, for the duration; restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(p) for p in params}
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def target_linears(model: nn.Module | None, patterns: list[str], scorer: str) -> dict[str, nn.Linear]:
    """The Linear modules whose names match any of ``patterns``, by name."""
    if model is None:
        raise WeightwiseError(f"{scorer} needs a causal language model: give the scoring context a model and tokenizer")
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and matches(name, patterns)}
    if not found:
        raise WeightwiseError(f"{scorer}: no Linear layer of the model matches targets {patterns}: pass regexes of its module names")
    return found


# --- GraNd ----------------------------------------------------------------------------------------


def masked_example_grad_norms(x: torch.Tensor, grad_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared norms over the flat entries ``mask`` of each example's weight gradient Gₙᵀ Xₙ (out × in), from a
    Linear's inputs ``x`` (n, ..., in) and the loss's gradient w.r.t. its outputs ``grad_out`` (n, ..., out), in
    fp32, one example's out × in matrix at a time: ``(n,)``."""
    x, g = x.flatten(1, -2).float(), grad_out.flatten(1, -2).float()
    return torch.stack([(g[i].T @ x[i]).reshape(-1)[mask].square().sum() for i in range(x.shape[0])])


def prepare_grand(config, ctx) -> dict[str, torch.Tensor]:
    """LIFT masks (flat indices of the principal weights) of the targeted matrices, by module name."""
    masks = {}
    for name, module in target_linears(ctx.model, config.targets, "grand").items():
        weight = module.weight.detach()
        k = budget_k(tuple(weight.shape), density=config.density)
        masks[name] = principal_mask(weight, k, filter_rank=config.filter_rank)
    return masks


def _captured(captured: list, index: int, module, args, output) -> None:
    """Forward hook: records (index, the Linear's input, its output)."""
    captured.append((index, args[0].detach(), output))


def grand_scores(config, batch, state: dict[str, torch.Tensor]) -> np.ndarray:
    """GraNd (Paul et al. 2021): the norm of each example's mean-NLL gradient over the masked entries. One forward
    and backward pass for the whole batch: each example's loss depends on its own positions only, so the gradient
    of the summed losses w.r.t. a Linear's outputs holds every example's own, and its weight gradient is Gₙᵀ Xₙ
    (summed over the calls of a Linear used twice); padding positions carry no gradient."""
    modules = dict(batch.model.named_modules())
    names = list(state)
    weights = [modules[name].weight for name in names]
    captured: list = []
    handles = [modules[name].register_forward_hook(partial(_captured, captured, i)) for i, name in enumerate(names)]
    try:
        with gradients_of(batch.model, weights):
            forward = batch.run(batch.collated(), grad=True)
            outputs = torch.autograd.grad(mean_nll(forward.logits, forward.labels).sum(), [out for _, _, out in captured])
    finally:
        for handle in handles:
            handle.remove()
    squared = torch.zeros(len(batch.encoded))
    by_module: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for (index, x, _), grad_out in zip(captured, outputs):
        by_module.setdefault(index, []).append((x, grad_out))
    for index, calls in by_module.items():  # a Linear called twice: its calls' positions side by side (Σ Gᵀ X)
        x = torch.cat([x.flatten(1, -2) for x, _ in calls], 1)
        g = torch.cat([g.flatten(1, -2) for _, g in calls], 1)
        squared += masked_example_grad_norms(x, g, state[names[index]].to(x.device)).cpu()
    return batch.scatter(squared.sqrt().numpy().astype(np.float64))


# --- LESS -----------------------------------------------------------------------------------------


@dataclass
class LoRAAdapters:
    """LoRA factors kept outside the model: ``a[i]`` (r, in) and ``b[i]`` (out, r) of the Linear ``names[i]``."""

    names: list[str]
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    scale: float = LORA_SCALE

    def tensors(self) -> list[torch.Tensor]:
        """A and B of every adapter, in feature order."""
        return [t for pair in zip(self.a, self.b) for t in pair]


def init_adapters(linears: dict[str, nn.Linear], rank: int, generator: torch.Generator) -> LoRAAdapters:
    """A ~ U(±1/√in) (peft's Kaiming-uniform with a=√5), B = 0, in fp32 on each Linear's device."""
    a, b = [], []
    for module in linears.values():
        out_features, in_features = module.weight.shape
        bound = 1 / math.sqrt(in_features)
        init = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        a.append(init.to(module.weight.device).requires_grad_())
        b.append(torch.zeros(out_features, rank, device=module.weight.device, requires_grad=True))
    return LoRAAdapters(list(linears), a, b)


def _adapted(adapters: LoRAAdapters, index: int, captured: list | None, module, args, output):
    """Forward hook: the Linear's output plus its adapter's, s·(X Aᵀ) Bᵀ; records (index, X, output)."""
    x = args[0]
    a, b = adapters.a[index], adapters.b[index]
    out = output + (adapters.scale * (x.to(a.dtype) @ a.T) @ b.T).to(output.dtype)
    if captured is not None:
        captured.append((index, x.detach(), out))
    return out


@contextmanager
def attached(model: nn.Module, adapters: LoRAAdapters, captured: list | None = None) -> Iterator[None]:
    """The adapters added to the model's forward passes for the duration (hooks removed afterwards)."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for i, name in enumerate(adapters.names):
            handles.append(modules[name].register_forward_hook(partial(_adapted, adapters, i, captured)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def lora_example_grads(x: torch.Tensor, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of a LoRA adapter from the Linear's inputs ``x`` (n, ..., in) and the loss's
    gradient w.r.t. its outputs ``grad_out`` (n, ..., out): dA (n, r, in) and dB (n, out, r), in fp32."""
    x, g = x.flatten(1, -2).float(), grad_out.flatten(1, -2).float()
    d_a = scale * torch.einsum("nlr,nli->nri", g @ b.detach(), x)
    d_b = scale * torch.einsum("nlo,nlr->nor", g, x @ a.detach().T)
    return d_a, d_b


def example_lora_grads(batch, adapters: LoRAAdapters, items: list[dict], device: torch.device) -> torch.Tensor:
    """Each example's gradient of its mean NLL w.r.t. all adapters, flattened in feature order: ``(n, D)``."""
    captured: list = []
    with attached(batch.model, adapters, captured):
        forward = batch.run(batch.collated(items), grad=True)
    outputs = torch.autograd.grad(mean_nll(forward.logits, forward.labels).sum(), [out for _, _, out in captured])
    per_module: list[torch.Tensor | None] = [None] * len(adapters.names)
    for (index, x, _), grad_out in zip(captured, outputs):
        d_a, d_b = lora_example_grads(x, grad_out, adapters.a[index], adapters.b[index], adapters.scale)
        flat = torch.cat([d_a.flatten(1), d_b.flatten(1)], 1).to(device)
        per_module[index] = flat if per_module[index] is None else per_module[index] + flat  # a Linear called twice
    return torch.cat(per_module, 1)


def adam_direction(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """LESS's Adam feature: the next step's update direction m′/√(v′+ε) from the moments and ``grads`` (n, D)."""
    m = BETAS[0] * exp_avg + (1 - BETAS[0]) * grads
    v = BETAS[1] * exp_avg_sq + (1 - BETAS[1]) * grads.square()
    return m / (v + ADAM_EPS).sqrt()


@dataclass
class CountSketch:
    """A sparse Johnson–Lindenstrauss projection D → ``dim``: coordinate j is added with sign ``signs[j]``
    into bucket ``buckets[j]``."""

    buckets: torch.Tensor
    signs: torch.Tensor
    dim: int

    @classmethod
    def seeded(cls, size: int, dim: int, generator: torch.Generator, device: torch.device) -> CountSketch:
        buckets = torch.randint(dim, (size,), generator=generator)
        signs = torch.randint(2, (size,), generator=generator) * 2.0 - 1
        return cls(buckets.to(device), signs.to(device), dim)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Unit rows of the projected ``features`` (n, D) → (n, dim)."""
        projected = features.new_zeros(features.shape[0], self.dim).index_add_(1, self.buckets, features * self.signs)
        return F.normalize(projected, dim=1)


@dataclass
class LESSState:
    """What every LESS batch needs: the warmed-up adapters, their Adam moments in feature order (None without
    warm-up), the sketch and the unit target direction."""

    adapters: LoRAAdapters
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    sketch: CountSketch
    target: torch.Tensor


def warm_up(model: nn.Module, adapters: LoRAAdapters, batches: list, steps: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` Adam steps of the adapters (model frozen) on ``batches`` in turn; the moments in feature order."""
    optimizer = torch.optim.Adam(adapters.tensors(), lr=WARMUP_LR, betas=BETAS, eps=ADAM_EPS)
    for step in range(steps):
        batch = batches[step % len(batches)]
        with attached(model, adapters):
            forward = batch.run(batch.collated(), grad=True)
        optimizer.zero_grad(set_to_none=True)
        mean_nll(forward.logits, forward.labels).mean().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = optimizer.state
    return tuple(torch.cat([state[t][key].flatten().to(device) for t in adapters.tensors()])
                 for key in ("exp_avg", "exp_avg_sq"))


def warmup_batches(ctx, config, generator: torch.Generator) -> list:
    """Batches of a seeded sample of ``warmup_examples`` pool examples (those within max_length)."""
    if not ctx.pool:
        return []
    order = torch.randperm(len(ctx.pool), generator=generator)[: config.warmup_examples].sort().values
    return [b for b in ctx.batches([ctx.pool[i] for i in order.tolist()]) if b.fits.any()]


def prepare_less(config, ctx) -> LESSState:
    """Seeded adapters and sketch, the warm-up's Adam moments and the target set's unit mean gradient feature."""
    if not ctx.targets:
        raise WeightwiseError("less needs a target set: pass target examples of the task the selection is for")
    linears = target_linears(ctx.model, config.targets, "less")
    batches = [b for b in ctx.batches(ctx.targets) if b.fits.any()]
    if not batches:
        raise WeightwiseError(f"less: every target example is longer than max_length={ctx.max_length} tokens: raise max_length")
    generator = torch.Generator().manual_seed(config.seed)
    adapters = init_adapters(linears, config.lora_rank, generator)
    device = next(ctx.model.parameters()).device
    sketch = CountSketch.seeded(sum(t.numel() for t in adapters.tensors()), config.projection_dim, generator, device)
    exp_avg = exp_avg_sq = None
    with gradients_of(ctx.model, []):
        if config.warmup_steps:
            exp_avg, exp_avg_sq = warm_up(ctx.model, adapters, warmup_batches(ctx, config, generator) or batches,
                                          config.warmup_steps, device)
        features = torch.cat([sketch(example_lora_grads(b, adapters, b.encoded, device)) for b in batches])
    return LESSState(adapters, exp_avg, exp_avg_sq, sketch, F.normalize(features.mean(0), dim=0))


def less_scores(config, batch, state: LESSState) -> np.ndarray:
    """Cosine of each example's projected Adam-preconditioned LoRA gradient to the target direction."""
    with gradients_of(batch.model, []):
        grads = example_lora_grads(batch, state.adapters, batch.encoded, state.target.device)
    if state.exp_avg is not None:
        grads = adam_direction(grads, state.exp_avg, state.exp_avg_sq)
    return batch.scatter(state.sketch(grads) @ state.target)
