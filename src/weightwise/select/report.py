"""The output folder of a selection: scored.jsonl (every input line, its scores, keep/drop and why),
selected.jsonl (the kept records, unchanged, which ``weightwise tune --task`` reads), report.md with score
histograms, and manifest.json (recipe, versions, counts, timings). Written as one atomic folder."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from weightwise.io.artifacts import atomic_output_dir, file_sha256, write_manifest
from weightwise.select.config import SelectConfig
from weightwise.select.engine import ScoringStats
from weightwise.select.pool import Pool

SELECTION_KIND = "selection"
RESULT_KEY = "weightwise_select"  # the field scored.jsonl adds to each record
BELOW_BUDGET = "below the budget"


@dataclass
class Selection:
    """Everything a selection decided: per-scorer scores and the combined rank score (by pool index, NaN where
    not scored), the chosen pool indices (in the selector's order) and why each other example was dropped."""

    pool: Pool
    config: SelectConfig
    scores: dict[str, np.ndarray]
    combined: np.ndarray
    chosen: np.ndarray
    reasons: dict[int, str]
    candidates: np.ndarray
    stats: ScoringStats
    seconds: float
    model_fingerprint: str | None

    def reason(self, index: int) -> str:
        """Why an example was dropped ('' if kept)."""
        if index in self.kept:
            return ""
        return self.reasons.get(index, BELOW_BUDGET)

    @property
    def kept(self) -> set[int]:
        return set(int(i) for i in self.chosen)

    def reason_counts(self) -> dict[str, int]:
        """Dropped examples per kind of reason (the text before any detail), invalid lines included."""
        counts = Counter(_reason_kind(self.reason(ex.index)) for ex in self.pool.examples if ex.index not in self.kept)
        if self.pool.bad_lines:
            counts["invalid line"] = len(self.pool.bad_lines)
        return dict(counts.most_common())


def write_selection(selection: Selection, out: Path, overwrite: bool = False) -> None:
    """Write the output folder atomically (replacing an existing one only with ``overwrite``)."""
    with atomic_output_dir(out) as tmp:
        _write_scored(selection, tmp / "scored.jsonl")
        kept = sorted(selection.kept)
        with (tmp / "selected.jsonl").open("w", encoding="utf-8") as f:
            for index in kept:
                f.write(json.dumps(selection.pool.examples[index].record, ensure_ascii=False) + "\n")
        figures = _histograms(selection, tmp)
        (tmp / "report.md").write_text(_markdown(selection, figures), encoding="utf-8")
        stats = selection.stats
        write_manifest(
            tmp, SELECTION_KIND,
            input={"path": str(selection.pool.path), "sha256": file_sha256(selection.pool.path)},
            config=selection.config.model_dump(mode="json"),
            model_fingerprint=selection.model_fingerprint,
            counts={"lines": len(selection.pool) + len(selection.pool.bad_lines), "valid": len(selection.pool),
                    "eligible": int(len(selection.candidates)), "kept": len(kept)},
            dropped=selection.reason_counts(),
            bad_lines=[{"line": b.line, "reason": b.reason} for b in selection.pool.bad_lines],
            scoring={label: {"seconds": stats.seconds.get(label), "examples": stats.examples.get(label),
                             "examples_per_second": _rate(stats.examples.get(label), stats.seconds.get(label)),
                             "prepare_seconds": stats.prepare_seconds.get(label), "reused_from_cache": stats.reused.get(label)}
                     for label in selection.scores},
            seconds=selection.seconds,
        )


def _write_scored(selection: Selection, path: Path) -> None:
    kept = selection.kept
    rows: list[tuple[int, dict]] = []
    for ex in selection.pool.examples:
        result = {"line": ex.line, "keep": ex.index in kept, "reason": selection.reason(ex.index),
                  "scores": {label: _finite(values[ex.index]) for label, values in selection.scores.items()},
                  "combined": _finite(selection.combined[ex.index])}
        rows.append((ex.line, {**ex.record, RESULT_KEY: result}))
    for bad in selection.pool.bad_lines:
        rows.append((bad.line, {RESULT_KEY: {"line": bad.line, "keep": False, "reason": f"invalid line: {bad.reason}"}}))
    with path.open("w", encoding="utf-8") as f:
        for _, row in sorted(rows, key=lambda r: r[0]):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _histograms(selection: Selection, folder: Path) -> list[str]:
    """One PNG per scorer: its scores over the eligible examples, kept and dropped stacked."""
    names = []
    kept_mask = np.zeros(len(selection.pool), dtype=bool)
    kept_mask[list(selection.kept)] = True
    eligible = np.zeros(len(selection.pool), dtype=bool)
    eligible[selection.candidates] = True
    for label, values in selection.scores.items():
        finite = eligible & np.isfinite(values)
        if not finite.any():
            continue
        figure = Figure(figsize=(5, 3))
        axes = figure.subplots()
        axes.hist([values[finite & kept_mask], values[finite & ~kept_mask]], bins=40, stacked=True,
                  label=["kept", "dropped"], color=["tab:green", "tab:gray"])
        axes.set_xlabel(f"{label} score")
        axes.set_ylabel("examples")
        axes.legend()
        figure.tight_layout()
        name = f"hist-{label.replace('#', '-')}.png"
        figure.savefig(folder / name, dpi=100)
        names.append(name)
    return names


def _markdown(selection: Selection, figures: list[str]) -> str:
    config = selection.config
    counts = selection.reason_counts()
    lines = [f"# Selection from {selection.pool.path.name}", "",
             f"{len(selection.pool) + len(selection.pool.bad_lines)} lines, {len(selection.pool)} valid, "
             f"{len(selection.candidates)} eligible after filters and scoring, **{len(selection.kept)} kept** "
             f"(selector {config.selector.name}, {_budget(config)}; {selection.seconds:.1f} s).", "",
             "| dropped because | examples |", "|---|---:|", *[f"| {reason} | {n} |" for reason, n in counts.items()], ""]
    if selection.scores:
        lines += ["| scorer | weight | prefer | kept mean | dropped mean | seconds | examples/s |", "|---|---:|---|---:|---:|---:|---:|"]
        kept = np.array(sorted(selection.kept), dtype=int)
        dropped = np.setdiff1d(selection.candidates, kept)
        for (label, values), scorer in zip(selection.scores.items(), config.scorers):
            seconds = selection.stats.seconds.get(label)
            rate = _rate(selection.stats.examples.get(label), seconds)
            lines.append(f"| {label} | {scorer.weight:g} | {scorer.prefer} | {_mean(values[kept])} | "
                         f"{_mean(values[dropped])} | {seconds or 0:.1f} | {'–' if rate is None else f'{rate:.1f}'} |")
        lines.append("")
    lines += [f"![{name}]({name})" for name in figures]
    if selection.pool.bad_lines:
        lines += ["", "Invalid lines (skipped):", ""]
        lines += [f"- line {b.line}: {b.reason}" for b in selection.pool.bad_lines[:50]]
        if len(selection.pool.bad_lines) > 50:
            lines.append(f"- … {len(selection.pool.bad_lines) - 50} more in manifest.json")
    return "\n".join(lines) + "\n"


def _reason_kind(reason: str) -> str:
    return reason.split(" of line")[0].split(":")[0].split(" (")[0]


def _budget(config: SelectConfig) -> str:
    return f"budget {config.budget}" if config.budget is not None else f"fraction {config.fraction:g}"


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _mean(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return f"{finite.mean():.4g}" if finite.size else "–"


def _rate(count: int | None, seconds: float | None) -> float | None:
    return count / seconds if count and seconds else None
