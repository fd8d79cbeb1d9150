"""Benchmark: other quantization tools beside weightwise, measured in weightwise's own harness in one run.

Every tool quantizes the same fp32 source: the default SmolLM2-135M-Instruct (dequantized from its Q4_1
GGUF) and all-MiniLM-L6-v2. A tool's weights, dequantized by the tool's own code (llama.cpp: the GGUF it
wrote, dequantized by the gguf package through `weightwise.load_model`), replace the source's weights of
the targeted linear layers (weightwise's default targets: every Linear of the decoder/encoder blocks;
embeddings and lm_head stay as in the source). SmolLM2 rows: perplexity on the pydoc eval windows, KL and
top-1 agreement against the source's outputs computed once. MiniLM rows: cosine of mean-pooled sentence
embeddings of the pydoc eval paragraphs to the source's. bits/weight: the tool's stored bits (packed codes
+ scales/zeros, read off its tensors or its GGUF) over the targeted layers' parameters ("real"), or the
format's nominal codes + its scale tensors where the tool keeps float fake-quantized weights ("nominal").
Also times GPTQ: weightwise against llm-compressor, same settings and calibration tokens, same run.

    .venv-peers/bin/python bench/peers.py               # full: 16 windows (8,192 tokens), every peer
    .venv-peers/bin/python bench/peers.py --gptq-int3   # also weightwise GPTQ int3 g64 (~7 min more)
    .venv-peers/bin/python bench/peers.py --quick       # 4 windows, one setting per tool, 16 x 512 calibration
    make peers                                          # builds .venv-peers ('.[peers]'), then the full run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib
import logging
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from weightwise.data.corpora import corpus, join_documents
from weightwise.evaluate import evaluate, reference_outputs, reference_result, token_windows
from weightwise.evaluate.config import EvalConfig
from weightwise.evaluate.embeddings import embedding_cosine, paragraphs, sentence_embeddings
from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic
from weightwise.io.defaults import default_gguf_path
from weightwise.io.models import load_model
from weightwise.quantize.api import quantize, target_layers
from weightwise.quantize.calibration import CalibrationConfig, calibration_tokens
from weightwise.quantize.methods import GPTQConfig
from weightwise.quantize.recipe import QuantRecipe

logger = logging.getLogger("peers")

GROUP = 64  # group size for every grouped setting: 576 (SmolLM2's width) and 384 (MiniLM's) are multiples
# The decoder-block linear weights of a llama GGUF (what weightwise's default recipe targets).
GGUF_LINEAR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


# --- what a tool hands back ------------------------------------------------------------------------


@dataclass
class Quantized:
    """One tool's result for one setting: a float model carrying its (dequantized) weights, and their size."""

    model: nn.Module
    bits_per_weight: float
    basis: str  # "real": the tool's stored tensors; "nominal": format bits + the tool's scale tensors
    note: str = ""
    seconds: float | None = None  # quantize time, when the tool's own call is not the whole build


@dataclass
class Source:
    """A source model and what every peer needs from it."""

    key: str  # "smollm2" | "minilm"
    model: nn.Module
    tokenizer: object
    calib: CalibrationConfig
    targets: list[str] = field(default_factory=list)
    _calibration: torch.Tensor | None = None

    def calibration(self) -> torch.Tensor:
        """(samples, seq_len) calibration token ids, built once and shared by every calibrated method."""
        if self._calibration is None:
            self._calibration = calibration_tokens(self.calib, self.tokenizer, self.model)
        return self._calibration


@dataclass(frozen=True)
class Peer:
    """One measured setting: a tool, its package (for the version) and how to build the quantized model."""

    model: str  # Source.key
    tool: str
    package: str
    setting: str
    build: Callable[[Source], Quantized]
    quick: bool = False
    module: str | None = None  # imported before the timer starts: a first import is not quantization time


