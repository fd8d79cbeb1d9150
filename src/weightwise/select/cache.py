"""A resumable score cache: per scorer, an append-only JSONL file of scored batches.

Each line is one finished batch (``{"keys": [...], "scores": [...]}``), written, flushed and fsynced before
the next batch starts, so a killed run loses at most the batch in flight; a torn last line is ignored when
the file is read back. The file's first line names what decides the scores (scorer fields, model
fingerprint, max_length, target set); a cache written under other settings is discarded, never mixed in.
Batches are cut from the pool deterministically, so a resumed run computes each missing batch exactly as an
uninterrupted run would, and ends with identical scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class ScoreCache:
    """Scores already computed for one scorer under one set of settings, keyed by example key."""

    def __init__(self, folder: Path, name: str, settings: dict[str, Any]):
        header = json.dumps(settings, sort_keys=True, default=str)
        digest = hashlib.sha256(header.encode()).hexdigest()[:16]
        self.path = Path(folder) / f"{name}-{digest}.jsonl"
        self.header = header
        self.scores: dict[str, float] = {}
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        if not lines or lines[0] != self.header:
            logger.warning("score cache %s was written under other settings; starting it again", self.path)
            self.path.unlink()
            return
        complete = 0
        for line in lines[1:]:
            try:
                batch = json.loads(line)
                self.scores.update(zip(batch["keys"], batch["scores"], strict=True))
                complete += 1
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break  # the torn line of a killed run: it and anything after it is recomputed
        logger.info("score cache %s: %d batches, %d scores reused", self.path.name, complete, len(self.scores))
        self._rewrite(complete)

    def _rewrite(self, complete: int) -> None:
        """Keep only the header and the complete batches (drops a torn tail before appending again)."""
        lines = self.path.read_text(encoding="utf-8").split("\n")[: complete + 1]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def missing(self, keys: list[str]) -> bool:
        return any(key not in self.scores for key in keys)

    def add(self, keys: list[str], scores: np.ndarray) -> None:
        """Record one batch's scores, durably, before returning."""
        values = [float(v) for v in scores]
        self.scores.update(zip(keys, values))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with self.path.open("a", encoding="utf-8") as f:
            if new:
                f.write(self.header + "\n")
            f.write(json.dumps({"keys": keys, "scores": values}) + "\n")  # NaN is written as NaN and read back
            f.flush()
            os.fsync(f.fileno())

    def lookup(self, keys: list[str]) -> np.ndarray:
        return np.array([self.scores[key] for key in keys], dtype=float)
