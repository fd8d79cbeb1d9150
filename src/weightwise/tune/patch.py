"""Sparse weight patches: the entries a sparse fine-tune changed, stored compactly and added to a base model.

A :class:`WeightPatch` holds, per tensor, the sorted flat indices of the changed entries and their fp32
deltas. On disk it is one safetensors file:

- header metadata ``weightwise.patch``: JSON ``{format_version, value_dtype, payload_sha256, tensors:
  {name: {shape, count}}}``; ``weightwise.metadata``: JSON of :attr:`WeightPatch.metadata` (base model
  hash, method, density, metrics, ...).
- ``NAME:gaps`` and ``NAME:escapes``: the indices encoded by :func:`weightwise.tune.indices.encode_indices`
  (gaps between sorted indices in the narrowest unsigned width; the excess of a gap that does not fit
  goes to the escapes, in order).
- ``NAME:values``: the deltas in fp16, bf16 or fp32, or int8 codes with ``NAME:scale`` (fp32,
  absmax/127).

Exact removal: rounding makes ``(W + Δ) − Δ`` differ from ``W`` in the last bit for a fraction of
entries (0.1–20 % for realistic fp32 weights and deltas), and no function of the patched weights alone
can undo it (rounding maps several ``W`` to one result). So :meth:`WeightPatch.apply` returns a
:class:`PatchUndo` holding the overwritten values, and :meth:`WeightPatch.remove` with it restores them
bit for bit; ``merge`` writes it into the patched folder, so that ``unmerge`` is exact too. Without an
undo record ``remove`` subtracts in float64 and rounds once: exact wherever ``W + scale·Δ`` was
representable, elsewhere off by at most one unit in the last place of the larger of ``W`` and the
patched value.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.formats.quantizer import all_finite
from weightwise.io.artifacts import (
    MANIFEST_NAME,
    canonical_safetensors,
    check_run_folder,
    file_sha256,
    output_lock,
    read_manifest,
    state_dict_fingerprint,
    write_bytes_atomic,
)
from weightwise.tune.indices import decode_indices, encode_indices

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PATCHED_MODEL_KIND = "patched-model"  # manifest kind of a folder written by WeightPatch.merge
UNDO_FILE = "patch_undo/originals.safetensors"  # in a subfolder: loaders that read every top-level *.safetensors skip it
VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.int8}
_HEADER_KEY, _METADATA_KEY = "weightwise.patch", "weightwise.metadata"


# --- pure encodings ----------------------------------------------------------------------------


def encode_values(values: torch.Tensor, value_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 deltas → (stored values, fp32 scale or None). int8: codes round(Δ/s), s = absmax/127, error ≤ s/2."""
    values = values.detach().to("cpu", torch.float32).reshape(-1)
    if value_dtype == "int8":
        absmax = float(values.abs().max()) if values.numel() else 0.0
        scale = torch.tensor(absmax / 127 if absmax > 0 else 1.0, dtype=torch.float32)
        return torch.round(values / scale).clamp(-127, 127).to(torch.int8), scale
    stored = values.to(VALUE_DTYPES[value_dtype])
    if not all_finite(stored):
        raise WeightwiseError(f"a delta exceeds the {value_dtype} range; save the patch with value_dtype 'bf16' or 'fp32'")
    return stored, None


