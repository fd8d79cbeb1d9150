"""Weights read one tensor at a time from safetensors files, into a model skeleton on the meta device.

A model built under ``accelerate.init_empty_weights`` has its parameters on the meta device (shapes and
dtypes, no memory). :class:`LazyWeights` knows which file of a checkpoint holds each tensor and reads a
tensor only when asked (``safe_open``, which reads the bytes of that tensor alone); :func:`materialize`
fills a part of the skeleton (a decoder block, the embeddings) from it and ``module.to("meta")`` empties
it again. So a model far larger than memory can be worked on one part at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.formats.quantizer import all_finite
from weightwise.io.artifacts import folder_file

SHARD_INDEX = "model.safetensors.index.json"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def shard_names(count: int) -> list[str]:
    """The Hugging Face names of ``count`` weight shards: model-00001-of-0000N.safetensors, ..."""
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shard_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``directory``'s model.safetensors.index.json: each tensor's shard (sorted by name) and the tensors' total bytes."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")


class NotStreamable(WeightwiseError):
    """A model or recipe that cannot be worked on one block at a time; the message says why and what to do instead."""


class LazyWeights:
    """The tensors of a folder's safetensors files (every ``*.safetensors``, or the files its shard index names)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / SHARD_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightwiseError(f"'{index}' is corrupt (no 'weight_map' object); re-create it")
            files = sorted({folder_file(self.folder, name, index) for name in weight_map.values()})
            for file in files:
                if not file.is_file():
                    raise WeightwiseError(f"'{file}', named by '{index}', is missing; the folder is incomplete: re-create it")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        self.files: dict[str, Path] = {}
        self._dtypes: dict[str, torch.dtype | None] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        self.files[name] = file
                        self._dtypes[name] = _DTYPES.get(f.get_slice(name).get_dtype())
            except (SafetensorError, OSError) as err:
                raise WeightwiseError(f"'{file}' is truncated or corrupt ({err}); re-create or re-download it") from None

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype of ``name`` (None for a dtype torch lacks)."""
        return self._dtypes[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (a fresh CPU tensor); NaN/Inf values are refused naming it."""
        try:
            with safe_open(self.files[name], framework="pt") as f:
                tensor = f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise WeightwiseError(f"'{self.files[name]}' is truncated or corrupt ({err}); re-create or re-download it") from None
        check_finite_tensor(name, tensor, self.files[name])
        return tensor


def check_finite_tensor(name: str, tensor: torch.Tensor, where: str | Path) -> None:
    """Refuse NaN/Inf values in a loaded tensor, naming the file it came from."""
    if not all_finite(tensor):
        raise WeightwiseError(
            f"weight '{name}' loaded from '{where}' has NaN/Inf values; the checkpoint is damaged: re-create or re-download it"
        )


