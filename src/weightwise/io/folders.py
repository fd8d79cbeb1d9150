"""The one writer and reader of weightwise model folders: model.safetensors + config.json + tokenizer + manifest.json.

A quantized model's safetensors hold the packed codes, scales and offsets of each QuantizedLinear and its
manifest the :class:`~weightwise.records.QuantizationRecord`, so loading rebuilds the same modules and the
round trip is exact. Quantized runs, merged patches and dense exports all go through :func:`save`; a run
quantized block by block goes through :func:`save_streamed`, which writes the same tensors as shards
(``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``, as Hugging Face shards). Loading
reads either, one tensor at a time into a model built on the meta device, so it never holds a float copy
of the quantized layers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from pydantic import ValidationError
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import (
    QUANTIZED_MODEL_KIND,
    atomic_output_dir,
    canonicalize_safetensors_file,
    check_run_folder,
    read_manifest,
    write_bytes_atomic,
    write_manifest,
)
from weightwise.io.lazy import (
    SHARD_INDEX,
    LazyWeights,
    materialize,
    missing_names,
    shard_names,
    source_name,
    tied_names,
    write_shard_index,
)
from weightwise.qlinear import QuantizedLinear
from weightwise.records import QuantizationRecord, attach_record, quantization_record

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
SHARD_BYTES = 512 * 2**20  # most bytes of float tensors in one shard written by save_streamed (a larger tensor: alone)


def save(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, kind: str | None = None,
               files: dict[str, bytes] | None = None, **manifest: Any) -> Path:
    """Write ``model`` (quantized or float) to the folder ``path`` atomically; returns the path.

    ``kind`` names the manifest kind (default: quantized-model when the model carries a quantization record,
    else model); ``files`` are extra files (name → bytes) written beside the weights; ``manifest`` fields
    (name, source, metrics, ...) go into manifest.json next to the quantization record.
    """
    path = Path(path)
    record = quantization_record(model)
    with atomic_output_dir(path) as tmp:
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        canonicalize_safetensors_file(tmp / WEIGHTS_FILE)  # tied weights add a metadata key: sorted, same bytes each run
        _write_beside_weights(tmp, path, model, tokenizer, kind, files, manifest)
    logger.info("saved %s", path)
    return path


def save_streamed(model: nn.Module, path: str | os.PathLike, *, block_files: list[Path], weights: LazyWeights,
                  tokenizer=None, **manifest: Any) -> Path:
    """Write the run folder of a model quantized block by block, atomically; returns the path.

    ``model`` is the quantized model on the meta device (its structure, dtypes and record); ``block_files`` hold
    every tensor of each decoder block (linked into the folder, or copied across file systems); the tensors outside
    them (embeddings, final norm, LM head) are read one at a time from the source checkpoint ``weights`` in the
    dtype ``model`` gives them. The tensors, their names and dtypes are those :func:`save` writes for the same
    model in memory; they are stored as shards of at most ``SHARD_BYTES`` of float tensors (one per block).
    """
    path = Path(path)
    ties = tied_names(model)
    entries = model.state_dict(keep_vars=True)
    in_blocks = {name for file in block_files for name in _tensor_names(file)}
    rest = [name for name in entries if name not in in_blocks and name not in ties]  # a tied copy is stored once
    groups: list[list[str]] = []
    size = SHARD_BYTES
    for name in rest:
        nbytes = entries[name].numel() * entries[name].element_size()
        if size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    count = len(groups) + len(block_files)
    names = shard_names(count)
    dropped = {alias: first for alias, first in ties.items() if alias in entries}
    weight_map: dict[str, str] = {}
    with atomic_output_dir(path) as tmp:
        for group, shard in zip(groups, names):
            tensors = {}
            for name in group:
                value = weights.read(source_name(name, weights, ties))
                tensors[name] = value.to(entries[name].dtype) if value.is_floating_point() else value
            metadata = {"format": "pt", **{alias: first for alias, first in dropped.items() if first in tensors}}
            safetensors.torch.save_file(tensors, str(tmp / shard), metadata=metadata)
            canonicalize_safetensors_file(tmp / shard)
            weight_map.update(dict.fromkeys(tensors, shard))
            del tensors
        for file, shard in zip(block_files, names[len(groups):]):
            _link_or_copy(file, tmp / shard)
            weight_map.update(dict.fromkeys(_tensor_names(file), shard))
        total = sum(entries[name].numel() * entries[name].element_size() for name in weight_map if name in entries)
        write_shard_index(tmp, weight_map, total)
        _write_beside_weights(tmp, path, model, tokenizer, None, None, manifest)
    logger.info("saved %s (%d shards)", path, count)
    return path


def _write_beside_weights(tmp: Path, path: Path, model: nn.Module, tokenizer, kind: str | None,
                          files: dict[str, bytes] | None, manifest: dict) -> None:
    """config.json, the tokenizer, extra ``files`` and manifest.json (with the model's record) of the folder ``path``."""
    record = quantization_record(model)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-loaded model's; what is written here is weightwise's own
    config["architectures"] = [type(model).__name__]  # tells a base model (BertModel) from an LM when loading
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name, data in (files or {}).items():
        write_bytes_atomic(tmp / name, data)
    fields = {"name": path.name, **manifest}
    if record is not None:
        fields.update(record.model_dump(mode="json"))
    write_manifest(tmp, kind or (QUANTIZED_MODEL_KIND if record is not None else "model"), **fields)


def _tensor_names(file: Path) -> list[str]:
    with safetensors.safe_open(file, framework="pt") as f:
        return list(f.keys())


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no copy: the block files are the shards), or a copy where the file systems differ."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def load_quantized(path: str | os.PathLike):
    """Rebuild a quantized model saved by :func:`save`; returns (model, tokenizer or None)."""
    skeleton = quantized_skeleton(path)
    materialize(skeleton.model, "", skeleton.weights, tied_names(skeleton.model), dtype=None)
    return skeleton.model, skeleton.tokenizer


