"""Evaluation of a model that is never whole in memory: block by block over all the windows.

The model is a skeleton on the meta device (:func:`weightwise.io.models.load_skeleton`: a Hugging Face folder, a hub
id, a .gguf file's cache, or a weightwise quantized run). The windows' inputs to the first decoder block are captured
with the embeddings read for that pass only; then each block is read for its turn (float parts in float32, a quantized
run's layers as stored), run over every window's hidden states and emptied (``quantize.stream.StreamedBlocks``, the
store streamed quantization uses). Last, the model runs once more per batch with its blocks replaced by stand-ins
that hand back the last block's outputs, so that the final norm and LM head are the model's own code, read for that
pass only. Peak memory: one block, the hidden states of every window (windows × tokens × hidden × 4 bytes) and one
batch's logits; the logits are those of the model in memory (same code, float32).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from weightwise.architectures import family_of
from weightwise.errors import WeightwiseError
from weightwise.heap import return_freed_memory
from weightwise.io.models import Skeleton, load_skeleton
from weightwise.quantize.calibration import capture_block_inputs, run_block
from weightwise.quantize.stream import StreamedBlocks
from weightwise.records import quantization_record


@dataclass(frozen=True)
class StreamedModel:
    """A causal LM evaluated block by block: its :class:`~weightwise.io.models.Skeleton`."""

    skeleton: Skeleton
    name: str

    @classmethod
    def open(cls, source: str) -> "StreamedModel":
        """The model of ``source`` (a Hugging Face folder, a hub id, a .gguf file or a quantized run), nothing read yet.
        A float model is evaluated in float32 whatever its checkpoint's dtype, as :func:`weightwise.load_model` loads it."""
        skeleton = load_skeleton(source, quantized_runs=True)
        if quantization_record(skeleton.model) is None:
            skeleton.model.float()  # meta tensors: only their dtype changes
        return cls(skeleton, str(source))

    @property
    def model(self) -> nn.Module:
        """The skeleton (meta tensors): its config, structure, record and size."""
        return self.skeleton.model

    def batch_logits(self, windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Float32 logits ``(B, L, V)`` of each batch of ``windows``, in order (the blocks run over all windows first)."""
        model = self.skeleton.model
        store = StreamedBlocks(model, self.skeleton.weights, dtype=None)  # the skeleton's dtypes: float32 float parts
        family = family_of(getattr(model.config, "model_type", "unknown"))
        blocks = [(name, module) for name, module in model.named_modules() if re.search(family.blocks, name)]
        if not blocks:
            raise WeightwiseError(f"{self.name}: no decoder blocks found to evaluate block by block; evaluate it in memory")
        with store.capture(model, [block for _, block in blocks]):
            states = capture_block_inputs(model, blocks[0][1], windows, batch_size)
        returns_tuple = []
        for index, (name, block) in enumerate(blocks):
            return_freed_memory()
            store.open(index, name, block, quantized=False)
            handle = block.register_forward_hook(lambda module, args, out: returns_tuple.append(isinstance(out, tuple)))
            try:
                states = run_block(block, states, replace=True)
            finally:
                handle.remove()
                store.close(index, name, block)
        final = [hidden for hidden, _, _ in states]
        del states
        stand_ins = [_Replay(final if i == len(blocks) - 1 else None, returns_tuple[-1]) for i in range(len(blocks))]
        with _replaced(model, blocks, stand_ins), store.capture(model, stand_ins), torch.no_grad():
            for batch_index, start in enumerate(range(0, len(windows), batch_size)):
                stand_ins[-1].batch = batch_index
                yield model(input_ids=windows[start : start + batch_size], use_cache=False).logits.float()


class _Replay(nn.Module):
    """Stands in for a decoder block in the last pass: hands back the stored outputs of the current batch (the last
    block) or its input unchanged (the others), in the form the real block returns."""

    def __init__(self, outputs: list[torch.Tensor] | None, as_tuple: bool):
        super().__init__()
        self.outputs, self.as_tuple, self.batch = outputs, as_tuple, 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.outputs is None else self.outputs[self.batch]
        return (out,) if self.as_tuple else out


@contextmanager
def _replaced(model: nn.Module, blocks: list[tuple[str, nn.Module]], stand_ins: list[nn.Module]) -> Iterator[None]:
    """Within the context, ``stand_ins`` take the places of ``blocks`` in ``model`` (a skeleton of our own)."""

    def put(modules: list[nn.Module]) -> None:
        for (name, _), module in zip(blocks, modules):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)

    put(stand_ins)
    try:
        yield
    finally:
        put([block for _, block in blocks])
