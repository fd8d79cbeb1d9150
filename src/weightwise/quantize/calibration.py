"""Layer-sequential calibration: capture the inputs of decoder block i, collect statistics of its
linear layers' inputs, let the caller quantize the block, then feed the *quantized* block's outputs
to block i + 1. Peak memory is one block's activations plus its statistics.

Statistics per linear layer (float32, token-normalized): the input Hessian H = XᵀX / n, the
per-input-channel mean x, mean |x| and max |x|. Inputs shared by several linears (q/k/v, gate/up) are multiplied once.

Within a block, the linears fall into *stages*: the groups that read the same input, in the order the
block calls them (q/k/v → o → gate/up → down for llama; query/key/value → attention output →
intermediate → output for BERT). With ``true_sequential`` the caller quantizes one stage at a time and
re-collects the next stage's statistics from the partly quantized block (:meth:`BlockPass.stats`), so
that o_proj is calibrated on the outputs of the *quantized* q/k/v, as in GPTQ's true-sequential mode.
Each re-collection stops the forward pass right after the stage's last linear.

The math runs in float32 whatever the model's dtype: the model runs up to the first block in float32 to
capture its inputs, and each block is cast to float32 for its turn (calibration, quantization, output pass).
Where the blocks are between their turns is a :class:`BlockStore`'s business: :class:`ResidentBlocks` keeps
the model in memory (with an execution ``device``, a GPU, each block is moved there for its turn and moved
back: GPU memory holds one block, its captured activations and its statistics); ``quantize.stream``'s store
reads each block from the checkpoint for its turn and writes and frees it afterwards.

With several processes (a :class:`~weightwise.comm.Comm` of ``world`` > 1, e.g. under torchrun) each process runs
its share of the calibration batches (batch i goes to process i mod world) through every block, and the statistics
are summed over the processes before any layer is quantized: every process sees those of all the batches, and a
block's layers can be quantized by any of them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weightwise.architectures import FAMILIES
from weightwise.comm import Comm
from weightwise.errors import WeightwiseError
from weightwise.heap import return_freed_memory
from weightwise.qlinear import QuantizedLinear, dequantized_once

logger = logging.getLogger(__name__)

# What a block receives for one batch: (hidden states, its other positional args — BERT's attention mask —, kwargs).
CapturedBatch = tuple[torch.Tensor, tuple, dict]


class CalibrationConfig(BaseModel):
    """Which calibration text, how much of it, and in what batches."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field("pydoc", description="'pydoc' (its calib split), a text file (any name: recognised by content) or .jsonl file, or 'self' (text sampled from the model: data-free).")
    samples: int = Field(128, ge=1, description="Number of calibration sequences.")
    seq_len: int = Field(512, ge=2, description="Tokens per calibration sequence.")
    seed: int = Field(0, description="Seed for choosing (or sampling) the sequences.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward call during calibration.")
    true_sequential: bool = Field(
        False, description="Within each block, quantize the linears stage by stage (q/k/v, o, gate/up, down) and calibrate "
        "each stage on the outputs of the stages already quantized (extra partial forward passes per block).")

    @classmethod
    def parse(cls, text: str) -> "CalibrationConfig":
        """'pydoc:128x512' → source pydoc, 128 samples of 512 tokens; 'data.jsonl' → defaults for the counts."""
        source, _, shape = text.rpartition(":") if ":" in text else (text, "", "")
        if not shape:
            return cls(source=text)
        samples, _, seq_len = shape.partition("x")
        if not (samples.isdigit() and seq_len.isdigit()):
            raise WeightwiseError(f"--calib {text}: expected SOURCE:SAMPLESxTOKENS, e.g. pydoc:128x512")
        return cls(source=source, samples=int(samples), seq_len=int(seq_len))