def quantized_skeleton(path: str | os.PathLike):
    """A quantized run saved by :func:`save` or :func:`save_streamed` as a :class:`~weightwise.io.models.Skeleton`:
    the model on the meta device with its QuantizedLinear modules and record, its tokenizer (or None) and its
    tensors, read one at a time (float parts in float32, quantized tensors as stored)."""
    from weightwise.io.model_checks import check_fits, read_config, read_tokenizer, safetensors_weights
    from weightwise.io.models import Skeleton

    path = Path(path)
    manifest = read_manifest(check_run_folder(path))
    if manifest.get("kind") != QUANTIZED_MODEL_KIND:
        raise WeightwiseError(f"{path} is not a weightwise quantized model (manifest kind {manifest.get('kind')!r})")
    record = _record_of(path, manifest)
    weights_file = path / (SHARD_INDEX if (path / SHARD_INDEX).is_file() else WEIGHTS_FILE)
    if not weights_file.is_file():
        raise WeightwiseError(f"{weights_file} is missing; the run folder is incomplete: re-run the quantization")
    weights = LazyWeights(path)
    from accelerate import init_empty_weights

    config = read_config(path)
    stored = safetensors_weights(sorted(path.glob("*.safetensors")))
    check_fits(config, path / "config.json", _auto_class(config).from_config, tensors=stored.tensors,
               max_elements=8 * stored.bytes)  # no format stores a weight in less than a bit
    with init_empty_weights():  # parameters on the meta device: each is read from the file into its place
        model = _auto_class(config).from_config(config, dtype=torch.float32)
    model.tie_weights()
    modules = dict(model.named_modules())
    for name, layer in record.layers.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise WeightwiseError(f"{path}: manifest names layer {name}, which the model config does not have")
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, QuantizedLinear.empty_like(linear, layer))
    missing = missing_names(model, weights, only_meta=False)
    unexpected = [name for name in weights.files if name not in model.state_dict(keep_vars=True)]
    if missing or unexpected:
        raise WeightwiseError(f"{weights_file} does not match its manifest (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    attach_record(model, record)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = read_tokenizer(path)
    return Skeleton(model, tokenizer, weights)


def _record_of(path: Path, manifest: dict) -> QuantizationRecord:
    """The manifest's quantization record, with a clear error for a damaged or outdated manifest."""
    try:
        return QuantizationRecord.model_validate({k: manifest[k] for k in QuantizationRecord.model_fields if k in manifest})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WeightwiseError(f"{path}/manifest.json has an invalid quantization record ({where}: {first['msg']}); "
                              "it was written by another weightwise version or damaged: re-run the quantization") from None


def _auto_class(config):
    """AutoModel when ``config.architectures`` names the family's base model (an encoder such as BertModel), else
    AutoModelForCausalLM."""
    from transformers import MODEL_MAPPING, AutoModel, AutoModelForCausalLM

    base = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
    named = config.architectures if isinstance(config.architectures, list) else []
    return AutoModel if base is not None and base.__name__ in named else AutoModelForCausalLM