def with_weights(source: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``source`` whose named Linear modules carry ``weights`` (float32): a tool's dequantized weights."""
    model = copy.deepcopy(source)
    modules = dict(model.named_modules())
    for name, weight in weights.items():
        target = modules[name].weight
        if weight.shape != target.shape:
            raise RuntimeError(f"{name}: the tool returned shape {tuple(weight.shape)}, expected {tuple(target.shape)}")
        target.data = weight.detach().to(torch.float32).contiguous()
    return model


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores; a tensor subclass (packed codes + scales, ...) is the sum of its inner tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.Tensor and type(tensor) is not nn.Parameter:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def linear_params(source: Source) -> int:
    """Parameters of the targeted linear layers: the denominator of every bits/weight."""
    modules = dict(source.model.named_modules())
    return sum(modules[name].weight.numel() for name in source.targets)


# --- weightwise ---------------------------------------------------------------------------------------


def weightwise_peer(recipe: QuantRecipe) -> Callable[[Source], Quantized]:
    def build(source: Source) -> Quantized:
        calibration = source.calibration() if recipe.method.needs_calibration else None
        started = time.perf_counter()
        model = quantize(source.model, recipe, tokenizer=source.tokenizer, calibration=calibration)
        seconds = time.perf_counter() - started
        bits = sum(int(m.stored_bits()) for m in model.modules() if callable(getattr(m, "stored_bits", None)))
        return Quantized(model, bits / linear_params(source), "real", seconds=seconds)

    return build


def weightwise_recipe(fmt: str, method: str = "rtn", **fields) -> QuantRecipe:
    method_config = GPTQConfig() if method == "gptq" else "rtn"
    return QuantRecipe(format=fmt, group_size=GROUP, method=method_config, **fields)


# --- llama.cpp ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_cache() -> Iterator[Path]:
    """A temporary WEIGHTWISE_CACHE: the dequantized copies of llama.cpp's GGUFs do not stay in the user's cache."""
    previous = os.environ.get("WEIGHTWISE_CACHE")
    with tempfile.TemporaryDirectory(prefix="peers-") as folder:
        os.environ["WEIGHTWISE_CACHE"] = folder
        try:
            yield Path(folder)
        finally:
            if previous is None:
                os.environ.pop("WEIGHTWISE_CACHE", None)
            else:
                os.environ["WEIGHTWISE_CACHE"] = previous


def gguf_linear_types(path: Path) -> tuple[float, str]:
    """Bits/weight of a GGUF's decoder-block linear weights (stored bytes / elements) and which tensor types hold them."""
    from gguf import GGUFReader

    bits = elements = 0
    kinds: dict[str, Counter] = {}
    for tensor in GGUFReader(path).tensors:
        if GGUF_LINEAR.match(tensor.name):
            bits += int(tensor.n_bytes) * 8
            elements += int(tensor.n_elements)
            kinds.setdefault(tensor.tensor_type.name, Counter())[tensor.name.split(".")[2]] += 1
    used = "; ".join(f"{kind} {'/'.join(f'{n}×{c}' for n, c in sorted(names.items()))}" for kind, names in sorted(kinds.items()))
    return bits / elements, used


def gguf_type_of(path: Path, name: str) -> int:
    from gguf import GGUFReader

    return next(int(t.tensor_type) for t in GGUFReader(path).tensors if t.name == name)


def llama_cpp_peer(ftype: str) -> Callable[[Source], Quantized]:
    """Requantize the source GGUF with llama.cpp to ``ftype`` (token embeddings copied as they are), load it back."""

    def build(source: Source) -> Quantized:
        import llama_cpp

        src = default_gguf_path()
        with tempfile.TemporaryDirectory(prefix="peers-gguf-") as folder, scratch_cache():
            out = Path(folder) / f"smollm2-{ftype}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            params.allow_requantize = True
            params.nthread = torch.get_num_threads()
            params.token_embedding_type = gguf_type_of(src, "token_embd.weight")  # same type as the source: copied
            started = time.perf_counter()
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
            seconds = time.perf_counter() - started
            if status != 0:
                raise RuntimeError(f"llama_model_quantize returned {status}")
            bpw, used = gguf_linear_types(out)
            model, _ = load_model(out)
        return Quantized(model, bpw, "real", note=f"GGUF tensor types: {used}", seconds=seconds)

    return build


# --- HQQ, optimum-quanto, torchao ----------------------------------------------------------------------


def hqq_peer(nbits: int) -> Callable[[Source], Quantized]:
    """HQQ (half-quadratic, calibration-free) per group of 64 along the input dimension; scale/zero in fp16."""

    def build(source: Source) -> Quantized:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=nbits, group_size=GROUP, axis=1)
        modules = dict(source.model.named_modules())
        weights, bits = {}, 0
        for name in source.targets:
            layer = HQQLinear(modules[name], config, del_orig=False, compute_dtype=torch.float16, device="cpu")
            weights[name] = layer.dequantize().float()
            bits += 8 * (tensor_bytes(layer.W_q) + sum(tensor_bytes(layer.meta[k]) for k in ("scale", "zero")))
        return Quantized(with_weights(source.model, weights), bits / linear_params(source), "real")

    return build


