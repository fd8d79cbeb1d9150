"""Weight compander: train each targeted weight through a bounded, zero-expanding nonlinearity, W = f(V).

After "Weight Compander: A Simple Weight Reparameterization for Regularization" (R. Cakaj, J. Mehnert, B. Yang,
IJCNN 2023, arXiv 2306.16993): every weight is reparameterised by a nonlinear function that restricts its
magnitude and pushes it away from zero, and the function's hyperparameters may themselves be learned. The public
abstract states those properties; the paper's own equation was not in the sources read for this module, so the
function here is ours, chosen to have them:

    f(v) = β · tanh(α · v / β)        f⁻¹(w) = (β / α) · atanh(w / β)

- ``β`` (per output row) bounds the weight: |f(v)| < β, however far V goes; it starts at ``margin`` × the row's
  largest |W| (and at least the layer's mean |W|), so every pretrained weight lies inside the range and the model
  starts unchanged (V = f⁻¹(W)).
- ``α`` (per layer) is the slope at zero: near zero a step in V moves W α times as far (α > 1 expands small
  weights away from zero and "reactivates" them), while the slope α·(1 − (w/β)²) shrinks towards the bound.
- both are stored as logarithms (positive); ``learn`` trains them, as the paper's extension does.

fp32 rounding makes f(f⁻¹(W)) differ from W in the last bit for about a fifth of the entries, so the
parametrization also holds the rounding residual r = W − f(f⁻¹(W)) (|r| ≤ 1 ulp, set by ``right_inverse``) and
computes f(V) + r: the model starts bit for bit unchanged, and an entry whose V never moves keeps its exact W
(a sparse method's patch stays exact). The wiring uses ``torch.nn.utils.parametrize``; :meth:`CompandedWeights.remove`
leaves the plain weights f(V) + r in the modules when training ends.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from weightwise.errors import WeightwiseError
from weightwise.tune.config import CompanderConfig


def compand(v: torch.Tensor, alpha: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """f(v) = β·tanh(α·v/β): the weight of latent ``v`` (``alpha`` a scalar, ``bound`` broadcast over ``v``)."""
    return bound * torch.tanh(v * (alpha / bound))


def expand(w: torch.Tensor, alpha: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """f⁻¹(w) = (β/α)·atanh(w/β): the latent of weight ``w`` (every |w| < β)."""
    return torch.atanh(w / bound) * (bound / alpha)


def initial_bounds(weight: torch.Tensor, margin: float) -> torch.Tensor:
    """β per output row (shape (rows, 1)): ``margin`` × the row's largest |W|, at least the layer's mean |W| (so a
    zero row can still grow), and positive."""
    magnitude = weight.detach().abs()
    floor = magnitude.mean().clamp_min(torch.finfo(weight.dtype).tiny)
    return margin * torch.maximum(magnitude.amax(dim=1, keepdim=True), floor)


class Compander(nn.Module):
    """The parametrization W = f(V) + r of one Linear weight: ``log_alpha`` (scalar), ``log_bound`` (rows, 1) and
    the rounding residual ``r`` (a buffer that :meth:`right_inverse` sets)."""

    def __init__(self, weight: torch.Tensor, settings: CompanderConfig):
        super().__init__()
        bound = initial_bounds(weight, settings.margin)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(settings.expansion), dtype=weight.dtype, device=weight.device),
                                      requires_grad=settings.learn)
        self.log_bound = nn.Parameter(bound.log(), requires_grad=settings.learn)
        self.register_buffer("residual", None)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return compand(latent, self.log_alpha.exp(), self.log_bound.exp()) + self.residual

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The latent V = f⁻¹(W); sets the residual so that ``forward(V)`` is exactly ``weight``."""
        alpha, bound = self.log_alpha.exp(), self.log_bound.exp()
        if not bool((weight.abs() < bound).all()):
            raise WeightwiseError("compander: a weight is not finite or lies outside its row's bound; check the model's "
                                  "weights, or raise the margin")
        latent = expand(weight, alpha, bound)
        self.residual = weight - compand(latent, alpha, bound)
        return latent

    def extra_repr(self) -> str:
        return f"alpha={self.log_alpha.exp().item():.3g}, rows={self.log_bound.shape[0]}"


class CompandedWeights:
    """The targets' weights as W = f(V) + r while training (parametrizations registered on construction).

    :meth:`latents` are the V the optimizer trains, :meth:`hyperparameters` the α and β it trains when ``learn``;
    :meth:`remove` leaves each module a plain ``weight`` Parameter holding f(V) + r (the same Parameter object as
    its latent, so an optimizer's references stay valid).
    """

    def __init__(self, targets: dict[str, nn.Linear], settings: CompanderConfig):
        self.targets = targets
        for module in targets.values():
            parametrize.register_parametrization(module, "weight", Compander(module.weight, settings))

    def latents(self) -> dict[str, nn.Parameter]:
        return {name: module.parametrizations.weight.original for name, module in self.targets.items()}

    def hyperparameters(self) -> dict[str, nn.Parameter]:
        """The learned α and β by name ``<target>.compander.<log_alpha|log_bound>``; empty unless ``learn``."""
        return {f"{name}.compander.{key}": p for name, module in self.targets.items()
                for key, p in module.parametrizations.weight[0].named_parameters() if p.requires_grad}

    def remove(self) -> None:
        """Leave the plain weights f(V) + r in the modules (idempotent)."""
        for module in self.targets.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def attach(targets: dict[str, nn.Linear], settings: CompanderConfig | None) -> CompandedWeights | None:
    """Reparameterise the targets' weights by the compander of ``settings``; None (nothing done) without settings."""
    return None if settings is None else CompandedWeights(targets, settings)
