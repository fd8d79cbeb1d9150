"""Supervised tasks: arithmetic generation, JSONL parsing, encoding with answer-only labels, exact match."""

import json
import logging
import random

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from weightwise.data.tasks import (
    ARITHMETIC_MODULES,
    IGNORE_INDEX,
    Example,
    arithmetic_examples,
    arithmetic_split,
    collate,
    encode_examples,
    load_examples,
    prompt_ids,
    task_examples,
)
from weightwise.errors import WeightwiseError
from weightwise.evaluate.tasks import exact_match, normalize_answer

TEMPLATE = (  # a minimal chat template for the character-level tiny tokenizer
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def smol_tokenizer():
    from weightwise.io.models import load_tokenizer

    return load_tokenizer("default")


def templated_tiny_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def scored(example: dict) -> list[int]:
    return [t for t, label in zip(example["input_ids"].tolist(), example["labels"].tolist()) if label != IGNORE_INDEX]


# --- arithmetic ---------------------------------------------------------------------------------------


def test_arithmetic_is_deterministic_per_seed_and_a_prefix_for_larger_n():
    first = arithmetic_examples("train", 20)
    assert first == arithmetic_examples("train", 20, seed=0)
    assert arithmetic_examples("train", 30)[:20] == first
    assert arithmetic_examples("train", 20, seed=5) != first
    assert all(ex.prompt and ex.response for ex in first)


def test_arithmetic_splits_are_disjoint_and_cover_all_modules():
    train, test = arithmetic_examples("train", 300), arithmetic_examples("test", 150)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}
    assert len({ex.prompt for ex in test}) == len(test)  # no repeats within a split
    # even with the same seed the splits stay apart
    assert not {ex.prompt for ex in arithmetic_examples("test", 100, seed=0)} & {ex.prompt for ex in train}
    # round-robin: example i comes from module i % 5 and lies in its own split
    for i, ex in enumerate(test):
        assert arithmetic_split(ARITHMETIC_MODULES[i % 5], ex.prompt) == "test"
    # the five modules, told apart by their wording: mul at i % 5 == 2, div at 3, mixed (fractions) at 4
    prompts = [[ex.prompt for ex in train[k::5]] for k in range(5)]
    says_divide = [sum("divide" in p.lower() for p in group) for group in prompts]
    says_times = [sum(any(w in p for w in ("*", "times", "roduct", "ultiply")) for p in group) for group in prompts]
    assert says_divide == [0, 0, 0, 60, 0]
    assert says_times[:4] == [0, 0, 60, 0]
    assert sum("/" in p for p in prompts[4]) > 45 and not any("/" in p for group in prompts[:4] for p in group)
    operators = [sum(p.count("+") + p.count(" - ") for p in group) for group in prompts]
    assert operators[1] > 2 * operators[0]  # add_sub_multiple chains several terms


def test_arithmetic_leaves_global_random_states_unchanged():
    random.seed(123)
    np.random.seed(456)
    py_state, np_state = random.getstate(), np.random.get_state()
    arithmetic_examples("test", 10, seed=7)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_arithmetic_rejects_bad_arguments():
    with pytest.raises(WeightwiseError, match="split"):
        arithmetic_examples("valid", 3)
    with pytest.raises(WeightwiseError, match="difficulty"):
        arithmetic_examples("train", 3, difficulty="extreme")


# --- JSONL --------------------------------------------------------------------------------------------


def test_load_examples_reads_the_three_forms(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [
        {"prompt": "2+2?", "response": "4", "id": 1},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"text": "plain text"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n")
    examples = load_examples(path)
    assert examples == [
        Example("2+2?", "4"),
        Example("Hi", "Hello", history=({"role": "system", "content": "Be brief."},)),
        "plain text",
    ]
    assert task_examples(str(path), "train", 2) == examples[:2]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2 is not valid JSON"),
        ('{"prompt": "x"}', 'line 2 needs string "prompt" and "response"'),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}', "line 2 does not end"),
        ('{"other": 1}', "line 2 is in none of the known forms"),
        ("[1, 2]", "line 2 is not a JSON object"),
    ],
)
def test_load_examples_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(WeightwiseError, match=message):
        load_examples(path)


def test_task_examples_rejects_unknown_tasks():
    with pytest.raises(WeightwiseError, match="unknown task"):
        task_examples("poetry", "train", 3)


# --- encoding -----------------------------------------------------------------------------------------