def quanto_peer(qtype: str) -> Callable[[Source], Quantized]:
    """optimum-quanto weight quantization (its default grouping) of the target layers, frozen to packed tensors."""

    def build(source: Source) -> Quantized:
        from optimum import quanto

        model = copy.deepcopy(source.model)
        quanto.quantize(model, weights=getattr(quanto, qtype), include=source.targets)
        quanto.freeze(model)
        modules = dict(model.named_modules())
        weights = {name: modules[name].weight.dequantize() for name in source.targets}
        bits = sum(8 * tensor_bytes(modules[name].weight) for name in source.targets)
        kind = type(modules[source.targets[0]].weight).__name__
        groups = Counter(str(modules[name].weight_group_size or "per-channel") for name in source.targets)
        del model
        note = f"stored as {kind}; its group sizes: " + ", ".join(f"{g} ×{n}" for g, n in sorted(groups.items()))
        return Quantized(with_weights(source.model, weights), bits / linear_params(source), "real", note=note)

    return build


def torchao_peer(dtype: str, int4_packing: str | None = None) -> Callable[[Source], Quantized]:
    """torchao weight-only quantization of the target layers in groups of 64: Int4WeightOnlyConfig with
    ``int4_packing`` when given, else IntxWeightOnlyConfig with ``dtype`` ('int4', 'int2', ...)."""

    def build(source: Source) -> Quantized:
        from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        if int4_packing is not None:
            config = Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format=int4_packing)
        else:
            config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, dtype), granularity=PerGroup(GROUP))
        model = copy.deepcopy(source.model)
        wanted = set(source.targets)
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in wanted)
        modules = dict(model.named_modules())
        weights = {name: modules[name].weight.dequantize() for name in source.targets}
        bits = sum(8 * tensor_bytes(modules[name].weight) for name in source.targets)
        first = modules[source.targets[0]].weight
        note = f"stored as {type(first).__name__}"
        codes = getattr(first, "qdata", None)
        if codes is not None and codes.dtype == torch.int8 and dtype != "int8":  # one int8 per code
            packed = bits - sum(8 * modules[name].weight.qdata.numel() for name in source.targets)
            packed += sum(int(dtype.removeprefix("int")) * modules[name].weight.qdata.numel() for name in source.targets)
            note += f": one int8 per {dtype} code (codes packed to {dtype} would make {packed / linear_params(source):.3f} bits/weight)"
        del model
        return Quantized(with_weights(source.model, weights), bits / linear_params(source), "real", note=note)

    return build


# --- llm-compressor ----------------------------------------------------------------------------------------


