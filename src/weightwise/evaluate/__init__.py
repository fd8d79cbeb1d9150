"""Evaluate a causal LM: perplexity on a text, divergence from a reference model, size and speed."""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from weightwise.data.corpora import corpus, join_documents
from weightwise.errors import WeightwiseError
from weightwise.evaluate.divergence import kl_from_log_probs
from weightwise.evaluate.perplexity import log_probs, perplexity, target_nll, token_windows
from weightwise.evaluate.report import load_metrics, write_report
from weightwise.evaluate.size import model_size
from weightwise.evaluate.speed import ForwardTimer, eval_mode, forward_logits
from weightwise.evaluate.streamed import StreamedModel
from weightwise.qlinear import dequantized_once

__all__ = [
    "EvalResult",
    "ReferenceOutputs",
    "StreamedModel",
    "evaluate",
    "load_metrics",
    "model_size",
    "reference_outputs",
    "reference_result",
    "token_windows",
    "write_report",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class EvalResult(BaseModel):
    """What ``evaluate`` measured; the fields of one row of a report."""

    model_config = ConfigDict(extra="forbid")

    ppl: float = Field(description="perplexity, exp(mean_nll)")
    mean_nll: float = Field(description="mean negative log-likelihood per scored token (nats)")
    n_tokens_scored: int = Field(description="tokens scored: every position of each window but the first")
    n_windows: int = Field(description="non-overlapping windows evaluated")
    window: int = Field(description="tokens per window")
    reference_ppl: float | None = Field(None, description="the reference's perplexity on the same windows")
    kl_mean: float | None = Field(None, description="mean per-token KL(reference ‖ candidate) (nats)")
    top1_agreement: float | None = Field(None, description="fraction of positions where both predict the same top token")
    total_bytes: int = Field(description="bytes of every stored tensor, shared storage counted once")
    bits_per_weight: float | None = Field(description="stored bits / parameters over the targeted linear layers")
    linear_params: int = Field(description="parameters of the targeted linear layers")
    quantized_layers: int = Field(description="layers stored in a quantized format")
    tokens_per_second: float | None = Field(
        None, description="forward throughput (median of several runs; quantized weights dequantized once, memory allowing)"
    )
    reference_tokens_per_second: float | None = Field(None, description="the reference's forward throughput, same run")
    speed_ratio: float | None = Field(None, description="tokens_per_second / reference_tokens_per_second")
    eval_seconds: float = Field(description="wall time of the whole evaluation")
    python_version: str = Field(description="the Python that ran it (the pydoc text changes between versions)")


@dataclass(frozen=True)
class ReferenceOutputs:
    """A reference model's outputs on fixed windows, kept so that many candidates compare to it cheaply.

    ``log_probs`` (float16 to halve memory) and ``top1`` / ``nll`` cover positions 0..L-2 of each window,
    the predictions that are scored.
    """

    windows: torch.Tensor  # (n_windows, window) token ids
    log_probs: torch.Tensor  # (n_windows, window - 1, vocab) float16
    top1: torch.Tensor  # (n_windows, window - 1) token ids of the highest logit
    nll: torch.Tensor  # (n_windows, window - 1) float32
    tokens_per_second: float | None = None


def reference_outputs(
    ref_model: nn.Module | StreamedModel,
    windows: torch.Tensor,
    batch_size: int = 4,
    measure_speed: bool = False,
    progress: Progress | None = None,
) -> ReferenceOutputs:
    """Run ``ref_model`` once over ``windows`` and keep what ``evaluate`` compares candidates against (a
    :class:`StreamedModel` runs block by block; its speed is not measured)."""
    _check_batch_size(batch_size)
    _check_language_model(ref_model)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    fp16_min = torch.finfo(torch.float16).min
    timer = ForwardTimer()
    with _inference(ref_model):
        for start, batch, logits in _batch_logits(ref_model, windows, batch_size, timer):
            lp, top1, nll = _scored(logits, batch)
            parts.append((lp.clamp(min=fp16_min).half().cpu(), top1.cpu(), nll.cpu()))
            if progress is not None:
                progress(min(start + batch_size, len(windows)), len(windows))
    speed = timer.tokens_per_second() if measure_speed and not isinstance(ref_model, StreamedModel) else None
    lps, top1s, nlls = zip(*parts)
    return ReferenceOutputs(
        windows=windows.clone(),
        log_probs=torch.cat(lps),
        top1=torch.cat(top1s),
        nll=torch.cat(nlls),
        tokens_per_second=speed,
    )


def reference_result(ref_model: nn.Module, outputs: ReferenceOutputs, seconds: float = 0.0) -> EvalResult:
    """The reference's own row (KL 0, agreement 1) from its stored outputs, without another forward pass."""
    n_windows, window = outputs.windows.shape
    mean_nll = outputs.nll.double().mean().item()
    return EvalResult(
        ppl=perplexity(mean_nll),
        mean_nll=mean_nll,
        n_tokens_scored=n_windows * (window - 1),
        n_windows=n_windows,
        window=window,
        reference_ppl=perplexity(mean_nll),
        kl_mean=0.0,
        top1_agreement=1.0,
        **{k: v for k, v in model_size(ref_model).items() if k != "linear_bits"},
        tokens_per_second=outputs.tokens_per_second,
        reference_tokens_per_second=outputs.tokens_per_second,
        speed_ratio=1.0 if outputs.tokens_per_second else None,
        eval_seconds=seconds,
        python_version=platform.python_version(),
    )


def evaluate(
    model: nn.Module | StreamedModel,
    tokenizer,
    text: str | list[str] | None = None,
    reference: nn.Module | StreamedModel | ReferenceOutputs | None = None,
    max_tokens: int | None = None,
    window: int = 512,
    batch_size: int = 4,
    measure_speed: bool = True,
    progress: Progress | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``text`` (default: the pydoc eval split) under the benchmark protocol,
    its KL divergence and top-1 agreement with ``reference`` (a model, or its precomputed
    ``reference_outputs`` on the same windows), its size, and its forward speed.

    ``progress(done, total)`` is called after each batch of windows. A :class:`StreamedModel` (as model or reference)
    is evaluated block by block over all the windows, never whole in memory: the same figures, but no speed.
    """
    _check_batch_size(batch_size)
    _check_language_model(model)
    if isinstance(reference, (nn.Module, StreamedModel)):
        _check_language_model(reference)
    started = time.perf_counter()
    if text is None:
        text = corpus("pydoc", "eval")
    if not isinstance(text, str):
        text = join_documents(text)
    windows = token_windows(tokenizer, text, window=window, max_tokens=max_tokens)
    if isinstance(reference, ReferenceOutputs) and not torch.equal(reference.windows, windows):
        raise WeightwiseError(
            "the reference outputs were computed on other windows: compute them from the same text, window and max_tokens"
        )
    if isinstance(reference, StreamedModel):  # its outputs first: two models are never read at once
        reference = reference_outputs(reference, windows, batch_size)
    ref_model = reference if isinstance(reference, nn.Module) else None
    totals = dict.fromkeys(("nll", "ref_nll", "kl", "agree"), 0.0)
    timer, ref_timer = ForwardTimer(), ForwardTimer()
    with _inference(model), _inference(ref_model):
        for start, batch, logits in _batch_logits(model, windows, batch_size, timer):
            lp, top1, nll = _scored(logits, batch)
            del logits
            totals["nll"] += nll.double().sum().item()
            if reference is not None:
                ref_lp, ref_top1, ref_nll = (
                    _reference_batch(ref_model, batch, ref_timer)
                    if ref_model is not None
                    else _stored_batch(reference, start, batch_size)
                )
                if ref_lp.shape[-1] != lp.shape[-1]:
                    raise WeightwiseError(
                        f"the reference has {ref_lp.shape[-1]} vocabulary entries, the model {lp.shape[-1]}: "
                        "compare models that share a tokenizer"
                    )
                ref_lp = ref_lp.to(lp.device)
                totals["kl"] += kl_from_log_probs(ref_lp, lp).double().sum().item()
                totals["agree"] += (top1 == ref_top1.to(top1.device)).sum().item()
                totals["ref_nll"] += ref_nll.double().sum().item()
            if progress is not None:
                progress(min(start + batch_size, len(windows)), len(windows))
    n_scored = windows.shape[0] * (windows.shape[1] - 1)
    mean_nll = totals["nll"] / n_scored
    speeds = _speeds(timer, ref_timer, reference) if measure_speed and not isinstance(model, StreamedModel) else {}
    result = EvalResult(
        ppl=perplexity(mean_nll),
        mean_nll=mean_nll,
        n_tokens_scored=n_scored,
        n_windows=windows.shape[0],
        window=windows.shape[1],
        reference_ppl=perplexity(totals["ref_nll"] / n_scored) if reference is not None else None,
        kl_mean=totals["kl"] / n_scored if reference is not None else None,
        top1_agreement=totals["agree"] / n_scored if reference is not None else None,
        **{k: v for k, v in model_size(_module(model)).items() if k != "linear_bits"},
        **speeds,
        eval_seconds=time.perf_counter() - started,
        python_version=platform.python_version(),
    )
    logger.info("ppl %.4f on %d tokens (%d windows of %d)", result.ppl, n_scored, result.n_windows, result.window)
    return result


def _module(model: nn.Module | StreamedModel) -> nn.Module:
    """The module (for a streamed model: its meta-device skeleton, for its structure and size)."""
    return model.model if isinstance(model, StreamedModel) else model


def _batch_logits(model: nn.Module | StreamedModel, windows: torch.Tensor, batch_size: int,
                  timer: ForwardTimer) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(first window, windows, logits of the scored predictions) per batch; the in-memory forward calls timed."""
    if isinstance(model, StreamedModel):
        starts = range(0, len(windows), batch_size)
        for start, logits in zip(starts, model.batch_logits(windows, batch_size), strict=True):
            yield start, windows[start : start + batch_size], logits[:, :-1]
        return
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        with timer.measure(batch.numel()):
            logits = forward_logits(model, batch)[:, :-1]
        yield start, batch, logits


def _scored(logits: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 log-probs, top-1 ids and NLL of the scored predictions ``logits`` of ``batch``."""
    lp = log_probs(logits)
    return lp, logits.argmax(-1), target_nll(lp, batch[:, 1:].to(lp.device))


@contextlib.contextmanager
def _inference(model: nn.Module | StreamedModel | None) -> Iterator[None]:
    """``model`` in eval mode with its quantized weights dequantized once for all batches, memory
    allowing (same outputs, the float model's speed); nothing for None or a streamed model (its blocks are
    dequantized once each as they run)."""
    if model is None or isinstance(model, StreamedModel):
        yield
        return
    with eval_mode(model), dequantized_once(model):
        yield


def _check_language_model(model: nn.Module | StreamedModel) -> None:
    """Perplexity needs next-token logits: refuse encoders (e.g. MiniLM) with a pointer to their harness."""
    model = _module(model)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_head is None or get_head() is None:
        raise WeightwiseError(f"{type(model).__name__} has no language-model head, so it has no perplexity: evaluate "
                              "encoders by embedding cosine (weightwise.evaluate.embeddings, bench/minilm.py)")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise WeightwiseError(f"batch_size {batch_size} is not positive: pass at least 1 window per batch")


def _reference_batch(
    ref_model: nn.Module, batch: torch.Tensor, timer: ForwardTimer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 log-probs, top-1 ids and NLL of the reference's scored predictions on ``batch``."""
    with timer.measure(batch.numel()):
        logits = forward_logits(ref_model, batch)[:, :-1]
    return _scored(logits, batch)


def _stored_batch(ref: ReferenceOutputs, start: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of stored reference outputs; the float16 log-probs renormalized in float32 so KL stays ≥ 0."""
    rows = slice(start, start + batch_size)
    return log_probs(ref.log_probs[rows]), ref.top1[rows], ref.nll[rows]


def _speeds(timer: ForwardTimer, ref_timer: ForwardTimer, reference: nn.Module | ReferenceOutputs | None) -> dict:
    """Throughput of the evaluation's own forward calls, beside the reference's from the same run."""
    tps = timer.tokens_per_second()
    ref_tps = reference.tokens_per_second if isinstance(reference, ReferenceOutputs) else ref_timer.tokens_per_second()
    return {
        "tokens_per_second": tps,
        "reference_tokens_per_second": ref_tps,
        "speed_ratio": tps / ref_tps if tps and ref_tps else None,
    }
