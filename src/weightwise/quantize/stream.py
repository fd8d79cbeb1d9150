"""Streamed quantization: the model is never whole in memory.

The model is a skeleton on the meta device (:func:`weightwise.io.models.load_skeleton`) whose checkpoint is
read one tensor at a time. :class:`StreamedBlocks` is the :class:`~weightwise.quantize.calibration.BlockStore`
that the one layer-sequential loop uses for it: a decoder block is read (float32) for its turn and emptied
after it, when its quantized tensors are in the block checkpoint (which becomes the output's shard); the
modules before the first block (the embeddings) are read only while the first block's inputs are captured.
Peak memory: one float32 block (or the embeddings), the calibration activations and statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from weightwise.io.lazy import LazyWeights, NotStreamable, materialize, tied_names
from weightwise.quantize.recipe import QuantRecipe


def check_streamable(recipe: QuantRecipe) -> None:
    """Refuse (:class:`NotStreamable`) a recipe that needs the whole model at once: a size target (the planner
    weighs every layer against every other) or calibration text sampled from the model itself."""
    if recipe.target_bpw is not None or recipe.target_mb is not None:
        raise NotStreamable("a size target (--target-bpw/--target-mb) plans over all layers at once, so the model is "
                            "quantized in memory: drop --stream")
    if recipe.needs_calibration and recipe.calibration.source == "self":
        raise NotStreamable("data-free calibration ('self') samples text from the whole model, so the model is "
                            "quantized in memory: drop --stream")


class StreamedBlocks:
    """Blocks read from ``weights`` for their turn and emptied (back to the meta device) after it. ``device``: where
    a block is put for its turn; ``restore(index, name)`` puts back a block an earlier run quantized (resume);
    ``dtype``: what floating tensors are read as (None: the dtype the skeleton gives them, e.g. a quantized run's
    scales as stored)."""

    def __init__(self, model: nn.Module, weights: LazyWeights, device: torch.device | str | None = None,
                 restore: Callable[[int, str], None] | None = None, dtype: torch.dtype | None = torch.float32):
        self.weights, self.device, self.restore, self.dtype = weights, device, restore, dtype
        self.ties = tied_names(model)
        self._opened: list[nn.Module] = []  # the block's modules at its opening: layers replaced in its turn too

    @contextmanager
    def capture(self, model: nn.Module, blocks: list[nn.Module]) -> Iterator[None]:
        """Each module outside the blocks is read when the model first calls it: up to the first block,
        that is the embeddings; the final norm and LM head are never read. Emptied again afterwards."""
        inside = {id(inner) for block in blocks for inner in block.modules()}
        emptied: list[tuple[nn.Module, str, torch.Tensor]] = []

        def fill(name: str, module: nn.Module, args) -> None:
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            if any(tensor.is_meta for _, tensor in own):
                emptied.extend((module, attr, tensor) for attr, tensor in own if tensor.is_meta)
                materialize(module, name, self.weights, self.ties, self.dtype, recurse=False)

        handles = [module.register_forward_pre_hook(lambda m, args, name=name: fill(name, m, args))
                   for name, module in model.named_modules() if id(module) not in inside]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, attr, tensor in emptied:  # the very meta tensors: ties between them are kept
                setattr(module, attr, tensor)

    def open(self, index: int, name: str, block: nn.Module, quantized: bool) -> None:
        self._opened = list(block.modules())
        if quantized:
            if self.restore is None:
                raise ValueError(f"block {name} was quantized by an earlier run, and there is nothing to restore it from")
            self.restore(index, name)
        else:
            materialize(block, name, self.weights, self.ties, self.dtype)
        if self.device is not None:
            block.to(self.device)

    def close(self, index: int, name: str, block: nn.Module) -> None:
        """Empty the block, and the float layers its quantized ones replaced (the job still names them)."""
        for module in (*self._opened, block):
            module.to("meta")
        self._opened = []
