"""Post-training quantization: recipes, QuantizedLinear, methods registry.

The package is callable as ``weightwise.quantize(model, recipe)`` (see ``weightwise._callable``).
"""

from weightwise._callable import make_callable
from weightwise.qlinear import QuantizedLinear
from weightwise.quantize.api import quantize, target_layers
from weightwise.quantize.recipe import LayerOverride, QuantRecipe
from weightwise.records import quantization_record

__all__ = ["LayerOverride", "QuantRecipe", "QuantizedLinear", "quantization_record", "quantize", "target_layers"]

make_callable(__name__, "weightwise.quantize.api", "quantize")
