"""Save and load models as run folders: model.safetensors + config.json + tokenizer + manifest.json.

A quantized model's safetensors hold the packed codes, scales and offsets of each QuantizedLinear;
the manifest holds each layer's spec, so loading rebuilds the same modules and the round trip is exact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import QUANTIZED_MODEL_KIND, atomic_output_dir, read_manifest, write_manifest
from weightwise.quantize.api import RECORD_ATTRIBUTE, quantization_record
from weightwise.quantize.qlinear import QuantizedLinear

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


def save(model: nn.Module, path: str | Path, *, tokenizer=None, metrics: dict | None = None, name: str | None = None, source: dict | None = None) -> Path:
    """Write ``model`` (quantized or float) to the folder ``path`` atomically; returns the path."""
    path = Path(path)
    record = quantization_record(model)
    with atomic_output_dir(path) as tmp:
        safetensors.torch.save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]  # tells load_quantized a base model (BertModel) from an LM
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        fields = dict(name=name or path.name, source=source, metrics=metrics or {})
        if record is not None:
            write_manifest(tmp, QUANTIZED_MODEL_KIND, **record, **fields)
        else:
            write_manifest(tmp, "model", **fields)
    logger.info("saved %s", path)
    return path


def load_quantized(path: str | Path):
    """Rebuild a quantized model saved by :func:`save`; returns (model, tokenizer or None)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") != QUANTIZED_MODEL_KIND:
        raise WeightwiseError(f"{path} is not a weightwise quantized model (manifest kind {manifest.get('kind')!r})")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightwiseError(f"{weights} is missing; the run folder is incomplete: re-run the quantization")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = _auto_class(config).from_config(config, dtype=torch.float32)
    modules = dict(model.named_modules())
    for name, layer in manifest["layers"].items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise WeightwiseError(f"{path}: manifest names layer {name}, which the model config does not have")
        qlinear = QuantizedLinear.empty_like(linear, layer)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, qlinear)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except (safetensors.SafetensorError, OSError) as err:
        raise WeightwiseError(f"{weights} is truncated or corrupt ({err}); re-run the quantization") from None
    missing = [k for k in missing if not _is_tied_copy(model, k)]
    if missing or unexpected:
        raise WeightwiseError(f"{weights} does not match its manifest (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    setattr(model, RECORD_ATTRIBUTE, {k: manifest[k] for k in ("recipe", "layers", "source_fingerprint", "timings") if k in manifest})
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def _auto_class(config):
    """AutoModel when ``config.architectures`` names the family's base model (an encoder such as BertModel), else
    AutoModelForCausalLM."""
    from transformers import MODEL_MAPPING, AutoModel, AutoModelForCausalLM

    base = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
    return AutoModel if base is not None and base.__name__ in (config.architectures or []) else AutoModelForCausalLM


def _is_tied_copy(model: nn.Module, key: str) -> bool:
    """lm_head.weight is legitimately absent from the file when tied to the input embeddings."""
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)
