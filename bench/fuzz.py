"""Fuzzing: every reader of user files gets valid tiny inputs, mutated; each case must end in a WeightwiseError or
succeed, within a time and an address-space limit.

The inputs (built once per run in ``WORK/seeds`` in a fraction of a second, from a tiny random Llama and a
byte-level BPE tokenizer made here, no downloads): a Hugging Face model folder, a quantized run folder
(``weightwise.save`` of an int4 g32 RTN model, with metrics in its manifest), the GGUF file weightwise's own exporter
writes of that run, a sparse weight patch (int8 values), a tune run folder (a 2-step LIFT run of the tiny model),
JSONL tasks, select pools (.jsonl and .jsonl.gz), text files (.txt and {"text"} .jsonl), and YAML quantize, tune
and select configs. Each reader (:data:`READERS`: ``load_model`` on the GGUF file and the three folders,
``patch_info``, ``load_examples``, ``read_pool``, ``corpus``, the three ``from_yaml``, and ``read_manifest`` +
``load_metrics`` + ``gguf_tokenizer_source`` on a run) names the files of its input that mutations change.

A case copies the input, picks one of its files and applies one or two mutations (:func:`mutate`), all drawn from
``random.Random(f"{reader}:{case}")``, so a case number reproduces its input. The first is format-aware (65 % of
the time) or generic, a second one generic. Generic: truncation, bit flips, overwritten, inserted or deleted bytes,
invalid UTF-8, an empty file. Format-aware: safetensors header lengths of 2^63 or the file size, tensors claiming
1 TB or 2^63 bytes, wrong dtypes, shapes and offsets, NaN/Inf tensor data, damaged metadata; GGUF tensor and
key-value counts, string and array lengths of 2^63 or 2^32, absurd dimension counts, dimensions, value and tensor
types and offsets, metadata numbers (layer counts, sizes) of 0 to 2^32 - 1, NaN/Inf block scales and tensors,
non-UTF-8 keys, other versions; JSON/JSONL/YAML documents with a value replaced by NaN, Infinity, 2^63, 10^400, a
lone surrogate, a NUL, a path, 100 kB of text, a wrong type or 5,000 nested lists, a key deleted or added, whole
documents of 1,000 or 100,000 nested lists; YAML aliases that expand exponentially, Python tags, duplicate keys. A
patch whose tensors were changed gets its checksum recomputed half the time, so that the mutation reaches the
checks behind it. Before the random cases, :func:`absurd_cases` (hand-made inputs declaring absurd sizes: the
same ones tests/test_fuzz.py reads) are read once.

Outcomes: ``ok`` (read), ``refused`` (WeightwiseError), ``escaped`` (any other exception: a bug), ``hang`` (over
``--case-timeout``), ``crashed`` (the worker died). Cases run in worker processes (``--worker``) with
``RLIMIT_AS`` at ``--mem-mb`` (an allocation past it is a MemoryError or a RuntimeError: escaped) and a fresh
``WEIGHTWISE_CACHE`` per case; a hung or dead worker is replaced. Readers share the time equally (the next case
goes to the reader with the least time so far), so slow readers (a GGUF file converted) get fewer cases than fast
ones (a JSONL line).

    .venv/bin/python bench/fuzz.py --seconds 300                 # the run in bench/README.md
    .venv/bin/python bench/fuzz.py --quick                       # 30 s: the wiring
    .venv/bin/python bench/fuzz.py --only patch gguf --seconds 60
    .venv/bin/python bench/fuzz.py --reproduce gguf:17           # rerun one case in this process, with its traceback

Results: bench/results/fuzz.json and fuzz.md (``--quick``: fuzz-quick.*): the absurd inputs' outcomes, cases and
outcomes per reader, every case outside the contract with its mutation and error, and a sample of refusals (the
messages users read). Work files: runs/bench-fuzz/.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import queue
import random
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "runs" / "bench-fuzz"

# --- the inputs -----------------------------------------------------------------------------------


def bpe_tokenizer():
    """A byte-level BPE tokenizer (256 byte symbols, two merges, one special token) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"he": len(vocab), "ll": len(vocab) + 1, "<|endoftext|>": len(vocab) + 2})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer Llama (hidden 64) with tied embeddings, initialised under a forked, seeded RNG."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


TASKS = [{"prompt": "12+7", "response": "19"},
         {"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": "3+4"},
                       {"role": "assistant", "content": "7"}]},
         {"text": "Hello, world."},
         {"prompt": "5+5", "response": "10", "source": "extra keys are ignored"}]
RECIPE = {"format": "int4", "group_size": 32, "method": {"name": "gptq", "damp": 0.05},
          "overrides": [{"pattern": "mlp\\.down_proj$", "format": "int8", "granularity": "channel"}]}
TUNE = {"method": {"name": "lift", "density": 0.05, "filter_rank": 8}, "task": "tasks.jsonl", "max_steps": 2,
        "lr": 1e-4, "batch_size": 2, "targets": ["mlp"]}
SELECT = {"scorers": [{"name": "length"}], "budget": 2, "dedup": "exact"}


