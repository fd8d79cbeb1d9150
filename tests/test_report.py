import json

import pytest

from weightwise.errors import WeightwiseError
from weightwise.evaluate.report import load_metrics, pareto_front, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(name, bits, ppl, **extra):
    return {
        "name": name, "bits_per_weight": bits, "ppl": ppl, "mean_nll": 2.0, "n_tokens_scored": 3066,
        "n_windows": 6, "window": 512, "reference_ppl": 14.75, "kl_mean": 0.05, "top1_agreement": 0.9,
        "total_bytes": 90_000_000, "linear_params": 100, "quantized_layers": 210, "tokens_per_second": 290.0,
        "reference_tokens_per_second": 300.0, "speed_ratio": 0.97, "eval_seconds": 12.0, "python_version": "3.11.7",
        **extra,
    }


RUNS = [
    run("fp32", 32.0, 14.75, kl_mean=0.0, top1_agreement=1.0),
    run("int8 | g128", 8.25, 14.77),
    run("int4", 4.5, 15.9, format="int4", recipe={"method": "gptq"}, quantize_seconds=30.0),
    run("int3-bad", 5.0, 19.0),
    run("int2", 2.5, 40.0, tokens_per_second=None),
]


def test_write_report_writes_three_files(tmp_path):
    write_report(tmp_path / "out", RUNS, title="int formats", reference_name="fp32")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "pareto.png", "report.md"]
    assert (out / "pareto.png").read_bytes().startswith(PNG_SIGNATURE)
    md = (out / "report.md").read_text()
    for r in RUNS:
        assert r["name"].replace("|", "\\|") in md
    assert "![" in md and "(pareto.png)" in md
    assert "+1.150" in md and "+0.000" in md  # Δppl against the fp32 run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["runs"] == RUNS and set(metrics["environment"]) == {"python", "torch", "transformers"}
    assert load_metrics(out) == RUNS


def test_single_run_report_has_a_plot_and_no_reference(tmp_path):
    write_report(tmp_path, [run("only", None, 20.0, reference_ppl=None, kl_mean=None, top1_agreement=None)],
                 title="one", reference_name=None)
    assert (tmp_path / "pareto.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| only | — |" in (tmp_path / "report.md").read_text()


def test_report_rejects_bad_input(tmp_path):
    with pytest.raises(WeightwiseError, match="no runs"):
        write_report(tmp_path, [], title="t", reference_name=None)
    with pytest.raises(WeightwiseError, match="'base' is not among the runs"):
        write_report(tmp_path, RUNS, title="t", reference_name="base")


def test_pareto_front_keeps_the_lower_left_points():
    points = [(32.0, 14.75), (8.25, 14.77), (4.5, 15.9), (5.0, 19.0), (2.5, 40.0)]
    assert pareto_front(points) == [(2.5, 40.0), (4.5, 15.9), (8.25, 14.77), (32.0, 14.75)]


def test_load_metrics_from_a_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "w4", "recipe": {"format": "int4"}, "metrics": {"ppl": 15.0}}))
    assert load_metrics(tmp_path) == [{"name": "w4", "ppl": 15.0, "recipe": {"format": "int4"}}]
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "w4"}))
    with pytest.raises(WeightwiseError, match="no metrics"):
        load_metrics(tmp_path / "manifest.json")
    with pytest.raises(WeightwiseError, match="not found"):
        load_metrics(tmp_path / "missing")
