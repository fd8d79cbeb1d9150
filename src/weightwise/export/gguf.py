"""Write a weightwise model (quantized, tuned or float) as a GGUF file that llama.cpp runs, then verify it.

Quantized layers are packed from their stored codes and scales (``gguf_types``), never re-quantized; a layer
with no exact GGUF type is an error naming it unless a fallback type is chosen, whose added error is reported.
Tensor names come from gguf-py's per-architecture name map; llama-family Q/K rows are permuted as llama.cpp
expects (codes, scales and offsets together). After writing, the file is read back with gguf-py and every
tensor is compared with weightwise's own weight: exact mappings must differ by 0.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weightwise.architectures import family_of
from weightwise.errors import WeightwiseError
from weightwise.export.gguf_types import (
    InexactGGUFError,
    pack_gguf,
    permute_qk_for_gguf,
    why_not_exact,
)
from weightwise.formats.base import QuantSpec
from weightwise.formats.quantizer import quantize_tensor
from weightwise.io.artifacts import (
    environment_versions,
    is_write_error,
    output_error,
    output_lock,
    state_dict_fingerprint,
    write_json_atomic,
)
from weightwise.io.gguf_families import (
    GGUF_FAMILIES,
    GGUFFamily,
    llama_qk_row_order,
    permuted_heads,
    rope_settings,
    write_family_metadata,
)
from weightwise.io.lazy import LazyStateDict, LazyWeights, each_unit, tied_names, unit_names
from weightwise.qlinear import QuantizedLinear
from weightwise.records import quantization_record

logger = logging.getLogger(__name__)

GGUFType = Literal["auto", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "mxfp4", "f16", "bf16", "f32"]
FloatType = Literal["f16", "bf16", "f32"]
_GGML = {"q4_0": GGMLQuantizationType.Q4_0, "q4_1": GGMLQuantizationType.Q4_1, "q5_0": GGMLQuantizationType.Q5_0,
         "q5_1": GGMLQuantizationType.Q5_1, "q8_0": GGMLQuantizationType.Q8_0, "iq4_nl": GGMLQuantizationType.IQ4_NL,
         "mxfp4": GGMLQuantizationType.MXFP4, "f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16,
         "f32": GGMLQuantizationType.F32}
# The weightwise spec whose round-to-nearest is each block type's own rule: a float layer exported to that type.
NATIVE_SPECS = {
    "q4_0": QuantSpec(format="int4", group_size=32, scale_dtype="fp16"),
    "q4_1": QuantSpec(format="int4_asym", group_size=32, scale_dtype="fp16"),
    "q5_0": QuantSpec(format="int5", group_size=32, scale_dtype="fp16"),
    "q5_1": QuantSpec(format="int5_asym", group_size=32, scale_dtype="fp16"),
    "q8_0": QuantSpec(format="int8", group_size=32, scale_dtype="fp16"),
    "iq4_nl": QuantSpec(format="iq4_nl", group_size=32, scale_dtype="fp16"),
    "mxfp4": QuantSpec(format="mxfp4"),
}


class GGUFExportConfig(BaseModel):
    """How a model becomes a GGUF file."""

    model_config = ConfigDict(extra="forbid")

    type: GGUFType = Field("auto", description="GGUF type of the linear layers: auto (each quantized layer's exact type; "
                           "float layers stay f32), a block type (quantized layers must map to it exactly; float layers are "
                           "quantized to it by its own rule) or a float type (dequantized weights).")
    fallback: Literal["q8_0", "f16", "f32"] | None = Field(
        None, description="Type for the layers that have no exact GGUF type (nf4, fp8, LoRC, groups not a multiple of "
        "32, ...): they are re-quantized to it and the error it adds is reported. Default: such layers are an error.")
    embeddings: Literal["f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "iq4_nl", "mxfp4"] = Field(
        "f16", description="Type of the token embeddings and an untied output matrix (kept in float by weightwise): a "
        "float type, q8_0 (llama.cpp's own rounding) or a smaller block type (round-to-nearest), to fit a file-size budget.")
    tokenizer_pre: str = Field("default", description="llama.cpp pre-tokenizer name, for a tokenizer written from Hugging "
                               "Face files (a GGUF source's own tokenizer metadata is copied as it is).")


class GGUFTensorReport(BaseModel):
    """One tensor of the written file and how close it is to weightwise's weight."""

    name: str
    gguf_name: str
    type: str
    how: Literal["exact", "fallback", "requantized", "converted"]
    max_abs_diff: float


