"""The one writer and reader of weightwise model folders: model.safetensors + config.json + tokenizer + manifest.json.

A quantized model's safetensors hold the packed codes, scales and offsets of each QuantizedLinear and its
manifest the :class:`~weightwise.records.QuantizationRecord`, so loading rebuilds the same modules and the
round trip is exact. Quantized runs, merged patches and dense exports all go through :func:`save`.
"""

from __future__ import annotations

import json
import logging
import os
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
from weightwise.qlinear import QuantizedLinear
from weightwise.records import QuantizationRecord, attach_record, quantization_record

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


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
    logger.info("saved %s", path)
    return path


def load_quantized(path: str | os.PathLike):
    """Rebuild a quantized model saved by :func:`save`; returns (model, tokenizer or None)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(check_run_folder(path))
    if manifest.get("kind") != QUANTIZED_MODEL_KIND:
        raise WeightwiseError(f"{path} is not a weightwise quantized model (manifest kind {manifest.get('kind')!r})")
    record = _record_of(path, manifest)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightwiseError(f"{weights} is missing; the run folder is incomplete: re-run the quantization")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    model = _auto_class(config).from_config(config, dtype=torch.float32)
    modules = dict(model.named_modules())
    for name, layer in record.layers.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise WeightwiseError(f"{path}: manifest names layer {name}, which the model config does not have")
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, QuantizedLinear.empty_like(linear, layer))
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except (safetensors.SafetensorError, OSError) as err:
        raise WeightwiseError(f"{weights} is truncated or corrupt ({err}); re-run the quantization") from None
    missing = [k for k in missing if not _is_tied_copy(model, k)]
    if missing or unexpected:
        raise WeightwiseError(f"{weights} does not match its manifest (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    attach_record(model, record)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    return model, tokenizer


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
    return AutoModel if base is not None and base.__name__ in (config.architectures or []) else AutoModelForCausalLM


def _is_tied_copy(model: nn.Module, key: str) -> bool:
    """lm_head.weight is legitimately absent from the file when tied to the input embeddings."""
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)