def llm_compressor_peer(num_bits: int) -> Callable[[Source], Quantized]:
    """llm-compressor oneshot GPTQ, symmetric int``num_bits`` weights in groups of 64 (W4A16-style; 128 does not divide
    576), static activation order, on the shared calibration tokens; the weights it leaves are fake-quantized floats."""

    def build(source: Source) -> Quantized:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        tokens = source.calibration()
        dataset = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
        scheme = QuantizationScheme(
            targets=[f"re:^{name}$" for name in source.targets],
            weights=QuantizationArgs(num_bits=num_bits, type="int", symmetric=True, strategy="group", group_size=GROUP),
        )
        recipe = GPTQModifier(config_groups={"group_0": scheme}, block_size=128, dampening_frac=0.01, actorder="static")
        model = copy.deepcopy(source.model)
        started = time.perf_counter()
        oneshot(model=model, processor=source.tokenizer, dataset=dataset, recipe=recipe, batch_size=source.calib.batch_size,
                num_calibration_samples=len(tokens), max_seq_length=tokens.shape[1])
        seconds = time.perf_counter() - started
        modules = dict(model.named_modules())
        weights = {name: modules[name].weight.detach().clone() for name in source.targets}
        scales = [modules[name].weight_scale for name in source.targets]
        scale_bits = sum(8 * tensor_bytes(scale) for scale in scales)
        params = linear_params(source)
        del model
        note = f"{num_bits}-bit codes counted packed, plus its weight_scale tensors as stored ({scales[0].dtype})"
        return Quantized(with_weights(source.model, weights), (num_bits * params + scale_bits) / params, "nominal",
                         note=note, seconds=seconds)

    return build


# --- what runs --------------------------------------------------------------------------------------------


def peers(gptq_int3: bool) -> list[Peer]:
    """Every measured setting, in run order; ``quick`` marks the one-per-tool subset of --quick."""
    ww = "weightwise"
    llama, hqq, quanto, torchao, llmc = (
        partial(Peer, tool=tool, package=package, module=module)
        for tool, package, module in (("llama.cpp", "llama-cpp-python", "llama_cpp"), ("HQQ", "hqq", "hqq.core.quantize"),
                                      ("optimum-quanto", "optimum-quanto", "optimum.quanto"),
                                      ("torchao", "torchao", "torchao.quantization"),
                                      ("llm-compressor", "llmcompressor", "llmcompressor"))
    )
    rows = [
        Peer("smollm2", ww, ww, "int4 g64 RTN", weightwise_peer(weightwise_recipe("int4")), quick=True),
        Peer("smollm2", ww, ww, "nf4 g64 RTN", weightwise_peer(weightwise_recipe("nf4"))),
        Peer("smollm2", ww, ww, "int3 g64 RTN", weightwise_peer(weightwise_recipe("int3"))),
        Peer("smollm2", ww, ww, "int4 g64 GPTQ", weightwise_peer(weightwise_recipe("int4", "gptq")), quick=True),
        *([Peer("smollm2", ww, ww, "int3 g64 GPTQ", weightwise_peer(weightwise_recipe("int3", "gptq")))] if gptq_int3 else []),
        *(llama(model="smollm2", setting=f, build=llama_cpp_peer(f), quick=f == "Q4_0") for f in ("Q8_0", "Q4_0", "Q3_K_M", "Q2_K")),
        *(hqq(model="smollm2", setting=f"{n}-bit g64", build=hqq_peer(n), quick=n == 4) for n in (4, 3, 2)),
        *(quanto(model="smollm2", setting=q, build=quanto_peer(q), quick=q == "qint4") for q in ("qint4", "qint2")),
        *(torchao(model="smollm2", setting=f"Int4WeightOnly g64 ({f} packing)", build=torchao_peer("int4", f))
          for f in ("plain", "plain_int32")),
        *(torchao(model="smollm2", setting=f"IntxWeightOnly {d} g64", build=torchao_peer(d), quick=d == "int4")
          for d in ("int4", "int2")),
        *(llmc(model="smollm2", setting=f"GPTQ W{n}A16 g64", build=llm_compressor_peer(n), quick=n == 4) for n in (4, 3)),
        Peer("minilm", ww, ww, "int8 per-channel RTN", weightwise_peer(QuantRecipe(format="int8", granularity="channel"))),
        Peer("minilm", ww, ww, "int4 g64 RTN", weightwise_peer(weightwise_recipe("int4")), quick=True),
        Peer("minilm", ww, ww, "int3 g64 RTN", weightwise_peer(weightwise_recipe("int3"))),
        *(hqq(model="minilm", setting=f"{n}-bit g64", build=hqq_peer(n), quick=n == 4) for n in (4, 3)),
        *(quanto(model="minilm", setting=q, build=quanto_peer(q), quick=q == "qint4") for q in ("qint8", "qint4")),
        llama(model="minilm", setting="any type", build=llama_cpp_minilm, quick=True),
    ]
    return rows


