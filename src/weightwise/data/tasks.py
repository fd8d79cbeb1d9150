"""Supervised tasks: (prompt, response) examples, the built-in ``arithmetic`` task generated with DeepMind's
``mathematics_dataset``, user JSONL files, and their encoding into token ids with loss on the answer only.

The prompt a model is trained on and the prompt it is evaluated on come from one function,
:func:`prompt_ids`, so training and exact-match evaluation see the same tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from weightwise.data.corpora import check_unicode
from weightwise.errors import WeightwiseError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ARITHMETIC_MODULES = ("add_or_sub", "add_sub_multiple", "mul", "div", "mixed")
DEFAULT_SEEDS = {"train": 0, "test": 1}
DIFFICULTY_LEVELS = {"easy": 0, "medium": 1, "hard": 2}
_MAX_ATTEMPTS = 1000  # draws per example before giving up (a module that only yields rejected problems)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

Split = Literal["train", "test"]
Difficulty = Literal["easy", "medium", "hard"]


@dataclass(frozen=True)
class Example:
    """One supervised example: the user's ``prompt`` and the ``response`` the model should give.

    ``history`` holds earlier chat messages (``{"role", "content"}`` dicts: a system prompt, earlier
    turns) that precede the prompt; they are context only, never scored.
    """

    prompt: str
    response: str
    history: tuple[dict[str, str], ...] = ()


# --- the arithmetic task --------------------------------------------------------------------------


def arithmetic_examples(
    split: Split, n: int, seed: int | None = None, *, difficulty: Difficulty = "easy"
) -> list[Example]:
    """``n`` arithmetic problems from DeepMind's ``mathematics_dataset`` (modules ``arithmetic__``
    add_or_sub, add_sub_multiple, mul, div, mixed), taken round-robin over the five modules.

    ``seed`` defaults to ``DEFAULT_SEEDS[split]`` (train 0, test 1). The splits are disjoint whatever the
    seeds and sizes: a problem belongs to train or test by a hash of its module and the numbers in its
    question (so "Add 3 and 4" and "3 + 4" fall in the same split), and each split drops repeats.
    The result for ``n`` is a prefix of the result for any larger ``n``.

    ``difficulty`` picks a third of the package's training entropy range ("easy" is its
    ``train-easy`` setting, e.g. ``29*-3``, ``Divide 51 by -106.`` → ``-51/106``): a 135M model can
    learn part of it in a few hundred steps. Both splits use the same difficulty, so test is held-out
    data from the training distribution (the package's harder ``interpolate`` set is not used).

    The generator draws from Python's ``random`` and numpy's global generators; their states are
    saved and restored around the generation, so the caller's random streams are unchanged.
    """
    if split not in DEFAULT_SEEDS:
        raise WeightwiseError(f"unknown split {split!r}: use 'train' or 'test'")
    if difficulty not in DIFFICULTY_LEVELS:
        raise WeightwiseError(f"unknown difficulty {difficulty!r}: use one of {', '.join(DIFFICULTY_LEVELS)}")
    if n < 0:
        raise WeightwiseError(f"asked for {n} examples: pass a number ≥ 0")
    modules, max_question, max_answer = _arithmetic_modules(DIFFICULTY_LEVELS[difficulty])
    seed = DEFAULT_SEEDS[split] if seed is None else seed
    examples: list[Example] = []
    seen: set[str] = set()
    with _seeded_global_rngs(seed):
        for i in range(n):
            name = ARITHMETIC_MODULES[i % len(ARITHMETIC_MODULES)]
            for _ in range(_MAX_ATTEMPTS):
                problem = modules[name]()
                question, answer = str(problem.question), str(problem.answer)
                if (
                    len(question) <= max_question
                    and len(answer) <= max_answer
                    and question not in seen
                    and arithmetic_split(name, question) == split
                ):
                    break
            else:
                raise RuntimeError(f"arithmetic module {name} gave no usable problem in {_MAX_ATTEMPTS} draws")
            seen.add(question)
            examples.append(Example(prompt=question, response=answer))
    return examples


def arithmetic_split(module: str, question: str) -> Split:
    """The split a problem belongs to: a hash of its module and the numbers in its question.

    Problems that differ only in wording or operators share a split, so no test problem repeats the
    operands of a training problem of the same module.
    """
    key = module + ":" + ",".join(_NUMBER.findall(question))
    return "train" if hashlib.sha256(key.encode()).digest()[0] % 2 == 0 else "test"


@contextlib.contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's and numpy's global generators for the block, then put their states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _arithmetic_modules(level: int) -> tuple[dict[str, Any], int, int]:
    """The five problem generators at difficulty ``level`` (0..2: a third of the package's training
    entropy range each, as its generate.py builds train-easy/medium/hard), and its length limits."""
    _alias_sympy_base_solution_linear()
    from mathematics_dataset import generate_settings
    from mathematics_dataset.modules import arithmetic

    def entropy_third(range_: tuple[float, float]) -> tuple[float, float]:
        low, high = range_
        return low + level * (high - low) / 3, low + (level + 1) * (high - low) / 3

    modules = arithmetic.train(entropy_third)
    chosen = {name: modules[name] for name in ARITHMETIC_MODULES}
    return chosen, generate_settings.MAX_QUESTION_LENGTH, generate_settings.MAX_ANSWER_LENGTH


def _alias_sympy_base_solution_linear() -> None:
    """The one compatibility alias ``mathematics_dataset`` 1.0.1 needs with modern sympy.

    The package does ``from sympy.solvers.diophantine import base_solution_linear``; sympy now keeps
    that function in the submodule ``sympy.solvers.diophantine.diophantine`` and no longer re-exports it
    from the package, so the import fails. This sets the missing attribute on the
    ``sympy.solvers.diophantine`` package module, pointing at sympy's own function. Setting an attribute on
    sympy's module is unavoidable without editing the installed package, since the failing line is an
    import inside it. It only adds a missing name (nothing of sympy's is replaced; a sympy that exports
    it again is left alone), and it runs only when the arithmetic task is requested, never at import.
    """
    package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(package, "base_solution_linear"):
        solver = importlib.import_module("sympy.solvers.diophantine.diophantine")
        package.base_solution_linear = solver.base_solution_linear


# --- user files -----------------------------------------------------------------------------------


def load_examples(path: str | Path) -> list[Example | str]:
    """Examples from a JSONL file, one object per line, in one of three forms:

    - ``{"prompt": ..., "response": ...}`` → an :class:`Example`;
    - ``{"messages": [{"role", "content"}, ...]}`` ending with a user then an assistant message → an
      :class:`Example` of those two, the earlier messages as its ``history``;
    - ``{"text": ...}`` → the string (plain language-model text, loss on every token).

    Blank lines are skipped; other keys are ignored. A line in none of these forms raises a
    :class:`WeightwiseError` naming its line number.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightwiseError(f"task file {path} not found: pass an existing .jsonl file or 'arithmetic'")
    examples: list[Example | str] = []
    with path.open("rb") as lines:  # decoded line by line, so that invalid UTF-8 is reported at its line
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise WeightwiseError(f"{path} line {number} is not UTF-8 text (byte {err.start} of the line): "
                                      "convert the file to UTF-8") from None
            if line.strip():
                examples.append(parse_record(line, f"{path} line {number}"))
    if not examples:
        raise WeightwiseError(f"task file {path} holds no examples: write one JSON object per line")
    return examples


_FORMS = '{"prompt", "response"}, {"messages": [...]} or {"text"}'


def parse_record(line: str, where: str) -> Example | str:
    """The example of one JSONL line (see :func:`load_examples`); ``where`` names the line in errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise WeightwiseError(f"{where} is not valid JSON ({err.msg}): write one JSON object per line") from None
    except RecursionError:
        raise WeightwiseError(f"{where} nests JSON too deeply to read: write one flat JSON object per line") from None
    return record_example(record, where)


def record_example(record: Any, where: str) -> Example | str:
    """The example a parsed JSON record holds: an :class:`Example` or a ``{"text"}`` string."""
    example = _record_example(record, where)
    strings = [example] if isinstance(example, str) else [example.prompt, example.response,
                                                          *(m[k] for m in example.history for k in ("role", "content"))]
    for text in strings:
        check_unicode(text, where)
    return example


def _record_example(record: Any, where: str) -> Example | str:
    forms = _FORMS
    if not isinstance(record, dict):
        raise WeightwiseError(f"{where} is not a JSON object: write objects like {forms}")
    if "prompt" in record or "response" in record:
        prompt, response = record.get("prompt"), record.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise WeightwiseError(f'{where} needs string "prompt" and "response" fields')
        return Example(prompt=prompt, response=response)
    if "messages" in record:
        return _messages_example(record["messages"], where)
    if isinstance(record.get("text"), str):
        return record["text"]
    raise WeightwiseError(f"{where} is in none of the known forms: write objects like {forms}")


def _messages_example(messages: Any, where: str) -> Example:
    fix = 'give a list of {"role", "content"} strings ending with a user message and an assistant message'
    if not isinstance(messages, list) or len(messages) < 2:
        raise WeightwiseError(f'{where} has a "messages" field that is not a list of 2 or more messages: {fix}')
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise WeightwiseError(f"{where} has a message without string role and content: {fix}")
    if messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise WeightwiseError(f"{where} does not end with a user message then an assistant message: {fix}")
    history = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-2])
    return Example(prompt=messages[-2]["content"], response=messages[-1]["content"], history=history)


def task_examples(task: str, split: Split, n: int | None, seed: int | None = None) -> list[Example | str]:
    """Examples of ``task``: ``"arithmetic"`` (``n`` problems of ``split``, see :func:`arithmetic_examples`)
    or the path of a .jsonl file (see :func:`load_examples`), whose first ``n`` records are used
    (all when ``n`` is None) whatever the split and seed: keep training and test data in separate files.
    """
    if task == "arithmetic":
        if n is None:
            raise WeightwiseError("the arithmetic task needs a number of examples: pass n")
        return arithmetic_examples(split, n, seed)
    if not task.endswith(".jsonl"):
        raise WeightwiseError(f"unknown task {task!r}: use 'arithmetic' or the path of a .jsonl file")
    examples = load_examples(task)
    return examples if n is None else examples[:n]


# --- encoding -------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` formats conversations with a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """Token ids the model sees before it answers: the chat template with the generation prompt, or,
    for a tokenizer without one, the history and prompt each followed by a newline."""
    if has_chat_template(tokenizer):
        return _ids(tokenizer, _chat_parts(tokenizer, example)[0])
    return _ids(tokenizer, _plain_prompt(example), special=True)


def stop_token_ids(tokenizer, example: Example | None = None) -> list[int]:
    """Ids that end an answer: the end-of-sequence token and the chat template's end-of-turn token
    (the first token the template puts after an assistant message)."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if has_chat_template(tokenizer):
        end = _ids(tokenizer, _chat_parts(tokenizer, example or Example("1 + 1", "2"))[2])
        if end and end[0] not in stops:
            stops.append(end[0])
    return stops


def encode_examples(examples: list[Example | str], tokenizer, max_length: int = 256) -> list[dict[str, torch.Tensor]]:
    """Token ids and labels for training, labels ``-100`` where no loss is taken.

    An :class:`Example` is the prompt (:func:`prompt_ids`), the response, and the end-of-turn token
    (chat template) or the end-of-sequence token (no template, when the tokenizer has one); only the
    response and that closing token carry labels. Text between the generation prompt and the response
    that the template adds (e.g. an empty reasoning block) is labelled too: the model has to produce it.
    An example longer than ``max_length`` tokens is dropped, not truncated (a cut prompt or answer would
    teach the wrong thing); the number dropped is logged as a warning.

    A string (``{"text"}`` record) is tokenized with the tokenizer's special tokens plus an
    end-of-sequence token, labels on every token, truncated to ``max_length``.
    """
    if max_length < 2:
        raise WeightwiseError(f"max_length {max_length} is too short: pass at least 2 tokens")
    encoded, dropped = [], 0
    for example in examples:
        item = encode_example(example, tokenizer, max_length)
        if item is None:
            dropped += 1
        else:
            encoded.append(item)
    if dropped:
        logger.warning("dropped %d of %d examples longer than max_length=%d tokens", dropped, len(examples), max_length)
    if examples and not encoded:
        raise WeightwiseError(f"every example is longer than max_length={max_length} tokens: raise max_length")
    return encoded


def encode_example(example: Example | str, tokenizer, max_length: int = 256) -> dict[str, torch.Tensor] | None:
    """One example's ``input_ids`` and ``labels`` as :func:`encode_examples` makes them; None when an
    :class:`Example` is longer than ``max_length`` (a text is truncated instead)."""
    if isinstance(example, str):
        ids = _text_ids(tokenizer, example)[:max_length]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)}
    context, answer = answer_split(tokenizer, example)
    if len(context) + len(answer) > max_length:
        return None
    return {"input_ids": torch.tensor(context + answer), "labels": torch.tensor([IGNORE_INDEX] * len(context) + answer)}


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence, else its unknown token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return candidate
    return 0


