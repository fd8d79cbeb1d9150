"""Reports of one or more evaluation runs: ``metrics.json``, a Markdown table (``report.md``) and a
size/perplexity Pareto plot (``pareto.png``)."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

from weightwise.errors import WeightwiseError

PLOT_NAME = "pareto.png"


def write_report(
    out_dir: str | Path, runs: list[dict], title: str, reference_name: str | None = None, settings: dict | None = None
) -> None:
    """Write ``metrics.json``, ``report.md`` and ``pareto.png`` for ``runs`` into ``out_dir``.

    Each run is a dict with a ``name`` and the fields of an ``EvalResult`` (optionally ``format``,
    ``recipe``, ``quantize_seconds``). Δppl is taken against the run named ``reference_name``, or
    else against each run's own ``reference_ppl``. ``settings`` (e.g. the EvalConfig) go into metrics.json.
    """
    if not runs:
        raise WeightwiseError("no runs to report: evaluate at least one model")
    names = [run.get("name") for run in runs]
    if None in names:
        raise WeightwiseError("a run has no 'name': give every run a name")
    if reference_name is not None and reference_name not in names:
        raise WeightwiseError(f"reference {reference_name!r} is not among the runs ({', '.join(names)}): name one of them")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"title": title, "reference": reference_name, "settings": settings, "environment": _environment(), "runs": runs}
    _write_atomic(out / "metrics.json", (json.dumps(metrics, indent=2, default=str) + "\n").encode())
    _write_atomic(out / PLOT_NAME, _pareto_png(runs, title, reference_name))
    _write_atomic(out / "report.md", _markdown(runs, title, reference_name, metrics["environment"]).encode())


def load_metrics(path: str | Path) -> list[dict]:
    """Runs stored in a report folder's ``metrics.json`` or a quantized-model folder's ``manifest.json``
    (given the folder or the file), so several runs can go into one table."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json" if (path / "metrics.json").is_file() else path / "manifest.json"
    if not path.is_file():
        raise WeightwiseError(f"{path} not found: pass a run folder holding metrics.json or manifest.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise WeightwiseError(f"{path} is not valid JSON ({err}): re-run the evaluation that wrote it") from None
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return data["runs"]
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        run = {"name": data.get("name") or path.parent.name, **data["metrics"]}
        if "recipe" in data:
            run.setdefault("recipe", data["recipe"])
        return [run]
    raise WeightwiseError(f"{path} holds no metrics: evaluate the model first (weightwise eval)")


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates (lower is better), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _reference_ppl(run: dict, runs: list[dict], reference_name: str | None) -> float | None:
    if reference_name is not None:
        return next(r.get("ppl") for r in runs if r["name"] == reference_name)
    return run.get("reference_ppl")


def _markdown(runs: list[dict], title: str, reference_name: str | None, env: dict) -> str:
    header = ["name", "bits/weight", "MB", "ppl", "Δppl vs ref", "KL", "top-1 agree", "tokens/s"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        ref_ppl, ppl = _reference_ppl(run, runs, reference_name), run.get("ppl")
        delta = ppl - ref_ppl if ppl is not None and ref_ppl is not None else None
        total_bytes = run.get("total_bytes")
        top1 = run.get("top1_agreement")
        cells = [
            str(run["name"]).replace("|", "\\|"),
            _fmt(run.get("bits_per_weight"), ".2f"),
            _fmt(total_bytes / 1e6 if total_bytes is not None else None, ".1f"),
            _fmt(ppl, ".3f"),
            _fmt(delta, "+.3f"),
            _fmt(run.get("kl_mean"), ".4f"),
            _fmt(top1 * 100 if top1 is not None else None, ".1f") + ("%" if top1 is not None else ""),
            _fmt(run.get("tokens_per_second"), ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    first = runs[0]
    lines += [
        "",
        f"Perplexity over {first.get('n_tokens_scored', '?')} scored tokens "
        f"({first.get('n_windows', '?')} windows of {first.get('window', '?')} tokens), "
        f"Python {first.get('python_version', env['python'])}, torch {env['torch']}, transformers {env['transformers']}."
        + (f" Reference: {reference_name}." if reference_name else ""),
        "",
        f"![bits per weight against perplexity]({PLOT_NAME})",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


FLOAT_BITS = 16.0  # runs at or above this many bits/weight are float models: reference lines, not points
METHOD_MARKERS = {"rtn": "o", "gptq": "s", "awq": "^", "fpsearch": "D", "model": "P"}
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in display pixels


def _method(run: dict) -> str:
    """The quantization method a run's recipe names ('model' for a run without one)."""
    method = (run.get("recipe") or {}).get("method")
    return (method.get("name") if isinstance(method, dict) else method) or "model"


def _overlap(a: Box, b: Box) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _polyline_boxes(vertices: list[tuple[float, float]], step: float = 4.0, half: float = 1.5) -> list[Box]:
    """Small boxes every ``step`` pixels along a polyline: a drawn line as obstacles for :func:`place_labels`."""
    boxes = []
    for (x0, y0), (x1, y1) in zip(vertices, vertices[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        for i in range(n + 1):
            x, y = x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n
            boxes.append((x - half, y - half, x + half, y + half))
    return boxes


def place_labels(anchors: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], bounds: Box,
                 obstacles: Sequence[Box] = (), gap: float = 5.0) -> list[tuple[float, float]]:
    """Offsets (pixels) of each label's lower-left corner from its anchor, so that labels overlap neither each
    other nor the ``obstacles`` (markers, other text) and stay inside ``bounds``.

    Greedy, label by label: candidate spots around the anchor on rings of growing radius (right, left, above,
    below, then the diagonals); the first free spot wins, else the one with the least overlap.
    """
    placed: list[Box] = list(obstacles)
    offsets = []
    for (x, y), (w, h) in zip(anchors, sizes):
        best, best_cost = None, float("inf")
        for radius in (gap, 2.5 * gap, 5 * gap, 8 * gap, 12 * gap):
            d = 0.7 * radius
            for dx, dy in ((radius, -h / 2), (-radius - w, -h / 2), (-w / 2, radius), (-w / 2, -radius - h),
                           (d, d), (-d - w, d), (d, -d - h), (-d - w, -d - h)):
                box = (x + dx, y + dy, x + dx + w, y + dy + h)
                outside = w * h - _overlap(box, bounds)
                cost = sum(_overlap(box, other) for other in placed) + 10 * outside
                if cost < best_cost:
                    best, best_cost = (dx, dy), cost
                if cost == 0:
                    break
            if best_cost == 0:
                break
        dx, dy = best
        placed.append((x + dx, y + dy, x + dx + w, y + dy + h))
        offsets.append(best)
    return offsets


def pareto_figure(runs: list[dict], title: str, reference_name: str | None):
    """The bits-per-weight / perplexity plot as a matplotlib Figure.

    Quantized runs are points (a marker per method) with labels placed clear of each other, joined by the Pareto
    frontier; float runs (≥ FLOAT_BITS bits/weight) and the reference are labelled horizontal lines at their
    perplexity, so the bits axis spans the quantized range only.
    """
    # Imported here: the Figure/Agg canvas pair draws without touching matplotlib's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(9, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.08, right=0.78, top=0.92, bottom=0.1)  # fixed, so label pixels stay where placed
    ax = fig.add_subplot()
    points = [r for r in runs if r.get("bits_per_weight") is not None and r.get("ppl") is not None and math.isfinite(r["ppl"])]
    quantized = [r for r in points if r["bits_per_weight"] < FLOAT_BITS]
    shown = quantized or points  # only float runs: plot them as points
    lines = [(str(r["name"]), float(r["ppl"])) for r in points if quantized and r["bits_per_weight"] >= FLOAT_BITS]
    ref_ppl = _reference_ppl(runs[0], runs, reference_name)
    if ref_ppl is not None and math.isfinite(ref_ppl) and not any(math.isclose(ref_ppl, ppl) for _, ppl in lines):
        lines.append((f"reference ({reference_name})" if reference_name else "reference", ref_ppl))
    for method in dict.fromkeys(_method(r) for r in shown):
        group = [r for r in shown if _method(r) == method]
        ax.scatter([r["bits_per_weight"] for r in group], [r["ppl"] for r in group], marker=METHOD_MARKERS.get(method, "X"),
                   s=36, edgecolors="white", linewidths=0.6, zorder=3, label=method)  # edges part touching markers
    front = pareto_front([(float(r["bits_per_weight"]), float(r["ppl"])) for r in shown])
    if len(front) > 1:
        ax.plot([x for x, _ in front], [y for _, y in front], color="tab:green", alpha=0.6, zorder=2, label="Pareto frontier")
    if shown:
        xs = [float(r["bits_per_weight"]) for r in shown]
        pad = max(0.3, 0.08 * (max(xs) - min(xs)))
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
        ys = [float(r["ppl"]) for r in shown] + [ppl for _, ppl in lines]
        low, high = math.log(min(ys)), math.log(max(ys))
        margin = max(0.08 * (high - low), 0.02)
        ax.set_ylim(math.exp(low - margin), math.exp(high + margin))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # plain numbers, not 4×10¹
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    line_texts = []
    for name, ppl in lines:
        ax.axhline(ppl, color="gray", linestyle="--", linewidth=1, zorder=1)
        line_texts.append(ax.text(0.01, ppl, f"{name}: ppl {ppl:.2f}", transform=ax.get_yaxis_transform(),
                                  va="bottom", ha="left", fontsize=8, color="dimgray"))
    ax.set_xlabel("bits per weight (targeted linear layers)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _label_points(ax, shown, front, lines, line_texts)
    return fig


def _label_points(ax, shown: list[dict], front: list[tuple[float, float]], lines: list[tuple[str, float]], line_texts) -> None:
    """Name every point, each label placed by :func:`place_labels` clear of the other labels, the markers, the
    frontier and the reference lines and their texts; a label pushed away from its point gets a leader line."""
    renderer = ax.figure.canvas.get_renderer()
    anchors = [tuple(ax.transData.transform((r["bits_per_weight"], r["ppl"]))) for r in shown]
    sizes = []
    for run in shown:  # each label's real box, measured with a throwaway text
        probe = ax.text(0, 0, str(run["name"]), fontsize=8)
        box = probe.get_window_extent(renderer)
        sizes.append((box.width, box.height))
        probe.remove()
    obstacles = [(x - 5, y - 5, x + 5, y + 5) for x, y in anchors]  # the markers
    obstacles += [tuple(t.get_window_extent(renderer).extents) for t in line_texts]
    left, _, right, _ = ax.bbox.extents
    for _, ppl in lines:
        y = ax.transData.transform((0, ppl))[1]
        obstacles += _polyline_boxes([(left, y), (right, y)])
    obstacles += _polyline_boxes([tuple(ax.transData.transform(point)) for point in front])
    offsets = place_labels(anchors, sizes, tuple(ax.bbox.extents), obstacles=obstacles)
    for run, (dx, dy), (w, h) in zip(shown, offsets, sizes):
        gap = math.hypot(max(dx, 0, -(dx + w)), max(dy, 0, -(dy + h)))  # anchor to the label's nearest edge
        ax.annotate(str(run["name"]), (run["bits_per_weight"], run["ppl"]), xytext=(dx, dy), textcoords="offset pixels",
                    ha="left", va="bottom", fontsize=8, zorder=4,
                    arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.6, shrinkA=0, shrinkB=4) if gap > 15 else None)


def _pareto_png(runs: list[dict], title: str, reference_name: str | None) -> bytes:
    buffer = io.BytesIO()
    pareto_figure(runs, title, reference_name).savefig(buffer, format="png")
    return buffer.getvalue()


def _environment() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

