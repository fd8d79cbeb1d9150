"""select(): pool reading and bad lines, the resumable score cache, outputs, errors, and the CLI."""

import gzip
import json

import numpy as np
import pytest
from conftest import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from weightwise.cli import app
from weightwise.data.tasks import load_examples
from weightwise.errors import WeightwiseError
from weightwise.select import SelectConfig, parse_scorer, select
from weightwise.select.cache import ScoreCache
from weightwise.select.pool import read_pool

PROBLEMS = [(f"What is {a} + {b}?", str(a + b)) for a, b in [(3, 4), (12, 7), (5, 9), (21, 30), (8, 8), (40, 2),
                                                             (13, 6), (7, 70), (11, 11), (2, 99), (64, 1), (5, 50)]]


def write_pool(path, records, compress=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture
def pool_file(tmp_path):
    return write_pool(tmp_path / "pool.jsonl", [{"prompt": p, "response": r, "module": "add"} for p, r in PROBLEMS])


def test_bad_lines_are_reported_with_their_numbers(tmp_path):
    path = write_pool(tmp_path / "pool.jsonl", [
        {"prompt": "1 + 1?", "response": "2"}, "{not json", {"prompt": "only a prompt"}, {"prompt": 3, "response": "x"},
        {"text": "   "}, "[1, 2]", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"text": "a plain document"}])
    pool = read_pool(path)
    assert [ex.line for ex in pool.examples] == [1, 7, 8]
    assert [b.line for b in pool.bad_lines] == [2, 3, 4, 5, 6]
    assert "not valid JSON" in pool.bad_lines[0].reason and pool.bad_lines[3].reason == "empty text"
    with pytest.raises(WeightwiseError, match="line 2: not valid JSON"):
        read_pool(path, "fail")


def test_gzip_pool_reads_like_plain(tmp_path):
    records = [{"prompt": p, "response": r} for p, r in PROBLEMS[:3]]
    plain, packed = read_pool(write_pool(tmp_path / "a.jsonl", records)), read_pool(write_pool(tmp_path / "a.jsonl.gz", records, True))
    assert [ex.key for ex in plain.examples] == [ex.key for ex in packed.examples]


def test_empty_pool_and_truncated_gzip_are_clear_errors(tmp_path):
    with pytest.raises(WeightwiseError, match="no usable example"):
        read_pool(write_pool(tmp_path / "empty.jsonl", ["", "{bad"]))
    whole = write_pool(tmp_path / "p.jsonl.gz", [{"prompt": p, "response": r} for p, r in PROBLEMS] * 50, True).read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightwiseError, match="could not be read to the end"):
        read_pool(tmp_path / "cut.jsonl.gz")


def test_score_cache_ignores_a_torn_line_and_other_settings(tmp_path):
    cache = ScoreCache(tmp_path, "loss", {"model": "a"})
    cache.add(["k1", "k2"], np.array([1.5, np.nan]))
    with cache.path.open("a") as f:
        f.write('{"keys": ["k3"], "sco')  # a kill in the middle of a write
    again = ScoreCache(tmp_path, "loss", {"model": "a"})
    assert again.scores["k1"] == 1.5 and np.isnan(again.scores["k2"]) and "k3" not in again.scores
    again.add(["k3"], np.array([2.0]))
    assert ScoreCache(tmp_path, "loss", {"model": "a"}).lookup(["k1", "k3"]).tolist() == [1.5, 2.0]
    assert ScoreCache(tmp_path, "loss", {"model": "b"}).scores == {}


def run(pool_file, out, model=None, **fields):
    fields.setdefault("budget", 4)
    fields.setdefault("dedup", "none")
    model = model or tiny_model()
    return select(pool_file, out, SelectConfig(**fields), model=model, tokenizer=tiny_tokenizer())


def test_select_writes_every_output(pool_file, tmp_path):
    out = tmp_path / "sel"
    selection = run(pool_file, out, scorers=[parse_scorer("loss"), parse_scorer("ifd:0.5")])
    selected = load_examples(out / "selected.jsonl")
    assert len(selected) == 4 and len(selection.kept) == 4
    rows = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert len(rows) == len(PROBLEMS)
    kept_rows = [r for r in rows if r["weightwise_select"]["keep"]]
    assert {r["prompt"] for r in kept_rows} == {ex.prompt for ex in selected}
    assert all(r["weightwise_select"]["reason"] for r in rows if not r["weightwise_select"]["keep"])
    # top keeps the best combined rank score
    combined = [r["weightwise_select"]["combined"] for r in rows]
    kept_scores = sorted(c for r, c in zip(rows, combined) if r["weightwise_select"]["keep"])
    dropped_scores = [c for r, c in zip(rows, combined) if not r["weightwise_select"]["keep"] and c is not None]
    assert min(kept_scores) >= max(dropped_scores)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "selection" and manifest["counts"]["kept"] == 4
    assert manifest["scoring"]["loss"]["examples"] == len(PROBLEMS)
    assert "loss" in (out / "report.md").read_text() and (out / "hist-loss.png").is_file()
    assert not (tmp_path / ".sel.score-cache").exists()


