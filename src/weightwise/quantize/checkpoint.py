"""Resume a calibrated quantization after a kill: each finished block's quantized layers (and its other
tensors, which scale migration may have changed) are saved (safetensors, written atomically) with a
progress file keyed by recipe, source and calibration data. A block's file holds the whole block, so a
streamed quantization also uses these files as the shards of its output."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from weightwise.io.artifacts import write_bytes_atomic, write_json_atomic
from weightwise.io.lazy import set_tensor
from weightwise.qlinear import QuantizedLinear
from weightwise.records import LayerRecord

logger = logging.getLogger(__name__)

_PROGRESS = "progress.json"


class BlockCheckpoint:
    """Blocks done so far in ``folder``; stale progress (another recipe, model or data) is discarded."""

    def __init__(self, folder: str | Path, recipe: dict, source_fingerprint: str, tokens: torch.Tensor | None):
        self.folder = Path(folder)
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
        digest.update(source_fingerprint.encode())
        if tokens is not None:  # None: a method without calibration
            digest.update(tokens.numpy().tobytes())
        self.key = digest.hexdigest()

    def progress(self) -> tuple[int, dict[str, LayerRecord]]:
        """(blocks done, their layers' records) by an earlier run with the same key; a stale folder is deleted."""
        state = self._state()
        if state is None:
            return 0, {}
        if state["blocks_done"]:
            logger.info("resuming after block %d from %s", state["blocks_done"], self.folder)
        return state["blocks_done"], {name: LayerRecord.model_validate(record) for name, record in state["layers"].items()}

    def restore_block(self, index: int, modules: dict[str, nn.Module]) -> dict[str, tuple[QuantizedLinear, LayerRecord]]:
        """Put block ``index``'s saved float tensors back (into real tensors, or in place of meta ones) and return its
        rebuilt QuantizedLinear modules with their records, by name (``modules``: the model's modules by name)."""
        state = self._state()
        if state is None or index >= state["blocks_done"]:
            raise ValueError(f"block {index} is not in the checkpoint {self.folder}")
        records = {name: LayerRecord.model_validate(state["layers"][name]) for name in state["blocks"][index]}
        saved = safetensors.torch.load_file(str(self.block_file(index)))
        rebuilt: dict[str, tuple[QuantizedLinear, LayerRecord]] = {}
        for name, record in records.items():
            qlinear = QuantizedLinear.empty_like(modules[name], record)
            qlinear.load_state_dict({key.removeprefix(name + "."): value for key, value in saved.items()
                                     if key.startswith(name + ".")})
            rebuilt[name] = (qlinear, record)
        for key in state.get("float", {}).get(str(index), []):
            owner, _, attr = key.rpartition(".")
            set_tensor(modules[owner], attr, saved[key])
        return rebuilt

    def block_file(self, index: int) -> Path:
        """The safetensors file of block ``index``: every tensor of the block, by full name."""
        return self.folder / f"block_{index:04d}.safetensors"

    def _state(self) -> dict | None:
        """The progress file's content if it belongs to this key (None if absent; a stale folder is deleted)."""
        progress = self.folder / _PROGRESS
        if not progress.is_file():
            return None
        state = json.loads(progress.read_text())
        if state.get("key") != self.key:
            logger.warning("ignoring %s: it belongs to another recipe, model or calibration set", self.folder)
            shutil.rmtree(self.folder)
            return None
        return state

    def save_block(self, index: int, qlinears: dict[str, QuantizedLinear], records: dict[str, LayerRecord],
                   float_state: dict[str, torch.Tensor] | None = None) -> None:
        """Record block ``index`` (its quantized layers, and ``float_state``: its other tensors by full name) as done."""
        self.folder.mkdir(parents=True, exist_ok=True)
        flat = {f"{name}.{key}": value.cpu().contiguous() for name, module in qlinears.items() for key, value in module.state_dict().items()}
        flat.update({key: value.cpu().contiguous() for key, value in (float_state or {}).items()})
        write_bytes_atomic(self.block_file(index), safetensors.torch.save(flat, metadata={"format": "pt"}))
        progress = self.folder / _PROGRESS
        state = json.loads(progress.read_text()) if progress.is_file() else {"key": self.key, "blocks": [], "layers": {}}
        state["blocks"].append(list(qlinears))
        state["blocks_done"] = index + 1
        state.setdefault("float", {})[str(index)] = list(float_state or {})
        state["layers"].update({name: records[name].model_dump(mode="json") for name in qlinears})
        write_json_atomic(progress, state)

    def clear(self) -> None:
        """Delete the checkpoint (see :func:`remove_checkpoint`)."""
        remove_checkpoint(self.folder)


def remove_checkpoint(folder: str | Path) -> None:
    """Delete a block checkpoint folder, its progress file first: a run killed while the blocks are being deleted
    leaves no progress naming a deleted block (its rerun starts afresh instead of failing on the missing file)."""
    (Path(folder) / _PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
