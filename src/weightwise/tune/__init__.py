"""Fine-tuning: LIFT principal-weight masks (lift.py), the sparse-state optimizer (optim.py), the one
training loop (loop.py) with its methods registry (methods.py), the API (api.py) and sparse weight
patches (patch.py).

Imported lazily, so that ``import weightwise.tune.lift`` does not pay for peft or transformers.
"""

import sys
import types
from importlib import import_module

_API = {
    "METHODS": "weightwise.tune.methods",
    "TuneConfig": "weightwise.tune.config",
    "WeightPatch": "weightwise.tune.patch",
    "tune": "weightwise.tune.api",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'weightwise.tune' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """``weightwise.tune`` is both this package and the ``tune`` function of the public API: once any
    ``weightwise.tune.*`` module is imported, Python binds ``weightwise.tune`` to the package, so the
    package forwards calls to :func:`weightwise.tune.api.tune`."""

    def __call__(self, *args, **kwargs):
        return import_module("weightwise.tune.api").tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
