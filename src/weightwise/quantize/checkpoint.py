"""Resume a calibrated quantization after a kill: each finished block's quantized layers (and its other
tensors, which scale migration may have changed) are saved (safetensors, written atomically) with a
progress file keyed by recipe, source and calibration data."""

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
from weightwise.qlinear import QuantizedLinear
from weightwise.records import LayerRecord

logger = logging.getLogger(__name__)

_PROGRESS = "progress.json"


class BlockCheckpoint:
    """Blocks done so far in ``folder``; stale progress (another recipe, model or data) is discarded."""

    def __init__(self, folder: str | Path, recipe: dict, source_fingerprint: str, tokens: torch.Tensor):
        self.folder = Path(folder)
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
        digest.update(source_fingerprint.encode())
        digest.update(tokens.numpy().tobytes())
        self.key = digest.hexdigest()

    def load(self, modules: dict[str, nn.Module]) -> tuple[int, dict[str, LayerRecord], dict[str, QuantizedLinear]]:
        """(blocks done, layer records, rebuilt QuantizedLinear modules) from an earlier run with the same key."""
        progress = self.folder / _PROGRESS
        if not progress.is_file():
            return 0, {}, {}
        state = json.loads(progress.read_text())
        if state.get("key") != self.key:
            logger.warning("ignoring %s: it belongs to another recipe, model or calibration set", self.folder)
            shutil.rmtree(self.folder)
            return 0, {}, {}
        records = {name: LayerRecord.model_validate(record) for name, record in state["layers"].items()}
        rebuilt: dict[str, QuantizedLinear] = {}
        for block in range(state["blocks_done"]):
            saved = safetensors.torch.load_file(str(self.folder / f"block_{block:04d}.safetensors"))
            for name in state["blocks"][block]:
                qlinear = QuantizedLinear.empty_like(modules[name], records[name])
                qlinear.load_state_dict({key.removeprefix(name + "."): value for key, value in saved.items()
                                         if key.startswith(name + ".")})
                rebuilt[name] = qlinear
            for key in state.get("float", {}).get(str(block), []):
                owner, _, attr = key.rpartition(".")
                getattr(modules[owner], attr).data.copy_(saved[key])
        logger.info("resuming after block %d from %s", state["blocks_done"], self.folder)
        return state["blocks_done"], records, rebuilt

    def save_block(self, index: int, qlinears: dict[str, QuantizedLinear], records: dict[str, LayerRecord],
                   float_state: dict[str, torch.Tensor] | None = None) -> None:
        """Record block ``index`` (its quantized layers, and ``float_state``: its other tensors by full name) as done."""
        self.folder.mkdir(parents=True, exist_ok=True)
        flat = {f"{name}.{key}": value.cpu().contiguous() for name, module in qlinears.items() for key, value in module.state_dict().items()}
        flat.update({key: value.cpu().contiguous() for key, value in (float_state or {}).items()})
        write_bytes_atomic(self.folder / f"block_{index:04d}.safetensors", safetensors.torch.save(flat))
        progress = self.folder / _PROGRESS
        state = json.loads(progress.read_text()) if progress.is_file() else {"key": self.key, "blocks": [], "layers": {}}
        state["blocks"].append(list(qlinears))
        state["blocks_done"] = index + 1
        state.setdefault("float", {})[str(index)] = list(float_state or {})
        state["layers"].update({name: records[name].model_dump(mode="json") for name in qlinears})
        write_json_atomic(progress, state)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
