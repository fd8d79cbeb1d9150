"""Quantization-aware training (``method: qat``): the targeted Linears become :class:`FakeQuantLinear` modules whose
latent float weights and group scales/offsets AdamW trains through their fake-quantized weights (math in
fakequant.py); the result is an ordinary weightwise quantized run, ``OUT/model`` (written by ``io.folders.save``).

The forward weight is exactly the weight the saved run dequantizes: the nearest codes of the latent weights under
the scales as stored (rounded to their storage dtype), so a trained model and its saved run give the same logits
bit for bit. After every optimizer step the codes are compared with the previous ones to track oscillations
(frozen past ``freeze_threshold``); the step's record carries the fractions of oscillating and frozen weights.
With ``distill_weight`` the loss mixes in distillation from the float model (the teacher: the targets' original
Linears swapped back in for its forward), and the record carries the task loss and the KL apart.

Memory: a layer's latent weight takes over its Linear's float32 weight (no copy); forward keeps only its input for
backward, which recomputes the fake-quantized weight (fakequant.fake_quant_linear); the freezing state (moving
averages, frozen codes) exists only when ``freeze_threshold`` is set. A step then holds the model, the latent weights'
gradients and two Adam moments, the previous codes and directions (1 byte each per weight) and the activations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from weightwise.errors import WeightwiseError
from weightwise.evaluate.perplexity import example_nll
from weightwise.formats.base import QuantizedTensor, QuantSpec
from weightwise.formats.packing import pack_codes
from weightwise.formats.quantizer import encode_scale, float_scales, from_groups, group_layout, quantize_tensor, to_groups
from weightwise.qlinear import QuantizedLinear
from weightwise.tune import compander
from weightwise.tune.base import AdamWMethod, freeze
from weightwise.tune.distill import distillation_loss
from weightwise.tune.fakequant import (
    dampening_loss,
    fake_quant_linear,
    fake_quantize,
    freeze_oscillating,
    grid_codes,
    lsq_gradient_scale,
    storage_rounded,
    straight_through,
    track_oscillations,
)

logger = logging.getLogger(__name__)

MODEL_DIR = "model"  # the quantized run inside a qat tune run


class FakeQuantLinear(nn.Module):
    """A Linear in training for quantization: latent float32 ``weight``, group ``scales`` and ``offsets`` (asymmetric
    formats) as parameters, the Linear's frozen ``bias``; forward uses the fake-quantized weight. With ``freezing``,
    ``frozen`` weights keep their ``frozen_codes`` (without it both are None: nothing is frozen).

    ``weight`` becomes the latent weight without a copy when it is float32 already (the Linear's own weight at a
    round-to-nearest start): training then updates that tensor in place."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bias: nn.Parameter | None,
                 spec: QuantSpec, learn_scales: bool, freezing: bool = False):
        super().__init__()
        self.spec, self.shape = spec, tuple(weight.shape)
        self.weight = nn.Parameter(weight.detach().to(torch.float32))
        self.scales = nn.Parameter(scales.detach().to(torch.float32).clone(), requires_grad=learn_scales)
        self.offsets = None if offsets is None else nn.Parameter(offsets.detach().to(torch.float32).clone(),
                                                                 requires_grad=learn_scales)
        self.bias = bias
        self.gradient_scale = lsq_gradient_scale(spec, self.shape)
        layout, device = group_layout(self.shape, spec), self.weight.device
        self.register_buffer("frozen", torch.zeros(layout, dtype=torch.bool, device=device) if freezing else None)
        self.register_buffer("frozen_codes", torch.zeros(layout, dtype=torch.uint8, device=device) if freezing else None)

    def latent(self) -> torch.Tensor:
        """The float32 (out, in) weight that is fake-quantized: the latent ``weight``."""
        return self.weight

    def quantizer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scales and offsets forward uses: their stored values, with LSQ's scaled gradients."""
        dtype, g = self.spec.resolved_scale_dtype, self.gradient_scale
        scales = straight_through(self.scales, storage_rounded(self.scales.detach(), dtype), g)
        if self.offsets is None:
            return scales, None
        return scales, straight_through(self.offsets, storage_rounded(self.offsets.detach(), dtype), g)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(latent weight groups (R, G, g), scales, offsets as :meth:`quantizer` gives them, the codes now)."""
        scales, offsets = self.quantizer()
        groups = to_groups(self.latent(), self.spec)
        codes = grid_codes(groups, scales, offsets, self.spec.number_format, self.frozen, self.frozen_codes)
        return groups, scales, offsets, codes

    def codes(self) -> torch.Tensor:
        """The codes (R, G, g) of the latent weights now."""
        return self.grid()[3]

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized float32 weight (differentiable in the latent weight, scales and offsets): what forward
        multiplies by, with the gradients forward's backward gives."""
        groups, scales, offsets, codes = self.grid()
        return from_groups(fake_quantize(groups, scales, offsets, self.spec.number_format, codes, self.frozen), self.shape)

    def dampening(self) -> torch.Tensor:
        """The summed dampening loss of this layer's unfrozen weights (fakequant.dampening_loss)."""
        groups, scales, offsets, codes = self.grid()
        return dampening_loss(groups, scales, offsets, self.spec.number_format, codes, self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_linear(x, self.latent(), *self.quantizer(), self.bias, self.spec, self.frozen, self.frozen_codes)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedLinear:
        """The QuantizedLinear of the current codes and stored scales (its forward equals this module's)."""
        _, scales, offsets, codes = self.grid()
        dtype = self.spec.resolved_scale_dtype
        codes = from_groups(codes, self.shape)
        qt = QuantizedTensor(pack_codes(codes, self.spec.number_format.bits), encode_scale(scales, dtype),
                             None if offsets is None else encode_scale(offsets, dtype), self.shape, self.spec)
        return QuantizedLinear.from_quantized(qt, self.bias)

    def frozen_count(self) -> int:
        return 0 if self.frozen is None else int(self.frozen.sum())

    def extra_repr(self) -> str:
        return f"in={self.shape[1]}, out={self.shape[0]}, format={self.spec.format}, frozen={self.frozen_count()}"


class QuantizedRunMethod(AdamWMethod):
    """What qat and qat-lora share: the check that every target's shape fits the quantizer's groups; the training of
    :class:`FakeQuantLinear` layers (oscillation tracking and freezing after each step, the dampening loss's
    gradient, distillation from the float model); and the result, an ordinary quantized run ``OUT/model`` of each
    layer's final codes and stored scales. Subclasses set ``model``, ``layers`` (name → FakeQuantLinear) and
    ``started`` in ``prepare``, then call :meth:`start_training`."""

    def check_layouts(self, targets: dict[str, nn.Linear]) -> None:
        for name, linear in targets.items():
            try:
                group_layout(tuple(linear.weight.shape), self.settings.spec)
            except WeightwiseError as err:
                raise WeightwiseError(f"{name}: {err}") from None

    def save_result(self, out_dir, metadata, patch_dtype, tokenizer=None):
        """The quantized run ``out_dir/model``: every target's QuantizedLinear of its final codes and stored scales
        (SQNR against the final latent weights), saved as `weightwise quantize` saves its runs."""
        from weightwise.io.folders import save
        from weightwise.quantize.api import weight_sqnr_db
        from weightwise.quantize.recipe import QuantRecipe
        from weightwise.records import LayerRecord, QuantizationRecord, attach_record, drop_record

        settings = self.settings
        quantized, layers = {}, {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                quantized[name] = layer.to_quantized()
                layers[name] = LayerRecord(
                    spec=settings.spec, stored_bits=quantized[name].stored_bits(),
                    sqnr_db=weight_sqnr_db(layer.latent(), quantized[name].dequantized_weight()),
                    diagnostics={"qat": {"frozen": layer.frozen_count()}})
        recipe = QuantRecipe(format=settings.format, granularity=settings.granularity, group_size=settings.group_size,
                             targets=self.config.targets).model_dump(mode="json")
        record = QuantizationRecord(
            recipe={**recipe, "method": settings.model_dump(mode="json")}, layers=layers,
            source_fingerprint=metadata["base_model_hash"], quantize_seconds=time.perf_counter() - self.started,
            device=str(next(iter(self.layers.values())).weight.device))
        with installed(self.model, quantized):
            attach_record(self.model, record)
            try:
                save(self.model, Path(out_dir) / MODEL_DIR, tokenizer=tokenizer, tune=metadata)
            finally:
                drop_record(self.model)
        return [MODEL_DIR]

    def start_training(self, targets: dict[str, nn.Linear], resume: dict | None) -> None:
        """After the layers are in place and the optimizer built: the distillation teacher (the targets' own Linears,
        kept intact), the oscillation tracking, and a resumed run's quantizer and tracking tensors."""
        self.teacher = dict(targets) if self.settings.distill_weight else {}
        self.distilled = torch.zeros(3, dtype=torch.float64)  # this step's summed task loss, KL, scored tokens
        self.tracking = {name: self._start_tracking(layer) for name, layer in self.layers.items()}
        if resume is not None:
            self._restore(resume["tensors"])
        self.entries = sum(math.prod(layer.shape) for layer in self.layers.values())
        self.metrics: dict = {}

    def _start_tracking(self, layer: FakeQuantLinear) -> dict[str, torch.Tensor]:
        """Per weight: its codes and last direction of change; when freezing, also its oscillation frequency and
        moving-average code (the step's oscillating fraction needs neither)."""
        with torch.no_grad():
            codes = layer.codes()
        state = {"codes": codes, "direction": torch.zeros_like(codes, dtype=torch.int8)}
        if self.settings.freeze_threshold is not None:
            state.update(frequency=torch.zeros_like(codes, dtype=torch.float32), average=codes.to(torch.float32))
        return state

    def _restore(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in self._compander_tensors().items():  # α, β and the residual, as the run started with them
                value.copy_(tensors[key].to(value.device))
            for name, layer in self.layers.items():
                for key in ("scales", "offsets", "frozen", "frozen_codes"):
                    if getattr(layer, key) is not None:
                        getattr(layer, key).copy_(tensors[f"qat.{name}.{key}"])
                device = layer.weight.device
                self.tracking[name] = {key: tensors[f"track.{name}.{key}"].to(device) for key in self.tracking[name]}

    def gradients(self):
        """The step's gradients, with the dampening loss's (divided over the processes, which sum them) added; one
        layer's backward at a time, so that one layer's intermediates live at once."""
        if self.settings.dampening:
            total = 0.0
            for layer in self.layers.values():
                loss = self.settings.dampening * layer.dampening() / self.entries
                (loss / self.comm.world).backward()
                total += loss.item()
            self.metrics["qat_dampening"] = total
        return super().gradients()

    def micro_loss(self, model, batch):
        """The task loss, or with ``distill_weight`` w its mix (1 − w) · task + w · T² · KL(teacher ‖ student)
        (tune/distill.py), the teacher's logits coming from the same model with the targets' original Linears in
        place, in eval mode and without gradients."""
        if not self.teacher:
            return super().micro_loss(model, batch)
        settings = self.settings
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        training = model.training
        with torch.no_grad(), installed(model, self.teacher):
            model.eval()
            try:
                teacher = model(**inputs).logits
            finally:
                model.train(training)
        logits = model(**inputs).logits
        nll, scored = example_nll(logits, batch["labels"])
        task = nll.sum()
        distill = distillation_loss(logits, teacher, batch["labels"], settings.distill_temperature)
        self.distilled += torch.stack([task.detach().double().cpu(), distill.detach().double().cpu()
                                       / settings.distill_temperature**2, scored.sum().double().cpu()])
        return (1 - settings.distill_weight) * task + settings.distill_weight * distill

    def step(self, lr):
        super().step(lr)
        settings = self.settings
        if self.teacher:  # this process's micro-batches: mean task loss and KL (at temperature T) per scored token
            task, kl, tokens = self.distilled.tolist()
            self.metrics.update(qat_task_loss=task / max(tokens, 1), qat_distill_kl=kl / max(tokens, 1))
            self.distilled.zero_()
        oscillated = frozen = 0
        with torch.no_grad():
            for name, layer in self.layers.items():
                track, codes = self.tracking[name], layer.codes()
                track["direction"], frequency, now = track_oscillations(
                    track["codes"], track["direction"], track.get("frequency"), codes, settings.oscillation_momentum)
                track["codes"] = codes
                if settings.freeze_threshold is not None:
                    track["frequency"] = frequency
                    track["average"] = torch.lerp(track["average"], codes.to(torch.float32), settings.oscillation_momentum)
                    layer.frozen, layer.frozen_codes = freeze_oscillating(
                        frequency, settings.freeze_threshold, layer.frozen, layer.frozen_codes, track["average"])
                oscillated += int(now.sum())
                frozen += layer.frozen_count()
        self.metrics.update(qat_oscillating=oscillated / self.entries, qat_frozen=frozen / self.entries)

    def zero_grad(self):
        """Zero the gradients in place: they keep their memory from step to step (no reallocation among the
        activations, whose holes would grow the process's resident memory)."""
        self.optimizer.zero_grad(set_to_none=False)

    def step_metrics(self):
        return dict(self.metrics)

    def _compander_tensors(self) -> dict[str, torch.Tensor]:
        """Each compander's α, β and residual by checkpoint name (none without ``reparam``)."""
        if self.companded is None:
            return {}
        return {f"compander.{name}.{key}": value for name, layer in self.layers.items()
                for key, value in layer.parametrizations.weight[0].state_dict(keep_vars=True).items()}

    def state(self):
        state = super().state()
        state["tensors"].update({key: value.detach() for key, value in self._compander_tensors().items()})
        for name, layer in self.layers.items():
            for key in ("scales", "offsets", "frozen", "frozen_codes"):
                if getattr(layer, key) is not None:
                    state["tensors"][f"qat.{name}.{key}"] = getattr(layer, key).detach()
            for key, value in self.tracking[name].items():
                state["tensors"][f"track.{name}.{key}"] = value
        return state


class QATMethod(QuantizedRunMethod):
    """The loop's hooks for qat: AdamW on the latent weights (with the config's weight decay) and the scales and
    offsets (without)."""

    def prepare(self, model, targets, resume=None):
        freeze(model)
        spec, settings = self.settings.spec, self.settings
        self.started = time.perf_counter()
        self.check_layouts(targets)
        # a resumed run's values come from its checkpoint: round-to-nearest only lays the tensors out
        start = initial_quantizers(model, targets, spec, "rtn" if resume is not None else settings.init)
        logger.info("qat: %d layers to %s, from %s", len(targets), spec.format, "the checkpoint" if resume else settings.init)
        self.model = model
        freezing = settings.freeze_threshold is not None
        self.layers = {}
        for name, linear in targets.items():
            weight, scales, offsets = start[name]
            if settings.distill_weight:  # the latent weight must not take over the teacher's (the Linear's own)
                weight = weight.detach().clone()
            self.layers[name] = FakeQuantLinear(weight, scales, offsets, linear.bias, spec, settings.learn_scales, freezing)
        for name, layer in self.layers.items():
            model.set_submodule(name, layer)
        # under the compander the latent weights are f(V) + r and AdamW trains V (and with ``learn`` α and β)
        self.companded = compander.attach(self.layers, self.config.reparam)
        if self.companded is None:
            self.params = {f"{name}.weight": layer.weight for name, layer in self.layers.items()}
        else:
            self.params = {f"{name}.weight": v for name, v in self.companded.latents().items()}
            self.params.update(self.companded.hyperparameters())
        if settings.learn_scales:
            self.params.update({f"{name}.{key}": p for name, layer in self.layers.items()
                                for key, p in (("scales", layer.scales), ("offsets", layer.offsets)) if p is not None})
        self.build_optimizer(resume)
        self.start_training(targets, resume)
        return model

    def param_groups(self):
        latents = [p for name, p in self.params.items() if name.endswith(".weight")]
        others = [p for name, p in self.params.items() if not name.endswith(".weight")]  # scales, offsets, α, β
        return [{"params": latents}] + ([{"params": others, "weight_decay": 0.0}] if others else [])

@contextmanager
def installed(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """``modules`` (by name) in place of ``model``'s own while the block runs."""
    previous = {name: model.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            model.set_submodule(name, module)
        yield
    finally:
        for name, module in previous.items():
            model.set_submodule(name, module)


def initial_quantizers(model: nn.Module, targets: dict[str, nn.Linear], spec: QuantSpec,
                       init: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(latent weight, scales, offsets) per target: its weight and round-to-nearest scales ('rtn'), or the
    dequantized weight and stored scales of the same layer in the quantized run at ``init``."""
    if init == "rtn":
        return {name: (linear.weight, *float_scales(quantize_tensor(linear.weight, spec, name)))
                for name, linear in targets.items()}
    from weightwise.io.artifacts import state_dict_fingerprint
    from weightwise.io.models import load_model
    from weightwise.records import quantization_record

    run, _ = load_model(init)
    record = quantization_record(run)
    if record is None:
        raise WeightwiseError(f"qat init '{init}' is not a quantized run: give a folder written by `weightwise quantize` "
                              "(or a qat tune run), or init 'rtn'")
    if record.source_fingerprint != state_dict_fingerprint(model):
        raise WeightwiseError(f"qat init '{init}' was quantized from another model than the one tuned: tune its "
                              "source model, or quantize this one")
    modules, wanted = dict(run.named_modules()), _storage(spec)
    start = {}
    for name in targets:
        layer = modules.get(name)
        if not isinstance(layer, QuantizedLinear) or layer.lowrank is not None or _storage(layer.spec) != wanted:
            found = "not quantized" if not isinstance(layer, QuantizedLinear) else repr(layer)
            raise WeightwiseError(f"qat init '{init}': layer {name} is {found}, not {spec.format} "
                                  f"{spec.granularity} {spec.resolved_group_size or ''} without LoRC: give qat the "
                                  "run's format, granularity and group size")
        with torch.no_grad():
            start[name] = (layer.dequantized_weight(), *layer.stored_scales())
    return start


def _storage(spec: QuantSpec) -> tuple:
    """What decides how a layer is stored: format, grouping, scale dtype and constraints."""
    return (spec.number_format.name, spec.granularity, spec.resolved_group_size, spec.resolved_scale_dtype, spec.pad,
            spec.pow2_scales)