def build_seeds(folder: Path) -> Path:
    """Write every valid input into ``folder`` (skipped when already complete); returns ``folder``."""
    import safetensors.torch  # noqa: F401  (the patch module needs it loaded)
    import torch
    import yaml

    from weightwise.export.gguf import export_gguf
    from weightwise.io.artifacts import state_dict_fingerprint
    from weightwise.io.folders import save
    from weightwise.io.models import model_source_info
    from weightwise.quantize.api import quantize
    from weightwise.tune.api import tune
    from weightwise.tune.config import TuneConfig
    from weightwise.tune.patch import WeightPatch

    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tokenizer = bpe_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    qmodel = quantize(tiny_llama(len(tokenizer)), {"format": "int4", "group_size": 32})
    save(qmodel, folder / "run", tokenizer=tokenizer, metrics={"ppl": 20.5, "size_mb": 0.1})
    export_gguf(qmodel, tokenizer, folder / "model.gguf")
    (folder / "model.gguf.json").unlink()

    generator = torch.Generator().manual_seed(1)
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    tuned = {name: t.clone() for name, t in base.items()}
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        flat = tuned[name].view(-1)
        picked = torch.randperm(flat.numel(), generator=generator)[: flat.numel() // 100]
        flat[picked] += 0.01 * torch.randn(picked.numel(), generator=generator)
    patch = WeightPatch.from_models(base, tuned, {"base_model_hash": state_dict_fingerprint(model), "method": "fuzz"})
    patch.save(folder / "patch.safetensors", "int8")

    lines = "".join(json.dumps(record) + "\n" for record in TASKS)
    (folder / "tasks.jsonl").write_text(lines)
    (folder / "pool.jsonl").write_text(lines)
    (folder / "pool.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (folder / "text.txt").write_text("Plain text, one document.\nA second line: café, 名前.\n")
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("One document.", "Another: 名前.")))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (folder / "select.yaml").write_text(yaml.safe_dump(SELECT))
    (folder / "tune.yaml").write_text(yaml.safe_dump(TUNE))
    config = TuneConfig(**{**TUNE, "task": str(folder / "tasks.jsonl")}, train_examples=2, test_examples=0,
                        retention_max_tokens=0, eval_before=False, checkpoint_every=0)
    tune(model, tokenizer, config, folder / "tune-run", source=model_source_info(folder / "hf"))
    done.touch()
    return folder


# --- mutations ------------------------------------------------------------------------------------

HUGE = (2**63, 2**64 - 1, 2**62, 2**40, 2**32)  # counts and sizes no real file has


def set_u64(data: bytes, offset: int, value: int) -> bytes:
    """``data`` with the little-endian uint64 at ``offset`` replaced by ``value`` (mod 2^64)."""
    return data[:offset] + struct.pack("<Q", value % 2**64) + data[offset + 8:]


def set_u32(data: bytes, offset: int, value: int) -> bytes:
    """``data`` with the little-endian uint32 at ``offset`` replaced by ``value`` (mod 2^32)."""
    return data[:offset] + struct.pack("<I", value % 2**32) + data[offset + 4:]


def truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    at = rng.choice([0, 1, 7, 8, 9, rng.randrange(len(data) + 1), len(data) - 1]) if data else 0
    return data[:max(at, 0)], f"truncated to {max(at, 0)} of {len(data)} bytes"


def flip_bits(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if not data:
        return data, "no bits to flip"
    out = bytearray(data)
    spots = [rng.randrange(len(out)) for _ in range(rng.choice([1, 1, 2, 8]))]
    for at in spots:
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out), f"bits flipped at {spots}"


