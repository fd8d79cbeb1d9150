"""The pool of candidate examples: a JSONL file (optionally gzip-compressed) read line by line.

Each valid line becomes a :class:`PoolExample` that keeps its original JSON object (written back out
unchanged, with the scores beside it) and a content key (the cache key of its scores). Invalid lines
(not JSON, no known form, wrong types, empty text) become :class:`BadLine` records with their line
number: skipped and reported, or fatal, per ``on_error``; never silently dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from weightwise.data.tasks import Example, record_example
from weightwise.errors import WeightwiseError

OnError = Literal["skip", "fail"]


@dataclass(frozen=True)
class PoolExample:
    """One candidate: its position among the valid lines, its line number, the parsed example and the raw record."""

    index: int
    line: int
    example: Example | str
    record: dict[str, Any] = field(repr=False)
    key: str = ""

    @property
    def text(self) -> str:
        """Prompt and response joined by a newline (or the ``{"text"}`` string): what text scorers read."""
        if isinstance(self.example, str):
            return self.example
        return "\n".join([*(m["content"] for m in self.example.history), self.example.prompt, self.example.response])

    @property
    def prompt(self) -> str:
        return "" if isinstance(self.example, str) else self.example.prompt

    @property
    def response(self) -> str:
        return self.example if isinstance(self.example, str) else self.example.response


@dataclass(frozen=True)
class BadLine:
    """A line that holds no usable example, and why."""

    line: int
    reason: str


@dataclass
class Pool:
    """The valid examples of a file, in file order, and the lines that were skipped."""

    path: Path
    examples: list[PoolExample]
    bad_lines: list[BadLine]

    def __len__(self) -> int:
        return len(self.examples)


def example_key(example: Example | str) -> str:
    """A content hash of the parts that are scored (history, prompt, response or text): equal content, equal key."""
    if isinstance(example, str):
        payload: Any = {"text": example}
    else:
        payload = {"history": list(example.history), "prompt": example.prompt, "response": example.response}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def open_text(path: Path) -> io.TextIOBase:
    """A text stream of ``path``, gunzipped when its name ends in ``.gz``."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open(encoding="utf-8")


def iter_lines(path: str | Path) -> Iterator[tuple[int, PoolExample | BadLine]]:
    """Each non-blank line of a JSONL (or .jsonl.gz) file as (line number, example or bad line), streamed."""
    path = Path(path)
    if not path.is_file():
        raise WeightwiseError(f"pool file {path} not found: pass an existing .jsonl or .jsonl.gz file")
    index = 0
    try:
        with open_text(path) as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                parsed = _parse(line, number, index)
                if isinstance(parsed, PoolExample):
                    index += 1
                yield number, parsed
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise WeightwiseError(f"{path} could not be read to the end ({err}): pass a complete, UTF-8 file") from None


def read_pool(path: str | Path, on_error: OnError = "skip", *, what: str = "pool") -> Pool:
    """Read a whole file into a :class:`Pool`; with ``on_error="fail"`` the first bad line is an error."""
    if on_error not in ("skip", "fail"):
        raise WeightwiseError(f"unknown on_error {on_error!r}: use 'skip' or 'fail'")
    examples: list[PoolExample] = []
    bad: list[BadLine] = []
    for _, item in iter_lines(path):
        if isinstance(item, BadLine):
            if on_error == "fail":
                raise WeightwiseError(f"{what} file {path} line {item.line}: {item.reason} (or skip bad lines with on_error 'skip')")
            bad.append(item)
        else:
            examples.append(item)
    if not examples:
        raise WeightwiseError(f"{what} file {path} holds no usable example ({len(bad)} bad lines): "
                              'write one {"prompt", "response"}, {"messages"} or {"text"} object per line')
    return Pool(Path(path), examples, bad)


def _parse(line: str, number: int, index: int) -> PoolExample | BadLine:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return BadLine(number, f"not valid JSON ({err.msg})")
    except RecursionError:
        return BadLine(number, "JSON nested too deeply to read")
    try:
        example = record_example(record, f"line {number}")
    except WeightwiseError as err:
        return BadLine(number, str(err).removeprefix(f"line {number} ").split(":")[0])
    empty = (not example.strip()) if isinstance(example, str) else not (example.prompt.strip() and example.response.strip())
    if empty:
        return BadLine(number, "empty text")
    return PoolExample(index=index, line=number, example=example, record=record, key=example_key(example))
