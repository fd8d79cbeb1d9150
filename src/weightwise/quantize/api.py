"""quantize(model, recipe): swap the targeted nn.Linear modules for QuantizedLinear by the recipe's method."""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from weightwise.architectures import family_of, matches
from weightwise.comm import Comm
from weightwise.errors import WeightwiseError
from weightwise.formats.base import QuantSpec
from weightwise.formats.lowrank import low_rank_compensation
from weightwise.formats.quantizer import check_finite, dequantize, group_layout
from weightwise.heap import return_freed_memory
from weightwise.io.artifacts import state_dict_fingerprint
from weightwise.qlinear import QuantizedLinear
from weightwise.quantize.blocktune import tune_block
from weightwise.quantize.calibration import (
    BlockPass,
    BlockStore,
    ResidentBlocks,
    calibration_tokens,
    device_of,
    float32_parts,
    layer_sequential,
    run_block,
)
from weightwise.quantize.checkpoint import BlockCheckpoint
from weightwise.quantize.methods import run_method
from weightwise.quantize.planning import plan_layers, plan_summary
from weightwise.quantize.recipe import QuantRecipe, validated
from weightwise.quantize.sensitivity import output_gradient_moments
from weightwise.records import (
    BlockTuneResult,
    CalibrationRecord,
    LayerRecord,
    LowRankRecord,
    PlanRecord,
    QuantizationRecord,
    attach_record,
)

logger = logging.getLogger(__name__)

def target_layers(model: nn.Module, recipe: QuantRecipe) -> list[tuple[str, nn.Linear]]:
    """The Linear modules the recipe targets, in module order (ignores and family defaults applied)."""
    if recipe.targets is not None:
        patterns, keep = recipe.targets, ()
    else:
        family = family_of(getattr(getattr(model, "config", None), "model_type", "unknown"))
        patterns, keep = [family.linears], family.keep
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches(name, patterns) and not matches(name, [*keep, *recipe.ignore])
    ]
    if not found:
        raise WeightwiseError("no Linear layer matches the recipe's targets; check --targets / --ignore patterns")
    return found


