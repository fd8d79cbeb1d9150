"""Output folders and files that appear only when complete, locks on outputs, manifests, run-folder checks,
hashes and the cache folder."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from weightwise.errors import OutputError, WeightwiseError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
QUANTIZED_MODEL_KIND = "quantized-model"  # manifest kind of a folder written by weightwise.save for a quantized model
TUNE_RUN_KIND = "tune-run"  # manifest kind of a finished `weightwise tune` run (a patch or adapter and its base)
MANIFEST_VERSION = 1
_VERSIONED_PACKAGES = ("torch", "transformers", "safetensors", "gguf", "weightwise")
# What writing into a folder raises when the folder is not writable or the disk is full.
_WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST})
_STALE_EMPTY_LOCK_S = 10.0  # a lock file still empty after this long was left by a writer killed while creating it
_HELD_LOCKS: dict[tuple[int, Path], int] = {}  # (pid, lock file) → nesting depth, for output_lock in this process


def cache_dir() -> Path:
    """``$WEIGHTWISE_CACHE`` if set (read at each call), else ``~/.cache/weightwise``."""
    return Path(os.environ.get("WEIGHTWISE_CACHE") or "~/.cache/weightwise").expanduser()


def output_error(target: str | os.PathLike, err: OSError) -> OutputError:
    """The user-facing error for an output that cannot be written: permissions, a read-only or full disk."""
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    why = "the disk is full" if full else (err.strerror or str(err))
    fix = "free some space or choose another location" if full else "choose a writable location"
    return OutputError(f"cannot write '{target}' ({why}); nothing was written there: {fix}")


def is_write_error(err: BaseException, *places: Path) -> bool:
    """An OSError of a write into one of ``places`` (or of no named file), as opposed to, say, a failed read."""
    if not isinstance(err, OSError) or err.errno not in _WRITE_ERRNOS:
        return False
    if err.filename is None:
        return True
    name = os.path.abspath(os.fsdecode(err.filename))
    return any(name == os.path.abspath(p) or name.startswith(os.path.abspath(p) + os.sep) for p in places)


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the output ``path``: ``.NAME.lock`` beside it."""
    target = Path(os.path.abspath(path))
    return target.with_name(f".{target.name}.lock")


@contextmanager
def output_lock(path: str | os.PathLike, *, wait: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock of the output ``path`` while the block runs, so that two processes never write it at once.

    The lock is a file beside the output created with O_CREAT|O_EXCL and holding this process id and host. One held
    by another live process raises :class:`OutputError` naming it and the pid (after waiting up to ``wait``
    seconds); one left by a process that is gone is taken over with a warning. Nested use in one process is free.
    Released when the block ends, also on an exception.
    """
    lock = lock_path(path)
    key = (os.getpid(), lock)  # keyed by pid too: a forked child does not inherit the parent's lock
    if key not in _HELD_LOCKS:
        _acquire_lock(lock, Path(path), wait)
        _clear_dead_writers_files(Path(os.path.abspath(path)))
    _HELD_LOCKS[key] = _HELD_LOCKS.get(key, 0) + 1
    try:
        yield lock
    finally:
        _HELD_LOCKS[key] -= 1
        if not _HELD_LOCKS[key]:
            del _HELD_LOCKS[key]
            if _read_lock(lock) == _lock_text():
                lock.unlink(missing_ok=True)


def _lock_text() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _read_lock(lock: Path) -> str | None:
    """The lock file's text, or None when it is gone."""
    try:
        return lock.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def _acquire_lock(lock: Path, target: Path, wait: float) -> None:
    deadline = time.monotonic() + wait
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(target, err) from err
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            text = _read_lock(lock)
            if text is None:  # released meanwhile
                continue
            if _lock_is_stale(lock, text):
                logger.warning("taking over the lock %s of process %s, which is no longer running", lock,
                               text.split()[0] if text.split() else "(unknown)")
                if _read_lock(lock) == text:
                    lock.unlink(missing_ok=True)
                continue
            if time.monotonic() >= deadline:
                owner = " on ".join(text.split()[:2]) or "(starting up)"
                raise OutputError(f"'{target}' is being written by another process (pid {owner}; lock file '{lock}'); "
                                  "wait for it to finish or write elsewhere; if that process is gone, delete the lock file")
            time.sleep(0.2)
            continue
        except OSError as err:
            raise output_error(target, err) from err
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_lock_text())
        return


def _clear_dead_writers_files(target: Path) -> None:
    """Delete the temporaries (``.NAME.tmp-PID``, ``.NAME.old-PID``) that writers of ``target`` killed before their
    cleanup left beside it; an old ``target`` moved aside by a writer killed while swapping is put back first.
    Called with ``target``'s lock held, so that no live writer of ``target`` owns them."""
    for leftover in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*")):
        kind, _, pid = leftover.name.removeprefix(f".{target.name}.").partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or (int(pid) != os.getpid() and _process_alive(int(pid))):
            continue
        if kind == "old" and not target.exists():
            os.replace(leftover, target)
            logger.warning("restored %s, which a killed writer had moved aside", target)
        elif leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _lock_is_stale(lock: Path, text: str) -> bool:
    """Whether the process that wrote the lock ``text`` is gone (a lock of another host is never stale)."""
    fields = text.split()
    if len(fields) < 2 or not fields[0].isdigit():  # empty or cut short: its writer died while creating it, or is
        try:                                         # creating it now
            return time.time() - lock.stat().st_mtime > _STALE_EMPTY_LOCK_S
        except FileNotFoundError:
            return False
    pid, host = int(fields[0]), fields[1]
    if host != socket.gethostname():
        return False
    if pid == os.getpid():  # not held by this process (output_lock checked): left by an earlier one with our pid
        return True
    return not _process_alive(pid)


@contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``path`` only if the block succeeds, under ``path``'s lock.

    An existing folder at ``path`` is replaced only once the new one is complete; on an exception
    the temporary folder is deleted and ``path`` is left as it was. Another process writing ``path``,
    an unwritable location or a full disk raise :class:`OutputError`.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise WeightwiseError(f"output '{target}' exists and is not a folder; remove it or choose another -o path")
    with output_lock(target):
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run that had the same pid
            tmp.mkdir()
        except OSError as err:
            raise output_error(target, err) from err
        try:
            yield tmp
            _usual_file_modes(tmp)
            _swap_in(tmp, target)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_write_error(err, tmp, target, target.parent):
                raise output_error(target, err) from err
            raise


def _usual_file_modes(folder: Path) -> None:
    """Give every file under ``folder`` the mode a new file gets under this process's umask (found by creating one):
    safetensors writes its files 0600, which would hide a model folder from the other users of a shared machine."""
    probe = folder / ".mode-probe"
    probe.touch()
    mode = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


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
    """Write ``data`` to a temporary sibling, flush it to disk, then rename it to ``path``.

    An unwritable location or a full disk raise :class:`OutputError` and leave ``path`` as it was.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with suppress(OSError):  # no tmp to remove when the folder itself could not be made
            tmp.unlink(missing_ok=True)
        if is_write_error(err, target.parent):
            raise output_error(target, err) from err
        raise
    return target


def _sorted_safetensors_header(header: bytes) -> bytes:
    """A safetensors header (the JSON after the 8-byte length) with its ``__metadata__`` keys sorted, padded with
    spaces to its old length. safetensors writes that map in a random order (its issue #584), so two saves of the
    same tensors and metadata would differ in their bytes."""
    parsed = json.loads(header)
    if len(parsed.get("__metadata__") or {}) < 2:
        return header
    parsed["__metadata__"] = dict(sorted(parsed["__metadata__"].items()))
    text = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > len(header):
        raise ValueError("the safetensors header grew when its metadata keys were sorted")
    return text + b" " * (len(header) - len(text))


def canonical_safetensors(data: bytes) -> bytes:
    """The bytes of a safetensors file with its metadata in sorted order: the same tensors and metadata always give
    the same bytes."""
    n = int.from_bytes(data[:8], "little")
    return data[:8] + _sorted_safetensors_header(data[8 : 8 + n]) + data[8 + n :]


def canonicalize_safetensors_file(path: str | os.PathLike) -> None:
    """Sort the metadata of the safetensors file ``path`` in place (see :func:`canonical_safetensors`)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = _sorted_safetensors_header(f.read(n))
        f.seek(8)
        f.write(header)


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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise WeightwiseError(f"'{path}' is corrupt ({e}); re-create the folder by re-running its command") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
        raise WeightwiseError(f"'{path}' has no 'kind' field; re-create the folder by re-running its command")
    return manifest


def check_run_folder(folder: str | os.PathLike) -> Path:
    """Refuse a weightwise output folder holding a symbolic link that resolves outside it, so that reading the
    run's files never reads another place's; returns ``folder``."""
    root = Path(folder).resolve()
    for where, dirs, files in os.walk(root):  # links to folders are listed, not entered
        for name in (*dirs, *files):
            entry = Path(where) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise WeightwiseError(
                    f"'{entry}' in the run folder '{folder}' is a link to '{entry.resolve()}', outside the folder; links "
                    "out of a run folder are not followed: replace the link by a copy of the file, or re-create the folder"
                )
    return Path(folder)


def folder_file(folder: str | os.PathLike, name: Any, listed_in: str | os.PathLike) -> Path:
    """``folder/name`` for a file name that ``listed_in`` (a manifest or index inside ``folder``) gives; a name that
    is absolute or climbs out with '..' is refused: such a file list names only the folder's own files."""
    parts = Path(name).parts if isinstance(name, str) and name else ()
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise WeightwiseError(f"'{listed_in}' names the file {name!r}, which is not inside '{folder}'; the folder "
                              "is damaged or was made to read other files: re-create or re-download it")
    return Path(folder) / name


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_fingerprint(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor], *,
                           ties: Mapping[str, str] | None = None) -> str:
    """Hex SHA-256 over sorted names, dtypes, shapes and bytes; tensors shared by several names count once.

    Shared tensors are found by their storage, or with ``ties`` (name → the first name in sorted order of the
    tensor it shares) from that map: for a state dict whose tensors are read one at a time, whose addresses repeat.
    """
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, torch.nn.Module)
        else model_or_state_dict
    )
    h = hashlib.sha256()
    first_name: dict[object, str] = {}
    for name in sorted(state):
        t = state[name].detach()
        if ties is not None:
            key: object = ties.get(name, name)
        else:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if key in first_name:
            h.update(f"same as {first_name[key]}\n".encode())
            continue
        first_name[key] = name
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        h.update(b"\n")
    return h.hexdigest()
