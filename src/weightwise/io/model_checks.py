"""transformers' readers of a model's configuration and tokenizer files, with the errors they raise on damaged
files made clear, and a check that a configuration fits its stored weights before the model is built.

A config.json (or GGUF metadata) with one wrong value makes transformers raise whatever the value trips first: a
strict-dataclass validation error, a TypeError or ZeroDivisionError in arithmetic on it, a RuntimeError for a
negative size. A size or layer count that is merely too large is worse: the model is allocated (and initialised)
before any weight is read, so a one-byte edit can ask for terabytes or hang for hours. :func:`check_fits` compares
the model the configuration describes, built on the meta device (no memory), with the weights the files hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from weightwise.errors import WeightwiseError

# What transformers raises building a configuration or a model from values of a wrong type or range: validation
# (strict dataclasses, torch's asserts), arithmetic and indexing on them, negative sizes, nesting too deep, a
# config.json that is not JSON (OSError).
CONFIG_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError,
                 ZeroDivisionError, RecursionError, AssertionError, OSError, StrictDataclassError)
_SLACK_ELEMENTS = 2**20  # non-persistent buffers (rotary frequencies, ...) are built but never stored


@dataclass(frozen=True)
class StoredWeights:
    """How many tensors, elements and bytes a model's weight files hold (from their headers and sizes)."""

    tensors: int
    elements: int
    bytes: int


def safetensors_weights(files: Iterable[Path]) -> StoredWeights:
    """The tensors, elements and bytes of safetensors files, read from their headers; a damaged file is refused."""
    tensors = elements = nbytes = 0
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    n = 1
                    for dim in f.get_slice(name).get_shape():
                        n *= dim
                    tensors, elements = tensors + 1, elements + n
            nbytes += file.stat().st_size
        except (SafetensorError, OSError) as err:
            raise WeightwiseError(f"'{file}' is truncated or corrupt ({err}); re-create or re-download it") from None
    return StoredWeights(tensors, elements, nbytes)


def reason(err: BaseException) -> str:
    """An exception as one short line: its type and the first 200 characters of its message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def read_config(folder: Path, *, where: Path | None = None, **kwargs) -> PretrainedConfig:
    """``AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)``; values transformers cannot use are a
    :class:`WeightwiseError` naming ``where`` (default: the folder's config.json)."""
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    except CONFIG_ERRORS as err:
        raise WeightwiseError(f"'{where or folder / 'config.json'}' holds a model configuration transformers cannot "
                              f"use ({reason(err)}); re-create or re-download it") from None


def check_fits(config: PretrainedConfig, where: Path, build: Callable[[PretrainedConfig], nn.Module], *,
               tensors: int, max_elements: int) -> None:
    """Refuse a configuration that describes a model far larger than its stored weights, before it is built: more
    decoder layers than the files' ``tensors``, or (``build(config)``, the loader's model, run on the meta device)
    more than ``max_elements`` weights (float files: twice the stored elements, as a model most of whose weights are
    missing is refused anyway; quantized files: eight per stored byte, as no format stores less than a bit)."""
    layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    if isinstance(layers, int) and layers > max(tensors, 1):
        raise WeightwiseError(f"'{where}' describes a model of {layers} layers, but its weights hold only "
                              f"{tensors} tensors; the configuration is damaged: re-create or re-download it")
    try:
        with torch.device("meta"):
            skeleton = build(config)
    except CONFIG_ERRORS as err:
        raise WeightwiseError(f"'{where}' holds a model configuration transformers cannot build ({reason(err)}); "
                              "re-create or re-download it") from None
    unique = {id(t): t for t in (*skeleton.parameters(), *skeleton.buffers())}
    elements = sum(t.numel() for t in unique.values())
    if elements > max_elements + _SLACK_ELEMENTS:
        raise WeightwiseError(f"'{where}' describes a model of {elements:,} weights, more than its weight files can "
                              "hold; the configuration is damaged: re-create or re-download it")


def read_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(folder)`` from local files; tokenizer files it cannot read are a
    :class:`WeightwiseError`. The tokenizers library raises a bare ``Exception`` for a malformed tokenizer.json, so
    every Exception is caught: the call reads nothing but the folder's files."""
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 — tokenizers' errors have no narrower type
        if isinstance(err, ValueError) and "trust_remote_code" in str(err):
            raise WeightwiseError(f"the tokenizer in '{folder}' needs its own code from the folder, which runs only "
                                  "with trust_remote_code=True: pass it if you trust its source") from None
        raise WeightwiseError(f"the tokenizer files in '{folder}' are damaged ({reason(err)}); re-create or "
                              "re-download them") from None