class GGUFExportReport(BaseModel):
    path: str
    file_bytes: int
    arch: str
    tensors: list[GGUFTensorReport]
    fallback_layers: list[str]
    source_fingerprint: str

    @property
    def exact_layers(self) -> int:
        return sum(t.how == "exact" for t in self.tensors)


@dataclass
class _Tensor:
    """A tensor on its way into the file: GGUF-domain data plus what it must read back as (HF row order)."""

    name: str
    gguf_name: str
    data: np.ndarray | None  # dropped once handed to the writer
    ggml_type: GGMLQuantizationType
    expected: Callable[[], torch.Tensor]  # float32, HF layout, read from the model when compared (a quantized
    # layer's dequantized weight is not kept for every layer at once: a whole model's worth of float32)
    how: str
    row_order: torch.Tensor | None  # rows as written = expected()[row_order]
    unit: int = 0  # the model part (io.lazy.unit_names) it belongs to: compared while that part is in memory


def export_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, config: GGUFExportConfig | None = None, *,
                tokenizer_gguf: str | os.PathLike | None = None, overwrite: bool = False,
                weights: LazyWeights | None = None) -> GGUFExportReport:
    """Write ``model`` to ``path`` as GGUF, read it back and compare; returns the per-tensor report.

    ``tokenizer_gguf``: a GGUF file whose tokenizer metadata is copied (the model's source); otherwise the
    tokenizer is written from ``tokenizer``'s Hugging Face files with gguf-py's vocab tools. ``weights``: ``model``
    is a meta-device skeleton whose tensors these are; each decoder block (and each other part) is then read,
    packed into the file's data and emptied, and read again for the comparison (memory: one block). The file is
    the same either way: tensors are packed part by part, in model order, into a temporary data file beside the
    output, which follows the header.
    """
    config = config or GGUFExportConfig()
    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightwiseError(f"'{path}' exists; allow overwriting it or choose another output path")
    model_type = getattr(model.config, "model_type", "unknown")
    family = GGUF_FAMILIES.get(model_type)
    if family is None:
        raise WeightwiseError(f"architecture '{model_type}' has no GGUF exporter (supported: {', '.join(sorted(GGUF_FAMILIES))}); "
                              "export it with --to hf or --to compressed-tensors instead")
    if tokenizer_gguf is None and tokenizer is None:
        raise WeightwiseError("the model has no tokenizer: llama.cpp needs one in the GGUF file; save it with the model")
    record = quantization_record(model)
    if record is not None:
        fingerprint = record.source_fingerprint
    elif weights is not None:
        fingerprint = state_dict_fingerprint(LazyStateDict(model, weights), ties=tied_names(model))
    else:
        fingerprint = state_dict_fingerprint(model)
    units = unit_names(model, family_of(model_type).blocks,
                       whole={name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)})
    sidecar = path.with_name(path.name + ".json")  # the report, written under its own lock too: a killed
    with output_lock(path), output_lock(sidecar):  # writer's temporaries of either go at the next export
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # created by the writer with the usual permissions
        try:
            with tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.data-") as data:  # gone when closed
                writer = GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[family.arch], use_temp_file=True)
                writer.temp_file = data  # gguf-py spools added tensors here (its default: memory, then /tmp)
                try:  # the metadata first: a tokenizer gguf-py cannot write fails before any tensor is packed
                    _add_metadata(writer, model, tokenizer, family, tokenizer_gguf, config, fingerprint)
                    tensors, fallback_layers = _add_tensors(writer, model, units, weights, family, config)
                    writer.write_header_to_file()
                    writer.write_kv_data_to_file()
                    writer.write_tensors_to_file()
                finally:
                    writer.close()
            report_tensors = _verify(tmp, tensors, model, units, weights)
            report = GGUFExportReport(path=str(path), file_bytes=tmp.stat().st_size, arch=family.arch.name.lower(),
                                      tensors=report_tensors, fallback_layers=fallback_layers, source_fingerprint=fingerprint)
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if is_write_error(err, path.parent):
                raise output_error(path, err) from err
            raise
        write_json_atomic(sidecar, {
            "kind": "gguf-export", "config": config.model_dump(), "versions": environment_versions(),
            "recipe": record.recipe if record else None,
            **report.model_dump(),
        })
    logger.info("wrote %s (%d tensors, %d exact)", path, len(report.tensors), report.exact_layers)
    return report