def calibration_tokens(config: CalibrationConfig, tokenizer, model: nn.Module | None = None) -> torch.Tensor:
    """(samples, seq_len) token ids: seeded non-overlapping windows of the text, or sequences sampled from the model.

    For model families that frame every input with special tokens (encoders: [CLS] … [SEP]) each window is
    framed the same way, so that its seq_len includes them; decoders get plain text windows (no BOS).
    """
    if config.source == "self":
        if model is None:
            raise WeightwiseError("data-free calibration ('self') needs the model to sample from")
        return _sample_from_model(model, tokenizer, config)
    from weightwise.data.corpora import corpus, join_documents

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    prefix, suffix = special_frame(tokenizer) if family is not None and family.frame_calibration else ([], [])
    body = config.seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise WeightwiseError(f"calibration seq_len {config.seq_len} leaves no room for text between the "
                              f"{len(prefix) + len(suffix)} special tokens: raise it")
    text = join_documents(corpus(config.source, "calib"))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    n_windows = ids.numel() // body
    if n_windows < config.samples:
        raise WeightwiseError(
            f"calibration text {config.source!r} holds {n_windows} windows of {config.seq_len} tokens, "
            f"fewer than the {config.samples} asked for: lower the sample count or the length, or pass more text"
        )
    windows = ids[: n_windows * body].view(n_windows, body)
    chosen = torch.randperm(n_windows, generator=torch.Generator().manual_seed(config.seed))[: config.samples]
    windows = windows[chosen.sort().values]
    left, right = (torch.tensor(edge, dtype=torch.long).expand(len(windows), -1) for edge in (prefix, suffix))
    return torch.cat([left, windows, right], dim=1)


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer`` puts before and after a single sequence (BERT: [CLS] and [SEP]), read off a probe."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    raise WeightwiseError("the tokenizer's special tokens cannot be told apart from the text; "
                          "pass calibration token ids (samples, seq_len) instead")


