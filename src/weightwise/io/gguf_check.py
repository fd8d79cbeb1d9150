"""A bounds check of a GGUF file's header against the file's size, before gguf-py or transformers read it.

gguf-py's reader trusts the counts and lengths a file declares: an array claiming 2^32 entries makes it loop over
billions of empty reads past the end of the file (a hang that fills memory), a file claiming 2^63 key-value pairs
or tensors does the same. This walk reads the header with ``struct`` and refuses, before anything is allocated, any
count, length, type, dimension or tensor extent that the file's bytes cannot hold. Fixed-size arrays are skipped
in one step, so the walk costs one short loop per string (the default model's 100k tokenizer strings: ~0.1 s).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from weightwise.errors import WeightwiseError
from weightwise.io.model_checks import StoredWeights

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # what gguf-py reads
_MAX_DIMS = 4  # GGML_MAX_DIMS
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType → bytes
_ALIGNMENT_KEY = "general.alignment"


class _Corrupt(Exception):
    """Raised inside the walk; check_gguf turns it into a WeightwiseError naming the file."""


class _Walk:
    """A cursor over the mapped file that refuses to read past its end."""

    def __init__(self, data: mmap.mmap, order: str):
        self.data, self.order, self.pos, self.size = data, order, 0, len(data)

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            raise _Corrupt(f"{what} needs {n} bytes at offset {self.pos}, but the file has {self.size} bytes")

    def number(self, fmt: str, what: str) -> int | float:
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> bytes:
        n = self.number("Q", f"the length of {what}")
        self.need(n, f"{what} (declared {n} bytes long)")
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def skip_value(self, value_type: int, what: str, depth: int = 0) -> None:
        if value_type in _SCALAR_SIZES:
            self.need(_SCALAR_SIZES[value_type], what)
            self.pos += _SCALAR_SIZES[value_type]
        elif value_type == _STRING:
            self.string(what)
        elif value_type == _ARRAY and depth < 8:  # arrays of arrays: a few levels at most
            item_type = self.number("I", f"the item type of {what}")
            count = self.number("Q", f"the length of {what}")
            smallest = _SCALAR_SIZES.get(item_type, 8)  # a string or array item takes at least its 8-byte length
            self.need(count * smallest, f"{what} (declared {count} items)")
            if item_type in _SCALAR_SIZES:
                self.pos += count * smallest
            else:
                for _ in range(count):
                    self.skip_value(item_type, what, depth + 1)
        else:
            raise _Corrupt(f"{what} has the unknown value type {value_type}")


def check_gguf(path: str | os.PathLike) -> StoredWeights:
    """The tensors and elements a GGUF file holds; refused (:class:`WeightwiseError`) when its header declares more
    than the file holds: counts of key-value pairs or tensors, string and array lengths, value and tensor types,
    dimensions, tensor extents."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise _Corrupt("shorter than a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _check(data)
    except _Corrupt as err:
        raise WeightwiseError(f"'{path}' is truncated or corrupt (not a readable GGUF file: {err}); "
                              "re-create or re-download it") from None


def _check(data: mmap.mmap) -> StoredWeights:
    if data[:4] != _MAGIC:
        raise _Corrupt("no GGUF magic number")
    order = "<"
    version = struct.unpack_from("<I", data, 4)[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine (gguf-py reads those too)
        order, version = ">", struct.unpack_from(">I", data, 4)[0]
    if version not in _VERSIONS:
        raise _Corrupt(f"GGUF version {version}; versions {', '.join(map(str, _VERSIONS))} are readable")
    walk = _Walk(data, order)
    walk.pos = 8
    tensor_count = walk.number("Q", "the tensor count")
    kv_count = walk.number("Q", "the key-value count")
    walk.need(kv_count * 13, f"{kv_count} key-value pairs")  # key length 8, type 4, value ≥ 1
    keys: set[bytes] = set()
    alignment = 32
    for _ in range(kv_count):
        key = walk.string("a key")
        if key in keys:
            raise _Corrupt(f"the key {key[:80]!r} appears twice")
        keys.add(key)
        _utf8(key, "a key")
        value_type = walk.number("I", f"the type of {key[:80]!r}")
        if key == _ALIGNMENT_KEY.encode() and value_type == 4:
            alignment = int(walk.number("I", _ALIGNMENT_KEY))
            if alignment == 0 or alignment & (alignment - 1):
                raise _Corrupt(f"{_ALIGNMENT_KEY} {alignment} is not a power of two")
        else:
            walk.skip_value(value_type, repr(key[:80].decode("utf-8", "replace")))
    walk.need(tensor_count * 24, f"{tensor_count} tensor descriptions")  # name length 8, dims 4, type 4, offset 8
    extents = []
    for _ in range(tensor_count):
        name = _utf8(walk.string("a tensor name"), "a tensor name")
        n_dims = walk.number("I", f"the dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = [walk.number("Q", f"a dimension of tensor {name!r}") for _ in range(n_dims)]
        raw_type = walk.number("I", f"the type of tensor {name!r}")
        offset = walk.number("Q", f"the data offset of tensor {name!r}")
        extents.append((name, dims, raw_type, offset))
    data_start = -(-walk.pos // alignment) * alignment
    total = 0
    for name, dims, raw_type, offset in extents:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name!r} has the unknown type {raw_type}") from None
        elements = 1
        for dim in dims:
            elements *= dim
        if dims and dims[0] % block:
            raise _Corrupt(f"tensor {name!r} has rows of {dims[0]} values, not whole blocks of {block}")
        nbytes = elements // block * block_bytes
        if data_start + offset + nbytes > len(data):
            raise _Corrupt(f"tensor {name!r} ({'×'.join(map(str, dims))}, {nbytes} bytes at offset {offset}) "
                           f"ends past the end of the file ({len(data)} bytes)")
        total += elements
    return StoredWeights(len(extents), total, len(data))


def _utf8(text: bytes, what: str) -> str:
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise _Corrupt(f"{what} is not UTF-8 text ({text[:40]!r})") from None
