"""Resumable training checkpoints: ``OUT/checkpoints/step-NNNNNNNN/`` holds ``state.safetensors`` (the
method's tensors: trained values, masks, optimizer moments; torch's RNG state as a uint8 tensor) and
``state.json`` (step, data position, JSON scalars, the hyperparameters and the key a rerun must match).

Each checkpoint folder appears only when complete (written aside, then renamed); older ones are deleted
after a newer one is in place, so a kill at any moment leaves a loadable checkpoint or none.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import safetensors.torch
import torch

from weightwise.errors import WeightwiseError
from weightwise.io.artifacts import atomic_output_dir

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
_TENSORS = "state.safetensors"
_STATE = "state.json"
_PREFIX = "step-"
_RNG_KEYS = ("rng.torch", "rng.cuda")


def rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """torch's CPU generator state (and the CUDA one of ``device`` when it is a GPU), as uint8 tensors."""
    state = {"rng.torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(tensors: dict[str, torch.Tensor], device: torch.device | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


class TuneCheckpoints:
    """The checkpoints of one run in ``run_dir/checkpoints``; ``key`` identifies the run (config + base model)."""

    def __init__(self, run_dir: str | Path, key: dict):
        self.folder = Path(run_dir) / CHECKPOINTS_DIR
        self.key = key

    def _complete(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir()
                      if p.is_dir() and p.name.startswith(_PREFIX) and (p / _STATE).is_file() and (p / _TENSORS).is_file())

    def latest_state(self) -> dict | None:
        """The JSON part of the newest complete checkpoint, or None."""
        found = self._complete()
        if not found:
            return None
        try:
            return json.loads((found[-1] / _STATE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WeightwiseError(f"checkpoint {found[-1]} is corrupt ({err}); rerun with --overwrite to start afresh") from None

    def matches(self, state: dict) -> bool:
        return state.get("key") == json.loads(json.dumps(self.key))

    def load(self) -> dict | None:
        """The newest checkpoint as {"step", "tensors", "scalars", "rng", "state"}, or None."""
        state = self.latest_state()
        if state is None:
            return None
        if not self.matches(state):
            raise WeightwiseError(f"{self.folder} holds a checkpoint of another config or base model; "
                                  "rerun with --overwrite to start afresh, or choose another output folder")
        path = self._complete()[-1] / _TENSORS
        tensors = safetensors.torch.load_file(str(path))
        rng = {key: tensors.pop(key) for key in _RNG_KEYS if key in tensors}
        logger.info("resuming from %s (step %d)", path.parent, state["step"])
        return {"step": state["step"], "tensors": tensors, "scalars": state["scalars"], "rng": rng, "state": state}

    def save(self, step: int, method_state: dict, rng: dict[str, torch.Tensor], info: dict) -> Path:
        """Write the checkpoint of ``step``; ``info`` (JSON) is stored beside the key and the step."""
        tensors, storages = {}, set()
        for name, t in method_state["tensors"].items():
            t = t.detach().contiguous().cpu()
            ptr = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if ptr in storages else t  # safetensors refuses tensors that share memory
            storages.add(ptr)
        tensors.update({key: value.cpu() for key, value in rng.items()})
        target = self.folder / f"{_PREFIX}{step:08d}"
        with atomic_output_dir(target) as tmp:
            safetensors.torch.save_file(tensors, str(tmp / _TENSORS))
            state = {"step": step, "key": self.key, "scalars": method_state["scalars"], **info}
            (tmp / _STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        for old in self._complete():
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
