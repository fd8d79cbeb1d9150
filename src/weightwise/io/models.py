"""Load a causal LM and its tokenizer from "default", a .gguf file, a local folder, a weightwise
quantized-model folder or a hub id already in the local Hugging Face cache (never downloads), or
the embedded encoder "minilm" (all-MiniLM-L6-v2, loaded as a base model: no LM head).

A GGUF file is dequantized to fp32 once and cached as safetensors under
``cache_dir()/gguf/<sha256>/`` (tensor by tensor for the families weightwise exports: memory stays one shard);
later loads read the cache. :func:`load_skeleton` gives the same model on
the meta device with its checkpoint read tensor by tensor, for work on a model larger than memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import struct
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from gguf import GGUFReader
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from weightwise.errors import OutputError, WeightwiseError
from weightwise.io.artifacts import (
    MANIFEST_NAME,
    QUANTIZED_MODEL_KIND,
    TUNE_RUN_KIND,
    atomic_output_dir,
    cache_dir,
    check_run_folder,
    file_sha256,
    folder_file,
    output_lock,
    read_manifest,
    write_json_atomic,
)
from weightwise.io.folders import load_quantized, quantized_skeleton
from weightwise.io.gguf_check import check_gguf
from weightwise.io.lazy import LazyWeights, NotStreamable, check_finite_tensor, missing_names
from weightwise.io.model_checks import (CONFIG_ERRORS, check_fits, read_config, read_tokenizer, reason,
                                        safetensors_weights)
from weightwise.io.defaults import DEFAULT_MODEL_NAME, MINILM_MODEL_NAME, default_gguf_path, minilm_path

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # what transformers loads
_SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# What gguf's reader raises on a cut-short or garbled file (numpy memmap/reshape, struct, sizes, indexing).
_GGUF_PARSE_ERRORS = (ValueError, IndexError, OverflowError, struct.error, EOFError)
# What transformers raises loading a damaged GGUF: the above, OSError for undecodable metadata text,
# RuntimeError for tensor shapes that disagree with the metadata, and what a config of bad values raises.
_GGUF_LOAD_ERRORS = (*_GGUF_PARSE_ERRORS, *CONFIG_ERRORS)
# What torch.load(weights_only=True) raises on a cut-short, garbled or object-holding pickle.
_PICKLE_READ_ERRORS = (OSError, RuntimeError, EOFError, pickle.UnpicklingError)
_CACHE_LOCK_WAIT_S = 600.0  # how long a process waits for another one converting the same GGUF file


@dataclass(frozen=True)
class _Source:
    kind: str  # "gguf" | "folder" | "hub" | "quantized-model" | "tune-run" | "encoder" (a base model such as BertModel)
    path: Path  # the .gguf file or the folder (for "hub": the snapshot folder in the HF cache)


def load_model(
    source: str | os.PathLike = "default",
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load ``(model, tokenizer)``, the model in eval mode.

    ``source``: "default", "minilm" (an AutoModel: BertModel), a .gguf file, a folder with config.json
    + weights, a weightwise quantized-model folder, or a hub id in the local HF cache. The tokenizer is None when a folder
    has no tokenizer files. Pickled weights (.bin/.pt) load only with ``allow_pickle=True`` and
    then only through ``torch.load(weights_only=True)``. ``dtype``: the weights' dtype, or "auto" for the
    checkpoint's own (:func:`checkpoint_dtype`: a bf16 checkpoint stays bf16, half the memory of fp32; a GGUF
    file's cache is fp32). It does not apply to quantized-model folders.
    """
    start = time.perf_counter()
    src = _resolve(source)
    if src.kind == QUANTIZED_MODEL_KIND:
        model, tokenizer = load_quantized(src.path)
    elif src.kind == TUNE_RUN_KIND:  # the one loader above io: a tune result needs the patch and peft code
        from weightwise.tune.runs import load_tune_run

        model, tokenizer = load_tune_run(src.path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    elif src.kind == "gguf":
        folder = _gguf_cache_folder(src.path)
        if not folder.is_dir():
            _build_gguf_cache(src.path, folder)
        model = _load_folder_model(folder, allow_pickle=False, trust_remote_code=False, dtype=dtype)
        tokenizer = _load_folder_tokenizer(folder, trust_remote_code=False)
    else:
        model = _load_folder_model(
            src.path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype=dtype,
            encoder=src.kind == "encoder",
        )
        tokenizer = _load_folder_tokenizer(src.path, trust_remote_code=trust_remote_code)
    _check_finite(model, src.path)
    model.eval()
    logger.info("loaded %s from %s in %.1f s", type(model).__name__, src.path, time.perf_counter() - start)
    return model, tokenizer


@dataclass(frozen=True)
class Skeleton:
    """A causal LM on the meta device (no memory: the config, names, shapes and the dtype ``load_model(dtype="auto")``
    gives), its tokenizer, and its checkpoint's tensors, read one at a time."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    weights: LazyWeights


def load_skeleton(source: str | os.PathLike = "default", *, quantized_runs: bool = False) -> Skeleton:
    """The model of ``source`` as a :class:`Skeleton`, after :func:`load_model`'s checks of the folder (architecture,
    shard index, safetensors files; NaN/Inf values are refused as tensors are read).

    Only sources held as safetensors with the names the model uses can be read so: a Hugging Face folder, a hub id in
    the local cache, or a .gguf file (through its safetensors cache, built on first use by loading it whole once).
    Others (quantized runs, tune runs, encoders, pickled weights, other tensor names) raise :class:`NotStreamable`.
    The model's own code (``auto_map``) is never used: the built-in class of its architecture is. With
    ``quantized_runs``, a weightwise quantized run is read too (:func:`weightwise.io.folders.quantized_skeleton`).
    """
    src = _resolve(source)
    if quantized_runs and src.kind == QUANTIZED_MODEL_KIND:
        return quantized_skeleton(src.path)
    if src.kind == "gguf":
        folder = _gguf_cache_folder(src.path)
        if not folder.is_dir():
            _build_gguf_cache(src.path, folder)
    elif src.kind in ("folder", "hub"):
        folder = src.path
    else:
        raise NotStreamable(f"'{source}' is a {src.kind}; only a Hugging Face folder, a hub id or a .gguf file is read "
                            "block by block: quantize it in memory (--no-stream)")
    config_dict = _read_json(folder / "config.json")
    _check_architecture(config_dict, folder / "config.json", False)
    _check_shard_index(folder)
    if not any(folder.glob("*.safetensors")):
        raise NotStreamable(f"'{folder}' holds no safetensors weights, which streaming reads tensor by tensor: "
                            "quantize it in memory (--no-stream), or convert it to safetensors")
    weights = LazyWeights(folder)
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=checkpoint_dtype(config_dict, weights))
    model.tie_weights()
    model.eval()
    missing = missing_names(model, weights)
    if missing:
        raise NotStreamable(f"'{folder}' names its tensors otherwise than {type(model).__name__} (no {missing[0]!r} "
                            f"among {len(weights.files)} tensors): quantize it in memory (--no-stream)")
    return Skeleton(model, _load_folder_tokenizer(folder, trust_remote_code=False), weights)


def checkpoint_dtype(config: dict, weights: LazyWeights | None) -> torch.dtype | str:
    """The dtype ``load_model(dtype="auto")`` gives a folder's model: its config.json's ``dtype`` (or ``torch_dtype``),
    else its first floating safetensors tensor's, else "auto" (transformers decides, for pickled weights)."""
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype) and getattr(torch, named).is_floating_point:
        return getattr(torch, named)
    for name in sorted(weights.files) if weights is not None else ():
        dtype = weights.dtype(name)
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return "auto"


