"""The ray scoring engine gives the local engine's scores and selection, and resumes a killed local run."""

import json
import sys

import numpy as np
import pytest
from conftest import tiny_model, tiny_tokenizer

from weightwise.errors import WeightwiseError
from weightwise.select import SelectConfig, parse_scorer, select
from weightwise.select.batch import ScoringContext
from weightwise.select.engine import ScoringWork
from weightwise.select.ray_engine import score_on_ray

ray = pytest.importorskip("ray", reason="the ray engine needs Ray: pip install 'weightwise[ray]'")
pytest.importorskip("ray.data", reason="the ray engine needs Ray Data: pip install 'weightwise[ray]'")

SCORERS = [parse_scorer("loss"), parse_scorer("ifd"), parse_scorer("el2n")]


@pytest.fixture(scope="module")
def cluster():
    """A local two-CPU cluster, started by the caller: the engine must join it and leave it running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture
def pool_file(tmp_path):
    records = [{"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}" if a % 2 else str(a + b)}
               for a in range(1, 7) for b in (2, 5, 9, 14, 30)]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(pool_file, out, engine, model, **fields):
    config = SelectConfig(scorers=SCORERS, fraction=0.3, batch_size=4, dedup="none", engine=engine, workers=2, **fields)
    return select(pool_file, out, config, model=model, tokenizer=tiny_tokenizer())


def test_ray_scores_and_selects_like_local(cluster, pool_file, tmp_path):
    model = tiny_model()  # one model for both: after a local forward it carries transformers' capture hooks
    local = run(pool_file, tmp_path / "local", "local", model)
    distributed = run(pool_file, tmp_path / "ray", "ray", model)
    assert ray.is_initialized()
    for label in ("loss", "ifd", "el2n"):
        assert np.isfinite(local.scores[label]).any()  # ifd: NaN where above 1 (no score), on both engines
        np.testing.assert_allclose(distributed.scores[label], local.scores[label], rtol=1e-6)
        assert distributed.stats.examples[label] == len(local.pool)
    assert distributed.chosen.tolist() == local.chosen.tolist()
    assert (tmp_path / "ray" / "selected.jsonl").read_text() == (tmp_path / "local" / "selected.jsonl").read_text()
    again = run(pool_file, tmp_path / "again", "local", model)  # the driver's model is left as it was
    np.testing.assert_array_equal(again.scores["loss"], local.scores["loss"])


def test_ray_resumes_a_killed_local_run(cluster, pool_file, tmp_path):
    model = tiny_model()
    reference = run(pool_file, tmp_path / "whole", "local", model)
    calls = []

    def stop_after_two_batches(module, args, kwargs):
        calls.append(1)
        if len(calls) > 4:  # two forwards per batch (ifd's second one without the prompt)
            raise KeyboardInterrupt

    hook = model.register_forward_pre_hook(stop_after_two_batches, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        run(pool_file, tmp_path / "resumed", "local", model)
    hook.remove()
    resumed = run(pool_file, tmp_path / "resumed", "ray", model)
    for label in ("loss", "ifd", "el2n"):
        assert resumed.stats.reused[label] == 8 and resumed.stats.examples[label] == len(reference.pool) - 8
        np.testing.assert_allclose(resumed.scores[label], reference.scores[label], rtol=1e-6)
    assert resumed.chosen.tolist() == reference.chosen.tolist()


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra
    config = SelectConfig(scorers=SCORERS, budget=1, engine="ray")
    with pytest.raises(WeightwiseError, match=r"pip install 'weightwise\[ray\]'"):
        score_on_ray(ScoringWork([], [[]]), ScoringContext(None, None), config)
