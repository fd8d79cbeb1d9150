"""Text sources as lists of documents: CPython's own pydoc topics (the embedded corpus, split
deterministically into eval and calibration parts) or a user's text file (recognised by content, any name) or .jsonl file."""

from __future__ import annotations

import json
from pathlib import Path

from weightwise.errors import WeightwiseError

SPLITS = ("eval", "calib", "all")
_SNIFF_BYTES = 1024  # how much of a file decides whether it is text


def corpus(source: str = "pydoc", split: str = "eval") -> list[str]:
    """Documents of ``source``: ``"pydoc"`` or a path to a text file (one document) or .jsonl file.

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
    """The documents of a .jsonl file, or of any other text file (by content: README, LICENSE, .rst, ...) as one."""
    if not path.is_file():
        raise WeightwiseError(f"text file {path} not found: pass an existing text (.txt, .md, ...) or .jsonl file, or 'pydoc'")
    check_text_file(path)
    try:
        docs = _read_jsonl(path) if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as err:
        raise WeightwiseError(f"text file {path} is not valid UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if not any(doc.strip() for doc in docs):
        raise WeightwiseError(f"text file {path} holds no text: pass a file with at least one non-empty document")
    return docs


def check_text_file(path: str | Path, sniff: int = _SNIFF_BYTES) -> None:
    """Refuse a file whose first ``sniff`` bytes are not UTF-8 text (a NUL byte or an invalid sequence): text
    inputs are recognised by their content, so a binary file given as text fails here and not as gibberish later."""
    with open(path, "rb") as f:
        head = f.read(sniff)
    try:
        head.decode("utf-8")
        text = True
    except UnicodeDecodeError as err:
        text = err.start >= len(head) - 3 and err.reason == "unexpected end of data"  # a character cut by the limit
    if b"\0" in head or not text:
        raise WeightwiseError(f"{path} is a binary file, not UTF-8 text; pass a text or .jsonl file")


def check_unicode(text: str, where: str) -> str:
    """``text``, refused when it holds a lone UTF-16 surrogate: JSON can spell one ("\\ud800"), but it is not text
    (no UTF-8 encoding, no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise WeightwiseError(f"{where} holds a lone surrogate escape (\\u{ord(err.object[err.start]):04x}), which is "
                              "not text: write valid Unicode") from None
    return text


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                raise WeightwiseError(
                    f"{path} line {number} is not valid JSON ({err}): write one JSON object per line"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise WeightwiseError(
                    f'{path} line {number} has no string "text" field: write objects like {{"text": "..."}}'
                )
            docs.append(check_unicode(record["text"], f"{path} line {number}"))
    return docs