def _sample_from_model(model: nn.Module, tokenizer, config: CalibrationConfig) -> torch.Tensor:
    """Sequences generated by the model itself from its BOS token (top-k 50 sampling, seeded)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise WeightwiseError("data-free calibration needs a tokenizer with a BOS or EOS token to start from")
    torch.manual_seed(config.seed)  # generate() draws from the global generator
    rows = []
    for first in range(0, config.samples, config.batch_size):
        n = min(config.batch_size, config.samples - first)
        prompt = torch.full((n, 1), start, dtype=torch.long)
        out = model.generate(prompt, do_sample=True, top_k=50, max_new_tokens=config.seq_len, min_new_tokens=config.seq_len,
                             pad_token_id=start)
        rows.append(out[:, 1 : config.seq_len + 1])
    return torch.cat(rows)


class _StopForward(Exception):
    """Raised by a hook once everything needed from a forward pass is recorded."""


@dataclass
class LayerStats:
    """Running input statistics of one linear layer."""

    hessian: torch.Tensor
    total: torch.Tensor
    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    tokens: int = 0

    def averaged(self) -> dict:
        """The statistics as the quantizers read them (the Hessian XᵀX / n, the mean input), divided in place:
        the sums are not kept beside them (a 7B block's Hessians are ~0.9 GB)."""
        n = max(self.tokens, 1)
        return {"hessian": self.hessian.div_(n), "act_mean": self.total.div_(n), "act_abs_mean": self.abs_sum.div_(n),
                "act_abs_max": self.abs_max, "tokens": self.tokens}


def gram(x: torch.Tensor, block: int = 192) -> torch.Tensor:
    """xᵀx for x (n, d), computing only the upper block triangle and mirroring it: about (k + 1) / 2k of
    the multiplications for k column blocks (a third less time at d = 576 or 1536 on a CPU)."""
    d = x.shape[1]
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for start in range(0, d, block):
        stop = min(start + block, d)
        strip = x[:, start:stop].T @ x[:, start:]
        out[start:stop, start:] = strip
        out[stop:, start:stop] = strip[:, stop - start :].T
    return out


@dataclass
class _Collector:
    """Forward pre-hooks on a block's target linears accumulating LayerStats (shared inputs computed once)."""

    stats: dict[str, LayerStats] = field(default_factory=dict)
    stages: dict[int, list[str]] = field(default_factory=dict)  # first chunk: input id → linears reading it, in call order
    calls: list[str] = field(default_factory=list)  # first chunk: every hooked call, in order
    _cache: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # per chunk: input id → (input, XᵀX, Σx, Σ|x|, max|x|)
    _first_chunk: bool = True

    def hook(self, name: str, linear: nn.Linear):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            key = id(args[0])
            if key not in self._cache:  # the cache keeps the input alive, so its id cannot be reused in this chunk
                absx = x.abs()
                self._cache[key] = (args[0], gram(x), x.sum(dim=0), absx.sum(dim=0), absx.amax(dim=0))
            _, xtx, total, abs_sum, abs_max = self._cache[key]
            if self._first_chunk:
                self.stages.setdefault(key, []).append(name)
                self.calls.append(name)
            entry = self.stats.get(name)
            if entry is None:
                self.stats[name] = LayerStats(xtx.clone(), total.clone(), abs_sum.clone(), abs_max.clone(), x.shape[0])
            else:
                entry.hessian += xtx
                entry.total += total
                entry.abs_sum += abs_sum
                torch.maximum(entry.abs_max, abs_max, out=entry.abs_max)
                entry.tokens += x.shape[0]

        return linear.register_forward_pre_hook(record)

    def end_chunk(self) -> None:
        self._cache.clear()
        self._first_chunk = False

    def reduce(self, comm: Comm, linears: dict[str, nn.Linear]) -> None:
        """Sum the statistics of ``linears`` over the processes (max|x|: their maximum), so that every process holds
        those of all the batches. A layer a process never saw called contributes zeros."""
        if comm.world == 1:
            return
        for name, linear in linears.items():
            if name not in self.stats:
                d = linear.in_features
                zeros = [torch.zeros(d, d), torch.zeros(d), torch.zeros(d), torch.zeros(d)]
                self.stats[name] = LayerStats(*(z.to(linear.weight.device) for z in zeros), tokens=0)
        entries = [self.stats[name] for name in linears]
        tokens = torch.tensor([entry.tokens for entry in entries], dtype=torch.int64, device=comm.device)
        comm.all_reduce_sum([tokens, *(t for e in entries for t in (e.hessian, e.total, e.abs_sum))])
        comm.all_reduce_max([entry.abs_max for entry in entries])
        for name, entry, count in zip(linears, entries, tokens.tolist()):
            entry.tokens = count
            if count == 0:  # called by no process
                del self.stats[name]

    def results(self) -> dict[str, dict]:
        """Each layer's averaged statistics, handed over: the collector keeps no sums once they are read."""
        stats, self.stats = self.stats, {}
        return {name: entry.averaged() for name, entry in stats.items()}


def capture_block_inputs(model: nn.Module, block: nn.Module, tokens: torch.Tensor, batch_size: int) -> list[CapturedBatch]:
    """Per batch of ``tokens``: the (hidden_states, other positional args, kwargs) that ``block`` receives when the model runs."""
    captured: list[CapturedBatch] = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), tuple(args[1:]), kwargs))
        raise _StopForward

    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(tokens), batch_size):
                try:
                    model(input_ids=tokens[start : start + batch_size], **no_cache)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[CapturedBatch], *, replace: bool = False) -> list[CapturedBatch]:
    """The block's outputs for each captured batch, paired with the same other args (for the next block). With
    ``replace`` each batch of ``inputs`` is replaced by its output as soon as that is computed, and ``inputs`` is
    returned: memory holds one copy of the activations, not two."""
    outputs = inputs if replace else []
    with torch.no_grad(), dequantized_once(block):
        for i, (hidden, args, kwargs) in enumerate(inputs):
            out = block(hidden, *args, **kwargs)
            entry = (out[0] if isinstance(out, tuple) else out, args, kwargs)
            if replace:
                outputs[i] = entry
            else:
                outputs.append(entry)
    return outputs


def _collect(block: nn.Module, linears: dict[str, nn.Linear], inputs: list[CapturedBatch], stop_after: str | None = None,
             comm: Comm = Comm()) -> _Collector:
    """Run ``block`` on every captured batch with statistics hooks on ``linears``; the statistics are summed over
    the processes of ``comm``.

    Only the linears' inputs are needed, so each forward pass ends as soon as the input of ``stop_after``
    is recorded; without it, from the second batch on, as soon as the last linear the first batch called
    is reached (when each was called once), which skips e.g. the down projection's matmul.
    """
    collector = _Collector()
    handles = [collector.hook(name, linear) for name, linear in linears.items()]

    def stop(module, args):
        raise _StopForward

    def stop_at(name: str) -> None:
        handles.append(linears[name].register_forward_pre_hook(stop))  # runs after the statistics hook

    if stop_after is not None:
        stop_at(stop_after)
    try:
        with torch.no_grad(), dequantized_once(block):
            for hidden, args, kwargs in inputs:
                try:
                    block(hidden, *args, **kwargs)
                except _StopForward:
                    pass
                if stop_after is None and collector.calls and len(set(collector.calls)) == len(collector.calls):
                    stop_after = collector.calls[-1]
                    stop_at(stop_after)
                collector.end_chunk()
    finally:
        for handle in handles:
            handle.remove()
    collector.reduce(comm, linears)
    return collector