def _add_tensors(writer: GGUFWriter, model: nn.Module, units: list[tuple[str, bool]], weights: LazyWeights | None,
                 family: GGUFFamily, config: GGUFExportConfig) -> tuple[list[_Tensor], list[str]]:
    """Pack every tensor of the model, part by part, and add it to ``writer`` (its data then leaves memory); returns
    the tensors (without data) and the layers that needed the fallback. Every layer without an exact type is
    listed in one error, raised before anything is written under the output's name."""
    cfg = model.config
    names = gguf.get_tensor_name_map(family.arch, cfg.num_hidden_layers)
    kept = {name for name, _ in model.named_parameters()}  # a tied lm_head appears once
    tensors, inexact, fallback_layers = [], {}, []
    for index, (unit, recurse, module) in enumerate(each_unit(model, units, weights)):
        for name, source in _sources(unit, recurse, module, kept):
            tensor = _plan_tensor(name, source, model, names, family, config)
            if isinstance(tensor, str):  # why the layer has no exact type
                inexact.setdefault(tensor, []).append(name.removesuffix(".weight"))
                continue
            if tensor.how == "fallback":
                fallback_layers.append(name)
            tensor.unit = index
            writer.add_tensor(tensor.gguf_name, tensor.data, raw_dtype=tensor.ggml_type)
            tensor.data = None
            tensors.append(tensor)
    if inexact:
        layers = [name for group in inexact.values() for name in group]
        why = "; ".join(f"{reason}: {', '.join(group[:3])}{' …' if len(group) > 3 else ''}" for reason, group in inexact.items())
        raise WeightwiseError(f"{len(layers)} layers have no exact GGUF type{'' if config.type == 'auto' else ' ' + config.type} "
                              f"({why}); choose a fallback type (q8_0, f16 or f32) to re-quantize just them and see the "
                              "error it adds, or quantize with a format that has an exact type")
    return tensors, fallback_layers


def _sources(unit: str, recurse: bool, module: nn.Module, kept: set[str]) -> list[tuple[str, QuantizedLinear | str]]:
    """The tensors a model part contributes, by full name: each quantized layer's weight as the layer, every other
    parameter (tied copies left out) as its name."""
    prefix = f"{unit}." if unit else ""
    layers = {f"{prefix}{name}".rstrip("."): layer for name, layer in module.named_modules()
              if isinstance(layer, QuantizedLinear) and (recurse or layer is module)}
    sources: list[tuple[str, QuantizedLinear | str]] = [(f"{name}.weight", layer) for name, layer in layers.items()]
    sources += [(f"{prefix}{name}", f"{prefix}{name}") for name, _ in module.named_parameters(recurse=recurse)
                if f"{prefix}{name}" in kept]
    return sources