def test_duplicates_are_dropped_with_their_reason(tmp_path):
    records = [{"prompt": p, "response": r} for p, r in PROBLEMS[:6]]
    records.append({"prompt": "What is 3 + 4?", "response": "7"})  # exact copy of line 1
    path = write_pool(tmp_path / "pool.jsonl", records)
    selection = run(path, tmp_path / "sel", scorers=[parse_scorer("length")], dedup="exact", budget=2)
    assert selection.reasons[6] == "exact duplicate of line 1"
    assert selection.reason_counts()["exact duplicate"] == 1


def test_a_killed_run_resumes_and_ends_with_identical_scores(pool_file, tmp_path):
    fields = dict(scorers=[parse_scorer("loss"), parse_scorer("el2n")], batch_size=3)
    reference = run(pool_file, tmp_path / "whole", **fields)

    model = tiny_model()
    calls = []

    def stop_after_two_batches(module, args, kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt

    hook = model.register_forward_pre_hook(stop_after_two_batches, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        run(pool_file, tmp_path / "resumed", model=model, **fields)
    hook.remove()
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    cached = list((tmp_path / ".resumed.score-cache").glob("loss-*.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 3  # header + two batches

    resumed = run(pool_file, tmp_path / "resumed", model=model, **fields)
    for label in ("loss", "el2n"):
        np.testing.assert_array_equal(resumed.scores[label], reference.scores[label])
    assert resumed.stats.reused["loss"] == 6
    assert resumed.kept == reference.kept


def test_budget_errors(pool_file, tmp_path):
    with pytest.raises(WeightwiseError, match="larger than"):
        run(pool_file, tmp_path / "a", scorers=[parse_scorer("length")], budget=len(PROBLEMS) + 1)
    with pytest.raises(ValueError, match="exactly one of budget"):
        SelectConfig(budget=3, fraction=0.5)
    with pytest.raises(ValueError, match="target"):
        SelectConfig(budget=3, scorers=[parse_scorer("rds")])
    with pytest.raises(WeightwiseError, match="unknown scorer"):
        parse_scorer("perplexity")
    with pytest.raises(WeightwiseError, match="weight"):
        parse_scorer("loss:-1")


def test_existing_output_is_refused(pool_file, tmp_path):
    (tmp_path / "sel").mkdir()
    with pytest.raises(WeightwiseError, match="already exists"):
        run(pool_file, tmp_path / "sel", scorers=[parse_scorer("length")])


def test_cli_select_and_its_errors(pool_file, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["select", str(pool_file), "-o", str(tmp_path / "sel"), "--scorer", "length",
                                 "--budget", "3", "--dedup", "exact"])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "sel" / "selected.jsonl").read_text().splitlines()) == 3
    bad = write_pool(tmp_path / "bad.jsonl", ["{oops", {"prompt": "a", "response": "b"}])
    result = runner.invoke(app, ["select", str(bad), "-o", str(tmp_path / "x"), "--scorer", "length", "--budget", "1",
                                 "--on-error", "fail"])
    assert result.exit_code != 0 and "line 1" in str(result.exception)


def test_examples_longer_than_max_length_get_no_score_and_a_reason(tmp_path):
    records = [{"prompt": p, "response": r} for p, r in PROBLEMS[:5]] + [{"prompt": "x" * 300, "response": "long"}]
    path = write_pool(tmp_path / "pool.jsonl", records)
    selection = run(path, tmp_path / "sel", scorers=[parse_scorer("loss")], max_length=64, batch_size=1, budget=2)
    assert np.isnan(selection.scores["loss"][5]) and np.isfinite(selection.scores["loss"][:5]).all()
    assert selection.reasons[5].startswith("no loss score")


def test_less_warms_up_on_a_seeded_sample_of_the_pool(pool_file, tmp_path):
    target = write_pool(tmp_path / "dev.jsonl", [{"prompt": "What is 1 + 1?", "response": "2"}])
    less = parse_scorer("less").model_copy(update={"warmup_examples": 4, "warmup_steps": 2, "targets": [r"q_proj$"]})
    first = run(pool_file, tmp_path / "a", scorers=[less], target=str(target))
    again = run(pool_file, tmp_path / "b", scorers=[less], target=str(target))
    np.testing.assert_array_equal(first.scores["less"], again.scores["less"])
    other = less.model_copy(update={"seed": 1})
    assert not np.allclose(run(pool_file, tmp_path / "c", scorers=[other], target=str(target)).scores["less"],
                           first.scores["less"])