def load_tokenizer(source: str | os.PathLike = "default", *, trust_remote_code: bool = False):
    """The tokenizer of ``source`` (same sources as :func:`load_model`), or None if it has none."""
    src = _resolve(source)
    if src.kind != "gguf":
        return _load_folder_tokenizer(src.path, trust_remote_code=trust_remote_code)
    folder = _gguf_cache_folder(src.path)
    if folder.is_dir():
        return _load_folder_tokenizer(folder, trust_remote_code=False)
    return _read_gguf(src.path, AutoTokenizer.from_pretrained)


def model_source_info(source: str | os.PathLike = "default") -> dict[str, Any]:
    """What a manifest records about a model source: kind, given source, resolved path, weights sha256."""
    src = _resolve(source)
    info: dict[str, Any] = {"kind": src.kind, "source": os.fspath(source), "path": str(src.path)}
    if source in _ALIASES:
        info["name"] = _ALIASES[source]
    info["sha256"] = _gguf_sha256(src.path) if src.kind == "gguf" else _folder_weights_sha256(src.path)
    return info


# --- resolving a source -------------------------------------------------------------------------


_ALIASES = {"default": DEFAULT_MODEL_NAME, "minilm": MINILM_MODEL_NAME}  # embedded models by short name


def _resolve(source: str | os.PathLike) -> _Source:
    if isinstance(source, str) and source == "default":
        return _Source("gguf", default_gguf_path())
    if isinstance(source, str) and source == "minilm":
        return _Source("encoder", minilm_path())
    path = Path(source).expanduser()
    try:
        path.exists()
    except (OSError, ValueError) as err:  # a name too long for the file system, a NUL character
        raise WeightwiseError(f"{os.fspath(source)[:200]!r} is not a usable path ({type(err).__name__}: "
                              f"{str(err)[:100]}); check the path") from None
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():  # a weightwise output folder: its files are read only inside it
            kind = read_manifest(check_run_folder(path))["kind"]
            if kind in (QUANTIZED_MODEL_KIND, TUNE_RUN_KIND):
                return _Source(kind, path)
        return _Source("folder", path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _Source("gguf", path)
        raise WeightwiseError(
            f"'{path}' is not a model source; pass a .gguf file or the folder holding config.json and the weights"
        )
    if isinstance(source, str) and _HUB_ID.fullmatch(source) and not source.lower().endswith(_FILE_SUFFIXES):
        return _Source("hub", _hub_snapshot(source))
    raise WeightwiseError(f"file not found: '{source}'; check the path")


def _hub_snapshot(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the local HF cache (never downloads)."""
    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        config = None
    if not isinstance(config, str):
        raise WeightwiseError(
            f"model '{repo_id}' is not a local folder, a .gguf file or a hub id in the local Hugging Face cache; "
            f"downloads are off: fetch it once with `hf download {repo_id}` or pass a local path"
        )
    return Path(config).parent


# --- GGUF ---------------------------------------------------------------------------------------


def _gguf_cache_folder(path: Path) -> Path:
    return cache_dir() / "gguf" / _gguf_sha256(path)


def _gguf_sha256(path: Path) -> str:
    """SHA-256 of a GGUF file, remembered in the cache by (resolved path, size, mtime_ns)."""
    index_path = cache_dir() / "gguf" / "index.json"
    stat = path.stat()
    key, stamp = str(path.resolve()), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index = _read_index(index_path)
    entry = index.get(key)
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and "sha256" in entry:
        return entry["sha256"]
    sha = file_sha256(path)
    index[key] = {**stamp, "sha256": sha}
    try:
        write_json_atomic(index_path, index)
    except (OSError, OutputError) as e:
        logger.warning("could not update the hash index %s: %s", index_path, e)
    return sha


def _read_index(path: Path) -> dict:
    """The hash index, or an empty one if missing or unreadable (it is only a cache)."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return index if isinstance(index, dict) else {}


def _read_gguf(path: Path, from_pretrained):
    """``from_pretrained`` (a model or tokenizer loader) on a GGUF file, with read errors made clear."""
    check_gguf(path)  # counts and lengths the file cannot hold would make gguf-py loop or allocate without end
    try:
        return from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except _GGUF_LOAD_ERRORS as e:
        raise _gguf_error(path, e) from e


def _gguf_error(path: Path, error: Exception) -> WeightwiseError:
    """Tell a damaged GGUF file from one whose architecture transformers cannot load."""
    damaged = WeightwiseError(
        f"'{path}' is truncated or corrupt (not a readable GGUF file); re-create or re-download it"
    )
    if isinstance(error, OSError) and error.errno is None:  # transformers: metadata text is not UTF-8
        return damaged
    try:
        reader = GGUFReader(path)
    except _GGUF_PARSE_ERRORS:
        return damaged
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[-1]).decode("utf-8", "replace") if field else "(none)"
    reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:300]
    return WeightwiseError(
        f"'{path}' (GGUF architecture '{arch}') cannot be loaded by transformers {transformers.__version__}: "
        f"{reason or type(error).__name__}; if the file is damaged re-create or re-download it, "
        "otherwise use a supported architecture or convert the model to a Hugging Face folder"
    )


