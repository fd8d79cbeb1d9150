"""Export a weightwise-quantized model as a compressed-tensors Hugging Face folder (transformers, vLLM).

A QuantizedLinear maps onto a compressed-tensors weight scheme only where that scheme stores its weights
exactly: symmetric int4/int8 with group or channel scales → ``pack-quantized`` (weightwise's signed-absmax
scales may be negative: compressed-tensors multiplies by the scale as it is, so they stay); int4/int8_asym whose
offsets are integer multiples of the scales → ``pack-quantized`` with zero points; fp8_e4m3 with tensor or
channel scales → ``float-quantized``; mxfp4 → ``mxfp4-pack-quantized``. The package's own compressors pack
every layer — from our dequantized weight and scales, which their quantize step rounds back to our codes — and
decompressing the result must give our float32 weight bit for bit. Any other layer is refused, by name.

A quantized run can also be written without loading it whole (``weights``: its tensors read one at a time into a
meta-device skeleton): one decoder block at a time is read, packed and written as a shard, then emptied; the
output is then sharded (``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``), which
transformers and vLLM load like one file.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from torch import nn

from weightwise.architectures import family_of
from weightwise.errors import WeightwiseError
from weightwise.formats.quantizer import decode_scale, dequantize, group_scales
from weightwise.io.lazy import SHARD_INDEX, LazyWeights, each_unit, shard_names, unit_names, write_shard_index
from weightwise.qlinear import QuantizedLinear

logger = logging.getLogger(__name__)

PACKED, FLOAT, MXFP4 = "pack-quantized", "float-quantized", "mxfp4-pack-quantized"
_INT_BITS = {"int4": 4, "int8": 8, "int4_asym": 4, "int8_asym": 8}
# checkpoint dtype of each weightwise scale dtype (e8m0: every power of two 2^-127..2^127 is exact in bfloat16)
_SCALE_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "e8m0": torch.bfloat16}


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors weight scheme; layers with equal schemes share a config group."""

    format: str  # compressed-tensors format
    num_bits: int
    type: str  # "int" or "float"
    symmetric: bool
    strategy: str  # "group", "channel" or "tensor"
    group_size: int | None = None

    def quantization_args(self) -> QuantizationArgs:
        # MXFP4's e8m0 scales are stored as uint8 exponents, as compressed-tensors' MXFP4A16 preset declares
        mx = {"scale_dtype": torch.uint8, "zp_dtype": torch.uint8} if self.format == MXFP4 else {}
        return QuantizationArgs(num_bits=self.num_bits, type=self.type, symmetric=self.symmetric, strategy=self.strategy,
                                group_size=self.group_size, dynamic=False, **mx)

    def describe(self) -> str:
        kind = "mxfp4" if self.format == MXFP4 else f"{self.type}{self.num_bits}"
        where = f"group {self.group_size}" if self.strategy == "group" else self.strategy
        return f"{kind} {'symmetric' if self.symmetric else 'asymmetric'}, {where} scales ({self.format})"


def compressed_tensors_scheme(layer: QuantizedLinear) -> Scheme:
    """The scheme that can store ``layer``, judged by its spec; WeightwiseError saying why there is none.

    Whether the stored numbers fit exactly (asymmetric zero points, rounding) is checked when packing.
    """
    spec = layer.spec
    name = spec.number_format.name
    if layer.lowrank is not None:
        raise WeightwiseError("has low-rank compensation factors (LoRC), which compressed-tensors cannot store")
    if layer.act_format is not None:
        raise WeightwiseError(f"quantizes its input activations (act_format={layer.act_format}), which is not exported")
    if name == "mxfp4":
        return Scheme(MXFP4, 4, "float", True, "group", 32)
    if name == "fp8_e4m3":
        if spec.granularity == "group":
            raise WeightwiseError("fp8_e4m3 with group scales: vLLM's FP8 weight-only path takes tensor or channel scales")
        return Scheme(FLOAT, 8, "float", True, spec.granularity)
    if name not in _INT_BITS:
        raise WeightwiseError(f"format {name} has no exact compressed-tensors scheme "
                              f"(exported: {', '.join(_INT_BITS)}, fp8_e4m3, mxfp4)")
    if spec.granularity == "tensor":
        raise WeightwiseError(f"{name} with one scale per tensor: vLLM's weight-only int path takes group or channel scales")
    group = spec.resolved_group_size
    if group is not None and layer.in_features % group:
        raise WeightwiseError(f"group size {group} does not divide in_features {layer.in_features} (padded last group); "
                              "compressed-tensors needs whole groups")
    return Scheme(PACKED, _INT_BITS[name], "int", not spec.number_format.asymmetric, spec.granularity, group)


