"""Post-training quantization: recipes, QuantizedLinear, methods registry, save/load.

The package is callable as ``weightwise.quantize(model, recipe)`` (see ``weightwise._callable``).
"""

from weightwise._callable import make_callable
from weightwise.quantize.api import quantization_record, quantize, target_layers
from weightwise.quantize.qlinear import QuantizedLinear
from weightwise.quantize.recipe import LayerOverride, QuantRecipe

__all__ = ["LayerOverride", "QuantRecipe", "QuantizedLinear", "quantization_record", "quantize", "target_layers"]

make_callable(__name__, "weightwise.quantize.api", "quantize")