def _build_gguf_cache(path: Path, folder: Path) -> None:
    """Dequantize ``path`` to fp32 and write it as a Hugging Face folder at ``folder``.

    Several processes loading one file at once (a distributed run) build it once: the others wait for the lock.
    """
    try:
        with output_lock(folder, wait=_CACHE_LOCK_WAIT_S):
            if folder.is_dir():  # built by another process while this one waited
                return
            _write_gguf_cache(path, folder)
    except (OSError, OutputError) as e:
        if isinstance(e, OutputError) and not isinstance(e.__cause__, OSError):
            raise
        raise WeightwiseError(
            f"cannot write the model cache '{folder}' ({e}); set WEIGHTWISE_CACHE to a writable folder"
        ) from e


def _write_gguf_cache(path: Path, folder: Path) -> None:
    """The fp32 Hugging Face folder of a GGUF file: for a family weightwise exports, written tensor by tensor
    (:mod:`weightwise.io.gguf_read`; memory: one shard); otherwise through transformers' whole-model load."""
    from weightwise.io.gguf_read import streams_gguf, write_gguf_tensors

    logger.info("converting %s to fp32 safetensors in %s (once per file)", path, folder)
    start = time.perf_counter()
    config = _read_gguf(path, AutoConfig.from_pretrained)  # read once: from_pretrained would read it again
    stored = check_gguf(path)
    check_fits(config, path, AutoModelForCausalLM.from_config, tensors=stored.tensors, max_elements=2 * stored.elements)
    stat = path.stat()
    source = {"path": str(path.resolve()), "size": stat.st_size, "sha256": folder.name}
    if streams_gguf(config):
        from accelerate import init_empty_weights

        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        skeleton.tie_weights()
        tokenizer = _read_gguf(path, AutoTokenizer.from_pretrained)
        with atomic_output_dir(folder) as tmp:
            try:
                write_gguf_tensors(path, skeleton, tmp)
            except _GGUF_PARSE_ERRORS as e:
                raise _gguf_error(path, e) from e
            skeleton.config.save_pretrained(tmp)
            if skeleton.can_generate():
                skeleton.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "source.json", source)
        logger.info("GGUF converted tensor by tensor in %.1f s", time.perf_counter() - start)
        return
    dense = GgufConfig(dequantize=True)  # plain nn.Linear weights even where GGUF kernels are installed
    read_model = partial(AutoModelForCausalLM.from_pretrained, config=config, quantization_config=dense,
                         dtype=torch.float32)
    model = _read_gguf(path, read_model)
    tokenizer = _read_gguf(path, AutoTokenizer.from_pretrained)
    _check_finite(model, path)
    converted = time.perf_counter()
    with atomic_output_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "source.json", source)
    logger.info(
        "GGUF read in %.1f s, cache written in %.1f s", converted - start, time.perf_counter() - converted
    )