# --- the two harnesses ------------------------------------------------------------------------------------


class LanguageHarness:
    """Perplexity, KL and top-1 agreement on fixed pydoc windows against the source's outputs, computed once."""

    def __init__(self, source: Source, config: EvalConfig):
        self.text = config.load_text()
        self.config = config
        windows = token_windows(source.tokenizer, self.text, window=config.window, max_tokens=config.max_tokens)
        started = time.perf_counter()
        self.reference = reference_outputs(source.model, windows, batch_size=config.batch_size)
        self.source_row = reference_result(source.model, self.reference, seconds=time.perf_counter() - started)
        self.tokenizer = source.tokenizer

    def score(self, model: nn.Module) -> dict:
        result = evaluate(model, self.tokenizer, text=self.text, reference=self.reference, max_tokens=self.config.max_tokens,
                          window=self.config.window, batch_size=self.config.batch_size, measure_speed=False)
        return {"ppl": result.ppl, "kl_mean": result.kl_mean, "top1_agreement": result.top1_agreement}


class EmbeddingHarness:
    """Cosine of each pydoc eval paragraph's sentence embedding to the source's (mean, min, 5th percentile)."""

    def __init__(self, source: Source, max_texts: int | None):
        self.texts = paragraphs(join_documents(corpus("pydoc", "eval")))[:max_texts]
        self.tokenizer = source.tokenizer
        self.reference = sentence_embeddings(source.model, source.tokenizer, self.texts)

    def score(self, model: nn.Module) -> dict:
        cosine = embedding_cosine(self.reference, sentence_embeddings(model, self.tokenizer, self.texts))
        return {"cos_mean": cosine["mean"], "cos_min": cosine["min"], "cos_p05": cosine["p05"]}


