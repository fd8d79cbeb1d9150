"""Fine-tuning: LIFT principal-weight masks (lift.py), the sparse-state optimizer (optim.py), the one
training loop (loop.py) with its methods registry (methods.py), quantization-aware training (qat.py and
qat_lora.py), the API (api.py) and sparse weight patches (patch.py).

Imported lazily, so that ``import weightwise.tune.lift`` does not pay for peft or transformers. The
package is callable as ``weightwise.tune(...)`` (see ``weightwise._callable``).
"""

from importlib import import_module

from weightwise._callable import make_callable

_API = {
    "METHODS": "weightwise.tune.methods",
    "DoraConfig": "weightwise.tune.config",
    "FullConfig": "weightwise.tune.config",
    "LiftConfig": "weightwise.tune.config",
    "LoraConfig": "weightwise.tune.config",
    "MagnitudeConfig": "weightwise.tune.config",
    "PissaConfig": "weightwise.tune.config",
    "QATConfig": "weightwise.tune.config",
    "QATLoraConfig": "weightwise.tune.config",
    "RandomMaskConfig": "weightwise.tune.config",
    "TuneConfig": "weightwise.tune.config",
    "WeightPatch": "weightwise.tune.patch",
    "tune": "weightwise.tune.api",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'weightwise.tune' has no attribute {name!r}")


make_callable(__name__, "weightwise.tune.api", "tune")