def tied_names(model: nn.Module) -> dict[str, str]:
    """Names of parameters shared with another name (tied embeddings) → the first name of each group in sorted
    order, the one safetensors' ``save_model`` keeps."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    ties = {}
    for names in groups.values():
        first, *others = sorted(names)
        ties.update({other: first for other in others})
    return ties


def source_name(name: str, weights: LazyWeights, ties: Mapping[str, str]) -> str:
    """The checkpoint name holding model tensor ``name``: itself, or a name it is tied to (lm_head ↔ embeddings)."""
    if name in weights:
        return name
    partners = [other for other, first in ties.items() if first == ties.get(name, name)] + [ties.get(name, name)]
    for partner in partners:
        if partner in weights:
            return partner
    raise WeightwiseError(f"'{weights.folder}' has no tensor '{name}', which the model needs; its config.json does not "
                          "match the weights: re-create the folder")


def missing_names(model: nn.Module, weights: LazyWeights, *, only_meta: bool = True) -> list[str]:
    """The model's parameters and persistent buffers (``only_meta``: those on the meta device, not those the model
    computes itself) that neither the checkpoint nor a tied partner holds."""
    ties = tied_names(model)
    missing = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        try:
            source_name(name, weights, ties)
        except WeightwiseError:
            if tensor.is_meta or not only_meta:
                missing.append(name)
    return missing


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (dotted, under ``module``): copied into a real
    tensor of the same dtype, assigned as is in place of a meta one."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    current = getattr(owner, attr)
    if not current.is_meta:
        with torch.no_grad():
            current.copy_(value)
    elif isinstance(current, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=current.requires_grad))
    else:
        setattr(owner, attr, value)


def materialize(module: nn.Module, prefix: str, weights: LazyWeights, ties: Mapping[str, str],
                dtype: torch.dtype | None = torch.float32, *, recurse: bool = True) -> None:
    """Fill ``module`` (named ``prefix`` in the model) from ``weights``: every parameter and persistent buffer the
    checkpoint holds, and every meta one (from its tied partner if need be), floating ones as ``dtype`` (None: the
    dtype the module has). Names tied within ``module`` end up sharing one tensor. Without ``recurse`` only the
    module's own tensors. Buffers the model computes itself (rotary frequencies) stay as they are."""
    entries = module.state_dict(keep_vars=True)
    local = {(f"{prefix}.{key}" if prefix else key): key for key in entries if recurse or "." not in key}
    shared = {name: ties[name] for name in local if name in ties and ties[name] in local}
    for name, key in local.items():
        current = entries[key]
        if name in shared or (not current.is_meta and name not in weights):
            continue
        value = weights.read(source_name(name, weights, ties))
        if tuple(value.shape) != tuple(current.shape):
            raise WeightwiseError(f"'{weights.folder}': tensor '{name}' has shape {tuple(value.shape)}, the model "
                                  f"expects {tuple(current.shape)}; its config.json does not match the weights")
        if value.is_floating_point() != current.is_floating_point():  # float codes, integer weights: a damaged file
            raise WeightwiseError(f"'{weights.folder}': tensor '{name}' is stored as {value.dtype}, the model expects "
                                  f"{current.dtype}; the file is damaged: re-create or re-download it")
        set_tensor(module, key, value.to(dtype or current.dtype) if value.is_floating_point() else value)
    for name, first in shared.items():
        owner_name, _, attr = local[name].rpartition(".")
        setattr(module.get_submodule(owner_name), attr, module.get_parameter(local[first]))


def unit_names(model: nn.Module, blocks: str, whole: Collection[str] = ()) -> list[tuple[str, bool]]:
    """The parts a model is worked on one at a time, in model order, as (module name, recurse): every module whose
    name matches the regex ``blocks`` (a decoder block) or is in ``whole`` (e.g. a quantized layer) outside those,
    with all its tensors; every other module that has tensors of its own, with just those. Together they hold each
    parameter and buffer once."""
    units: list[tuple[str, bool]] = []
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if re.search(blocks, name) or name in whole:
            units.append((name, True))
            inside += (f"{name}.",)
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            units.append((name, False))
    return units


def each_unit(model: nn.Module, units: list[tuple[str, bool]], weights: LazyWeights | None = None,
              dtype: torch.dtype | None = None) -> Iterator[tuple[str, bool, nn.Module]]:
    """(name, recurse, module) for each of :func:`unit_names`' ``units``. With ``weights`` (``model`` is a meta-device
    skeleton), each is filled from them (floating tensors as ``dtype``; None: the skeleton's dtypes) for its turn and
    emptied after it, its very meta tensors put back (ties kept), and the memory handed back to the OS: memory holds
    one unit at a time."""
    from weightwise.heap import return_freed_memory

    ties = tied_names(model) if weights is not None else {}
    for name, recurse in units:
        module = model.get_submodule(name)
        if weights is None:
            yield name, recurse, module
            continue
        owners = list(module.modules()) if recurse else [module]
        saved = [(owner, attr, tensor) for owner in owners
                 for attr, tensor in [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]]
        materialize(module, name, weights, ties, dtype, recurse=recurse)
        try:
            yield name, recurse, module
        finally:
            for owner, attr, tensor in saved:
                setattr(owner, attr, tensor)
            return_freed_memory()


class LazyStateDict(Mapping):
    """A model's state dict whose tensors are read from the checkpoint on access, in the model's dtypes (as
    ``from_pretrained`` with that dtype would hold them): to hash or check a model that is never whole in memory."""

    def __init__(self, model: nn.Module, weights: LazyWeights):
        self._entries = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in model.state_dict(keep_vars=True).items()}
        self._computed = {name: tensor for name, tensor in model.state_dict().items() if not tensor.is_meta}
        self._weights, self._ties = weights, tied_names(model)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise KeyError(name)
        if name in self._computed and name not in self._weights:
            return self._computed[name]
        value = self._weights.read(source_name(name, self._weights, self._ties))
        dtype = self._entries[name][0]
        return value.to(dtype) if value.is_floating_point() else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def ties(self) -> dict[str, str]:
        return dict(self._ties)
