"""quantize(model, recipe): swap the targeted nn.Linear modules for QuantizedLinear by the recipe's method."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from weightwise.architectures import family_of, matches
from weightwise.errors import WeightwiseError
from weightwise.formats.quantizer import check_finite, group_layout
from weightwise.io.artifacts import state_dict_fingerprint
from weightwise.quantize.methods import METHODS
from weightwise.quantize.qlinear import QuantizedLinear
from weightwise.quantize.recipe import QuantRecipe, validated

logger = logging.getLogger(__name__)

RECORD_ATTRIBUTE = "weightwise_quantization"


def target_layers(model: nn.Module, recipe: QuantRecipe) -> list[tuple[str, nn.Linear]]:
    """The Linear modules the recipe targets, in module order (ignores and family defaults applied)."""
    if recipe.targets is not None:
        patterns, keep = recipe.targets, ()
    else:
        family = family_of(getattr(getattr(model, "config", None), "model_type", "unknown"))
        patterns, keep = [family.linears], family.keep
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches(name, patterns) and not matches(name, [*keep, *recipe.ignore])
    ]
    if not found:
        raise WeightwiseError("no Linear layer matches the recipe's targets; check --targets / --ignore patterns")
    return found


def weight_sqnr_db(weight: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB; None when the approximation is exact."""
    noise = (weight.float() - approx.float()).pow(2).sum().item()
    return None if noise == 0 else 10 * math.log10(weight.float().pow(2).sum().item() / noise)


def quantize(
    model: nn.Module,
    recipe: QuantRecipe | dict | str | Path,
    *,
    calibration=None,
    inplace: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> nn.Module:
    """Quantize ``model``'s target layers; returns a new model unless ``inplace``.

    ``recipe`` may be a QuantRecipe, a dict of its fields, or a YAML path. ``progress(done, total, name)``
    is called after each layer. The returned model carries a record (recipe, per-layer spec and SQNR,
    source fingerprint, timings) that :func:`weightwise.save` writes to the manifest.
    """
    recipe = _as_recipe(recipe)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise WeightwiseError("the model is already quantized; quantize its float source instead")
    start = time.perf_counter()
    source_fingerprint = state_dict_fingerprint(model)
    targets = target_layers(model, recipe)
    plan = _plan(targets, recipe)
    if not inplace:
        model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    method = METHODS[recipe.method]
    layers: dict[str, dict] = {}
    for done, (name, spec) in enumerate(plan.items(), start=1):
        linear = modules[name]
        weight = linear.weight.detach().to(torch.float32)
        qt = method(weight, spec, None)
        qlinear = QuantizedLinear.from_quantized(qt, linear.bias)
        sqnr = weight_sqnr_db(weight, qlinear.dequantized_weight())
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, qlinear)
        layers[name] = {"spec": spec.model_dump(exclude_none=True), "sqnr_db": sqnr, "stored_bits": qlinear.stored_bits()}
        if progress:
            progress(done, len(plan), name)
    elapsed = time.perf_counter() - start
    logger.info("quantized %d layers with %s/%s in %.1f s", len(layers), recipe.method, recipe.format, elapsed)
    setattr(
        model,
        RECORD_ATTRIBUTE,
        {
            "recipe": recipe.model_dump(mode="json"),
            "layers": layers,
            "source_fingerprint": source_fingerprint,
            "timings": {"quantize_seconds": elapsed},
        },
    )
    return model


def quantization_record(model: nn.Module) -> dict | None:
    """The record :func:`quantize` attached to a quantized model (None for a float model)."""
    return getattr(model, RECORD_ATTRIBUTE, None)


def _as_recipe(recipe) -> QuantRecipe:
    if isinstance(recipe, QuantRecipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return QuantRecipe.from_yaml(recipe)
    if isinstance(recipe, dict):
        return validated(QuantRecipe, recipe, source="recipe")
    raise WeightwiseError(f"recipe must be a QuantRecipe, a dict or a YAML path, not {type(recipe).__name__}")


def _plan(targets, recipe: QuantRecipe) -> dict:
    """Spec per layer, checked (finite weights, group size fits) before any work is done."""
    plan = {}
    for name, linear in targets:
        spec = recipe.spec_for(name)
        if spec is None:
            continue
        check_finite(linear.weight, f"weight of {name}")
        try:
            group_layout(tuple(linear.weight.shape), spec)
        except WeightwiseError as err:
            raise WeightwiseError(f"{name}: {err}") from None
        plan[name] = spec
    return plan
