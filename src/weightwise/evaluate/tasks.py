"""Task accuracy: greedy answers of a model compared with the expected responses after normalization."""

from __future__ import annotations

import logging
import re
from decimal import Decimal, InvalidOperation

import torch
from torch import nn

from weightwise.data.tasks import Example, pad_id, prompt_ids, stop_token_ids
from weightwise.errors import WeightwiseError
from weightwise.evaluate.speed import eval_mode
from weightwise.qlinear import dequantized_once

logger = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """A canonical form of an answer, so that equal answers written differently compare equal.

    Strips surrounding whitespace and trailing periods, collapses inner whitespace to one space; a
    number becomes its shortest decimal form (``"-3.0"`` → ``"-3"``, ``"+0.50"`` → ``"0.5"``,
    ``"-0"`` → ``"0"``); a fraction ``a/b`` of integers stays a fraction, its parts normalized and the
    sign on the numerator (``"3 / -4"`` → ``"-3/4"``), not reduced: reducing is part of the answer.
    Anything else is returned as the cleaned text.
    """
    text = _SPACES.sub(" ", text.strip()).rstrip(".").rstrip()
    number = _number(text)
    if number is not None:
        return number
    parts = text.split("/")
    if len(parts) == 2:
        numerator, denominator = (_number(part.strip(), integer=True) for part in parts)
        if numerator is not None and denominator is not None:
            top, bottom = int(numerator), int(denominator)
            return f"{-top}/{-bottom}" if bottom < 0 else f"{top}/{bottom}"
    return text


def _number(text: str, integer: bool = False) -> str | None:
    """The shortest decimal form of ``text`` if it is a finite number (an integer when ``integer``)."""
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    if integer:
        return None
    return format(value.normalize(), "f")


def exact_match(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    n_samples: int = 5,
) -> dict:
    """Fraction of ``examples`` whose greedy answer equals the expected response after
    :func:`normalize_answer`.

    Each prompt is built as in training (chat template with the generation prompt, see
    :func:`weightwise.data.tasks.prompt_ids`); prompts are left-padded into batches of similar length and
    decoded greedily for at most ``max_new_tokens``; an answer ends at the end-of-sequence or end-of-turn
    token. A quantized model's weights are dequantized once for all batches when memory allows
    (:func:`weightwise.qlinear.dequantized_once`), so it decodes as fast as the float model.

    Returns ``{"accuracy", "n", "n_correct", "samples"}``, samples being the first ``n_samples``
    examples as ``{"prompt", "expected", "got"}`` (``got`` the decoded answer before normalization).
    """
    if not examples:
        raise WeightwiseError("exact match needs at least one example: pass a non-empty list")
    if not all(isinstance(example, Example) for example in examples):
        raise WeightwiseError('exact match needs prompt/response examples: {"text"} records have no answer to check')
    if batch_size < 1 or max_new_tokens < 1:
        raise WeightwiseError("batch_size and max_new_tokens must be at least 1")
    prompts = [prompt_ids(tokenizer, example) for example in examples]
    stops = stop_token_ids(tokenizer, examples[0]) + _model_eos_ids(model)
    pad = pad_id(tokenizer)
    answers: list[str] = [""] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))  # similar lengths → less padding
    with eval_mode(model), dequantized_once(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            generated = _greedy(model, [prompts[i] for i in rows], pad, stops, max_new_tokens)
            for i, ids in zip(rows, generated):
                answers[i] = tokenizer.decode(_until_stop(ids, stops), skip_special_tokens=True)
    correct = [normalize_answer(got) == normalize_answer(ex.response) for got, ex in zip(answers, examples)]
    result = {
        "accuracy": sum(correct) / len(examples),
        "n": len(examples),
        "n_correct": sum(correct),
        "samples": [
            {"prompt": ex.prompt, "expected": ex.response, "got": got}
            for ex, got in zip(examples[:n_samples], answers[:n_samples])
        ],
    }
    logger.info("exact match %.4f on %d examples", result["accuracy"], result["n"])
    return result


def _greedy(
    model: nn.Module, prompts: list[list[int]], pad: int, stops: list[int], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations (new token ids only) of left-padded ``prompts``."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops or None, pad_token_id=pad
    )
    output = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
    )
    return output[:, width:].tolist()


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position]
    return ids


def _model_eos_ids(model: nn.Module) -> list[int]:
    """The end-of-sequence ids of the model's own generation config, which ``generate`` also stops at."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


