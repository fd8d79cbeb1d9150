import json

import pytest

from weightwise.errors import WeightwiseError
from weightwise.evaluate.report import load_metrics, pareto_figure, pareto_front, place_labels, write_report

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


def test_plot_zooms_on_the_quantized_runs_with_the_float_source_as_a_labelled_line():
    runs = [*RUNS[:2], {**RUNS[2], "name": "int4 rtn", "recipe": {"method": {"name": "rtn"}}},
            {**RUNS[2], "name": "int4 gptq", "ppl": 15.5, "recipe": {"method": {"name": "gptq"}}}, *RUNS[3:]]
    ax = pareto_figure(runs, "t", "fp32").axes[0]
    low, high = ax.get_xlim()
    assert low < 2.5 and 8.25 < high < 16  # not out to the float source's 32 bits
    assert any(list(line.get_ydata()) == [14.75, 14.75] for line in ax.get_lines())  # fp32 as a horizontal line
    assert any(text.get_text() == "fp32: ppl 14.75" for text in ax.texts)
    labels = {text.get_text() for text in ax.texts}
    assert {"int4 rtn", "int4 gptq", "int2"} <= labels and "fp32" not in labels
    assert {collection.get_label() for collection in ax.collections} == {"model", "rtn", "gptq"}  # a marker per method


def test_plot_labels_do_not_overlap_on_clustered_points():
    runs = [run("fp32", 32.0, 14.75)] + [run(f"int4 g32 variant {i}", 4.5 + 0.01 * i, 16.0 + 0.05 * i) for i in range(6)]
    fig = pareto_figure(runs, "t", "fp32")
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in fig.axes[0].texts]
    assert len(boxes) == 7
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_place_labels_avoids_labels_and_obstacles_and_stays_inside():
    anchors = [(50.0, 50.0), (50.0, 52.0), (95.0, 50.0)]
    offsets = place_labels(anchors, [(30.0, 10.0)] * 3, bounds=(0, 0, 100, 100), obstacles=[(55, 45, 80, 55)])
    boxes = [(x + dx, y + dy, x + dx + 30, y + dy + 10) for (x, y), (dx, dy) in zip(anchors, offsets)]
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert 0 <= x0 and x1 <= 100 and 0 <= y0 and y1 <= 100
        assert x1 <= 55 or x0 >= 80 or y1 <= 45 or y0 >= 55
        for u0, v0, u1, v1 in boxes[i + 1:]:
            assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0
