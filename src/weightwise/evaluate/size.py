"""Model size: bytes of everything stored, and bits per weight of the targeted linear layers."""

from __future__ import annotations

import re

import torch
from torch import nn

DEFAULT_LINEAR_PATTERN = r"\.layers\.\d+\."


def model_size(model: nn.Module, linear_pattern: str = DEFAULT_LINEAR_PATTERN) -> dict:
    """Size of ``model`` as a dict.

    ``total_bytes``: every tensor of the state dict (parameters and persistent buffers), storage
    shared by several names (tied embeddings) counted once. ``linear_params`` / ``linear_bits`` /
    ``bits_per_weight`` (None without any): over the quantized layers — any module with
    ``stored_bits()``, ``in_features`` and ``out_features`` — and the plain ``nn.Linear`` modules whose
    name matches ``linear_pattern`` (the decoder blocks), counted at their weight dtype's bits.
    ``quantized_layers``: how many quantized layers there are.
    """
    linear_params = linear_bits = quantized_layers = 0
    quantized_names: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(q + ".") for q in quantized_names):
            continue  # the parts of a quantized layer are already in its stored_bits()
        if _is_quantized(module):
            quantized_names.append(name)
            quantized_layers += 1
            linear_params += module.in_features * module.out_features
            linear_bits += int(module.stored_bits())
        elif isinstance(module, nn.Linear) and re.search(linear_pattern, "." + name + "."):
            linear_params += module.weight.numel()
            linear_bits += module.weight.numel() * module.weight.element_size() * 8
    return {
        "total_bytes": _stored_bytes(model),
        "linear_params": linear_params,
        "linear_bits": linear_bits,
        "bits_per_weight": linear_bits / linear_params if linear_params else None,
        "quantized_layers": quantized_layers,
    }


def _is_quantized(module: nn.Module) -> bool:
    return callable(getattr(module, "stored_bits", None)) and hasattr(module, "in_features") and hasattr(module, "out_features")


def _stored_bytes(model: nn.Module) -> int:
    storages: dict[int, int] = {}
    total = 0
    meta_seen: set[int] = set()  # meta tensors have no storage: a tied one is the same object under two names
    for tensor in model.state_dict(keep_vars=True).values():
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_meta:
            if id(tensor) not in meta_seen:
                meta_seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return total + sum(storages.values())