def _plan_tensor(name: str, source: QuantizedLinear | str, model: nn.Module, names, family: GGUFFamily,
                 config: GGUFExportConfig) -> _Tensor | str:
    """One tensor with its GGUF name, type and data (a quantized layer with no exact type: re-quantized to the
    fallback type, or, without one, why it has none)."""
    gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise WeightwiseError(f"tensor '{name}' has no GGUF name for architecture {family.arch.name.lower()}; "
                              "this model layout is not supported by the GGUF exporter")
    heads = permuted_heads(family, model.config, name)
    order = None
    if heads is not None:
        rows = source.out_features if isinstance(source, QuantizedLinear) else model.get_parameter(source).shape[0]
        order = llama_qk_row_order(rows, heads)
    if isinstance(source, QuantizedLinear):
        tensor, reason = _quantized_tensor(name, gguf_name, source, order, config, heads)
        if reason is None:
            return tensor
        if config.fallback is None:
            return reason
        return _float_tensor(name, gguf_name, source.dequantized_weight, config.fallback, order, "fallback")
    parameter = model.get_parameter(source)
    if parameter.ndim == 1:
        if family.norm_shift and name.endswith("norm.weight"):  # stored as llama.cpp's graph multiplies
            shift = family.norm_shift
            return _float_tensor(name, gguf_name, lambda: model.get_parameter(source) + shift, "f32", order, "converted")
        return _float_tensor(name, gguf_name, lambda: model.get_parameter(source), "f32", order, "converted")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        lossy = config.embeddings in NATIVE_SPECS and config.embeddings != "q8_0"
        return _float_tensor(name, gguf_name, lambda: model.get_parameter(source), config.embeddings, order,
                             "requantized" if lossy else "converted")
    kind = "f32" if config.type == "auto" else config.type  # a float linear layer
    return _float_tensor(name, gguf_name, lambda: model.get_parameter(source), kind, order,
                         "converted" if kind in ("f16", "bf16", "f32") else "requantized")


def _quantized_tensor(name: str, gguf_name: str, layer: QuantizedLinear, order, config: GGUFExportConfig,
                      heads: int | None) -> tuple[_Tensor | None, str | None]:
    """The layer's codes and scales packed into their exact GGUF type, or (None, why not)."""
    if layer.lowrank is not None:
        return None, f"LoRC rank {layer.lowrank[0]} factors"
    if layer.act_format is not None:
        return None, f"activation format {layer.act_format}"
    if config.type in ("f16", "bf16", "f32"):
        how = "exact" if config.type == "f32" else "converted"
        return _float_tensor(name, gguf_name, layer.dequantized_weight, config.type, order, how), None
    reason = why_not_exact(layer.spec, (layer.out_features, layer.in_features))
    if reason is not None:
        return None, reason
    qt = layer.quantized_tensor()
    if order is not None:
        qt = permute_qk_for_gguf(qt, heads)
    try:
        ggml_type, blocks = pack_gguf(qt)
    except InexactGGUFError as err:
        return None, str(err)
    if config.type != "auto" and ggml_type != _GGML[config.type]:
        return None, f"{layer.spec.format} maps to {ggml_type.name}"
    return _Tensor(name, gguf_name, blocks, ggml_type, layer.dequantized_weight, "exact", order), None


def _float_tensor(name: str, gguf_name: str, read: Callable[[], torch.Tensor], kind: str, order, how: str) -> _Tensor:
    """A float tensor stored as ``kind``: a float type as it is, a block type by the type's own rounding rule.
    ``read`` gives the weight (HF layout), now for the data and again for the comparison."""
    with torch.no_grad():
        weight = read().detach().to(torch.float32).cpu()
    permuted = weight if order is None else weight[order]
    ggml_type = _GGML[kind]
    if kind in NATIVE_SPECS and weight.ndim == 2:
        if kind == "q8_0" and how != "requantized":  # embeddings and fallbacks: llama.cpp's own Q8_0 rounding
            data = gguf.quants.quantize(permuted.numpy(), ggml_type)
        else:
            ggml_type, data = pack_gguf(quantize_tensor(permuted, NATIVE_SPECS[kind], name))
    else:
        data = gguf.quants.quantize(permuted.numpy(), ggml_type)
    return _Tensor(name, gguf_name, data, ggml_type, read, how, order)


