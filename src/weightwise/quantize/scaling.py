"""Block-level scale migration (the wiring around ``methods.awq``): find a block's scaling groups from
the architecture data, choose scales with a rule (AWQ's search, SmoothQuant's formula), fold them into
the float block and rescale the calibration statistics, so that the block's layers are then quantized
in the rescaled basis. Runs inside layer-sequential calibration, before a block's layers are quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from weightwise.architectures import Family
from weightwise.formats.base import QuantSpec
from weightwise.quantize.methods.awq import fold_scales, scale_stats, smoothquant_scales

logger = logging.getLogger(__name__)

# (weights of a group's linears, the statistics of their shared input, their specs) → (scales, notes for the record)
ScaleRule = Callable[[list[torch.Tensor], dict, list[QuantSpec]], tuple[torch.Tensor, dict]]
# (block, block name, specs of the block's target layers, their statistics, family) → the statistics to quantize with
BlockStep = Callable[[nn.Module, str, dict[str, QuantSpec], dict[str, dict], Family], dict[str, dict]]


def scaling_groups(block: nn.Module, block_name: str, family: Family, targets) -> list[tuple[str, nn.Module, dict[str, nn.Module]]]:
    """The family's scaling groups present in ``block`` whose linears are all ``targets`` (full names)
    and whose widths fit: (previous module's name in the block, the module, {full name: linear})."""
    found = []
    for group in family.scaling_groups:
        if not all(f"{block_name}.{rel}" in targets for rel in group.linears):
            continue
        try:
            previous = block.get_submodule(group.previous)
        except AttributeError:
            continue
        linears = {f"{block_name}.{rel}": block.get_submodule(rel) for rel in group.linears}
        if all(linear.weight.shape[1] == previous.weight.shape[0] for linear in linears.values()):
            found.append((group.previous, previous, linears))
    return found


def migrate_scales(block: nn.Module, block_name: str, specs: dict[str, QuantSpec], stats: dict[str, dict],
                   family: Family, rule: ScaleRule, label: str) -> dict[str, dict]:
    """Apply ``rule`` to every scaling group of ``block`` in turn: fold its scales into the block and
    return the statistics with those of the group's linears rescaled. Each rescaled layer's statistics
    gain a ``folded`` list entry {"step": label, "from": previous module, **notes} for its record."""
    stats = dict(stats)
    for previous_name, previous, linears in scaling_groups(block, block_name, family, specs):
        names = list(linears)
        weights = [linear.weight.detach().to(torch.float32) for linear in linears.values()]
        scales, notes = rule(weights, stats[names[0]], [specs[name] for name in names])
        fold_scales(previous, list(linears.values()), scales, family.norm_offset)
        note = {"step": label, "from": previous_name, **notes}
        for name in names:
            stats[name] = {**scale_stats(stats[name], scales), "folded": [*stats[name].get("folded", []), note]}
        logger.debug("%s: %s scales folded from %s into %d layers", block_name, label, previous_name, len(names))
    return stats


def smoothquant_step(alpha: float) -> BlockStep:
    """SmoothQuant's block step: s = max|x|^α / max|W|^(1−α) folded for every scaling group."""

    def rule(weights, shared, specs):
        return smoothquant_scales(shared["act_abs_max"], weights, alpha), {"alpha": alpha}

    def step(block, block_name, specs, stats, family):
        return migrate_scales(block, block_name, specs, stats, family, rule, "smoothquant")

    return step
