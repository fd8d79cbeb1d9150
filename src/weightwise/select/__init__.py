"""Data selection: score fine-tuning examples, drop duplicates and contaminated ones, keep those that matter.

``select(pool, out, SelectConfig(...))`` writes scored.jsonl, selected.jsonl (which ``tune`` reads),
report.md and manifest.json. Scorers live in :mod:`weightwise.select.scorers` (one registry), selectors in
:mod:`weightwise.select.selectors`, filters in :mod:`weightwise.select.filters`.
"""

from weightwise.select.api import select
from weightwise.select.config import SelectConfig
from weightwise.select.report import Selection
from weightwise.select.scorers import SCORER_NAMES, parse_scorer, scorer_config

__all__ = ["SCORER_NAMES", "SelectConfig", "Selection", "parse_scorer", "scorer_config", "select"]