def _checkpoint_scales(scales: torch.Tensor, scale_dtype: str, scheme: Scheme) -> torch.Tensor:
    """Scales as the checkpoint stores them: weightwise's storage dtype where that holds them exactly
    (pow2_scales="ratio" scales may not fit it), else float32; one per tensor has shape (1,).

    Asymmetric layers get float32: transformers loads them only with dequantize=True (see _loader_warnings), which
    multiplies in the scales' dtype, and float32 keeps that product exact.
    """
    dtype = _SCALE_TORCH_DTYPES[scale_dtype] if scheme.symmetric else torch.float32
    if not torch.equal(scales.to(dtype).float(), scales):
        dtype = torch.float32
    return scales.reshape(1).to(dtype) if scheme.strategy == "tensor" else scales.to(dtype)


def _zero_points(layer: QuantizedLinear, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 zero points z with ``s·code + offset == s·((code - 2^(N-1)) - z)``: offset = -s·k for an integer
    k in [0, 2^N - 1], z = k - 2^(N-1). WeightwiseError when some group's offset is not such a multiple."""
    offsets = decode_scale(layer.quantized_tensor().offsets, layer.spec.resolved_scale_dtype)
    k = torch.round(-offsets / scales)
    if not (torch.equal(-(scales * k), offsets) and k.min() >= 0 and k.max() <= 2**bits - 1):
        raise WeightwiseError(f"{layer.spec.number_format.name} offsets are not integer multiples of the scales "
                              f"(weightwise stores each group's minimum as a float offset); compressed-tensors needs "
                              f"integer zero points in [0, {2**bits - 1}]")
    return (k - 2 ** (bits - 1)).to(torch.int8)


def compress_layer(layer: QuantizedLinear, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The layer's compressed-tensors tensors (weight_packed / weight, weight_scale, ...; local names), packed by
    the package's compressor and checked: its decompression equals our float32 weight exactly."""
    qt = layer.quantized_tensor()
    weight, scales = dequantize(qt), group_scales(qt)
    state = {"weight": weight, "weight_scale": scales if scheme.format == MXFP4 else
             _checkpoint_scales(scales, layer.spec.resolved_scale_dtype, scheme)}
    if not scheme.symmetric:
        state["weight_zero_point"] = _zero_points(layer, scales, scheme.num_bits)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=scheme.quantization_args(), format=scheme.format)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    packed = compressor.compress(state, ct_scheme)
    # decompress in float32: the loaders cast the scales to the model's dtype first (transformers' default load)
    scale = packed["weight_scale"]
    back = compressor.decompress({**packed, "weight_scale": scale.float() if scale.is_floating_point() else scale},
                                 ct_scheme)["weight"].float()
    if not torch.equal(back, weight):
        raise WeightwiseError(f"compressed-tensors does not reproduce its weights exactly "
                              f"(max difference {(back - weight).abs().max().item():.3g})")
    return {key: value.contiguous() for key, value in packed.items()}


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every QuantizedLinear of ``model`` by module name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


# ---------------------------------------------------------------------------------------------------------------
# What vLLM's fast kernels accept. vLLM serves each layer below with a Marlin kernel; the limits come from
# vllm/model_executor/layers/quantization/utils/marlin_utils.py (vllm-project/vllm): GPTQ_MARLIN_MIN_THREAD_N = 64
# and GPTQ_MARLIN_MIN_THREAD_K = 128, checked on the int (WNA16) path by verify_marlin_supports_shape, and
# MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]; the FP8/FP4 Marlin GEMMs take either thread-tile family
# (out % 64, in % 128) or (out % 128, in % 64) (marlin_padded_nk, vLLM PR #45295). Since that PR (June 2026) vLLM
# zero-pads a misaligned layer up to a tile (more memory and work); older versions run an int layer on a slower
# kernel (or refuse it when none fits) and fail to repack an FP8/FP4 one. Sizes are per tensor-parallel rank:
# these checks are for one GPU.
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelShapeRule:
    """A vLLM kernel's shape limits: (out, in) a multiple of one of ``tiles``; group size among ``group_sizes``."""

    kernel: str
    formats: tuple[str, ...]  # compressed-tensors formats the kernel serves
    tiles: tuple[tuple[int, int], ...]  # (out multiple, in multiple); any one suffices
    group_sizes: tuple[int, ...] | None  # None: any; -1 is per channel


VLLM_SHAPE_RULES: tuple[KernelShapeRule, ...] = (
    KernelShapeRule("Marlin int4/int8 weight-only (WNA16)", (PACKED,), ((64, 128),), (-1, 32, 64, 128)),
    KernelShapeRule("Marlin FP8/MXFP4 weight-only", (FLOAT, MXFP4), ((64, 128), (128, 64)), None),
)
# vLLM runs these shards as one fused layer with one scheme (packed_modules_mapping, e.g.
# vllm/model_executor/models/llama.py); compressed_tensors/utils.py takes the first shard's scheme for all.
VLLM_FUSED_LAYERS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                                  "gate_up_proj": ("gate_proj", "up_proj")}


