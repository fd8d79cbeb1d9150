"""A dense Hugging Face folder: every QuantizedLinear replaced by an nn.Linear holding its dequantized weight.

For runtimes that take plain safetensors: the weights are exactly what weightwise computes with (LoRC factors
added), cast to the chosen dtype. Activation formats are simulated inside weightwise only, so a model that uses
them is refused rather than silently exported without them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import state_dict_fingerprint
from weightwise.io.folders import save
from weightwise.qlinear import QuantizedLinear
from weightwise.records import drop_record, quantization_record

DenseDtype = Literal["fp32", "fp16", "bf16"]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dense_model(model: nn.Module, dtype: DenseDtype = "fp32") -> nn.Module:
    """A copy of ``model`` with plain nn.Linear layers (dequantized weights) in ``dtype``; the model is unchanged."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    simulated = [name for name, m in layers.items() if m.act_format is not None]
    if simulated:
        raise WeightwiseError(f"{len(simulated)} layers simulate activation quantization ({simulated[0]}, …), which a dense "
                              "export cannot carry; export a run quantized without act_format")
    dense = copy.deepcopy(model)
    modules = dict(dense.named_modules())
    for name, layer in layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else dense, child, linear)
    drop_record(dense)
    dense.tie_weights()
    return dense.to(TORCH_DTYPES[dtype])


def export_hf(model: nn.Module, tokenizer, path: str | os.PathLike, dtype: DenseDtype = "fp32", *,
              overwrite: bool = False) -> Path:
    """Write ``model`` as a dense safetensors folder that ``AutoModelForCausalLM.from_pretrained`` loads."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightwiseError(f"'{path}' exists; allow overwriting it or choose another output path")
    record = quantization_record(model)
    dense = dense_model(model, dtype)
    return save(dense, path, tokenizer=tokenizer, kind="dense-export", dtype=dtype,
                recipe=record.recipe if record else None, formats=record.format_label if record else None,
                source_fingerprint=record.source_fingerprint if record else state_dict_fingerprint(model))
