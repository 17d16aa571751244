"""The quantizers' text reader: calibration and held-out files that are not clean text
are refused naming the file and where, instead of a decoder traceback from a Ray task."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.config import ConfigError
from raylm.export.quantize import read_docs


def test_jsonl_and_plain_text_documents(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "b.txt").write_text("first para\nstill first\n\n  \nsecond\n")
    assert read_docs(str(tmp_path / "a.jsonl"), "quantize.dataset") == ["one", "two"]
    assert read_docs(str(tmp_path / "b.txt"), "quantize.dataset") == [
        "first para\nstill first",
        "second",
    ]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"text": "ok"}\n{"text": "bad \xff byte"}\n', r"not UTF-8 text \(byte 29, line 2\)"),
        (b'{"text": "ok"}\n{"txt": "x"}\n', "line 2 is not a JSON object with a `text` string"),
        (b'{"text": "ok"}\nnot json\n', "line 2 is not a JSON object"),
        (b'["text"]\n', "line 1 is not a JSON object"),
        (b"\n\n", "no text"),
    ],
)
def test_unusable_files_are_refused_naming_the_place(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as err:
        read_docs(str(path), "quantize.dataset")
    assert "quantize.dataset=" in str(err.value)