def llama_cpp_minilm(source: Source) -> Quantized:
    """llama.cpp on MiniLM would need a BERT GGUF written and read back in this harness: say why that does not run."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    if "bert" not in GGUF_CONFIG_MAPPING:
        raise NotImplementedError(
            "transformers cannot load a BERT GGUF (no 'bert' in its GGUF architectures), so llama.cpp's MiniLM weights "
            "cannot be read back into this harness; llama-cpp-python also ships no HF→GGUF converter to write one")
    raise NotImplementedError("no HF→GGUF converter for BERT in this environment")


# --- running and reporting ------------------------------------------------------------------------------------


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def failure(err: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def measure(peer: Peer, source: Source, harness) -> dict:
    """Build and score one peer; a tool that cannot run gives a row that says why."""
    row = {"model": peer.model, "tool": peer.tool, "version": package_version(peer.package), "setting": peer.setting}
    try:
        if peer.module is not None:
            importlib.import_module(peer.module)
    except ImportError as err:
        return {**row, "status": "did not run", "note": f"not installed ({failure(err)}): pip install -e '.[peers]'"}
    try:
        started = time.perf_counter()
        result = peer.build(source)
    except Exception as err:  # a peer's own failure is a result to report, not a crash of the benchmark
        logger.warning("%s %s failed", peer.tool, peer.setting, exc_info=True)
        return {**row, "status": "did not run", "note": failure(err)}
    seconds = result.seconds if result.seconds is not None else time.perf_counter() - started
    row.update(bits_per_weight=result.bits_per_weight, basis=result.basis, quantize_seconds=seconds, note=result.note)
    try:
        row.update(harness.score(result.model), status="ran")
    except Exception as err:
        logger.warning("%s %s: evaluation failed", peer.tool, peer.setting, exc_info=True)
        row.update(status="did not run", note=f"quantized, but its model failed in the harness: {failure(err)}")
    del result
    gc.collect()
    return row


def _num(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(rows: list[dict], model: str, source: dict) -> str:
    """The Markdown table of one model's rows (source first), then the notes they carry."""
    mine = [r for r in rows if r["model"] == model]
    notes = []
    if model == "smollm2":
        head = ["| tool | version | setting | bits/weight | basis | ppl | Δppl | KL | top-1 | quantize s | status |",
                "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|",
                f"| source | | fp32 | 32 | | {source['ppl']:.3f} | +0.000 | 0.0000 | 1.000 | – | |"]
    else:
        head = ["| tool | version | setting | bits/weight | basis | cos mean | cos min | cos p05 | quantize s | status |",
                "|---|---|---|---:|---|---:|---:|---:|---:|---|",
                "| source | | fp32 | 32 | | 1.00000 | 1.00000 | 1.00000 | – | |"]
    lines = list(head)
    for r in mine:
        ran = r["status"] == "ran"
        status = r["status"] if not r.get("note") else f"{r['status']} ({len(notes) + 1})"
        if r.get("note"):
            notes.append(f"({len(notes) + 1}) {r['tool']} {r['setting']}: {r['note']}")
        cells = [r["tool"], r.get("version") or "not installed", r["setting"], _num(r.get("bits_per_weight"), ".3f"),
                 r.get("basis", "")]
        if model == "smollm2":
            delta = f"{r['ppl'] - source['ppl']:+.3f}" if ran else "–"
            cells += [_num(r.get("ppl"), ".3f"), delta, _num(r.get("kl_mean"), ".4f"), _num(r.get("top1_agreement"), ".3f")]
        else:
            cells += [_num(r.get("cos_mean"), ".5f"), _num(r.get("cos_min"), ".5f"), _num(r.get("cos_p05"), ".5f")]
        cells += [_num(r.get("quantize_seconds"), ".1f"), status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def gptq_speed(rows: list[dict], calib: CalibrationConfig) -> str | None:
    """weightwise GPTQ against llm-compressor's, int4 g64 on the same tokens in this run: the time ratio."""
    ours = next((r for r in rows if r["tool"] == "weightwise" and r["setting"] == "int4 g64 GPTQ" and "quantize_seconds" in r), None)
    theirs = next((r for r in rows if r["tool"] == "llm-compressor" and r["setting"] == "GPTQ W4A16 g64"), None)
    if ours is None or theirs is None:
        return None
    shape = f"{calib.samples} × {calib.seq_len} pydoc calibration tokens"
    if "quantize_seconds" not in theirs:
        return f"GPTQ speed ({shape}): weightwise {ours['quantize_seconds']:.0f} s; llm-compressor did not run ({theirs['note']})."
    ratio = theirs["quantize_seconds"] / ours["quantize_seconds"]
    return (f"GPTQ speed, int4 g64 symmetric, static act order, block 128, damp 0.01, the same {shape}, this CPU, this run: "
            f"weightwise {ours['quantize_seconds']:.0f} s (whole quantize call), llm-compressor {theirs['quantize_seconds']:.0f} s "
            f"(whole oneshot call): weightwise is **{ratio:.2f}×** as fast.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 windows, 128 paragraphs, one setting per tool, 16 x 512 calibration")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens scored per SmolLM2 model (default 8192 = 16 windows)")
    parser.add_argument("--calib", default=None, help="calibration of the GPTQ rows, SOURCE:SAMPLESxTOKENS "
                        "(default pydoc:128x512; --quick: pydoc:16x512)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--gptq-int3", action="store_true", help="also weightwise GPTQ int3 g64 (~7 min on 2 cores)")
    parser.add_argument("--only", default=None, help="regex: run only the peers whose 'model tool setting' matches (model: smollm2, minilm)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/peers.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    calib = CalibrationConfig.parse(args.calib or ("pydoc:16x512" if args.quick else "pydoc:128x512"))
    config = EvalConfig(max_tokens=2048 if args.quick else args.max_tokens)
    chosen = [p for p in peers(args.gptq_int3) if (p.quick or not args.quick)
              and (args.only is None or re.search(args.only, f"{p.model} {p.tool} {p.setting}"))]

    source_rows: dict[str, dict] = {}
    rows: list[dict] = []
    for key, name in (("smollm2", "default"), ("minilm", "minilm")):
        todo = [p for p in chosen if p.model == key]
        if not todo:
            continue
        model, tokenizer = load_model(name)
        source = Source(key, model, tokenizer, calib)
        source.targets = [n for n, _ in target_layers(model, QuantRecipe())]
        harness = LanguageHarness(source, config) if key == "smollm2" else EmbeddingHarness(source, 128 if args.quick else None)
        if key == "smollm2":
            source_rows[key] = harness.source_row.model_dump()
        say(f"{key}: {len(source.targets)} target layers, reference ready")
        for peer in todo:
            say(f"{peer.tool} {peer.setting} ...")
            rows.append(measure(peer, source, harness))
            r = rows[-1]
            say(f"{peer.tool} {peer.setting}: {r['status']}" + (f" — {r['note']}" if r.get("note") else ""))
            write_json_atomic(args.out, {"partial": True, "rows": rows})
        del model, source, harness
        gc.collect()
    report(args, rows, source_rows.get("smollm2"), calib, config, time.perf_counter() - started)


def report(args, rows: list[dict], source: dict | None, calib: CalibrationConfig, config: EvalConfig, seconds: float) -> None:
    """Print the Markdown report and write it (bench/results/peers.md) beside the JSON rows."""
    versions = environment_versions()
    command = " ".join(["bench/peers.py", *sys.argv[1:]])
    parts = [(f"Peers in weightwise's harness, one run of `{command}`: torch "
              f"{versions.get('torch')}, transformers {versions.get('transformers')}, Python {versions.get('python')}, "
              f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s); total {seconds:.0f} s.")]
    if source is not None:
        parts += [(f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32), pydoc eval split: {source['n_windows']} windows × "
                   f"{source['window']} = {source['n_tokens_scored']} scored tokens; GPTQ calibration {calib.samples} × "
                   f"{calib.seq_len} pydoc tokens (the same ids for both tools)."), markdown(rows, "smollm2", source)]
        speed = gptq_speed(rows, calib)
        if speed:
            parts.append(speed)
    minilm = [r for r in rows if r["model"] == "minilm"]
    if minilm:
        n_texts = len(paragraphs(join_documents(corpus("pydoc", "eval")))[: 128 if args.quick else None])
        parts += [f"all-MiniLM-L6-v2 (fp32), sentence-embedding cosine to the source on {n_texts} pydoc eval paragraphs:",
                  markdown(rows, "minilm", {})]
    text = "\n\n".join(parts) + "\n"
    print(text)
    payload = {"settings": {"eval": config.model_dump(), "calibration": calib.model_dump(), "quick": args.quick,
                            "gptq_int3": args.gptq_int3, "only": args.only, "threads": torch.get_num_threads()},
               "versions": versions, "source": source, "rows": rows, "seconds": seconds, "markdown": text}
    write_json_atomic(args.out, payload)
    write_text_atomic(args.out.with_suffix(".md"), text)


if __name__ == "__main__":
    main()
