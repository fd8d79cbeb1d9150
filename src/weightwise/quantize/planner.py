"""Mixed precision under a size budget: pick one candidate per layer minimising the total predicted error.

A multiple-choice knapsack solved exactly as a small integer program (``scipy.optimize.milp``,
HiGHS): one binary x[l, c] per layer and candidate, Σ_c x[l, c] = 1 per layer, Σ bits·x ≤ budget,
minimise Σ error·x. The errors are predictions (e.g. Hessian-weighted output error per choice),
assumed additive over layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from weightwise.errors import WeightwiseError


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer: its stored bits and predicted error (lower is better)."""

    label: str
    bits: int
    error: float
    info: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Plan:
    """The chosen candidate per layer, the totals, and whether the solver proved optimality."""

    choices: dict[str, Candidate]
    total_bits: int
    total_error: float
    budget_bits: int
    optimal: bool

    @property
    def labels(self) -> dict[str, str]:
        return {name: c.label for name, c in self.choices.items()}


def budget_from_bpw(target_bpw: float, n_params: int, fixed_bits: int = 0) -> int:
    """Bits left to the planned layers when ``n_params`` weights may average ``target_bpw`` bits.

    ``n_params`` counts the weights the target is measured over: the planned layers alone (then
    ``fixed_bits`` = 0), or the whole model with ``fixed_bits`` = the bits of what is not planned.
    The decimal target is taken exactly (3.3 bpw × 10 weights = 33 bits, not 32).
    """
    return _remaining(math.floor(Fraction(str(target_bpw)) * n_params), fixed_bits, f"{target_bpw} bits/weight × {n_params} weights")


def budget_from_mb(target_mb: float, fixed_bits: int = 0) -> int:
    """Bits left to the planned layers in a file of ``target_mb`` MB (10^6 bytes) after ``fixed_bits``."""
    return _remaining(math.floor(Fraction(str(target_mb)) * 8_000_000), fixed_bits, f"{target_mb} MB")


def _remaining(total_bits: int, fixed_bits: int, what: str) -> int:
    if fixed_bits < 0:
        raise WeightwiseError(f"fixed_bits must be ≥ 0, got {fixed_bits}")
    if total_bits <= fixed_bits:
        raise WeightwiseError(
            f"{what} = {total_bits} bits leaves nothing for the planned layers: the fixed tensors alone take "
            f"{fixed_bits} bits ({fixed_bits / 8e6:.3f} MB)"
        )
    return total_bits - fixed_bits


def plan_mixed_precision(
    layers: dict[str, list[Candidate]], budget_bits: int, *, time_limit: float | None = None, mip_rel_gap: float = 1e-9
) -> Plan:
    """Exactly one candidate per layer, Σ bits ≤ ``budget_bits``, least total predicted error.

    ``time_limit`` (seconds) returns the best plan found so far with ``optimal=False``;
    ``mip_rel_gap`` is the relative optimality gap at which HiGHS stops.
    """
    names = list(layers)
    if not names:
        raise WeightwiseError("nothing to plan: no layers given")
    for name, cands in layers.items():
        if not cands:
            raise WeightwiseError(f"layer {name} has no candidates")
        if len({c.label for c in cands}) != len(cands):
            raise WeightwiseError(f"layer {name} has two candidates with the same label")
        if any(c.bits < 0 or not math.isfinite(c.error) for c in cands):
            raise WeightwiseError(f"layer {name}: candidate bits must be ≥ 0 and errors finite")
    least = sum(min(c.bits for c in layers[n]) for n in names)
    if least > budget_bits:
        raise WeightwiseError(
            f"budget of {budget_bits} bits ({budget_bits / 8e6:.3f} MB) is infeasible: the smallest candidates "
            f"of the {len(names)} layers already take {least} bits ({least / 8e6:.3f} MB)"
        )
    flat = [c for n in names for c in layers[n]]
    starts = np.cumsum([0] + [len(layers[n]) for n in names])
    layer_of = np.repeat(np.arange(len(names)), np.diff(starts))
    bits = np.array([c.bits for c in flat], dtype=np.float64)
    errors = np.array([c.error for c in flat], dtype=np.float64)
    one_each = csr_array((np.ones(len(flat)), (layer_of, np.arange(len(flat)))), shape=(len(names), len(flat)))
    # conditioning: coefficients ≤ 1 in magnitude, so HiGHS's absolute tolerances act relative to the data
    bit_scale, err_scale = max(bits.max(), 1.0), max(np.abs(errors).max(), np.finfo(float).tiny)
    options = {"mip_rel_gap": mip_rel_gap} | ({} if time_limit is None else {"time_limit": time_limit})
    slack = 0
    while True:  # HiGHS's feasibility tolerance may let Σ bits pass the budget by a hair: tighten and re-solve
        result = milp(
            errors / err_scale,
            integrality=np.ones(len(flat)),
            bounds=Bounds(0, 1),
            constraints=[
                LinearConstraint(one_each, 1, 1),
                LinearConstraint(bits[None, :] / bit_scale, -np.inf, (budget_bits - slack) / bit_scale),
            ],
            options=options,
        )
        if result.x is None:
            raise WeightwiseError(f"mixed-precision planner found no plan within the limits: {result.message}")
        chosen = {n: layers[n][int(np.argmax(result.x[starts[i] : starts[i + 1]]))] for i, n in enumerate(names)}
        total = sum(c.bits for c in chosen.values())
        if total <= budget_bits:
            break
        slack += total - budget_bits
    return Plan(
        choices=chosen,
        total_bits=total,
        total_error=float(sum(c.error for c in chosen.values())),
        budget_bits=budget_bits,
        optimal=result.status == 0,
    )
