"""Output folders and files that appear only when complete, manifests, hashes and the cache folder."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from weightwise.errors import WeightwiseError

MANIFEST_NAME = "manifest.json"
QUANTIZED_MODEL_KIND = "quantized-model"  # manifest kind of a folder written by weightwise.save for a quantized model
TUNE_RUN_KIND = "tune-run"  # manifest kind of a finished `weightwise tune` run (a patch or adapter and its base)
MANIFEST_VERSION = 1
_VERSIONED_PACKAGES = ("torch", "transformers", "safetensors", "gguf", "weightwise")


def cache_dir() -> Path:
    """``$WEIGHTWISE_CACHE`` if set (read at each call), else ``~/.cache/weightwise``."""
    return Path(os.environ.get("WEIGHTWISE_CACHE") or "~/.cache/weightwise").expanduser()


@contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``path`` only if the block succeeds.

    An existing folder at ``path`` is replaced only once the new one is complete; on an exception
    the temporary folder is deleted and ``path`` is left as it was.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise WeightwiseError(f"output '{target}' exists and is not a folder; remove it or choose another -o path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run that had the same pid
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an old ``target`` is moved aside first and deleted last."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, flush it to disk, then rename it to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (paths become strings)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def environment_versions() -> dict[str, str | None]:
    """Versions of Python, the key libraries (None when not installed) and the platform."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["platform"] = platform.platform()
    return versions


def write_manifest(directory: str | os.PathLike, kind: str, **fields: Any) -> Path:
    """Write ``manifest.json`` (kind, UTC creation time, library versions, then ``fields``) into ``directory``."""
    manifest = {
        "kind": kind,
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": environment_versions(),
        **fields,
    }
    return write_json_atomic(Path(directory) / MANIFEST_NAME, manifest)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` of a weightwise output folder, with a clear error if missing or corrupt."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise WeightwiseError(f"'{directory}' has no {MANIFEST_NAME}; it is not a weightwise output folder")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightwiseError(f"'{path}' is corrupt ({e}); re-create the folder by re-running its command") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
        raise WeightwiseError(f"'{path}' has no 'kind' field; re-create the folder by re-running its command")
    return manifest


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_fingerprint(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over sorted names, dtypes, shapes and bytes; tensors shared by several names count once."""
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, torch.nn.Module)
        else model_or_state_dict
    )
    h = hashlib.sha256()
    first_name: dict[tuple, str] = {}
    for name in sorted(state):
        t = state[name].detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if key in first_name:
            h.update(f"same as {first_name[key]}\n".encode())
            continue
        first_name[key] = name
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        h.update(b"\n")
    return h.hexdigest()
