"""Filters before scoring: exact and near duplicates, contamination with evaluation texts."""

import random

import pytest

from weightwise.errors import WeightwiseError
from weightwise.select.filters import char_shingles, contaminated, exact_duplicates, near_duplicates, normalize_text


def test_normalize_text():
    assert normalize_text("  What IS\t12 +  7?\n\n19  ") == "what is 12 + 7? 19"
    assert normalize_text("Straße") == normalize_text("STRASSE")  # casefold, not lower


def test_exact_duplicates_point_to_the_first_occurrence_after_normalising():
    texts = ["What is 2+2?\n4", "Other", "what is 2+2? 4", "  WHAT IS 2+2?\n4 ", "other", "What is 2+2?\n4."]
    assert exact_duplicates(texts) == {2: 0, 3: 0, 4: 1}


def test_char_shingles_of_short_and_long_texts():
    assert char_shingles("Hi ") == {"hi"}
    assert char_shingles("abcdefg") == {"abcde", "bcdef", "cdefg"}


def test_near_duplicates_catch_one_character_edits_of_short_problems():
    texts = ["What is 12 + 7?\n19", "Calculate 5*3.\n15", "What is 12 + 7?\n19.", "calculate 5*3.\n15!"]
    found = near_duplicates(texts)
    assert set(found) == {2, 3}
    assert found[2][0] == 0 and found[3][0] == 1
    assert all(0.8 <= jaccard <= 1 for _, jaccard in found.values())


def test_near_duplicates_keep_the_first_of_a_group_and_report_the_closest_kept_text():
    base = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    texts = [base, "Something else entirely, about trains leaving stations.", base + "!", base.replace("48", "49"), base]
    found = near_duplicates(texts)
    assert set(found) == {2, 3, 4}
    assert {kept for kept, _ in found.values()} == {0}
    assert found[4][1] == 1.0  # identical text: every MinHash value agrees


def test_near_duplicates_do_not_flag_distinct_problems():
    rng = random.Random(0)
    texts = list({f"What is {rng.randint(1, 999)} {rng.choice('+-*')} {rng.randint(1, 999)}?\n{rng.randint(1, 9999)}"
                  for _ in range(2000)})
    texts += ["What is 12 + 7?\n19", "What is 12 + 8?\n20", "Calculate 5*3.\n15", "Calculate 6*4.\n24"]
    assert near_duplicates(texts) == {}


def test_near_duplicates_threshold_is_checked_and_respected():
    texts = ["What is 12 + 7?\n19", "What is 12 + 7?\n18"]  # one changed digit: Jaccard 13/15 on 5-grams
    assert 1 in near_duplicates(texts, threshold=0.7)
    assert near_duplicates(texts, threshold=0.99) == {}
    with pytest.raises(WeightwiseError, match="threshold"):
        near_duplicates(texts, threshold=0)
    with pytest.raises(WeightwiseError, match="num_perm"):
        near_duplicates(texts, num_perm=16)


EVAL = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four.",
    "What is 12 + 7?\n19",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.",
]


def test_contamination_catches_a_13_word_span_inside_a_longer_text():
    pool = ["Intro words first. " + "She eats three for breakfast every morning, and BAKES muffins for her friends "
            "every day!" + " Then more words.",
            "She eats three for breakfast every morning and bakes muffins for her dogs.",  # a 12-word span only
            "A completely unrelated example about the weather in spring and summer across the northern hemisphere."]
    assert contaminated(pool, EVAL) == {0: "shares a 13-word span with evaluation text 0"}
    assert contaminated(pool, EVAL, n=12) == {0: "shares a 12-word span with evaluation text 0",
                                               1: "shares a 12-word span with evaluation text 0"}


def test_contamination_compares_short_texts_whole():
    pool = ["what is 12+7? 19",  # the same short problem, punctuation and case aside
            "Homework: what is 12 + 7? 19, says the key, and a few more words to make this text long enough here.",
            "What is 12 + 7?\n20",  # another answer: not the evaluation text
            "bolts of blue fiber"]  # short pool text found inside a longer evaluation text
    assert contaminated(pool, EVAL) == {0: "appears whole in evaluation text 1",
                                        1: "contains evaluation text 1 whole",
                                        3: "appears whole in evaluation text 2"}


def test_contamination_ignores_texts_without_words_and_checks_n():
    assert contaminated(["?!", "..."], ["?!"]) == {}
    with pytest.raises(WeightwiseError, match="at least 1"):
        contaminated(["a"], ["a"], n=0)