def overwrite(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    at = rng.randrange(len(data) + 1)
    chunk = rng.choice([b"\xff" * 8, b"\x00" * 8, b"\x80\x80\xfe", bytes(rng.randrange(256) for _ in range(16))])
    return data[:at] + chunk + data[at + len(chunk):], f"{len(chunk)} bytes overwritten at {at}"


def insert(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    at = rng.randrange(len(data) + 1)
    chunk = rng.choice([b"\x00", b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"{", b"\n", data[at:at + 64]])
    return data[:at] + chunk + data[at:], f"{chunk[:16]!r} inserted at {at}"


def delete(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    at = rng.randrange(len(data) + 1)
    n = rng.choice([1, 8, 100, len(data)])
    return data[:at] + data[at + n:], f"{n} bytes deleted at {at}"


def non_utf8(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    at = rng.randrange(len(data) + 1)
    return data[:at] + b"\xff\xc0\x80\xed\xa0\x80" + data[at:], f"invalid UTF-8 inserted at {at}"


def empty(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    return b"", "emptied"


GENERIC = (truncate, flip_bits, overwrite, insert, delete, non_utf8, empty)


# JSON-like documents (JSON, JSONL lines, YAML, safetensors metadata): replace, drop or add a value at a random place.

_DEEP = "__deeply_nested__"  # stands for 5,000 nested lists until the document is written (see _dumps)


def _special_values(rng: random.Random) -> list:
    return [_DEEP, None, True, -1, 0, 2**16, 2**20, 2**63, -(2**63), 10**400, 1e308, float("nan"), float("inf"), -float("inf"), "",
            "\ud800", "a\u0000b", "x" * 100_000, "../../etc/passwd", "/etc/passwd", [], {}, [1, "a", None], {"a": {"b": []}}]


def _paths(node, path=()) -> list[tuple]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*path, i))
    return found


def mutate_tree(tree, rng: random.Random):
    """A changed copy of a parsed JSON/YAML document, and what changed."""
    tree = json.loads(json.dumps(tree))
    path = rng.choice(_paths(tree))
    op = rng.choice(["replace", "replace", "replace", "drop", "add"])
    if not path or op == "replace":
        value = rng.choice(_special_values(rng))
        if not path:
            return value, f"document replaced by a {type(value).__name__}"
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        return tree, f"{'.'.join(map(str, path))} = {_short(value)}"
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if op == "drop":
        del parent[path[-1]]
        return tree, f"{'.'.join(map(str, path))} deleted"
    target = parent[path[-1]]
    if isinstance(target, dict):
        target["unknown_key"] = rng.choice(_special_values(rng))
    elif isinstance(target, list):
        target.append(rng.choice(_special_values(rng)))
    else:
        parent[path[-1]] = [target]
    return tree, f"{'.'.join(map(str, path))} extended"


def _short(value) -> str:
    if value == _DEEP:
        return "5,000 nested lists"
    text = _dumps(value)
    return text if len(text) < 40 else f"{text[:30]}… ({type(value).__name__}, {len(text)} chars)"


def _dumps(tree) -> str:
    return _deepen(json.dumps(tree))


def _deepen(text: str) -> str:
    """``text`` with the deep-nesting placeholder written out (json.dumps itself would recurse too deep)."""
    return text.replace(f'"{_DEEP}"', "[" * 5000 + "0" + "]" * 5000).replace(_DEEP, "[" * 5000 + "0" + "]" * 5000)


def mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    try:
        tree = json.loads(data)
    except (ValueError, RecursionError):
        return rng.choice(GENERIC)(data, rng)
    if rng.random() < 0.1:
        n = rng.choice([1000, 100_000])
        return ("[" * n + "]" * n).encode(), f"document replaced by {n} nested lists"
    tree, what = mutate_tree(tree, rng)
    return _dumps(tree).encode("utf-8", "surrogatepass"), what


def mutate_jsonl(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    lines = data.split(b"\n")
    at = rng.randrange(len(lines))
    new, what = mutate_json(lines[at], rng)
    lines[at] = new.replace(b"\n", b" ")
    return b"\n".join(lines), f"line {at + 1}: {what}"


# YAML aliases that expand to 9^9 (387 million) items where anything walks the document ("billion laughs").
LAUGHS = b"".join(f"{name}: &{name} [{', '.join([f'*{prev}' if prev else 'x'] * 9)}]\n".encode()
                  for prev, name in zip(["", *"abcdefgh"], "abcdefghi")) + b"format: [*i, *i]\n"


def mutate_yaml(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    import yaml

    tricks = [
        (LAUGHS, "exponential aliases (billion laughs)"),
        (b"format: !!python/object/apply:os.system ['echo pwned']\n", "a python/object tag"),
        (b"[" * 10_000 + b"]" * 10_000, "10,000 nested flow lists"),
        (b"format: int4\nformat: int8\n", "a duplicate key"),
        (b"group_size: .nan\nformat: .inf\n", "YAML NaN and infinity"),
        (b"\t- x\n  : [", "invalid YAML"),
        (b"--- 1\n--- 2\n", "two documents"),
    ]
    if rng.random() < 0.25:
        text, what = rng.choice(tricks)
        return text, what
    try:
        tree = yaml.safe_load(data)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError):
        return rng.choice(GENERIC)(data, rng)
    tree, what = mutate_tree(tree, rng)
    try:
        text = _deepen(yaml.safe_dump(tree, allow_unicode=True))
    except yaml.YAMLError:
        text = _dumps(tree)  # JSON is YAML
    return text.encode("utf-8", "surrogatepass"), what


# safetensors: an 8-byte little-endian header length, a JSON header, the tensor bytes.

_ST_DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "F4", "XYZ", 3]
_NAN_BITS = {"F32": struct.pack("<I", 0x7FC00000), "F16": struct.pack("<H", 0x7E00), "BF16": struct.pack("<H", 0x7FC0),
             "F64": struct.pack("<Q", 0x7FF8000000000000)}
_INF_BITS = {"F32": struct.pack("<I", 0x7F800000), "F16": struct.pack("<H", 0x7C00), "BF16": struct.pack("<H", 0x7F80),
             "F64": struct.pack("<Q", 0x7FF0000000000000)}


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: dict, body: bytes) -> bytes:
    text = _dumps(header).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    try:
        header, body = split_safetensors(data)
        names = [k for k in header if k != "__metadata__"]
    except (ValueError, RecursionError, UnicodeDecodeError):
        return rng.choice(GENERIC)(data, rng)
    op = rng.choice(["length", "dtype", "shape", "offsets", "nan", "metadata", "rename"] if names else ["length", "metadata"])
    if op == "length":
        n = rng.choice([*HUGE, len(data), len(data) - 8, int.from_bytes(data[:8], "little") + 1, 0, 1])
        return set_u64(data, 0, n), f"header length {n}"
    if op == "metadata":
        meta = header.get("__metadata__") or {}
        key = rng.choice(sorted(meta)) if meta and rng.random() < 0.7 else None
        if key is not None and rng.random() < 0.6:
            try:
                inner, what = mutate_tree(json.loads(meta[key]), rng)
                meta[key] = _dumps(inner)
            except (ValueError, RecursionError):
                meta[key], what = "x", "not JSON"
            header["__metadata__"] = meta
            return join_safetensors(header, body), f"metadata {key}: {what}"
        header, what = mutate_tree(header, rng)
        return join_safetensors(header, body), f"header: {what}"
    name = rng.choice(names)
    entry = header[name]
    if op == "dtype":
        entry["dtype"] = rng.choice(_ST_DTYPES)
        return join_safetensors(header, body), f"{name} dtype {entry['dtype']}"
    if op == "shape":
        shape = entry.get("shape", [])
        entry["shape"] = rng.choice([[], [0], [2**62, 2**62], [2**40], [-1], shape[::-1], [*shape, 1], [d * 2 for d in shape], ["a"]])
        return join_safetensors(header, body), f"{name} shape {entry['shape']}"
    if op == "offsets":
        begin, end = entry.get("data_offsets", [0, 0])
        entry["data_offsets"] = rng.choice([[0, 10**12], [0, 2**63], [end, begin], [begin + 1, end + 1], [0, 0], [begin, 2**64 - 1]])
        return join_safetensors(header, body), f"{name} data_offsets {entry['data_offsets']} (1 TB and more)"
    if op == "nan":
        floats = [k for k in names if isinstance(header[k], dict) and header[k].get("dtype") in _NAN_BITS
                  and [type(v) for v in header[k].get("data_offsets", ())] == [int, int]]
        if not floats:
            return join_safetensors(header, body), "no float tensor for NaN"
        name = rng.choice(floats)
        begin, end = header[name]["data_offsets"]
        bits = rng.choice([_NAN_BITS, _INF_BITS])[header[name]["dtype"]]
        n = (end - begin) // len(bits)
        count = rng.choice([1, n])
        out = bytearray(body)
        for i in rng.sample(range(n), min(count, n)):
            out[begin + i * len(bits): begin + (i + 1) * len(bits)] = bits
        return join_safetensors(header, bytes(out)), f"{name}: {min(count, n)} values {'NaN' if bits in _NAN_BITS.values() else 'Inf'}"
    header[name + rng.choice(["", ".x", "\u00e9"])] = header.pop(name) if rng.random() < 0.5 else dict(entry)
    return join_safetensors(header, body), f"{name} renamed or duplicated"


# GGUF: the positions of every count, length, type and offset, read from the valid file with gguf-py.

def gguf_layout(data: bytes) -> dict[str, list[int]]:
    """Offsets of the header's numbers in a valid GGUF file: kind → offsets."""
    from gguf import GGUFReader, GGUFValueType

    path = WORK / f".layout-{os.getpid()}.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    try:
        reader = GGUFReader(path)
        base = reader.data.__array_interface__["data"][0]

        def at(part) -> int:
            return part.__array_interface__["data"][0] - base

        layout: dict[str, list[int]] = {"tensor_count": [8], "kv_count": [16], "version": [4], "string_len": [],
                                        "key_text": [], "value_type": [], "array_len": [], "array_type": [], "n_dims": [],
                                        "dim": [], "tensor_type": [], "tensor_offset": [], "f32_data": [], "f16_data": [],
                                        "block_scale": [], "u32_value": [], "f32_value": []}
        for name, field in reader.fields.items():
            if name.startswith("GGUF."):
                continue
            layout["string_len"].append(at(field.parts[0]))
            layout["key_text"].append(at(field.parts[1]))
            layout["value_type"].append(at(field.parts[2]))
            if field.types[0] == GGUFValueType.ARRAY:
                layout["array_type"].append(at(field.parts[3]))
                layout["array_len"].append(at(field.parts[4]))
                if field.types[-1] == GGUFValueType.STRING and len(field.parts) > 5:
                    layout["string_len"].append(at(field.parts[5]))
            elif field.types[0] == GGUFValueType.STRING:
                layout["string_len"].append(at(field.parts[3]))
            elif field.types[0] in (GGUFValueType.UINT32, GGUFValueType.INT32):
                layout["u32_value"].append(at(field.parts[3]))
            elif field.types[0] == GGUFValueType.FLOAT32:
                layout["f32_value"].append(at(field.parts[3]))
        for tensor in reader.tensors:
            parts = tensor.field.parts
            layout["string_len"].append(at(parts[0]))
            layout["n_dims"].append(at(parts[2]))
            layout["dim"] += [at(parts[3]) + 8 * i for i in range(len(parts[3]))]
            layout["tensor_type"].append(at(parts[4]))
            layout["tensor_offset"].append(at(parts[5]))
            kind = {"F32": "f32_data", "F16": "f16_data"}.get(tensor.tensor_type.name, "block_scale")
            layout[kind].append(int(tensor.data_offset))
        del reader
        return layout
    finally:
        path.unlink(missing_ok=True)


def mutate_gguf(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    try:
        layout = gguf_layout(data)
    except Exception:  # a file already mutated: only generic changes
        return rng.choice(GENERIC)(data, rng)
    kind = rng.choice([k for k, v in layout.items() if v])
    at = rng.choice(layout[kind])
    if kind in ("tensor_count", "kv_count", "string_len", "array_len", "dim", "tensor_offset"):
        value = rng.choice([*HUGE, len(data), len(data) - at, struct.unpack_from("<Q", data, at)[0] + 1, 0])
        return set_u64(data, at, value), f"{kind} at {at} = {value}"
    if kind in ("version", "value_type", "array_type", "n_dims", "tensor_type"):
        value = rng.choice([0, 1, 2, 3, 4, 9, 13, 39, 99, 2**31, 2**32 - 1])
        return set_u32(data, at, value), f"{kind} at {at} = {value}"
    if kind == "u32_value":  # a metadata number: block count, embedding length, head count, ...
        value = rng.choice([0, 1, 3, 2**12, 2**16, 2**20, 2**31, 2**32 - 1])
        return set_u32(data, at, value), f"metadata value at {at} = {value}"
    if kind == "f32_value":
        value = rng.choice([float("nan"), float("inf"), 0.0, -1.0, 1e30])
        return data[:at] + struct.pack("<f", value) + data[at + 4:], f"metadata value at {at} = {value}"
    if kind == "key_text":
        return data[:at] + b"\xff" + data[at + 1:], f"key at {at} not UTF-8"
    bits = {"f32_data": _NAN_BITS["F32"], "f16_data": _NAN_BITS["F16"], "block_scale": _NAN_BITS["F16"]}[kind]
    if rng.random() < 0.5:
        bits = {"f32_data": _INF_BITS["F32"]}.get(kind, _INF_BITS["F16"])
    return data[:at] + bits + data[at + len(bits):], f"{kind} at {at} set to {bits.hex()} (NaN/Inf)"


def mutate_gz(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.5:
        return rng.choice(GENERIC)(data, rng)
    try:
        inner = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return rng.choice(GENERIC)(data, rng)
    new, what = mutate_jsonl(inner, rng)
    return gzip.compress(new), f"inside the gzip: {what}"


FORMATS: dict[str, Callable[[bytes, random.Random], tuple[bytes, str]]] = {
    ".safetensors": mutate_safetensors, ".gguf": mutate_gguf, ".json": mutate_json, ".jsonl": mutate_jsonl,
    ".yaml": mutate_yaml, ".gz": mutate_gz,
}


def mutate(data: bytes, suffix: str, rng: random.Random) -> tuple[bytes, str]:
    """One or two mutations of ``data`` (a valid file with ``suffix``): the first format-aware (for known formats,
    65 % of the time: they map the valid file, e.g. with gguf-py, which would hang on a mutated one), a second
    generic."""
    whats = []
    for round_ in range(rng.choice([1, 1, 1, 2])):
        aware = FORMATS.get(suffix) if round_ == 0 else None
        mutation = aware if aware is not None and rng.random() < 0.65 else rng.choice(GENERIC)
        data, what = mutation(data, rng)
        whats.append(what)
    return data, "; ".join(whats)


def resign_patch(data: bytes) -> bytes:
    """A weight patch whose tensors changed, with its payload checksum recomputed (unchanged when unreadable)."""
    import safetensors.torch

    from weightwise.io.artifacts import state_dict_fingerprint

    try:
        header, body = split_safetensors(data)
        meta = header["__metadata__"]
        patch_header = json.loads(meta["weightwise.patch"])
        patch_header["payload_sha256"] = state_dict_fingerprint(safetensors.torch.load(data))
        meta["weightwise.patch"] = json.dumps(patch_header)
        return join_safetensors(header, body)
    except Exception:  # not decodable: leave it as it is
        return data


# --- the readers ----------------------------------------------------------------------------------


def _load(path: Path):
    from weightwise.io.models import load_model

    model, tokenizer = load_model(path)
    return type(model).__name__


def _patch(path: Path):
    from weightwise.tune.patch import patch_info

    return patch_info(path)["entries"]


def _tasks(path: Path):
    from weightwise.data.tasks import load_examples

    return len(load_examples(path))


def _pool(path: Path):
    from weightwise.select.pool import read_pool

    return len(read_pool(path))


def _text(path: Path):
    from weightwise.data.corpora import corpus

    return len(corpus(str(path)))


def _recipe(path: Path):
    from weightwise.quantize.recipe import QuantRecipe

    return QuantRecipe.from_yaml(path).format


def _tune_config(path: Path):
    from weightwise.tune.config import TuneConfig

    return TuneConfig.from_yaml(path).method.name


def _select_config(path: Path):
    from weightwise.select.config import SelectConfig

    return SelectConfig.from_yaml(path).budget


def _manifest(path: Path):
    from weightwise.evaluate import load_metrics
    from weightwise.export import gguf_tokenizer_source
    from weightwise.io.artifacts import read_manifest

    return read_manifest(path)["kind"], len(load_metrics(path)), str(gguf_tokenizer_source(path))


@dataclass(frozen=True)
class Reader:
    """A reader of user files: the input it reads (a file or folder in the seeds), the files of it that mutations
    change (relative to the input; "" = the input file itself) and the call."""

    name: str
    seed: str
    files: tuple[str, ...]
    read: Callable[[Path], object]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
READERS = {r.name: r for r in [
    Reader("gguf", "model.gguf", ("",), _load),
    Reader("hf-folder", "hf", ("model.safetensors", "model.safetensors", "config.json", *_TOKENIZER_FILES), _load),
    Reader("quantized-run", "run", ("model.safetensors", "model.safetensors", "manifest.json", "manifest.json", "config.json",
                                    *_TOKENIZER_FILES), _load),
    Reader("tune-run", "tune-run", ("manifest.json", "patch.safetensors"), _load),
    Reader("patch", "patch.safetensors", ("",), _patch),
    Reader("tasks", "tasks.jsonl", ("",), _tasks),
    Reader("pool", "pool.jsonl", ("",), _pool),
    Reader("pool-gz", "pool.jsonl.gz", ("",), _pool),
    Reader("text", "text.txt", ("",), _text),
    Reader("text-jsonl", "texts.jsonl", ("",), _text),
    Reader("recipe", "recipe.yaml", ("",), _recipe),
    Reader("tune-config", "tune.yaml", ("",), _tune_config),
    Reader("select-config", "select.yaml", ("",), _select_config),
    Reader("manifest", "run", ("manifest.json",), _manifest),
]}


def case_rng(reader: str, case: int) -> random.Random:
    """The random stream of case ``case`` of ``reader``: the same case number makes the same input."""
    return random.Random(f"{reader}:{case}")


def _copy(seeds: Path, name: str, where: Path) -> Path:
    """A copy of the input ``name`` (a file or folder) in ``where``."""
    source, target = seeds / name, where / name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target


def make_case(reader: Reader, rng: random.Random, seeds: Path, where: Path) -> tuple[Path, str]:
    """Copy the reader's input to ``where`` and mutate one of its files with draws from ``rng``; (input, mutation)."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    target = _copy(seeds, reader.seed, where)
    name = rng.choice(reader.files)
    file = target / name if name else target
    data, what = mutate(file.read_bytes(), "".join(file.suffixes[-1:]), rng)
    if file.name == "patch.safetensors" or reader.name == "patch":
        data = resign_patch(data) if rng.random() < 0.5 else data
    file.write_bytes(data)
    return target, f"{name or target.name}: {what}"


def _edit(file: Path, change: Callable[[bytes], bytes]) -> None:
    file.write_bytes(change(file.read_bytes()))


def _edit_json(file: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def _edit_safetensors_header(file: Path, change: Callable[[dict], None]) -> None:
    header, body = split_safetensors(file.read_bytes())
    change(header)
    file.write_bytes(join_safetensors(header, body))


def _gguf_value_offset(path: Path, key: str) -> int:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    offset = reader.fields[key].parts[3].__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]
    del reader
    return offset


def _patch_header(header: dict, change: Callable[[dict], None]) -> None:
    inner = json.loads(header["__metadata__"]["weightwise.patch"])
    change(inner)
    header["__metadata__"]["weightwise.patch"] = json.dumps(inner)


def absurd_cases(seeds: Path, where: Path) -> dict[str, tuple[str, Path]]:
    """Hand-made inputs declaring absurd sizes, counts or lengths, written under ``where``: label → (reader, input).
    Each must be read or refused at once, without allocating what it declares (all but the patch of a 2^62 × 2^62
    tensor, a valid patch of a few entries, are refused)."""
    where.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[str, Path]] = {}

    def case(label: str, reader: str, seed: str, file: str, change: Callable[[Path], None]) -> None:
        folder = where / f"case-{len(cases)}"
        folder.mkdir()
        target = _copy(seeds, seed, folder)
        change(target / file if file else target)
        cases[label] = (reader, target)

    tokens_len = gguf_layout((seeds / "model.gguf").read_bytes())["array_len"][0]
    layers_at = _gguf_value_offset(seeds / "model.gguf", "llama.block_count")
    case("gguf: 2^63 tensors", "gguf", "model.gguf", "", lambda f: _edit(f, lambda d: set_u64(d, 8, 2**63)))
    case("gguf: 2^63 key-value pairs", "gguf", "model.gguf", "", lambda f: _edit(f, lambda d: set_u64(d, 16, 2**63)))
    case("gguf: a key of 2^63 bytes", "gguf", "model.gguf", "", lambda f: _edit(f, lambda d: set_u64(d, 24, 2**63)))
    case("gguf: an array of 2^32 items", "gguf", "model.gguf", "",
         lambda f: _edit(f, lambda d: set_u64(d, tokens_len, 2**32)))
    case("gguf: 2^32 - 1 layers", "gguf", "model.gguf", "",
         lambda f: _edit(f, lambda d: set_u32(d, layers_at, 2**32 - 1)))
    case("gguf: 4,096 layers", "gguf", "model.gguf", "", lambda f: _edit(f, lambda d: set_u32(d, layers_at, 4096)))
    case("safetensors: a header of 2^63 bytes", "hf-folder", "hf", "model.safetensors",
         lambda f: _edit(f, lambda d: set_u64(d, 0, 2**63)))
    case("safetensors: a tensor of 1 TB", "hf-folder", "hf", "model.safetensors",
         lambda f: _edit_safetensors_header(f, lambda h: h["model.embed_tokens.weight"].update(
             data_offsets=[0, 10**12])))
    case("config.json: hidden size 2^16", "hf-folder", "hf", "config.json",
         lambda f: _edit_json(f, lambda c: c.update(hidden_size=2**16)))
    case("config.json: 2^31 layers", "hf-folder", "hf", "config.json",
         lambda f: _edit_json(f, lambda c: c.update(num_hidden_layers=2**31)))
    case("quantized run: vocabulary of 2^30", "quantized-run", "run", "config.json",
         lambda f: _edit_json(f, lambda c: c.update(vocab_size=2**30)))
    case("patch: a tensor of 2^62 × 2^62", "patch", "patch.safetensors", "", lambda f: _edit_safetensors_header(
        f, lambda h: _patch_header(h, lambda p: next(iter(p["tensors"].values())).update(shape=[2**62, 2**62]))))
    case("patch: 2^63 entries", "patch", "patch.safetensors", "", lambda f: _edit_safetensors_header(
        f, lambda h: _patch_header(h, lambda p: next(iter(p["tensors"].values())).update(count=2**63))))
    case("recipe: exponential YAML aliases", "recipe", "recipe.yaml", "", lambda f: f.write_bytes(LAUGHS))
    case("tasks: a line of 100,000 nested lists", "tasks", "tasks.jsonl", "",
         lambda f: f.write_text("[" * 100_000 + "]" * 100_000 + "\n"))
    return cases


# --- running cases --------------------------------------------------------------------------------


def run_case(reader: Reader, path: Path, where: Path) -> dict:
    """Read the input ``path`` (made in ``where``) in this process: its outcome, error and time."""
    from weightwise.errors import WeightwiseError

    os.environ["WEIGHTWISE_CACHE"] = str(where / "cache")  # this case's own cache, deleted with the case
    start = time.perf_counter()
    row = {"reader": reader.name}
    try:
        reader.read(path)
        row["outcome"] = "ok"
    except WeightwiseError as err:
        row.update(outcome="refused", error=_clean(err), one_line="\n" not in str(err))
    except Exception as err:  # noqa: BLE001 — an escape is what this bench looks for
        frames = traceback.extract_tb(err.__traceback__)
        ours = [f for f in frames if "weightwise" in f.filename]
        where_ = ours[-1] if ours else frames[-1]
        row.update(outcome="escaped", error=f"{type(err).__name__}: {_clean(err)}",
                   at=f"{Path(where_.filename).name}:{where_.lineno} ({where_.name})")
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _clean(err: Exception) -> str:
    """The start of an error message as writable text (a message may quote a lone surrogate)."""
    return str(err)[:300].encode("utf-8", "backslashreplace").decode("utf-8")


def worker(seeds: Path, scratch: Path, mem_mb: int) -> None:
    """Read cases as JSON lines on stdin (``{"reader", "case"}``: make the case; ``{"reader", "path"}``: an input
    made already, left in place), answer each with its mutation and then its outcome, under an address-space limit."""
    import logging

    logging.disable(logging.WARNING)  # refused inputs log warnings; the outcome says enough
    limit = mem_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import weightwise.io.models  # noqa: F401  (imported once, before the first case's clock starts)
    import weightwise.tune.runs  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        reader = READERS[job["reader"]]
        if "path" in job:
            path, what, where = Path(job["path"]), job["path"], scratch / f"{reader.name}-given"
        else:
            where = scratch / f"{reader.name}-{job['case']}"
            path, what = make_case(reader, case_rng(reader.name, job["case"]), seeds, where)
        print(json.dumps({"mutation": what}), flush=True)  # first, so that a hang or a crash still names its input
        try:
            row = run_case(reader, path, where)
        except MemoryError:
            row = {"reader": reader.name, "outcome": "escaped", "error": "MemoryError (address-space limit)"}
        if "path" not in job:
            shutil.rmtree(where, ignore_errors=True)
        print(json.dumps({**row, **{k: v for k, v in job.items() if k != "reader"}}), flush=True)


class Worker:
    """A worker process (this script with --worker) and the pipe to it."""

    def __init__(self, seeds: Path, scratch: Path, mem_mb: int):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(seeds), "--scratch", str(scratch),
                                      "--mem-mb", str(mem_mb)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if self._line(300) is None:
            raise RuntimeError("the fuzz worker did not start")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the worker exited

    def _line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def run(self, job: dict, timeout: float) -> dict:
        """The outcome of ``job`` (see :func:`worker`), or a hang after ``timeout`` seconds (the worker is then
        stopped), or a crash (the worker died)."""
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        announced = self._line(60)  # the mutation (making a case takes well under a second)
        mutation = json.loads(announced)["mutation"] if announced else "(not made)"
        start = time.perf_counter()
        line = self._line(timeout) if announced else None
        if line is not None:
            return {**json.loads(line), "mutation": mutation}
        row = {**job, "mutation": mutation, "seconds": round(time.perf_counter() - start, 1)}
        if self.proc.poll() is None:
            self.stop()
            return {**row, "outcome": "hang"}
        return {**row, "outcome": "crashed", "error": f"exit code {self.proc.returncode}"}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_absurd(cases: dict[str, tuple[str, Path]], seeds: Path, scratch: Path, mem_mb: int,
               case_timeout: float) -> list[dict]:
    """The outcome of each :func:`absurd_cases` input, read by a worker (replaced when one hangs or dies)."""
    rows = []
    current = Worker(seeds, scratch, mem_mb)
    try:
        for label, (reader, path) in cases.items():
            if not current.alive():
                current = Worker(seeds, scratch, mem_mb)
            rows.append({**current.run({"reader": reader, "path": str(path)}, case_timeout), "case": label})
    finally:
        current.stop()
    return rows


def fuzz(readers: list[str], seconds: float, seeds: Path, scratch: Path, mem_mb: int, case_timeout: float,
         first_case: int = 0) -> list[dict]:
    """Cases for ``seconds`` of wall-clock, the next one always for the reader with the least time so far."""
    spent = {name: 0.0 for name in readers}
    next_case = {name: first_case for name in readers}
    rows: list[dict] = []
    current = Worker(seeds, scratch, mem_mb)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            name = min(spent, key=spent.get)
            start = time.monotonic()
            row = current.run({"reader": name, "case": next_case[name]}, case_timeout)
            spent[name] += time.monotonic() - start
            next_case[name] += 1
            rows.append(row)
            if row["outcome"] not in ("ok", "refused"):
                print(f"{row['outcome']}: {name}:{row['case']} {row.get('mutation', '')} -> {row.get('error', '')}", flush=True)
            if not current.alive():
                current = Worker(seeds, scratch, mem_mb)
    finally:
        current.stop()
    return rows


# --- the report -----------------------------------------------------------------------------------

OUTCOMES = ("ok", "refused", "escaped", "hang", "crashed")


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per reader: cases, outcome counts, multi-line refusals, median and max seconds."""
    table: dict[str, dict] = {}
    for row in rows:
        entry = table.setdefault(row["reader"], {"cases": 0, **{o: 0 for o in OUTCOMES}, "multi_line": 0, "seconds": []})
        entry["cases"] += 1
        entry[row["outcome"]] += 1
        entry["multi_line"] += row.get("one_line") is False
        entry["seconds"].append(row.get("seconds", 0.0))
    for entry in table.values():
        times = sorted(entry.pop("seconds"))
        entry["median_s"], entry["max_s"] = times[len(times) // 2], times[-1]
    return table


def sample_refusals(rows: list[dict], per_reader: int = 5) -> dict[str, list[dict]]:
    """A few refusals per reader (case, mutation, message), one per distinct message start: what users would read."""
    sample: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["outcome"] == "refused":
            kinds = sample.setdefault(row["reader"], {})
            key = row["error"].replace(str(WORK), "").split("(")[0][-60:]
            if key not in kinds and len(kinds) < per_reader:
                kinds[key] = {k: row[k] for k in ("case", "mutation", "error")}
    return {reader: list(kinds.values()) for reader, kinds in sample.items()}


def markdown(table: dict[str, dict], rows: list[dict], settings: dict, targeted: list[dict]) -> str:
    lines = ["Hand-made inputs declaring absurd sizes (each read by a worker under the same limits):", "",
             "| input | reader | outcome | s | message |", "|---|---|---|---:|---|"]
    lines += [f"| {r['case']} | {r['reader']} | {r['outcome']} | {r.get('seconds', 0):.2f} | "
              f"{r.get('error', '').replace(str(WORK), '…').split(';')[0][:120].replace('|', '/')} |" for r in targeted]
    lines += ["", f"Fuzzing: {settings['seconds']} s, {sum(t['cases'] for t in table.values())} cases, address space ≤ "
             f"{settings['mem_mb']} MB, {settings['case_timeout']} s per case",
             "", "| reader | cases | ok | refused | escaped | hang | crashed | median s | max s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t in table.items():
        lines.append(f"| {name} | {t['cases']} | {t['ok']} | {t['refused']} | {t['escaped']} | {t['hang']} | "
                     f"{t['crashed']} | {t['median_s']:.3f} | {t['max_s']:.2f} |")
    bad = [r for r in rows if r["outcome"] not in ("ok", "refused")]
    lines += ["", f"Cases outside the contract: {len(bad)}"]
    lines += [f"- `{r['reader']}:{r['case']}` {r['outcome']}: {r.get('mutation', '')} → {r.get('error', '')} {r.get('at', '')}"
              for r in bad[:50]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="wall-clock budget of the whole run")
    parser.add_argument("--quick", action="store_true", help="30 s: checks the wiring")
    parser.add_argument("--only", nargs="+", choices=sorted(READERS), help="these readers only")
    parser.add_argument("--mem-mb", type=int, default=3072, help="address-space limit of a worker (RLIMIT_AS)")
    parser.add_argument("--case-timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--first-case", type=int, default=0, help="case number each reader starts at")
    parser.add_argument("--reproduce", metavar="READER:CASE", help="rerun one case here, raising its exception")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, default=WORK / "cases", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seeds = WORK / "seeds"
    if args.worker:
        worker(args.worker, args.scratch, args.mem_mb)
        return
    build_seeds(seeds)
    if args.reproduce:
        name, case = args.reproduce.split(":")
        path, what = make_case(READERS[name], case_rng(name, int(case)), seeds, WORK / "reproduce")
        print(f"{path}: {what}", flush=True)
        os.environ["WEIGHTWISE_CACHE"] = str(WORK / "reproduce" / "cache")
        print(READERS[name].read(path))
        return
    seconds = 30.0 if args.quick else args.seconds
    readers = args.only or sorted(READERS)
    started = time.perf_counter()
    shutil.rmtree(WORK / "absurd", ignore_errors=True)
    absurd = {label: case for label, case in absurd_cases(seeds, WORK / "absurd").items() if case[0] in readers}
    targeted = run_absurd(absurd, seeds, args.scratch, args.mem_mb, args.case_timeout)
    shutil.rmtree(WORK / "absurd", ignore_errors=True)
    rows = fuzz(readers, seconds, seeds, args.scratch, args.mem_mb, args.case_timeout, args.first_case)
    settings = {"seconds": seconds, "mem_mb": args.mem_mb, "case_timeout": args.case_timeout, "readers": readers,
                "first_case": args.first_case, "wall_s": round(time.perf_counter() - started, 1)}
    table = summarize(rows)
    from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic

    stem = "fuzz-quick" if args.quick else "fuzz"
    outside = [r for r in rows if r["outcome"] not in ("ok", "refused")]
    write_json_atomic(RESULTS / f"{stem}.json", {"settings": settings, "versions": environment_versions(),
                                                 "readers": table, "absurd": targeted, "outside_contract": outside,
                                                 "refusals": sample_refusals(rows)})
    text = markdown(table, rows, settings, targeted)
    write_text_atomic(RESULTS / f"{stem}.md", text)
    print(text)


if __name__ == "__main__":
    main()