def collect_stats(block: nn.Module, linears: dict[str, nn.Linear], inputs: list[CapturedBatch]) -> dict[str, dict]:
    """Input statistics of ``linears`` (names → modules inside ``block``) over every captured batch."""
    return _collect(block, linears, inputs).results()


@dataclass
class BlockPass:
    """One block under calibration: its target linears grouped into stages, and fresh statistics on demand."""

    block: nn.Module
    linears: dict[str, nn.Linear]
    inputs: list[CapturedBatch]  # this process's share of the batches
    stages: list[list[str]]  # linears that read the same input, in call order; uncalled targets last
    comm: Comm = field(default_factory=Comm)

    def stats(self, names: list[str]) -> dict[str, dict]:
        """Statistics of ``names`` (still float linears) from the block as it is now, e.g. with earlier
        stages quantized; the forward passes stop after the last of them the block calls."""
        order = [name for stage in self.stages for name in stage]
        last = max(names, key=order.index)
        return _collect(self.block, {n: self.linears[n] for n in names}, self.inputs, last, self.comm).results()


class BlockStore(Protocol):
    """Where :func:`layer_sequential` finds the decoder blocks' weights and what happens to a block after its turn."""

    def capture(self, model: nn.Module, blocks: list[nn.Module]) -> AbstractContextManager:
        """A context in which ``model`` can run up to its first block, in float32 (to capture that block's inputs)."""

    def open(self, index: int, name: str, block: nn.Module, quantized: bool) -> None:
        """Make ``block`` ready for its turn: its float tensors in float32, on the work device. ``quantized``: an
        earlier run quantized it already (a resume), so its quantized state is to be restored, not recomputed."""

    def close(self, index: int, name: str, block: nn.Module) -> None:
        """The block's turn is over: its outputs are computed."""


class ResidentBlocks:
    """Blocks held in memory. ``device``: each block is moved there for its turn and back afterwards. ``restore(index,
    name)``: puts a block an earlier run quantized back in place (resume; None: such blocks are quantized already).
    ``keep_float32``: the model is being quantized, and its float parts stay in float32 after their turn (as a loaded
    quantized run's are); otherwise they return to their dtype and the model is left as it was."""

    def __init__(self, device: torch.device | str | None = None, restore: Callable[[int, str], None] | None = None,
                 keep_float32: bool = False):
        self.device, self.restore, self.keep_float32 = device, restore, keep_float32
        self._turn: tuple[torch.device | None, list] = (None, [])

    @contextmanager
    def capture(self, model: nn.Module, blocks: list[nn.Module]) -> Iterator[None]:
        changed = float32_parts(model, skip=blocks)
        try:
            yield
        finally:
            if not self.keep_float32:
                cast_back(changed)

    def open(self, index: int, name: str, block: nn.Module, quantized: bool) -> None:
        home, changed = device_of(block), float32_parts(block)
        if quantized and self.restore is not None:
            self.restore(index, name)
        if self.device is not None:
            block.to(self.device)
        self._turn = (home, changed)

    def close(self, index: int, name: str, block: nn.Module) -> None:
        home, changed = self._turn
        if self.device is not None and home is not None:
            block.to(home)
        if not self.keep_float32:
            cast_back(changed)


