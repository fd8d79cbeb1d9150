import json
import math

import pytest
from pydoc_data.topics import topics

from weightwise.data import corpus, join_documents
from weightwise.errors import WeightwiseError


def test_pydoc_eval_split_is_every_fourth_sorted_topic():
    keys = sorted(topics)
    evaluation = corpus("pydoc", "eval")
    assert len(evaluation) == math.ceil(len(keys) / 4)
    assert evaluation == [topics[k] for i, k in enumerate(keys) if i % 4 == 0]
    assert corpus() == evaluation


def test_pydoc_splits_are_disjoint_and_cover_all():
    evaluation, calib, everything = corpus("pydoc", "eval"), corpus("pydoc", "calib"), corpus("pydoc", "all")
    assert len(evaluation) + len(calib) == len(everything) == len(topics)
    assert not set(evaluation) & set(calib)
    assert sorted(evaluation + calib) == sorted(everything)


def test_join_documents_uses_a_blank_line():
    assert join_documents(["a", "b\n", "c"]) == "a\n\nb\n\n\nc"


def test_text_and_markdown_files_are_one_document(tmp_path):
    for suffix in (".txt", ".md"):
        path = tmp_path / f"doc{suffix}"
        path.write_text("line one\n\nline two\n", encoding="utf-8")
        assert corpus(str(path)) == ["line one\n\nline two\n"]


def test_jsonl_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert corpus(str(path), "calib") == ["first", "second"]


@pytest.mark.parametrize(
    ("second_line", "problem"),
    [('{"text": "ok"', "not valid JSON"), ('{"body": "x"}', '"text"'), ('["x"]', '"text"'), ('{"text": 3}', '"text"')],
)
def test_jsonl_errors_name_the_line(tmp_path, second_line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + second_line + "\n")
    with pytest.raises(WeightwiseError, match="line 2") as err:
        corpus(str(path))
    assert problem in str(err.value)


def test_missing_file_unknown_split_and_binary_file(tmp_path):
    with pytest.raises(WeightwiseError, match="text file .*nope.txt not found"):
        corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(WeightwiseError, match="unknown split 'test'"):
        corpus("pydoc", "test")
    (tmp_path / "data.csv").write_text("a,b\n")  # text by content, whatever the extension
    assert corpus(str(tmp_path / "data.csv")) == ["a,b\n"]
    (tmp_path / "data.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(WeightwiseError, match="data.txt is a binary file"):
        corpus(str(tmp_path / "data.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(WeightwiseError, match="no text"):
        corpus(str(tmp_path / "empty.txt"))