# --- Hugging Face folders -----------------------------------------------------------------------


def _load_folder_model(folder: Path, *, allow_pickle: bool, trust_remote_code: bool, dtype: torch.dtype | str,
                       encoder: bool = False):
    """A causal LM from ``folder``, or with ``encoder`` its base model (AutoModel, e.g. BertModel)."""
    config = _read_json(folder / "config.json")
    _check_architecture(config, folder / "config.json", trust_remote_code, causal=not encoder)
    _check_shard_index(folder)
    safetensors_files = sorted(folder.glob("*.safetensors"))
    use_pickle = not safetensors_files
    if use_pickle:
        _check_pickle_allowed(folder, allow_pickle)
    auto_class = AutoModel if encoder else AutoModelForCausalLM
    hf_config = read_config(folder, trust_remote_code=trust_remote_code)
    if not use_pickle:  # a size in config.json far beyond the weights would be allocated before they are read
        stored = safetensors_weights(safetensors_files)  # refuses a damaged file
        check_fits(hf_config, folder / "config.json", partial(auto_class.from_config, trust_remote_code=trust_remote_code),
                   tensors=stored.tensors, max_elements=2 * stored.elements)
    if dtype == "auto":
        dtype = checkpoint_dtype(config, None if use_pickle else LazyWeights(folder))
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code, "dtype": dtype}
    if use_pickle:
        kwargs.update(use_safetensors=False, weights_only=True)  # torch.load(weights_only=True): tensors only, no code
    try:
        model, info = auto_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    except (*CONFIG_ERRORS, *_PICKLE_READ_ERRORS) as e:  # a tensor that disagrees with config.json, a damaged pickle
        if not use_pickle:
            raise WeightwiseError(f"the weights in '{folder}' do not fit its config.json ({reason(e)}); re-create or "
                                  "re-download the folder") from None
        raise WeightwiseError(
            f"the pickled weights in '{folder}' are truncated, corrupt, hold Python objects beyond tensors or do not "
            f"fit config.json ({type(e).__name__}); re-create or re-download them, ideally as safetensors"
        ) from e
    _check_mostly_loaded(model, info["missing_keys"], folder)
    return model