def decode_values(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`encode_values`: fp32 deltas."""
    return stored.float() * scale.float() if scale is not None else stored.float()


# --- the patch ---------------------------------------------------------------------------------


@dataclass
class PatchUndo:
    """What :meth:`WeightPatch.apply` overwrote: the original values at the patched entries (model dtype)."""

    originals: dict[str, torch.Tensor]
    scale: float
    patch_fingerprint: str
    model_fingerprint: str  # of the model before the patch was applied

    def to_bytes(self) -> bytes:
        meta = {"scale": repr(self.scale), "patch_fingerprint": self.patch_fingerprint, "model_fingerprint": self.model_fingerprint}
        return canonical_safetensors(safetensors.torch.save({k: v.contiguous() for k, v in self.originals.items()}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatchUndo:
        try:
            data = Path(path).read_bytes()
            originals = safetensors.torch.load(data)
            meta = _header(data).get("__metadata__") or {}
            return cls(originals, float(meta["scale"]), meta["patch_fingerprint"], meta["model_fingerprint"])
        except (OSError, safetensors.SafetensorError, KeyError, ValueError) as err:
            raise WeightwiseError(f"undo record '{path}' is missing or corrupt ({err}); re-create the patched folder") from None


@dataclass
class WeightPatch:
    """Per tensor, the sorted flat indices of the changed entries and their fp32 deltas, plus metadata."""

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict = field(default_factory=dict)
    source: dict | None = field(default=None, compare=False, repr=False)  # set by load: path, bytes, value dtype

    def __post_init__(self) -> None:
        checked = {}
        for name, (idx, values) in sorted(self.entries.items()):
            if name not in self.shapes:
                raise WeightwiseError(f"patch entry '{name}' has no shape")
            idx = idx.detach().to("cpu", torch.int64).reshape(-1)
            values = values.detach().to("cpu", torch.float32).reshape(-1)
            numel = _numel(self.shapes[name])
            if idx.numel() != values.numel():
                raise WeightwiseError(f"patch entry '{name}': {idx.numel()} indices but {values.numel()} values")
            if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all())):
                raise WeightwiseError(f"patch entry '{name}': indices must be strictly increasing and within 0..{numel - 1}")
            checked[name] = (idx, values)
        self.entries = checked
        self.shapes = {name: tuple(int(s) for s in self.shapes[name]) for name in checked}

    # --- building and identity ---

    @classmethod
    def from_models(cls, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], metadata: dict | None = None) -> WeightPatch:
        """The entries where ``tuned`` differs from ``base`` (Δ = tuned − base in fp32), for float tensors in both.

        A tensor shared by several names (tied embeddings) is kept once, under its first name in sorted
        order. ``metadata['base_model_hash']`` is required: ``state_dict_fingerprint(model)`` of the base
        model taken before tuning (a fingerprint of ``base`` itself would differ whenever ``base`` is a
        subset or a clone, since clones lose the ties the fingerprint counts once).
        """
        if not isinstance((metadata or {}).get("base_model_hash"), str):
            raise WeightwiseError("metadata['base_model_hash'] is required: pass state_dict_fingerprint(model) of the base model")
        entries, shapes, seen = {}, {}, set()
        for name in sorted(set(base) & set(tuned)):
            b, t = base[name].detach(), tuned[name].detach()
            if not (b.is_floating_point() and t.is_floating_point()):
                continue
            if b.shape != t.shape:
                raise WeightwiseError(f"tensor '{name}' has shape {tuple(b.shape)} in the base but {tuple(t.shape)} tuned; "
                                      "a patch needs models of the same architecture")
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen:
                continue
            seen.add(key)
            b, t = b.reshape(-1).float(), t.reshape(-1).float()
            changed = torch.nonzero(t != b).reshape(-1)
            if not changed.numel():
                continue
            delta = t[changed] - b[changed]
            if not all_finite(delta):
                raise WeightwiseError(f"tensor '{name}' has NaN/Inf values after tuning; lower the learning rate and re-run")
            entries[name], shapes[name] = (changed, delta), tuple(base[name].shape)
        return cls(entries, shapes, dict(metadata))

    def fingerprint(self) -> str:
        """Hex SHA-256 of the content (names, shapes, indices, fp32 values); metadata and file encoding excluded."""
        content = {}
        for name, (idx, values) in self.entries.items():
            content[f"{name}:shape"] = torch.tensor(self.shapes[name], dtype=torch.int64)
            content[f"{name}:indices"], content[f"{name}:values"] = idx, values
        return state_dict_fingerprint(content)

    @property
    def base_model_hash(self) -> str | None:
        return self.metadata.get("base_model_hash")

    # --- files ---

    def to_bytes(self, value_dtype: str = "fp16") -> bytes:
        """The safetensors encoding (see the module docstring)."""
        if value_dtype not in VALUE_DTYPES:
            raise WeightwiseError(f"unknown patch value dtype '{value_dtype}'; use one of {', '.join(VALUE_DTYPES)}")
        tensors, described = {}, {}
        for name, (idx, values) in self.entries.items():
            tensors[f"{name}:gaps"], escapes = encode_indices(idx.cpu())
            tensors[f"{name}:values"], scale = encode_values(values, value_dtype)
            if escapes is not None:
                tensors[f"{name}:escapes"] = escapes
            if scale is not None:
                tensors[f"{name}:scale"] = scale
            described[name] = {"shape": list(self.shapes[name]), "count": idx.numel()}
        header = {"format_version": FORMAT_VERSION, "value_dtype": value_dtype, "payload_sha256": state_dict_fingerprint(tensors),
                  "tensors": described}
        metadata = {_HEADER_KEY: json.dumps(header), _METADATA_KEY: json.dumps(self.metadata, default=os.fspath)}
        return canonical_safetensors(safetensors.torch.save(tensors, metadata=metadata))

    def save(self, path: str | os.PathLike, value_dtype: str = "fp16") -> Path:
        """Write the patch to ``path`` atomically (fp16, bf16, fp32 or int8 values); returns the path."""
        return write_bytes_atomic(path, self.to_bytes(value_dtype))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "patch") -> WeightPatch:
        """Decode and check a patch; a truncated, corrupt or foreign file raises WeightwiseError."""
        def corrupt(why: str) -> WeightwiseError:
            return WeightwiseError(f"'{where}' is truncated or corrupt ({why}); re-create the patch")

        try:
            tensors = safetensors.torch.load(data)
            meta = _header(data).get("__metadata__") or {}
        except (safetensors.SafetensorError, ValueError) as err:
            raise corrupt(str(err)) from None
        if _HEADER_KEY not in meta:
            raise WeightwiseError(f"'{where}' is a safetensors file but not a weightwise patch; pass a file written by `weightwise tune` or `patch compose`")
        try:
            header, metadata = json.loads(meta[_HEADER_KEY]), json.loads(meta.get(_METADATA_KEY, "{}"))
            described, value_dtype = header["tensors"], header["value_dtype"]
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError) as err:
            raise corrupt(f"bad header: {err}") from None
        if not isinstance(described, dict) or not isinstance(metadata, dict):
            raise corrupt("bad header: its tensors or metadata are not JSON objects")
        if header.get("format_version") != FORMAT_VERSION:
            raise WeightwiseError(f"'{where}' has patch format version {header.get('format_version')}; this weightwise reads {FORMAT_VERSION}")
        if state_dict_fingerprint(tensors) != header.get("payload_sha256"):
            raise corrupt("checksum mismatch")
        expected = {f"{name}:{part}" for name in described for part in ("gaps", "values")}
        optional = {f"{name}:{part}" for name in described for part in ("escapes", "scale")}
        if not expected <= set(tensors) <= expected | optional:
            raise corrupt("tensor list does not match the header")
        entries, shapes = {}, {}
        for name, spec in described.items():
            try:
                idx = decode_indices(tensors[f"{name}:gaps"], tensors.get(f"{name}:escapes"))
                values = decode_values(tensors[f"{name}:values"], tensors.get(f"{name}:scale"))
                count, shape = int(spec["count"]), tuple(int(s) for s in spec["shape"])
            except (ValueError, KeyError, TypeError, OverflowError) as err:
                raise corrupt(f"{name}: {err}") from None
            if not all(0 <= s < 2**63 for s in shape):
                raise corrupt(f"{name}: shape {shape}")
            if idx.numel() != count or values.numel() != count:
                raise corrupt(f"{name}: {idx.numel()} indices, {values.numel()} values, header says {count}")
            if not all_finite(values):
                raise corrupt(f"{name}: NaN/Inf deltas")
            entries[name], shapes[name] = (idx, values), shape
        try:
            patch = cls(entries, shapes, metadata)
        except WeightwiseError as err:
            raise corrupt(str(err)) from None
        patch.source = {"path": where, "bytes": len(data), "value_dtype": value_dtype,
                        "tensor_bytes": {name: sum(t.numel() * t.element_size() for key, t in tensors.items() if key.rpartition(":")[0] == name)
                                         for name in described}}
        return patch

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeightPatch:
        """Read a patch file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise WeightwiseError(f"patch file not found: '{path}'; check the path")
        patch = cls.from_bytes(path.read_bytes(), str(path))
        patch.source["sha256"] = file_sha256(path)
        return patch

    def info(self) -> dict[str, Any]:
        """Tensors (shape, entries, density, stored bytes), totals, value dtype, file bytes and metadata."""
        tensor_bytes = (self.source or {}).get("tensor_bytes", {})
        tensors = {name: {"shape": list(self.shapes[name]), "entries": idx.numel(), "density": idx.numel() / _numel(self.shapes[name]),
                          "bytes": tensor_bytes.get(name)} for name, (idx, _) in self.entries.items()}
        entries = sum(t["entries"] for t in tensors.values())
        numel = sum(_numel(s) for s in self.shapes.values())
        source = self.source or {}
        return {"tensors": tensors, "entries": entries, "patched_numel": numel, "density": entries / numel if numel else 0.0,
                "value_dtype": source.get("value_dtype"), "file_bytes": source.get("bytes"), "fingerprint": self.fingerprint(),
                "metadata": self.metadata}

    # --- applying ---

    def _targets(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model tensors the patch names, checked for presence, float dtype, shape and aliasing."""
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        modules = dict(model.named_modules())
        found, storages = {}, {}
        for name in self.entries:
            tensor = tensors.get(name)
            if tensor is None or not tensor.is_floating_point():
                owner = modules.get(name.rpartition(".")[0])
                detail = f" (its module is a {type(owner).__name__})" if owner is not None else ""
                raise WeightwiseError(f"the model has no float tensor '{name}'{detail}; apply the patch to the float model "
                                      "it was made for, before quantizing")
            if tuple(tensor.shape) != self.shapes[name]:
                raise WeightwiseError(f"'{name}' has shape {tuple(tensor.shape)} in the model but {self.shapes[name]} in the patch; "
                                      "the patch belongs to another architecture")
            if not tensor.is_contiguous():
                raise WeightwiseError(f"'{name}' is not contiguous in the model; call model.contiguous() weights first")
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in storages:
                raise WeightwiseError(f"'{name}' and '{storages[key]}' are one tied tensor in this model; the patch may name it only once")
            storages[key], found[name] = name, tensor
        return found

    def apply(self, model: nn.Module, scale: float = 1.0, force: bool = False) -> PatchUndo:
        """Add ``scale``·Δ to the model's weights in place (float64 sum rounded once to the weight dtype).

        Refuses (WeightwiseError) a model whose fingerprint differs from ``base_model_hash`` unless
        ``force``. Returns the undo record that makes :meth:`remove` exact.
        """
        targets = self._targets(model)
        model_hash = state_dict_fingerprint(model)
        if model_hash != self.base_model_hash:
            if not force:
                raise WeightwiseError(f"the patch was made for base model {str(self.base_model_hash)[:12]}…, but this model hashes to "
                                      f"{model_hash[:12]}…; apply it to its base model, or force it (--force)")
            logger.warning("applying a patch made for base %s to a model hashing to %s (forced)", self.base_model_hash, model_hash)
        originals = {}
        with torch.no_grad():
            for name, (idx, delta) in self.entries.items():
                flat = targets[name].view(-1)
                idx = idx.to(flat.device)
                originals[name] = flat[idx].cpu().clone()
                flat[idx] = (flat[idx].double() + scale * delta.to(flat.device, torch.float64)).to(flat.dtype)
        return PatchUndo(originals, float(scale), self.fingerprint(), model_hash)

    def remove(self, model: nn.Module, scale: float = 1.0, undo: PatchUndo | None = None) -> None:
        """Undo :meth:`apply` in place: bit-exact with its ``undo`` record, else subtract scale·Δ (see module doc).

        Several patches must be removed in the reverse order of application.
        """
        targets = self._targets(model)
        if undo is not None:
            if undo.patch_fingerprint != self.fingerprint():
                raise WeightwiseError("the undo record belongs to another patch; pass the record this patch's apply() returned")
            if undo.scale != scale:
                raise WeightwiseError(f"the patch was applied with scale {undo.scale}, not {scale}; remove it with the same scale")
            if set(undo.originals) != set(self.entries) or any(undo.originals[n].numel() != i.numel() for n, (i, _) in self.entries.items()):
                raise WeightwiseError("the undo record does not match the patch's entries; it is corrupt")
        with torch.no_grad():
            for name, (idx, delta) in self.entries.items():
                flat = targets[name].view(-1)
                idx = idx.to(flat.device)
                if undo is not None:
                    flat[idx] = undo.originals[name].to(flat.device, flat.dtype)
                else:
                    flat[idx] = (flat[idx].double() - scale * delta.to(flat.device, torch.float64)).to(flat.dtype)

    # --- model folders ---

    def merge(self, model: str | os.PathLike, out_dir: str | os.PathLike, scale: float = 1.0, force: bool = False, *,
              allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
        """Load ``model`` (any :func:`weightwise.load_model` source), apply the patch, write a full model folder.

        The folder holds model.safetensors, config.json, the tokenizer, the undo record and a manifest
        (kind ``patched-model``: source, its fingerprint, the patch's fingerprint, file hash and
        metadata, the scale, the result's fingerprint). Written atomically.
        """
        from weightwise.io.folders import save
        from weightwise.io.models import load_model, model_source_info

        out_dir = Path(out_dir)
        with output_lock(out_dir):  # held from the start: a second merge into ``out_dir`` is refused at once
            base, tokenizer = load_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            undo = self.apply(base, scale=scale, force=force)
            source = self.source or {}
            patch_record = {"fingerprint": self.fingerprint(), "path": source.get("path"), "sha256": source.get("sha256"),
                            "value_dtype": source.get("value_dtype"), "metadata": self.metadata}
            save(base, out_dir, tokenizer=tokenizer, kind=PATCHED_MODEL_KIND, files={UNDO_FILE: undo.to_bytes()},
                 source=model_source_info(model), source_fingerprint=undo.model_fingerprint, patch=patch_record, scale=scale,
                 forced=undo.model_fingerprint != self.base_model_hash, fingerprint=state_dict_fingerprint(base))
        logger.info("wrote %s (patch %s × %g)", out_dir, patch_record["fingerprint"][:12], scale)
        return out_dir

    def unmerge(self, folder: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
        """From a folder written by :meth:`merge` with this patch, write the original model (bit-exact) to ``out_dir``.

        The restored weights are checked against the fingerprint recorded before the patch was applied.
        """
        from weightwise.io.folders import save
        from weightwise.io.models import load_model, model_source_info

        folder, out_dir = Path(folder), Path(out_dir)
        manifest = read_manifest(check_run_folder(folder)) if (folder / MANIFEST_NAME).is_file() else {"kind": "plain model"}
        if manifest["kind"] != PATCHED_MODEL_KIND:
            raise WeightwiseError(f"'{folder}' is a '{manifest['kind']}' folder, not one written by `weightwise patch apply`; "
                                  "remove needs the folder that apply wrote")
        if manifest.get("patch", {}).get("fingerprint") != self.fingerprint():
            raise WeightwiseError(f"'{folder}' was patched with another patch (fingerprint {str(manifest.get('patch', {}).get('fingerprint'))[:12]}…); "
                                  "pass the patch file that was applied")
        undo = PatchUndo.load(folder / UNDO_FILE)
        model, tokenizer = load_model(folder)
        self.remove(model, scale=manifest["scale"], undo=undo)
        restored = state_dict_fingerprint(model)
        if restored != manifest["source_fingerprint"]:
            raise WeightwiseError(f"the weights of '{folder}' were changed after patching: removal does not give back the "
                                  "original model; re-create it from the base model instead")
        save(model, out_dir, tokenizer=tokenizer, source=model_source_info(folder), fingerprint=restored,
             removed_patch=manifest["patch"]["fingerprint"])
        return out_dir


def compose(patches: list[WeightPatch], scales: list[float] | None = None, *, force: bool = False) -> tuple[WeightPatch, dict]:
    """One patch equal to Σ scaleᵢ·patchᵢ: entries at the same index are summed (fp32) and counted as overlaps.

    Sums that cancel to exactly 0 are dropped (and counted). All patches must share the base model
    hash unless ``force`` (the result then keeps the first patch's). Report: ``{"overlaps": {name: n},
    "total_overlaps", "cancelled": {name: n}, "total_cancelled", "entries"}``.
    """
    if not patches:
        raise WeightwiseError("compose needs at least one patch")
    scales = [1.0] * len(patches) if scales is None else [float(s) for s in scales]
    if len(scales) != len(patches):
        raise WeightwiseError(f"{len(scales)} scales for {len(patches)} patches; give one scale per patch or none")
    hashes = [p.base_model_hash for p in patches]
    if len(set(hashes)) > 1 and not force:
        raise WeightwiseError("the patches were made for different base models "
                              f"({', '.join(sorted({str(h)[:12] for h in hashes}))}); compose patches of one base, or force it (--force)")
    shapes: dict[str, tuple[int, ...]] = {}
    for patch in patches:
        for name, shape in patch.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise WeightwiseError(f"'{name}' has shape {shapes[name]} in one patch and {shape} in another; they are for different models")
    entries, overlaps, cancelled = {}, {}, {}
    for name in sorted(shapes):
        parts = [(p.entries[name], s) for p, s in zip(patches, scales) if name in p.entries]
        idx = torch.cat([i for (i, _), _ in parts])
        values = torch.cat([v * s for (_, v), s in parts])
        unique, inverse, counts = torch.unique(idx, sorted=True, return_inverse=True, return_counts=True)
        summed = torch.zeros(unique.numel(), dtype=torch.float32).index_add_(0, inverse, values)
        keep = summed != 0
        overlaps[name], cancelled[name] = int((counts > 1).sum()), int((~keep).sum())
        if keep.any():
            entries[name] = (unique[keep], summed[keep])
    metadata = {"base_model_hash": hashes[0], "method": "compose",
                "components": [{"fingerprint": p.fingerprint(), "scale": s, "metadata": p.metadata} for p, s in zip(patches, scales)]}
    result = WeightPatch(entries, {n: shapes[n] for n in entries}, metadata)
    report = {"overlaps": overlaps, "total_overlaps": sum(overlaps.values()), "cancelled": cancelled,
              "total_cancelled": sum(cancelled.values()), "entries": sum(i.numel() for i, _ in entries.values())}
    return result, report


# --- helpers -----------------------------------------------------------------------------------


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _header(data: bytes) -> dict:
    """The JSON header of safetensors bytes (call after safetensors has validated them)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n])


def patch_info(path: str | os.PathLike) -> dict[str, Any]:
    """:meth:`WeightPatch.info` of the patch file at ``path`` plus its SHA-256."""
    patch = WeightPatch.load(path)
    return {**patch.info(), "sha256": patch.source["sha256"]}


__all__ = ["PATCHED_MODEL_KIND", "VALUE_DTYPES", "PatchUndo", "WeightPatch", "compose", "decode_indices", "decode_values",
           "encode_indices", "encode_values", "patch_info"]