def test_encode_with_chat_template_scores_only_the_answer_and_end_of_turn(smol_tokenizer):
    tok = smol_tokenizer
    examples = [Example("Divide 51 by -106.", "-51/106"),
                Example("What is 2+3?", "5", history=({"role": "system", "content": "Be brief."},))]
    encoded = encode_examples(examples, tok)
    for ex, enc in zip(examples, encoded):
        context = prompt_ids(tok, ex)
        assert enc["input_ids"].tolist()[: len(context)] == context
        assert (enc["labels"][: len(context)] == IGNORE_INDEX).all()
        assert tok.decode(scored(enc)) == ex.response + "<|im_end|>"
        # the pieces tokenize exactly as the whole rendered conversation does
        messages = [*ex.history, {"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}]
        whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        assert whole[: len(enc["input_ids"])] == enc["input_ids"].tolist()
    assert "Be brief." in tok.decode(encoded[1]["input_ids"])


def test_encode_without_chat_template_and_plain_text():
    tok = tiny_tokenizer()
    assert tok.chat_template is None and tok.eos_token_id is None
    prompt_enc, text_enc = encode_examples([Example("1+2=", "3"), "abcdef"], tok)
    assert tok.decode(prompt_enc["input_ids"].tolist()).replace(" ", "") == "1+2=<unk>3"  # "\n" is unknown here
    assert scored(prompt_enc) == tok("3", add_special_tokens=False)["input_ids"]
    assert torch.equal(text_enc["labels"], text_enc["input_ids"]) and len(text_enc["input_ids"]) == 6


def test_encode_appends_eos_without_template_and_truncates_or_drops(caplog):
    tok = tiny_tokenizer()
    tok.eos_token = "~"
    enc = encode_examples([Example("q", "42")], tok)[0]
    assert scored(enc) == tok("42~", add_special_tokens=False)["input_ids"]
    with caplog.at_level(logging.WARNING, logger="weightwise.data.tasks"):
        kept = encode_examples([Example("q" * 20, "1"), Example("q", "1"), "x" * 30], tok, max_length=10)
    assert len(kept) == 2 and len(kept[1]["input_ids"]) == 10  # long example dropped, long text cut
    assert "dropped 1 of 3" in caplog.text
    with pytest.raises(WeightwiseError, match="max_length"):
        encode_examples([Example("q" * 20, "1")], tok, max_length=10)


def test_collate_pads_right_and_masks_labels():
    batch = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    out = collate(batch, pad_token_id=0)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, 3) for k in ("input_ids", "attention_mask", "labels")}
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["input_ids"].dtype == torch.long


# --- evaluation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [(" -3.0 ", "-3"), ("5.", "5"), ("+0.50", "0.5"), ("-0", "0"), (".5", "0.5"), ("12.340", "12.34"),
     ("3 / -4", "-3/4"), ("-51/106.", "-51/106"), ("6/8", "6/8"), (" two   words. ", "two words"), ("1e3", "1e3")],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_counts_greedy_answers():
    model, tok = tiny_model(3, tie_word_embeddings=False), templated_tiny_tokenizer()
    examples = [Example("What is " + "1" * (a % 4) + f"{a} + {a + 1}?", "x") for a in range(8)]
    first = exact_match(model, tok, examples, max_new_tokens=5, batch_size=1, n_samples=8)
    assert first["n"] == 8 and 0.0 <= first["accuracy"] <= 1.0
    got = [sample["got"] for sample in first["samples"]]
    assert all(got) and len(set(got)) > 1  # real, varied answers
    # expected = what greedy decoding produces → all correct, also in left-padded batches of 3
    right = [Example(ex.prompt, answer) for ex, answer in zip(examples, got)]
    assert exact_match(model, tok, right, max_new_tokens=5, batch_size=3)["accuracy"] == 1.0
    half = [Example(ex.prompt, ex.response + ("1" if i % 2 else "")) for i, ex in enumerate(right)]
    assert exact_match(model, tok, half, max_new_tokens=5, batch_size=8)["accuracy"] == 0.5
    assert tok.padding_side == "right"  # the caller's tokenizer is untouched
    assert not model.training


def test_exact_match_stops_at_end_of_sequence():
    model, tok = tiny_model(3, tie_word_embeddings=False), templated_tiny_tokenizer()
    example = Example("What is 0 + 1?", "x")
    tokens = exact_match(model, tok, [example], max_new_tokens=5)["samples"][0]["got"].split(" ")
    assert len(tokens) == 5 and tokens[0] != tokens[1]
    tok.eos_token = tokens[1]
    assert exact_match(model, tok, [Example(example.prompt, tokens[0])], max_new_tokens=5)["accuracy"] == 1.0


def test_exact_match_rejects_text_records():
    with pytest.raises(WeightwiseError, match="prompt/response"):
        exact_match(tiny_model(), tiny_tokenizer(), ["just text"])