def weight_sqnr_db(weight: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio in dB; None when the approximation is exact."""
    noise = (weight.float() - approx.float()).pow(2).sum().item()
    return None if noise == 0 else 10 * math.log10(weight.float().pow(2).sum().item() / noise)


def quantize(
    model: nn.Module,
    recipe: QuantRecipe | dict | str | Path,
    *,
    tokenizer=None,
    calibration: torch.Tensor | str | list[str] | None = None,
    checkpoint_dir: str | Path | None = None,
    keep_checkpoint: bool = False,
    inplace: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    device: torch.device | str | None = None,
    comm: Comm = Comm(),
) -> nn.Module:
    """Quantize ``model``'s target layers; returns a new model unless ``inplace``.

    ``recipe`` may be a QuantRecipe, a dict of its fields, or a YAML path. Calibrated methods (gptq, awq, …)
    use ``calibration`` — token ids (samples, seq_len), a text, or a list of documents (with
    ``tokenizer``) — or else the recipe's calibration config (needs ``tokenizer``). With
    ``checkpoint_dir`` a killed calibrated run resumes at the next unfinished block; the checkpoint is deleted at the end
    unless ``keep_checkpoint`` (a caller that saves the model deletes it after the save, with
    :func:`weightwise.quantize.checkpoint.remove_checkpoint`: a kill before the save then resumes instead of restarting).
    ``progress(done, total, name)`` is called after each layer. With ``device`` (e.g. "cuda") the work runs
    there one block (or layer) at a time while the model stays where it is; the result is where the model
    was. The returned model carries a :class:`~weightwise.records.QuantizationRecord` (recipe, per-layer
    spec, SQNR and diagnostics, source fingerprint, timings, device, calibration, plan) that
    :func:`weightwise.save` writes to the manifest; read it with :func:`weightwise.quantization_record`.
    The calibration math runs in float32 whatever the model's dtype, and the returned model's float parts
    (embeddings, norms, biases) are float32, as those of a saved run loaded back: a bf16 model gives the
    same result as its float32 copy.
    With several processes in ``comm`` (e.g. under torchrun), each calibrates on its share of the batches and
    quantizes its share of each block's layers (see :meth:`QuantizeJob.quantize_stage`); every process returns the
    same model, and process 0 alone writes the checkpoint.
    """
    recipe = _as_recipe(recipe)
    _check_processes(recipe, comm)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise WeightwiseError("the model is already quantized; quantize its float source instead")
    start = time.perf_counter()
    source_fingerprint = state_dict_fingerprint(model)
    plan = _plan(target_layers(model, recipe), recipe)
    ranks = {name: recipe.lorc_rank_for(name) for name in plan}
    planned = tokens = None
    sized = recipe.target_bpw is not None or recipe.target_mb is not None
    if sized or recipe.needs_calibration:
        tokens = _calibration_tokens(model, recipe, tokenizer, calibration)
    if sized:
        planned, choices = _mixed_precision(model, recipe, plan, tokens, device, comm)
        plan = {name: spec for name, (spec, _) in choices.items()}
        ranks = {name: rank for name, (_, rank) in choices.items()}
    if not inplace:
        model = copy.deepcopy(model)
    job = QuantizeJob(model, recipe, plan, ranks, device, progress, comm)
    calibration_record = None
    if recipe.needs_calibration:
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = BlockCheckpoint(checkpoint_dir, recipe.model_dump(mode="json"), source_fingerprint, tokens)
        calibration_record = job.run_calibrated(tokens, checkpoint)
        if checkpoint is not None and comm.is_main and not keep_checkpoint:
            checkpoint.clear()
    else:
        for name in plan:
            home = job.modules[name].weight.device
            job.quantize_layer(name, None).to(home)  # made on ``device``: the layer returns next to its neighbours
    float32_parts(model)
    elapsed = time.perf_counter() - start
    logger.info("quantized %d layers with %s/%s in %.1f s", len(job.layers), recipe.method.name, recipe.format, elapsed)
    attach_record(model, QuantizationRecord(
        recipe=recipe.model_dump(mode="json"), layers=job.layers, source_fingerprint=source_fingerprint,
        quantize_seconds=elapsed, device=str(device or device_of(model) or "cpu"), calibration=calibration_record, plan=planned))
    return model


def quantize_streamed(
    model: str | Path,
    recipe: QuantRecipe | dict | str | Path,
    output: str | Path,
    *,
    calibration: torch.Tensor | str | list[str] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    device: torch.device | str | None = None,
    comm: Comm = Comm(),
    **manifest,
) -> nn.Module:
    """Quantize the model ``model`` (a source name or path, as :func:`weightwise.load_model` takes) one decoder block
    at a time, never holding it whole, into the run folder ``output``; returns the quantized model on the meta device
    (no tensors: they are in ``output``) with its record.

    The model is built on the meta device and its checkpoint read tensor by tensor
    (:func:`weightwise.io.models.load_skeleton`: a Hugging Face folder, a hub id in the local cache or a .gguf file).
    Each block is read in float32 for its turn, calibrated and quantized as :func:`quantize` does it, saved to
    ``checkpoint_dir`` (default ``.NAME.partial`` beside ``output``: a killed run resumes at the next block) and
    emptied; the embeddings are read only to compute the first block's inputs. The folder holds the same tensors,
    bit for bit, as ``save(quantize(load_model(model, dtype="auto")[0], recipe, ...), output)``, as shards (one per
    block) with an index; ``manifest`` fields go into its manifest.json beside the record and the size
    (``metrics.size``). Raises :class:`~weightwise.io.lazy.NotStreamable` for a source or recipe that needs the
    whole model (a size target, 'self' calibration, quantized layers outside the decoder blocks). With several
    processes in ``comm`` the work is shared as in :func:`quantize`, and process 0 alone writes.
    """
    from weightwise.evaluate.size import model_size
    from weightwise.io.folders import save_streamed
    from weightwise.io.lazy import LazyStateDict, NotStreamable
    from weightwise.io.models import load_skeleton
    from weightwise.quantize.stream import StreamedBlocks, check_streamable

    recipe, output = _as_recipe(recipe), Path(output)
    check_streamable(recipe)
    _check_processes(recipe, comm)
    start = time.perf_counter()
    skeleton = load_skeleton(model)
    qmodel, weights = skeleton.model, skeleton.weights
    state = LazyStateDict(qmodel, weights)  # reads every tensor once: the fingerprint, and NaN/Inf refused before any work
    source_fingerprint = state_dict_fingerprint(state, ties=state.ties)
    plan = _plan(target_layers(qmodel, recipe), recipe)
    try:
        blocks = _targets_by_block(qmodel, dict(qmodel.named_modules()), plan)[0]
    except WeightwiseError as err:
        raise NotStreamable(f"{err}; or quantize in memory (--no-stream)") from None
    ranks = {name: recipe.lorc_rank_for(name) for name in plan}
    tokens = _calibration_tokens(qmodel, recipe, skeleton.tokenizer, calibration) if recipe.needs_calibration else None
    checkpoint = BlockCheckpoint(checkpoint_dir or output.parent / f".{output.name}.partial", recipe.model_dump(mode="json"),
                                 source_fingerprint, tokens)
    job = QuantizeJob(qmodel, recipe, plan, ranks, device, progress, comm)
    store = StreamedBlocks(qmodel, weights, device, partial(job.restore, checkpoint))
    calibration_record = None
    if recipe.needs_calibration:
        calibration_record = job.run_calibrated(tokens, checkpoint, store)
    else:
        job.run_blockwise(checkpoint, store)
    float32_parts(qmodel)  # on the meta device: the dtypes the float parts are written in, as quantize() leaves them
    elapsed = time.perf_counter() - start
    logger.info("quantized %d layers with %s/%s block by block in %.1f s", len(job.layers), recipe.method.name,
                recipe.format, elapsed)
    attach_record(qmodel, QuantizationRecord(
        recipe=recipe.model_dump(mode="json"), layers=job.layers, source_fingerprint=source_fingerprint,
        quantize_seconds=elapsed, device=str(device or "cpu"), calibration=calibration_record, plan=None))
    if comm.is_main:
        metrics = {**manifest.pop("metrics", {}), "size": model_size(qmodel)}
        save_streamed(qmodel, output, block_files=[checkpoint.block_file(i) for i in range(len(blocks))], weights=weights,
                      tokenizer=skeleton.tokenizer, metrics=metrics, **manifest)
        checkpoint.clear()
    return qmodel


def quantize_to_folder(
    source: str | Path,
    recipe: QuantRecipe | dict | str | Path,
    output: str | Path,
    *,
    stream: bool | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    device: torch.device | str | None = None,
    comm: Comm = Comm(),
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Quantize the model ``source`` names into the run folder ``output``, as ``weightwise quantize`` does; returns the
    quantized model (on the meta device when streamed: its tensors are in the folder).

    ``stream``: True, block by block (:func:`quantize_streamed`; :class:`~weightwise.io.lazy.NotStreamable` when the
    source or recipe does not allow it); None, so when they allow it and no remote code is trusted, else in memory;
    False, in memory (the model loaded in its checkpoint's dtype and quantized in place, then saved). Either way the
    output's lock is held from the first block checkpoint to the saved folder (another run into it is refused), a
    killed run resumes at its next unfinished block, and with several processes in ``comm`` process 0 alone writes.
    """
    from contextlib import nullcontext

    from weightwise.evaluate.size import model_size
    from weightwise.io.artifacts import output_lock
    from weightwise.io.folders import save
    from weightwise.io.lazy import NotStreamable
    from weightwise.io.models import load_model, model_source_info
    from weightwise.quantize.checkpoint import remove_checkpoint

    recipe, output = _as_recipe(recipe), Path(output)
    with output_lock(output) if comm.is_main else nullcontext():
        checkpoint, origin = output.parent / f".{output.name}.partial", model_source_info(source)
        if stream or (stream is None and not trust_remote_code):
            try:
                return quantize_streamed(source, recipe, output, checkpoint_dir=checkpoint, progress=progress,
                                         device=device, comm=comm, source=origin)
            except NotStreamable as why:
                if stream:
                    raise
                logger.info("loading the whole model: %s", why)
        model, tokenizer = load_model(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, dtype="auto")
        qmodel = quantize(model, recipe, tokenizer=tokenizer, checkpoint_dir=checkpoint, keep_checkpoint=True,
                          progress=progress, device=device, inplace=True, comm=comm)
        if comm.is_main:
            save(qmodel, output, tokenizer=tokenizer, source=origin, metrics={"size": model_size(qmodel)})
            remove_checkpoint(checkpoint)  # only now: a kill before the save resumes from it
        return qmodel


class QuantizeJob:
    """One quantization of one model: what every step needs (the model and its modules by name, the recipe, each
    layer's planned spec and LoRC rank, the device, the processes sharing the work) and the layer records made so far."""

    def __init__(self, model: nn.Module, recipe: QuantRecipe, plan: dict[str, QuantSpec], ranks: dict[str, int],
                 device, progress: Callable[[int, int, str], None] | None, comm: Comm = Comm()):
        self.model, self.recipe, self.plan, self.ranks, self.device, self.progress = model, recipe, plan, ranks, device, progress
        self.comm = comm
        self.modules = dict(model.named_modules())
        self.layers: dict[str, LayerRecord] = {}

    def install(self, name: str, qlinear: QuantizedLinear, record: LayerRecord) -> None:
        """Put ``qlinear`` in place of the Linear called ``name`` and keep its record."""
        parent_name, _, child = name.rpartition(".")
        setattr(self.modules[parent_name] if parent_name else self.model, child, qlinear)
        self.modules[name] = qlinear
        self.layers[name] = record
        if self.progress:
            self.progress(len(self.layers), len(self.plan), name)

    def quantize_layer(self, name: str, stats: dict | None) -> QuantizedLinear:
        """Quantize one layer by the recipe's method (with its calibration ``stats``, if any) and install it."""
        qlinear, record = self.make_layer(name, stats)
        self.install(name, qlinear, record)
        return qlinear

    def quantize_stage(self, names: list[str], stats: dict[str, dict]) -> dict[str, QuantizedLinear]:
        """Quantize and install the layers ``names`` of one block. With several processes, each makes its share
        (balanced by :func:`share_layers`) and sends it to the others (safetensors bytes and the record's JSON), so
        that every process installs the same layers in the same order."""
        if self.comm.world == 1:
            return {name: self.quantize_layer(name, stats[name]) for name in names}
        owners = share_layers({name: self.modules[name].weight.shape for name in names}, self.comm.world)
        made = {name: self.make_layer(name, stats[name]) for name in names if owners[name] == self.comm.rank}
        for name in names:
            if name in made:
                qlinear, record = made[name]
                tensors = safetensors.torch.save({k: v.cpu().contiguous() for k, v in qlinear.state_dict().items()})
                self.comm.broadcast_bytes(record.model_dump_json().encode(), owners[name])
                self.comm.broadcast_bytes(tensors, owners[name])
            else:
                record = LayerRecord.model_validate_json(self.comm.broadcast_bytes(None, owners[name]))
                linear = self.modules[name]
                qlinear = QuantizedLinear.empty_like(linear, record)
                qlinear.load_state_dict(safetensors.torch.load(self.comm.broadcast_bytes(None, owners[name])))
                qlinear.to(linear.weight.device)
            self.install(name, qlinear, record)
        return {name: self.modules[name] for name in names}

    def make_layer(self, name: str, stats: dict | None) -> tuple[QuantizedLinear, LayerRecord]:
        """The quantized layer for the Linear ``name`` by the recipe's method (with its calibration ``stats``, if
        any), and its record; the model is not changed."""
        recipe, linear = self.recipe, self.modules[name]
        weight = linear.weight.detach().to(device=self.device, dtype=torch.float32)
        spec, rank = self.plan[name], self.ranks[name]
        mean = None
        if recipe.bias_correction and linear.bias is not None and stats and "act_mean" in stats:
            mean = stats["act_mean"].to(torch.float32)
            stats = {**stats, "hessian": stats["hessian"] - torch.outer(mean, mean)}  # the covariance: the mean goes to the bias
        qt, diagnostics = run_method(recipe.method, weight, spec, stats)
        factors = None
        if rank:
            factors = low_rank_compensation(weight - dequantize(qt), rank, recipe.lorc_dtype)
        qlinear = QuantizedLinear.from_quantized(qt, linear.bias, factors, recipe.lorc_dtype, recipe.act_format)
        if mean is not None:  # the mean output error, moved into the bias
            with torch.no_grad():
                qlinear.bias += ((weight - qlinear.dequantized_weight()) @ mean).to(qlinear.bias.dtype)
        # qt.spec, not spec: a searching method (fpsearch) may choose another format than planned
        record = LayerRecord(
            spec=qt.spec, stored_bits=qlinear.stored_bits(), sqnr_db=weight_sqnr_db(weight, qlinear.dequantized_weight()),
            lorc=None if factors is None else LowRankRecord(rank=rank, dtype=recipe.lorc_dtype),
            act_format=recipe.act_format, diagnostics=diagnostics or {},
            folded=stats.get("folded") if stats else None)  # scales migrated into this layer's input (SmoothQuant, AWQ)
        return qlinear, record

    def restore(self, checkpoint: BlockCheckpoint, index: int, block_name: str) -> None:
        """Put block ``index``, quantized by an earlier run, back in place from ``checkpoint``."""
        for name, (qlinear, record) in checkpoint.restore_block(index, self.modules).items():
            self.install(name, qlinear, record)

    def run_calibrated(self, tokens: torch.Tensor, checkpoint: BlockCheckpoint | None,
                       store: BlockStore | None = None) -> CalibrationRecord:
        """Layer-sequential calibration over the decoder blocks, resumable through ``checkpoint``; ``store`` readies
        each block for its turn (default: the model in memory, each block on the job's device for its turn)."""
        recipe, modules, plan = self.recipe, self.modules, self.plan
        blocks, by_block = _targets_by_block(self.model, modules, plan)
        start_block = self.resume_point(checkpoint)
        if store is None:
            store = ResidentBlocks(self.device, None if checkpoint is None else partial(self.restore, checkpoint),
                                   keep_float32=True)
        family, steps = family_of(getattr(self.model.config, "model_type", "unknown")), recipe.block_steps()

        def quantize_block(index: int, block_name: str, stats: dict[str, dict], block_pass: BlockPass) -> None:
            targets = None
            if recipe.block_tune is not None:  # the float block's outputs, before any of its layers is quantized
                targets = [out for out, _, _ in run_block(modules[block_name], block_pass.inputs)]
            for step in steps:  # block-level transforms (scale migration) before the block's layers are quantized
                stats = step(modules[block_name], block_name, {name: plan[name] for name in by_block[block_name]}, stats, family)
            stages = block_pass.stages if recipe.calibration.true_sequential else [list(by_block[block_name])]
            done: dict[str, QuantizedLinear] = {}
            for stage in stages:
                if done:  # recalibrate on the outputs of the stages quantized so far; keep notes such as "folded"
                    fresh = block_pass.stats(stage)
                    stats = {**stats, **{name: {**stats.get(name, {}), **fresh[name]} for name in fresh}}
                done.update(self.quantize_stage(stage, stats))
            if targets is not None:
                result = BlockTuneResult(**tune_block(modules[block_name], block_pass.inputs, targets, recipe.block_tune))
                for name in done:
                    self.layers[name] = self.layers[name].model_copy(update={"block_tune": result})
            if checkpoint is not None and self.comm.is_main:
                checkpoint.save_block(index, done, {name: self.layers[name] for name in done},
                                      _float_state(block_name, modules[block_name]))

        layer_sequential(self.model, blocks, by_block, tokens, recipe.calibration.batch_size, quantize_block, start_block,
                         self.device, store, self.comm)
        return CalibrationRecord(**recipe.calibration.model_dump(), tokens=int(tokens.numel()), resumed_at_block=start_block)

    def run_blockwise(self, checkpoint: BlockCheckpoint, store: BlockStore) -> None:
        """Quantize block by block without calibration, each block readied by ``store`` for its turn and saved to
        ``checkpoint`` (blocks an earlier run saved are only put back)."""
        blocks, by_block = _targets_by_block(self.model, self.modules, self.plan)
        start_block = self.resume_point(checkpoint)
        for index, (block_name, block) in enumerate(blocks):
            return_freed_memory()
            store.open(index, block_name, block, quantized=index < start_block)
            if index >= start_block:
                names = list(by_block[block_name])
                done = self.quantize_stage(names, dict.fromkeys(names))
                if self.comm.is_main:
                    checkpoint.save_block(index, done, {name: self.layers[name] for name in done},
                                          _float_state(block_name, block))
            store.close(index, block_name, block)

    def resume_point(self, checkpoint: BlockCheckpoint | None) -> int:
        """The blocks an earlier run finished, read by process 0 (which alone writes the checkpoint) and sent to the others."""
        if checkpoint is None:
            return 0
        done = torch.tensor([checkpoint.progress()[0] if self.comm.is_main else 0], device=self.comm.device)
        self.comm.broadcast([done])
        return int(done.item())


def share_layers(shapes: dict[str, torch.Size], world: int) -> dict[str, int]:
    """The process that quantizes each layer: largest first, each to the least loaded process, the load of an
    (out, in) layer counted as out·in² (GPTQ's cost; round-to-nearest's is out·in, in the same order)."""
    load, owners = [0] * world, {}
    for name in sorted(shapes, key=lambda n: (-shapes[n][0] * shapes[n][1] ** 2, n)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[name] = owner
        load[owner] += shapes[name][0] * shapes[name][1] ** 2
    return owners


def _check_processes(recipe: QuantRecipe, comm: Comm) -> None:
    """Refuse what cannot yet be shared between processes: block tuning trains on all the calibration batches at once."""
    if comm.world > 1 and recipe.block_tune is not None:
        raise WeightwiseError("block tuning does not run on several processes yet: run it in one process (drop torchrun)")


def _float_state(block_name: str, block: nn.Module) -> dict[str, torch.Tensor]:
    """The block's tensors outside its quantized layers (e.g. norms that scale migration rescaled), by full name."""
    quantized = {name for name, module in block.named_modules() if isinstance(module, QuantizedLinear)}
    return {f"{block_name}.{key}": value for key, value in block.state_dict().items() if key.rpartition(".")[0] not in quantized}


def _targets_by_block(model: nn.Module, modules: dict, plan: dict) -> tuple[list, dict]:
    """The decoder blocks and, per block, its target layers; every target must lie in a block."""
    family = family_of(getattr(model.config, "model_type", "unknown"))
    blocks = [(name, module) for name, module in model.named_modules() if re.search(family.blocks, name)]
    by_block = {name: {t: modules[t] for t in plan if t.startswith(name + ".")} for name, _ in blocks}
    outside = set(plan) - {t for targets in by_block.values() for t in targets}
    if outside:
        raise WeightwiseError(f"calibration covers decoder blocks only; {sorted(outside)[0]} is outside them: "
                              "quantize it with rtn in a separate recipe or add it to --ignore")
    return blocks, by_block


def _mixed_precision(model, recipe: QuantRecipe, plan: dict, tokens: torch.Tensor, device, comm: Comm) -> tuple[PlanRecord, dict]:
    """Calibrate the float model once for every layer's Hessian, then plan one candidate per layer (every process
    plans the same: the Hessians are summed over the processes)."""
    modules = dict(model.named_modules())
    blocks, by_block = _targets_by_block(model, modules, plan)
    hessians: dict[str, torch.Tensor] = {}  # kept with the model (CPU memory), moved to ``device`` layer by layer
    home = device_of(model)
    layer_sequential(model, blocks, by_block, tokens, recipe.calibration.batch_size,
                     lambda index, block, stats, block_pass: hessians.update({n: s["hessian"].to(home) for n, s in stats.items()}),
                     device=device, comm=comm)
    weights = {name: modules[name].weight.detach().to(torch.float32) for name in plan}
    row_weights = None
    if recipe.plan_gradient_samples:
        row_weights = output_gradient_moments(model, {name: modules[name] for name in plan},
                                              tokens[: recipe.plan_gradient_samples])
    result, choices = plan_layers(model, weights, hessians, candidates=recipe.candidates, target_bpw=recipe.target_bpw,
                                  target_mb=recipe.target_mb, pad=recipe.pad, pow2_scales=recipe.pow2_scales,
                                  lorc_dtype=recipe.lorc_dtype, method=_planning_method(recipe),
                                  row_weights=row_weights, device=device,
                                  storage=recipe.plan_storage)
    n_params = sum(w.numel() for w in weights.values())
    return PlanRecord(target_bpw=recipe.target_bpw, target_mb=recipe.target_mb, **plan_summary(result, n_params)), choices


def _planning_method(recipe: QuantRecipe):
    """The method whose gain over round-to-nearest the planner measures per layer: GPTQ (needs only the
    layer's Hessian); None for the others (scored as round-to-nearest)."""
    if recipe.method.name != "gptq":
        return None
    return lambda weight, spec, hessian: dequantize(run_method(recipe.method, weight, spec, {"hessian": hessian})[0])


def _calibration_tokens(model, recipe: QuantRecipe, tokenizer, calibration) -> torch.Tensor:
    """Token ids (samples, seq_len) from explicit ``calibration`` or the recipe's calibration config."""
    if isinstance(calibration, torch.Tensor):
        if calibration.ndim != 2 or calibration.dtype != torch.long:
            raise WeightwiseError("calibration token ids must be a 2-D LongTensor (samples, seq_len)")
        return calibration
    if tokenizer is None:
        raise WeightwiseError("this recipe needs calibration data (a calibrated method, smoothquant_alpha or a size target): pass tokenizer= (or calibration token ids)")
    if calibration is None:
        return calibration_tokens(recipe.calibration, tokenizer, model)
    from weightwise.data.corpora import join_documents

    text = calibration if isinstance(calibration, str) else join_documents(calibration)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    seq_len = recipe.calibration.seq_len
    n = min(recipe.calibration.samples, ids.numel() // seq_len)
    if n == 0:
        raise WeightwiseError(f"the calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def _as_recipe(recipe) -> QuantRecipe:
    if isinstance(recipe, QuantRecipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return QuantRecipe.from_yaml(recipe)
    if isinstance(recipe, dict):
        return validated(QuantRecipe, recipe, source="recipe")
    raise WeightwiseError(f"recipe must be a QuantRecipe, a dict or a YAML path, not {type(recipe).__name__}")


def _plan(targets, recipe: QuantRecipe) -> dict:
    """Spec per layer, checked (finite weights, group size fits) before any work is done."""
    plan = {}
    for name, linear in targets:
        spec = recipe.spec_for(name)
        if spec is None:
            continue
        if not linear.weight.is_meta:  # a streamed model's weights are checked as they are read
            check_finite(linear.weight, f"weight of {name}")
        if recipe.target_bpw is not None or recipe.target_mb is not None:
            plan[name] = spec  # the planner replaces it with a candidate that fits
            continue
        try:
            group_layout(tuple(linear.weight.shape), spec)
        except WeightwiseError as err:
            raise WeightwiseError(f"{name}: {err}") from None
        plan[name] = spec
    return plan
