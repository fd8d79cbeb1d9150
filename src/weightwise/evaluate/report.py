"""Reports of one or more evaluation runs: ``metrics.json``, a Markdown table (``report.md``) and a
size/perplexity Pareto plot (``pareto.png``)."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import tempfile
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
    except json.JSONDecodeError as err:
        raise WeightwiseError(f"{path} is not valid JSON ({err.msg}): re-run the evaluation that wrote it") from None
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


def _pareto_png(runs: list[dict], title: str, reference_name: str | None) -> bytes:
    # Imported here: the Figure/Agg canvas pair draws without touching matplotlib's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [
        (float(r["bits_per_weight"]), float(r["ppl"]), str(r["name"]))
        for r in runs
        if r.get("bits_per_weight") is not None and r.get("ppl") is not None and math.isfinite(r["ppl"])
    ]
    if points:
        xs, ys, labels = zip(*points)
        ax.scatter(xs, ys, zorder=3)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        front = pareto_front([(x, y) for x, y, _ in points])
        ax.plot([x for x, _ in front], [y for _, y in front], color="tab:green", label="Pareto frontier")
    ref_ppl = _reference_ppl(runs[0], runs, reference_name)
    if ref_ppl is not None and math.isfinite(ref_ppl):
        ax.axhline(ref_ppl, color="gray", linestyle="--", label=f"reference ({reference_name or 'reference'})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # plain numbers, not 4×10¹
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("bits per weight (targeted linear layers)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
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