def float32_parts(module: nn.Module, skip: Collection[nn.Module] = ()) -> list[tuple[torch.Tensor, torch.dtype]]:
    """Cast the floating parameters and buffers of ``module`` to float32 in place (shared ones once), except inside
    quantized layers (their stored scales keep their dtype) and the modules ``skip``; returns the (tensor, old dtype)
    pairs changed, for :func:`cast_back`."""
    skipped = {id(inner) for outer in skip for inner in outer.modules()}
    changed, seen = [], set()
    for sub in module.modules():
        if id(sub) in skipped or isinstance(sub, QuantizedLinear):
            continue
        for tensor in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)):
            if tensor.is_floating_point() and tensor.dtype != torch.float32 and id(tensor) not in seen:
                seen.add(id(tensor))
                changed.append((tensor, tensor.dtype))
                tensor.data = tensor.data.to(torch.float32)
    return changed


def cast_back(changed: list[tuple[torch.Tensor, torch.dtype]]) -> None:
    """Undo :func:`float32_parts`."""
    for tensor, dtype in changed:
        tensor.data = tensor.data.to(dtype)


def layer_sequential(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    targets_by_block: dict[str, dict[str, nn.Linear]],
    tokens: torch.Tensor,
    batch_size: int,
    quantize_block: Callable[[int, str, dict[str, dict], BlockPass], None],
    start_block: int = 0,
    device: torch.device | str | None = None,
    store: BlockStore | None = None,
    comm: Comm = Comm(),
) -> None:
    """Calibrate and quantize block by block from ``start_block`` on.

    ``quantize_block(index, block_name, stats, block_pass)`` must replace the block's target layers; it may
    quantize them stage by stage with ``block_pass`` (see :class:`BlockPass`). The block is then re-run so
    that the next block sees the quantized outputs. Blocks before ``start_block`` were quantized by an
    earlier run (resume; ``store`` restores them): their outputs are recomputed block by block from the
    first block's inputs, the same computation as in the uninterrupted run, so that a resumed run ends with
    the same weights. ``store`` (default: :class:`ResidentBlocks` on ``device``) readies each block for its
    turn; with ``device``, the captured activations go there too. With several processes in ``comm``, each runs its
    share of the batches and every ``quantize_block`` receives the statistics of all of them.
    """
    from accelerate.utils import send_to_device

    store = ResidentBlocks(device) if store is None else store
    if start_block >= len(blocks):  # all quantized by a run killed before it finished: only put them back
        for index, (name, block) in enumerate(blocks):
            store.open(index, name, block, quantized=True)
            store.close(index, name, block)
        return
    tokens = process_share(tokens, batch_size, comm)
    with store.capture(model, [block for _, block in blocks]):
        inputs = capture_block_inputs(model, blocks[0][1], tokens, batch_size)
    if device is not None:
        inputs = send_to_device(inputs, device)
    for index, (name, block) in enumerate(blocks):
        return_freed_memory()  # what the last phase freed (SmolLM2-135M: ~40 MB of fragments a block otherwise)
        store.open(index, name, block, quantized=index < start_block)
        if index >= start_block:
            linears = targets_by_block.get(name, {})
            collector = _collect(block, linears, inputs, comm=comm)
            stages = list(collector.stages.values())
            uncalled = [n for n in linears if n not in collector.stats]
            return_freed_memory()
            quantize_block(index, name, collector.results(),
                           BlockPass(block, linears, inputs, stages + ([uncalled] if uncalled else []), comm))
            logger.info("calibrated block %d/%d (%s)", index + 1, len(blocks), name)
        if index + 1 < len(blocks):
            return_freed_memory()
            inputs = run_block(block, inputs, replace=True)
        store.close(index, name, block)
    return_freed_memory()


def process_share(tokens: torch.Tensor, batch_size: int, comm: Comm) -> torch.Tensor:
    """The rows of ``tokens`` this process calibrates on: batch i (of ``batch_size`` rows) goes to process i mod world.
    Batched again by ``batch_size``, the share gives the very batches of the whole."""
    if comm.world == 1:
        return tokens
    starts = range(0, len(tokens), batch_size)
    if len(starts) < comm.world:
        raise WeightwiseError(f"the calibration set makes {len(starts)} batches of {batch_size} sequences, fewer than the "
                              f"{comm.world} processes: lower the batch size, add sequences or start fewer processes")
    return torch.cat([tokens[start : start + batch_size] for start in starts[comm.rank :: comm.world]])


def device_of(module: nn.Module) -> torch.device | None:
    """Where ``module``'s tensors live (None for a module without any)."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return None if tensor is None else tensor.device
