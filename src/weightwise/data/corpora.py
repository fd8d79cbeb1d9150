"""Text sources as lists of documents: CPython's own pydoc topics (the embedded corpus, split
deterministically into eval and calibration parts) or a user's .txt/.md/.jsonl file."""

from __future__ import annotations

import json
from pathlib import Path

from weightwise.errors import WeightwiseError

SPLITS = ("eval", "calib", "all")
_TEXT_SUFFIXES = (".txt", ".md")


def corpus(source: str = "pydoc", split: str = "eval") -> list[str]:
    """Documents of ``source``: ``"pydoc"`` or a path to a .txt/.md (one document) or .jsonl file.

    For ``"pydoc"`` the topics are sorted by key; ``"eval"`` keeps sorted index ``i % 4 == 0``,
    ``"calib"`` the rest, ``"all"`` everything. A file is used whole whatever the split: keep
    calibration and evaluation text in separate files.
    """
    if split not in SPLITS:
        raise WeightwiseError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if source == "pydoc":
        return _pydoc_topics(split)
    return _read_file(Path(source))


def join_documents(docs: list[str]) -> str:
    """One text stream: the documents separated by a blank line (the benchmark protocol)."""
    return "\n\n".join(docs)


def _pydoc_topics(split: str) -> list[str]:
    from pydoc_data.topics import topics  # ships with CPython; imported on use (~0.5 MB of text)

    docs = [topics[key] for key in sorted(topics)]
    if split == "eval":
        return docs[::4]
    if split == "calib":
        return [doc for i, doc in enumerate(docs) if i % 4 != 0]
    return docs


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise WeightwiseError(f"text file {path} not found: pass an existing .txt, .md or .jsonl file, or 'pydoc'")
    if path.suffix in _TEXT_SUFFIXES:
        docs = [path.read_text(encoding="utf-8")]
    elif path.suffix == ".jsonl":
        docs = _read_jsonl(path)
    else:
        raise WeightwiseError(f"text file {path} has an unsupported type: use .txt, .md or .jsonl")
    if not any(doc.strip() for doc in docs):
        raise WeightwiseError(f"text file {path} holds no text: pass a file with at least one non-empty document")
    return docs


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise WeightwiseError(
                    f"{path} line {number} is not valid JSON ({err.msg}): write one JSON object per line"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise WeightwiseError(
                    f'{path} line {number} has no string "text" field: write objects like {{"text": "..."}}'
                )
            docs.append(record["text"])
    return docs