def vllm_shape_warnings(model: nn.Module) -> list[str]:
    """Warnings naming the quantized layers vLLM's fast kernels reject (VLLM_SHAPE_RULES, checked on the fused
    layers vLLM builds; one warning per rule and shape) and fused shards whose schemes differ. Layers that
    cannot be exported are skipped."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    schemes = {}
    for name, layer in quantized_layers(model).items():
        try:
            schemes[name] = compressed_tensors_scheme(layer)
        except WeightwiseError:
            continue
    warnings, fused_members = [], set()
    shapes: list[tuple[str, Scheme, int, int]] = []  # (label, scheme, out_features, in_features) as vLLM sees them
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        for fused, shards in VLLM_FUSED_LAYERS.items():
            members = [f"{parent}.{shard}" if parent else shard for shard in shards]
            if leaf != shards[0] or not all(member in linears for member in members):
                continue
            fused_members.update(members)
            found = {schemes.get(member) for member in members}
            if len(found) > 1:
                kinds = "; ".join(f"{m}: {schemes[m].describe() if m in schemes else 'not quantized'}" for m in members)
                warnings.append(f"vLLM fuses {', '.join(members)} into one {fused} with one scheme, but theirs differ "
                                f"({kinds}); vLLM refuses a partly quantized fused layer and else applies the first "
                                "shard's scheme to all")
            elif None not in found:
                label = f"{parent}.{{{','.join(shards)}}}" if parent else f"{{{','.join(shards)}}}"
                shapes.append((label, found.pop(), sum(linears[m].out_features for m in members), linears[name].in_features))
    shapes += [(name, scheme, linears[name].out_features, linears[name].in_features)
               for name, scheme in schemes.items() if name not in fused_members]
    rejected: dict[str, list[str]] = defaultdict(list)
    for label, scheme, out_features, in_features in shapes:
        for problem in _rule_problems(scheme, out_features, in_features):
            rejected[problem].append(label)
    return warnings + [f"{problem}: {', '.join(labels)}" for problem, labels in rejected.items()]


def _rule_problems(scheme: Scheme, out_features: int, in_features: int) -> list[str]:
    """What each VLLM_SHAPE_RULES kernel serving ``scheme`` rejects about an (out, in) layer."""
    problems = []
    group = -1 if scheme.group_size is None else scheme.group_size
    for rule in VLLM_SHAPE_RULES:
        if scheme.format not in rule.formats:
            continue
        if not any(out_features % n == 0 and in_features % k == 0 for n, k in rule.tiles):
            tiles = " or ".join(f"(out % {n}, in % {k})" for n, k in rule.tiles)
            problems.append(f"vLLM's {rule.kernel} needs {tiles} == 0, not {out_features}x{in_features} (vLLM since "
                            "PR #45295 zero-pads it; older versions use a slower kernel or fail)")
        if rule.group_sizes is not None and scheme.strategy != "tensor" and group not in rule.group_sizes:
            problems.append(f"vLLM's {rule.kernel} supports group sizes {', '.join(map(str, rule.group_sizes))} "
                            f"(-1: per channel), not {group}")
    return problems


def write_compressed_tensors(model: nn.Module, tokenizer, directory: Path, dtype: torch.dtype | None = None, *,
                             weights: LazyWeights | None = None) -> dict:
    """Write ``model`` INTO the existing ``directory`` as a compressed-tensors folder: model.safetensors (with
    ``weights``, shards and their index), config.json with its quantization_config, generation config and tokenizer
    files.

    Non-quantized tensors (embeddings, norms, lm_head, biases) are written as they are, or cast to ``dtype``
    (which also becomes the config's dtype). Raises WeightwiseError listing every layer that cannot be stored
    exactly (with ``weights``: every layer whose scheme is refused, before anything is written; one whose packing
    fails, when it is reached). ``weights``: ``model`` is a quantized run's meta-device skeleton whose tensors these
    are, written block by block (see the module's docstring). Returns {"format", "groups": {group: {"scheme",
    "layers"}}, "warnings", "bytes" (of the weight files), "compressed_tensors_version"}.
    """
    directory = Path(directory)
    layers = quantized_layers(model)
    if not layers:
        raise WeightwiseError("the model has no quantized layers; quantize it before exporting compressed-tensors")
    if weights is None:
        tensors, by_scheme = _compress(layers, dtype)
        tensors.update(_dense_tensors(model, layers, dtype))
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        files = ["model.safetensors"]
    else:
        by_scheme, files = _write_block_by_block(model, weights, layers, dtype, directory)

    groups = {f"group_{i}": (scheme, names) for i, (scheme, names) in enumerate(by_scheme.items())}
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    config_groups = {
        group: QuantizationScheme(targets=["Linear"] if len(groups) == 1 else names, weights=scheme.quantization_args(),
                                  format=scheme.format)
        for group, (scheme, names) in groups.items()
    }
    formats = {scheme.format for scheme in by_scheme}
    quantization_config = QuantizationConfig(config_groups=config_groups, ignore=ignore, quantization_status="compressed",
                                             format=formats.pop() if len(formats) == 1 else "mixed-precision")
    config = copy.deepcopy(model.config)
    config.dtype = dtype or model.get_input_embeddings().weight.dtype
    config.save_pretrained(directory)
    ModelCompressor(quantization_config=quantization_config).update_config(str(directory))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)

    warnings = vllm_shape_warnings(model) + _loader_warnings(by_scheme, config.dtype)
    for warning in warnings:
        logger.warning("compressed-tensors export: %s", warning)
    size = sum((directory / file).stat().st_size for file in files)
    logger.info("wrote %d quantized layers in %d scheme(s) to %s (%.1f MB)", len(layers), len(groups), directory, size / 1e6)
    return {
        "format": quantization_config.format,
        "groups": {group: {"scheme": scheme.describe(), "layers": names} for group, (scheme, names) in groups.items()},
        "warnings": warnings,
        "bytes": size,
        "compressed_tensors_version": compressed_tensors.__version__,
    }


def _compress(layers: Mapping[str, QuantizedLinear], dtype: torch.dtype | None) -> tuple[dict, dict[Scheme, list[str]]]:
    """The compressed-tensors tensors of ``layers`` (and their biases) by full name, and the layers of each scheme;
    WeightwiseError listing every layer that has no exact form."""
    tensors, by_scheme, problems = {}, defaultdict(list), {}
    for name, layer in layers.items():
        try:
            scheme = compressed_tensors_scheme(layer)
            packed = compress_layer(layer, scheme)
        except WeightwiseError as err:
            problems[name] = str(err)
            continue
        by_scheme[scheme].append(name)
        tensors.update({f"{name}.{key}": value for key, value in packed.items()})
        if layer.bias is not None:
            tensors[f"{name}.bias"] = _cast(layer.bias.detach(), dtype)
    _refuse(problems)
    return tensors, by_scheme


def _write_block_by_block(model: nn.Module, weights: LazyWeights, layers: Mapping[str, QuantizedLinear],
                          dtype: torch.dtype | None, directory: Path) -> tuple[dict[Scheme, list[str]], list[str]]:
    """Write the skeleton ``model`` whose tensors are ``weights`` as shards: one per decoder block (read, packed,
    written, emptied), one per quantized layer outside the blocks, and one of the other tensors (read one module at
    a time); returns the layers of each scheme and the files written (shards, then the index)."""
    _compress_check(layers)
    units = unit_names(model, family_of(getattr(model.config, "model_type", "unknown")).blocks, whole=layers)
    entries = model.state_dict(keep_vars=True)
    tied = {target for target, source in getattr(model, "all_tied_weights_keys", {}).items()  # as _dense_tensors drops them
            if target in entries and source in entries and entries[target] is entries[source]}
    whole = [unit for unit in units if unit[1]]
    rest = [(name, recurse) for name, recurse in units if not recurse and
            any(f"{name}.{key}".lstrip(".") not in tied for key in model.get_submodule(name).state_dict() if "." not in key)]
    shards = shard_names(len(whole) + 1)
    by_scheme: dict[Scheme, list[str]] = defaultdict(list)
    weight_map: dict[str, str] = {}
    for (unit, _, module), shard in zip(each_unit(model, whole, weights), shards):  # the skeleton's dtypes: float32
        inside = {name: layer for name, layer in layers.items() if name == unit or name.startswith(unit + ".")}  # float
        tensors, schemes = _compress(inside, dtype)  # parts, codes as stored
        for scheme, names in schemes.items():
            by_scheme[scheme].extend(names)
        packed_prefixes = tuple(f"{name}." for name in inside)
        tensors.update({f"{unit}.{key}": _cast(value, dtype).contiguous() for key, value in module.state_dict().items()
                        if not f"{unit}.{key}".startswith(packed_prefixes)})
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    tensors = {}
    for unit, _, module in each_unit(model, rest, weights):
        own = {f"{unit}.{key}".lstrip("."): value for key, value in module.state_dict().items() if "." not in key}
        tensors.update({name: _cast(value, dtype).contiguous() for name, value in own.items() if name not in tied})
    save_file(tensors, str(directory / shards[-1]), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(tensors, shards[-1]))
    total = sum((directory / shard).stat().st_size for shard in shards)
    write_shard_index(directory, weight_map, total)
    order = {name: i for i, name in enumerate(layers)}  # schemes' layers in module order, as in memory
    return {scheme: sorted(names, key=order.get) for scheme, names in by_scheme.items()}, [*shards, SHARD_INDEX]


def _compress_check(layers: Mapping[str, QuantizedLinear]) -> None:
    """Refuse, before any tensor is read, every layer whose spec has no compressed-tensors scheme."""
    problems = {}
    for name, layer in layers.items():
        try:
            compressed_tensors_scheme(layer)
        except WeightwiseError as err:
            problems[name] = str(err)
    _refuse(problems)


def _refuse(problems: Mapping[str, str]) -> None:
    """WeightwiseError listing every layer (name: why) that has no exact compressed-tensors form, if any."""
    if problems:
        listing = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise WeightwiseError(f"{len(problems)} layer(s) have no exact compressed-tensors form: {listing}")


def _loader_warnings(by_scheme: Mapping[Scheme, list[str]], dtype: torch.dtype) -> list[str]:
    """Known limits of transformers' compressed load (compressed-tensors 0.19-0.20) that the checkpoint cannot avoid;
    ``CompressedTensorsConfig(dequantize=True)`` decompresses at load time instead and loads every scheme here."""
    version, warnings = compressed_tensors.__version__, []
    if dtype != torch.bfloat16 and any(scheme.format == MXFP4 for scheme in by_scheme):
        warnings.append(f"mxfp4 layers: compressed-tensors {version} decompresses MXFP4 to bfloat16 weights, so "
                        f"transformers' {dtype} model fails at its first forward; load with dtype=torch.bfloat16, or "
                        "exactly in float32 with quantization_config=CompressedTensorsConfig(dequantize=True)")
    if any(not scheme.symmetric for scheme in by_scheme):
        # PackedQuantizationCompressor.compress packs zero points, but its meta-device branch (transformers'
        # empty model) leaves them unpacked: the checkpoint's weight_zero_point then mismatches in size
        warnings.append(f"asymmetric layers: transformers with compressed-tensors {version} cannot load packed zero "
                        "points into its compressed model (weight_zero_point size mismatch); load with "
                        "quantization_config=CompressedTensorsConfig(dequantize=True)")
    return warnings


def _dense_tensors(model: nn.Module, layers: Mapping[str, QuantizedLinear], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor outside the quantized layers, tied copies left out (the loader ties them again)."""
    state = model.state_dict()
    inside = tuple(f"{name}." for name in layers)
    tied = {target for target, source in getattr(model, "all_tied_weights_keys", {}).items()
            if target in state and source in state and state[target].data_ptr() == state[source].data_ptr()}
    return {key: _cast(value, dtype).contiguous() for key, value in state.items()
            if not key.startswith(inside) and key not in tied}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