def _add_metadata(writer: GGUFWriter, model: nn.Module, tokenizer, family: GGUFFamily, tokenizer_gguf,
                  config: GGUFExportConfig, fingerprint: str) -> None:
    """Add the metadata llama.cpp reads: hyperparameters, tokenizer, weightwise's recipe and source."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(getattr(cfg, "name_or_path", "") or "weightwise model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_settings(cfg, family)["theta"])
    write_family_metadata(writer, cfg, family, head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    record = quantization_record(model)
    writer.add_string("weightwise.version", environment_versions()["weightwise"] or "unknown")
    writer.add_string("weightwise.source_fingerprint", fingerprint)
    if record is not None:
        writer.add_string("weightwise.recipe", json.dumps(record.recipe, sort_keys=True))
        writer.add_string("weightwise.formats", record.format_label)
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, Path(tokenizer_gguf))
    else:
        _write_hf_tokenizer(writer, tokenizer, config.tokenizer_pre, cfg.vocab_size)


def _copy_tokenizer(writer: GGUFWriter, source: Path) -> None:
    """Copy every tokenizer.* key of the source GGUF file unchanged."""
    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)


def _write_hf_tokenizer(writer: GGUFWriter, tokenizer, pre: str, vocab_size: int) -> None:
    """A GPT-2-style BPE tokenizer from Hugging Face files, through gguf-py's vocab tools. llama.cpp wants one token per
    embedding row: a tokenizer with fewer tokens than the model's ``vocab_size`` (rows kept for padding or later use) is
    filled with unused ``[PAD{i}]`` tokens, as llama.cpp's own converter does."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        try:
            vocab = gguf.vocab.BpeVocab(Path(folder))
        except (FileNotFoundError, ValueError) as err:
            raise WeightwiseError(f"the tokenizer is not a byte-level BPE tokenizer that the GGUF exporter can write ({err}); "
                                  "export from the model's GGUF source instead") from None
        tokens, types = [], []
        for text, _, token_type in vocab.all_tokens():
            tokens.append(text)
            types.append(token_type)
        if len(tokens) > vocab_size:
            raise WeightwiseError(f"the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size} embedding rows; "
                                  "save the model with its own tokenizer")
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.vocab.SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def _verify(path: Path, tensors: list[_Tensor], model: nn.Module, units: list[tuple[str, bool]],
            weights: LazyWeights | None) -> list[GGUFTensorReport]:
    """Read the file back with gguf-py and compare every tensor (permutation undone) with what it stands for, part by
    part (with ``weights``, each read again for its turn)."""
    reader = GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    reports = []
    by_unit: dict[int, list[_Tensor]] = {}
    for tensor in tensors:
        by_unit.setdefault(tensor.unit, []).append(tensor)
    wanted = [unit for index, unit in enumerate(units) if index in by_unit]
    with open(path, "rb") as file:  # read, not the reader's memory map: its pages would stay resident, a file's worth
        for (unit, _, _), index in zip(each_unit(model, wanted, weights), sorted(by_unit)):
            for tensor in by_unit[index]:
                reports.append(_compare(file, stored[tensor.gguf_name], tensor))
    return reports


def _compare(file, read, tensor: _Tensor) -> GGUFTensorReport:
    """The stored tensor ``read`` (its bytes read from ``file``) against what ``tensor`` stands for."""
    file.seek(read.data_offset)
    data = np.frombuffer(file.read(read.n_bytes), dtype=read.data.dtype).reshape(read.data.shape)
    values = torch.from_numpy(np.array(gguf.quants.dequantize(data, read.tensor_type), dtype=np.float32, copy=True))
    with torch.no_grad():
        expected = tensor.expected().detach().to(torch.float32).cpu()
    values = values.reshape(expected.shape)
    if tensor.row_order is not None:
        values = values[torch.argsort(tensor.row_order)]
    diff = float((values - expected).abs().max()) if values.numel() else 0.0
    del expected
    if tensor.how == "exact" and diff != 0:
        raise WeightwiseError(f"{tensor.name}: the written {read.tensor_type.name} blocks differ from the quantized "
                              f"layer by {diff:g}; the GGUF file was not kept (this is a weightwise bug: please report it)")
    return GGUFTensorReport(name=tensor.name, gguf_name=tensor.gguf_name, type=read.tensor_type.name, how=tensor.how,
                            max_abs_diff=diff)
