"""A GGUF file written out as a Hugging Face safetensors folder one tensor at a time (memory: one shard).

transformers reads a GGUF file by dequantizing every tensor into one state dict, then builds the model: a 7B file
needs 27 GB of float32 at once. For the families weightwise exports (:data:`GGUF_FAMILIES`) the conversion is the
inverse of the exporter's: each Hugging Face tensor name has its GGUF name in gguf-py's per-architecture map; the
tensor is dequantized by gguf-py, Q/K rows go back to Hugging Face's order and Gemma's norms lose llama.cpp's
+1, and the float32 tensors are written in shards of at most :data:`SHARD_BYTES` (one model.safetensors if they fit). The result equals transformers'
own load of the file, tensor for tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGUFReader
from safetensors.torch import save_file

from weightwise.errors import WeightwiseError
from weightwise.io.gguf_families import GGUF_FAMILIES, llama_qk_row_order, permuted_heads
from weightwise.io.lazy import check_finite_tensor, shard_names, write_shard_index

logger = logging.getLogger(__name__)

SHARD_BYTES = 1 << 30  # float32 bytes per shard: what the conversion holds in memory at once (and one tensor more)


def streams_gguf(config) -> bool:
    """Whether a GGUF file of this (transformers) config is converted tensor by tensor: its family has a name map."""
    return getattr(config, "model_type", None) in GGUF_FAMILIES


def write_gguf_tensors(path: Path, model: torch.nn.Module, folder: Path) -> None:
    """Write the tensors of the GGUF file ``path`` into ``folder`` as the safetensors shards (and index) of ``model``,
    a meta-device skeleton of the file's config that says which tensors, names, shapes there are.

    A tensor the model needs that the file lacks (other than a tied output matrix), one of another shape, or NaN/Inf
    values are refused naming it; tensors the model has no place for (llama.cpp's precomputed rope factors) are left.
    """
    cfg = model.config
    family = GGUF_FAMILIES[cfg.model_type]
    names = gguf.get_tensor_name_map(family.arch, cfg.num_hidden_layers)
    stored = {tensor.name: tensor for tensor in GGUFReader(path).tensors}
    wanted = [(name, param) for name, param in model.named_parameters()]  # a tied output matrix appears once
    wanted += [(name, buffer) for name, buffer in model.named_buffers() if name in model.state_dict() and buffer.is_meta]
    plan: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    pending = 0
    for name, tensor in wanted:
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name not in stored:
            raise WeightwiseError(f"'{path}' has no tensor for '{name}' ({gguf_name or 'no GGUF name'}), which the "
                                  f"{type(model).__name__} of its metadata needs; the file is incomplete or not a "
                                  f"{family.arch.name.lower()} model: re-create or re-download it")
        size = tensor.numel() * 4
        if plan[-1] and pending + size > SHARD_BYTES:
            plan.append([])
            pending = 0
        plan[-1].append((name, gguf_name, tuple(tensor.shape)))
        pending += size
    unused = sorted(set(stored) - {gguf_name for shard in plan for _, gguf_name, _ in shard})
    if unused:
        logger.info("%s: tensors with no place in %s left out: %s", path, type(model).__name__, ", ".join(unused[:5]))
    files = shard_names(len(plan)) if len(plan) > 1 else ["model.safetensors"]  # one file: no index, as transformers saves
    weight_map: dict[str, str] = {}
    total = 0
    for shard, file in zip(plan, files):
        tensors = {}
        for name, gguf_name, shape in shard:
            tensors[name] = _hf_tensor(path, stored[gguf_name], name, shape, family, permuted_heads(family, cfg, name))
            total += tensors[name].numel() * 4
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(files) > 1:
        write_shard_index(folder, weight_map, total)


def _hf_tensor(path: Path, stored, name: str, shape: tuple[int, ...], family, heads: int | None) -> torch.Tensor:
    """One GGUF tensor as the float32 Hugging Face tensor ``name``: dequantized, rows and norms as transformers has them."""
    try:
        values = torch.from_numpy(np.array(gguf.quants.dequantize(stored.data, stored.tensor_type), dtype=np.float32))
    except NotImplementedError:
        raise WeightwiseError(f"'{path}': tensor '{stored.name}' is {stored.tensor_type.name}, which gguf-py "
                              "cannot dequantize; re-quantize the file to another type (Q4_K, Q8_0, ...)") from None
    if values.numel() != int(np.prod(shape)):
        raise WeightwiseError(f"'{path}': tensor '{stored.name}' has {values.numel()} values, '{name}' needs shape {shape}; "
                              "the file's metadata does not match its tensors: re-create or re-download it")
    values = values.reshape(shape)
    if heads is not None:  # rows (and a bias) stored as llama.cpp's RoPE pairs them
        values = values[torch.argsort(llama_qk_row_order(shape[0], heads))]
    if family.norm_shift and name.endswith("norm.weight"):
        values = values - family.norm_shift
    check_finite_tensor(name, values, path)
    return values.contiguous()