def collate(batch: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of encoded examples: ``input_ids`` with ``pad_token_id``, ``attention_mask``
    1 on real tokens, ``labels`` -100 on padding. Tensors are ``(B, longest)`` int64."""
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item["input_ids"])
        input_ids[row, :length] = item["input_ids"]
        attention_mask[row, :length] = 1
        labels[row, :length] = item["labels"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def answer_split(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(unscored context ids, scored ids: the response and its closing token)."""
    if has_chat_template(tokenizer):
        prompt, answer, rest = _chat_parts(tokenizer, example)
        closing = _ids(tokenizer, rest)[:1] or _eos(tokenizer)
        return _ids(tokenizer, prompt), _ids(tokenizer, answer) + closing
    return _ids(tokenizer, _plain_prompt(example), special=True), _ids(tokenizer, example.response) + _eos(tokenizer)


def _chat_parts(tokenizer, example: Example) -> tuple[str, str, str]:
    """The conversation rendered by the chat template, cut in three: the prompt up to and including the
    generation prompt, the text the model must generate up to the end of the response, and the rest."""
    messages = [*example.history, {"role": "user", "content": example.prompt}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": example.response}], tokenize=False
    )
    at = full.find(example.response, len(prompt)) if full.startswith(prompt) else -1
    if at < 0:
        raise WeightwiseError(
            "the tokenizer's chat template does not render the assistant response after the generation "
            "prompt: use a tokenizer whose template does, or plain {\"text\"} records"
        )
    end = at + len(example.response)
    return prompt, full[len(prompt):end], full[end:]


def _plain_prompt(example: Example) -> str:
    return "".join(message["content"] + "\n" for message in example.history) + example.prompt + "\n"


def _text_ids(tokenizer, text: str) -> list[int]:
    ids = _ids(tokenizer, text, special=True)
    return ids + _eos(tokenizer) if not ids or ids[-1] != tokenizer.eos_token_id else ids


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of ``text``; ``special`` adds the tokenizer's own BOS/EOS (rendered templates carry theirs)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
