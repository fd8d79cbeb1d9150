"""weightwise: which weights matter and which data matter — quantize, tune and evaluate causal LMs.

The public API is imported lazily so that ``import weightwise.formats`` (or the CLI's ``--help``)
does not pay for transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "QuantRecipe": "weightwise.quantize.recipe",
    "QuantSpec": "weightwise.formats.base",
    "QuantizedLinear": "weightwise.qlinear",
    "WeightwiseError": "weightwise.errors",
    "corpus": "weightwise.data.corpora",
    "evaluate": "weightwise.evaluate",
    "export": "weightwise.export",
    "get_format": "weightwise.formats.registry",
    "load_model": "weightwise.io.models",
    "quantize": "weightwise.quantize.api",
    "quantize_streamed": "weightwise.quantize.api",
    "quantize_to_folder": "weightwise.quantize.api",
    "QuantizationRecord": "weightwise.records",
    "quantization_record": "weightwise.records",
    "save": "weightwise.io.folders",
    "select": "weightwise.select.api",
    "SelectConfig": "weightwise.select.config",
    "TuneConfig": "weightwise.tune.config",
    "LiftConfig": "weightwise.tune.config",
    "MagnitudeConfig": "weightwise.tune.config",
    "RandomMaskConfig": "weightwise.tune.config",
    "FullConfig": "weightwise.tune.config",
    "LoraConfig": "weightwise.tune.config",
    "DoraConfig": "weightwise.tune.config",
    "PissaConfig": "weightwise.tune.config",
    "QATConfig": "weightwise.tune.config",
    "QATLoraConfig": "weightwise.tune.config",
    "tune": "weightwise.tune.api",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'weightwise' has no attribute {name!r}")