def _check_mostly_loaded(model: torch.nn.Module, missing_keys, folder: Path) -> None:
    """Refuse a model most of whose weights (by element count) were not in the checkpoint."""
    params = dict(model.named_parameters())
    missing = [name for name in missing_keys if name in params]
    if 2 * sum(params[name].numel() for name in missing) > sum(p.numel() for p in params.values()):
        raise WeightwiseError(
            f"'{folder}' lacks most weights of {type(model).__name__} ({len(missing)} of {len(params)} tensors); "
            "its config.json does not match the weights: re-create the folder"
        )


def _check_shard_index(folder: Path) -> None:
    """Refuse a shard index whose weight map names files outside ``folder`` (transformers would read them)."""
    for index_name in _SHARD_INDEXES:
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise WeightwiseError(f"'{index}' is corrupt (no 'weight_map' object); re-create or re-download it")
            for shard in set(weight_map.values()):
                folder_file(folder, shard, index)


def _check_pickle_allowed(folder: Path, allow_pickle: bool) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if not pickles:
        raise WeightwiseError(f"'{folder}' holds no model weights (*.safetensors); re-create or re-download it")
    if not allow_pickle:
        raise WeightwiseError(
            f"'{folder}' holds only pickled weights ({', '.join(pickles)}), refused by default; "
            "pass allow_pickle=True (--allow-pickle) if you trust their source, or convert them to safetensors"
        )
    if not any((folder / name).is_file() for name in _PICKLE_NAMES):
        raise WeightwiseError(
            f"'{folder}' has pickled weights ({', '.join(pickles)}) but no pytorch_model.bin, "
            "the name transformers loads; rename the file or convert it to safetensors"
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightwiseError(
            f"'{path}' not found; pass a folder written by save_pretrained, a .gguf file or a hub id"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise WeightwiseError(
            f"'{path}' is truncated or corrupt (invalid JSON: {e}); re-create or re-download it"
        ) from None
    if not isinstance(data, dict):
        raise WeightwiseError(f"'{path}' is corrupt (not a JSON object); re-create or re-download it")
    return data


def _check_architecture(config: dict, config_path: Path, trust_remote_code: bool, causal: bool = True) -> None:
    """Refuse a model_type transformers does not know or (with ``causal``) cannot load as a causal LM."""
    if trust_remote_code and "auto_map" in config:
        return
    model_type = config.get("model_type", "(none)")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if "auto_map" in config and not known:
        raise WeightwiseError(
            f"'{config_path}' names model code shipped in the folder (auto_map) for architecture '{model_type}', which "
            "transformers does not know; that code runs only with trust_remote_code=True: pass it if you trust its source"
        )
    if "auto_map" in config:
        logger.warning("%s ships its own model code (auto_map); not running it (trust_remote_code is off): "
                       "transformers' built-in %s class is used", config_path, model_type)
    if not known:
        raise WeightwiseError(
            f"architecture '{model_type}' in '{config_path}' is not known to transformers {transformers.__version__}; "
            "upgrade transformers, or pass trust_remote_code=True if the folder ships its own model code"
        )
    if causal and CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise WeightwiseError(
            f"architecture '{model_type}' in '{config_path}' has no causal-LM class in transformers; "
            "pass a causal language model"
        )


def _load_folder_tokenizer(folder: Path, *, trust_remote_code: bool):
    present = [name for name in _TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        logger.info("no tokenizer files in %s; tokenizer is None", folder)
        return None
    for name in present:
        if name.endswith(".json"):
            _read_json(folder / name)
    if not trust_remote_code:
        _check_tokenizer_code(folder)
    return read_tokenizer(folder, trust_remote_code=trust_remote_code)


def _check_tokenizer_code(folder: Path) -> None:
    """Refuse a tokenizer that only the folder's own code (``auto_map``) can build; with a built-in class for it,
    that code is ignored (never run) and logged."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    settings = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    auto_map = settings.get("auto_map") or {}
    model_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    if not (auto_map if isinstance(auto_map, list) else auto_map.get("AutoTokenizer") or model_map.get("AutoTokenizer")):
        return
    name = settings.get("tokenizer_class")
    builtin = (isinstance(name, str) and any(tokenizer_class_from_name(n) is not None
                                             for n in (name, name.removesuffix("Fast"), name + "Fast"))
               or (not name and config.get("model_type") in TOKENIZER_MAPPING_NAMES))
    if not builtin:
        raise WeightwiseError(
            f"the tokenizer in '{folder}' is built by code shipped in the folder (auto_map, class {name!r}); that code "
            "runs only with trust_remote_code=True: pass it if you trust its source"
        )
    logger.warning("%s ships its own tokenizer code (auto_map); not running it (trust_remote_code is off): "
                   "the built-in %s class is used", folder, name or config.get("model_type"))


# --- checks and hashes --------------------------------------------------------------------------


def _check_finite(model: torch.nn.Module, where: Path) -> None:
    """Refuse NaN/Inf weights."""
    for name, param in model.named_parameters():
        check_finite_tensor(name, param.detach(), where)


def _folder_weights_sha256(folder: Path) -> str:
    """SHA-256 over the names and hashes of a folder's weight files (safetensors or pickles)."""
    h = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.suffix in (".safetensors", *_PICKLE_SUFFIXES):
            h.update(f"{file.name}\0{file_sha256(file)}\n".encode())
    return h.hexdigest()
