"""Filters run before scoring: exact duplicates, near duplicates (MinHash LSH) and contamination with
evaluation texts. Each returns, for every text it drops, what it matched (plain data the report words).

Near duplicates are compared on character 5-grams of the normalised text, not word n-grams: pool
examples are often short problems ("What is 12 + 7?\\n19"), where one edited character changes a whole
word and with it every word shingle through that word. On that pair with a trailing "." added, word
3-grams give Jaccard 0.6 (missed at 0.8), character 5-grams 0.93; two different short problems
("What is 12 + 7?\\n19" and "What is 12 + 8?\\n20") stay below 0.5 either way.
"""

from __future__ import annotations

import re

from datasketch import MinHash, MinHashLSH

from weightwise.errors import WeightwiseError

_WORD = re.compile(r"\w+")
_LSH_CAP = 0.9  # highest LSH threshold datasketch can band with 32 permutations (b ≥ 2)


def normalize_text(text: str) -> str:
    """Casefolded, whitespace runs collapsed to one space, stripped: what duplicate checks compare."""
    return " ".join(text.casefold().split())


def exact_duplicates(texts: list[str]) -> dict[int, int]:
    """Dropped index → index of the first text with the same normalised text (which is kept)."""
    first: dict[str, int] = {}
    dropped: dict[int, int] = {}
    for index, text in enumerate(texts):
        kept = first.setdefault(normalize_text(text), index)
        if kept != index:
            dropped[index] = kept
    return dropped


def char_shingles(text: str, size: int = 5) -> set[str]:
    """The character ``size``-grams of the normalised text (the whole text when it is shorter)."""
    norm = normalize_text(text)
    if len(norm) <= size:
        return {norm}
    return {norm[i : i + size] for i in range(len(norm) - size + 1)}


def near_duplicates(texts: list[str], threshold: float = 0.8, num_perm: int = 128, shingle: int = 5,
                    seed: int = 1) -> dict[int, tuple[int, float]]:
    """Dropped index → (kept index, estimated Jaccard) for texts whose character ``shingle``-gram sets have a
    MinHash-estimated Jaccard similarity ≥ ``threshold`` with an earlier kept text (the most similar one is
    reported). LSH proposes the pairs (banded for min(threshold, 0.9): datasketch cannot band higher ones),
    the estimate confirms them. Earlier texts are kept."""
    if not 0 < threshold <= 1:
        raise WeightwiseError(f"near-duplicate threshold {threshold} is outside (0, 1]: give a Jaccard similarity such as 0.8")
    if shingle < 1:
        raise WeightwiseError(f"shingle size {shingle}: give at least 1 character")
    if num_perm < 32:
        raise WeightwiseError(f"num_perm {num_perm} is too few for LSH banding: give at least 32 permutations")
    sketches = MinHash.bulk(([s.encode("utf-8") for s in char_shingles(t, shingle)] for t in texts),
                            num_perm=num_perm, seed=seed)
    index = MinHashLSH(threshold=min(threshold, _LSH_CAP), num_perm=num_perm)
    dropped: dict[int, tuple[int, float]] = {}
    for i, sketch in enumerate(sketches):
        matches = [(sketch.jaccard(sketches[j]), -j) for j in index.query(sketch)]
        best = max(matches, default=(0.0, 0))
        if best[0] >= threshold:
            dropped[i] = (-best[1], best[0])
        else:
            index.insert(i, sketch)
    return dropped


def _windows(tokens: list[str], size: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + size]) for i in range(len(tokens) - size + 1)]


def contaminated(texts: list[str], eval_texts: list[str], n: int = 13) -> dict[int, str]:
    """Index → reason for texts that share an ``n``-word span (``\\w+`` tokens of the normalised text) with an
    evaluation text. Texts of fewer than n words are compared whole: an evaluation text that short
    contaminates every text containing its words as a contiguous run, and a pool text that short is
    contaminated when an evaluation text contains it. Evaluation texts are numbered from 0."""
    if n < 1:
        raise WeightwiseError(f"contamination n-gram of {n} words: give at least 1")
    pool_tokens = [_WORD.findall(normalize_text(t)) for t in texts]
    spans: dict[tuple[str, ...], int] = {}
    whole_evals: dict[tuple[str, ...], int] = {}
    short_lengths = {len(tokens) for tokens in pool_tokens if 0 < len(tokens) < n}
    inside_evals: dict[tuple[str, ...], int] = {}
    for e, text in enumerate(eval_texts):
        tokens = _WORD.findall(normalize_text(text))
        if 0 < len(tokens) < n:
            whole_evals.setdefault(tuple(tokens), e)
        for window in _windows(tokens, n):
            spans.setdefault(window, e)
        for length in short_lengths:
            for window in _windows(tokens, length):
                inside_evals.setdefault(window, e)
    whole_lengths = sorted({len(key) for key in whole_evals})
    reasons: dict[int, str] = {}
    for i, tokens in enumerate(pool_tokens):
        if not tokens:
            continue
        if len(tokens) < n and tuple(tokens) in inside_evals:
            reasons[i] = f"appears whole in evaluation text {inside_evals[tuple(tokens)]}"
            continue
        hit = next((spans[w] for w in _windows(tokens, n) if w in spans), None)
        if hit is not None:
            reasons[i] = f"shares a {n}-word span with evaluation text {hit}"
            continue
        hit = next((whole_evals[w] for length in whole_lengths for w in _windows(tokens, length) if w in whole_evals), None)
        if hit is not None:
            reasons[i] = f"contains evaluation text {hit} whole"
    return reasons
