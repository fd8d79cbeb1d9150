"""Packages that are also the function of the public API they are named after.

``weightwise.quantize`` (the function) and ``weightwise.quantize`` (the package) share a name: as soon
as any ``weightwise.quantize.*`` module is imported, Python binds the attribute to the package and the
lazy function lookup of ``weightwise/__init__.py`` no longer runs. Giving the package module a class
with ``__call__`` keeps ``weightwise.quantize(model, recipe)`` working either way (same for ``tune``).
"""

from __future__ import annotations

import sys
import types
from importlib import import_module


def make_callable(package: str, function_module: str, function: str) -> None:
    """Let calling the module ``package`` call ``function_module.function``."""

    class CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(import_module(function_module), function)(*args, **kwargs)

    CallablePackage.__doc__ = f"``{package}`` forwards calls to :func:`{function_module}.{function}`."
    sys.modules[package].__class__ = CallablePackage
