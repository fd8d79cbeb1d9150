"""Post-training quantization: recipes, QuantizedLinear, methods registry, save/load."""

from weightwise.quantize.api import quantization_record, quantize, target_layers
from weightwise.quantize.qlinear import QuantizedLinear
from weightwise.quantize.recipe import LayerOverride, QuantRecipe

__all__ = ["LayerOverride", "QuantRecipe", "QuantizedLinear", "quantization_record", "quantize", "target_layers"]
