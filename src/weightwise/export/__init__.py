"""Exporters: GGUF for llama.cpp, compressed-tensors for transformers/vLLM, dense Hugging Face folders.

:func:`export` writes a loaded model; :func:`export_source` loads anything :func:`weightwise.load_model` takes
(and finds a GGUF source's tokenizer metadata) first. Both return the exporter's report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.export.gguf import GGUFExportConfig, GGUFExportReport, export_gguf
from weightwise.export.hf import TORCH_DTYPES, DenseDtype, export_hf
from weightwise.io.artifacts import (
    MANIFEST_NAME,
    QUANTIZED_MODEL_KIND,
    TUNE_RUN_KIND,
    atomic_output_dir,
    output_lock,
    read_manifest,
)
from weightwise.io.lazy import LazyWeights
from weightwise.records import quantization_record

ExportTarget = Literal["gguf", "compressed-tensors", "hf"]
TARGETS: tuple[str, ...] = ("gguf", "compressed-tensors", "hf")


def export(model: nn.Module, tokenizer, to: ExportTarget, path: str | os.PathLike, *,
           gguf: GGUFExportConfig | None = None, dtype: DenseDtype = "fp32", tokenizer_gguf: str | os.PathLike | None = None,
           overwrite: bool = False, weights: LazyWeights | None = None) -> dict:
    """Write ``model`` to ``path`` for the runtime ``to`` names; returns the exporter's report as a dict.

    ``gguf``: the GGUF options (type, fallback, embeddings); ``dtype``: the float dtype of a dense (hf) export and
    of a compressed-tensors export's unquantized tensors; ``tokenizer_gguf``: a GGUF file whose tokenizer is copied;
    ``weights``: ``model`` is a meta-device skeleton whose tensors these are, written block by block (gguf, and
    compressed-tensors of a quantized run).
    """
    path = Path(path)
    if to not in TARGETS:
        raise WeightwiseError(f"unknown export target '{to}'; choose one of {', '.join(TARGETS)}")
    if weights is not None and to == "hf":
        raise WeightwiseError("block-by-block export writes gguf or compressed-tensors; export hf with the model in memory")
    with output_lock(path):  # from the existence check to the last file: another export of ``path`` is refused
        if to == "gguf":
            report: GGUFExportReport = export_gguf(model, tokenizer, path, gguf, tokenizer_gguf=tokenizer_gguf,
                                                   overwrite=overwrite, weights=weights)
            return report.model_dump()
        if to == "hf":
            export_hf(model, tokenizer, path, dtype, overwrite=overwrite)
            return {"path": str(path), "dtype": dtype}
        from weightwise.export.compressed_tensors import write_compressed_tensors

        if path.exists() and not overwrite:
            raise WeightwiseError(f"'{path}' exists; allow overwriting it or choose another output path")
        with atomic_output_dir(path) as tmp:
            return {"path": str(path), **write_compressed_tensors(model, tokenizer, tmp, TORCH_DTYPES[dtype], weights=weights)}


def export_source(source: str | os.PathLike, to: ExportTarget, path: str | os.PathLike, *, allow_pickle: bool = False,
                  trust_remote_code: bool = False, stream: bool = False, **options) -> dict:
    """Load ``source`` (a run folder, a model folder, a .gguf file, "default", …) and :func:`export` it; with
    ``stream``, the source (a quantized run, a Hugging Face folder, a .gguf file) is read block by block instead
    (memory: one block) and written as GGUF, or a quantized run as compressed-tensors."""
    from weightwise.io.models import load_model, load_skeleton

    if stream:
        if to == "hf":
            raise WeightwiseError("block-by-block export writes gguf or compressed-tensors; export hf with the model in "
                                  "memory (drop the stream option)")
        skeleton = load_skeleton(source, quantized_runs=True)
        if to == "compressed-tensors" and quantization_record(skeleton.model) is None:
            raise WeightwiseError(f"block-by-block export writes a quantized run as compressed-tensors; '{source}' is not "
                                  "one: quantize it first, or export it with the model in memory (drop the stream option)")
        return export(skeleton.model, skeleton.tokenizer, to, path, weights=skeleton.weights,
                      tokenizer_gguf=gguf_tokenizer_source(source), **options)
    model, tokenizer = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return export(model, tokenizer, to, path, tokenizer_gguf=gguf_tokenizer_source(source), **options)


def gguf_tokenizer_source(source: str | os.PathLike) -> Path | None:
    """The GGUF file a model came from (a .gguf source, "default", or a run whose manifest names one), whose
    tokenizer metadata an export copies unchanged; None when the model did not come from GGUF."""
    from weightwise.io.models import model_source_info

    seen: set[Path] = set()
    while _is_file(Path(source) / MANIFEST_NAME):  # a run: follow its source
        run = Path(source).resolve()
        if run in seen:
            raise WeightwiseError(f"'{run}/manifest.json' is among its own sources; the run folders are damaged: "
                                  "re-create them")
        seen.add(run)
        origin = read_manifest(run).get("source")
        where = origin.get("path") if isinstance(origin, dict) else None
        if not isinstance(where, str) or not where:
            return None
        if origin.get("kind") == "gguf":
            return Path(where) if _is_file(Path(where)) else None
        if origin.get("kind") not in (QUANTIZED_MODEL_KIND, TUNE_RUN_KIND):
            return None
        source = where
    info = model_source_info(source)
    return Path(info["path"]) if info["kind"] == "gguf" else None


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file; False for a name the file system refuses (too long)."""
    try:
        return path.is_file()
    except OSError:
        return False
