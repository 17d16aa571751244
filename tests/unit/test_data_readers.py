"""Reading line-oriented files as byte ranges gives exactly the rows of a whole-file read.

The range functions are plain Python on real files, no Ray; ``read_dataset`` itself is
tested on a cluster in tests/integration/test_data_pipeline.py.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

import pytest
from pyarrow import fs

from raylm.config import ConfigError
from raylm.data import readers
from raylm.data.config import DataJobConfig

BLOCKS = [1, 2, 3, 16, 64, 257, 4096, 1 << 30]


def _src(path: Path) -> dict[str, str]:
    return {"path": str(path), "name": path.name, "fmt": "auto", "columns": "{}"}


def _random_corpus(seed: int, lines: int, trailing_newline: bool) -> bytes:
    """Blank, whitespace-only, CRLF, undecodable, long and non-ASCII lines, mixed."""
    rng = random.Random(seed)
    pieces = []
    for i in range(lines):
        r = rng.random()
        if r < 0.1:
            line = b""
        elif r < 0.2:
            line = rng.choice([b"  ", b"\t", b" \t \r", b"\x0b\x0c", b"\r"])
        elif r < 0.3:
            line = b'{"text": "bad \xff\xfe bytes \xc3"}'
        elif r < 0.35:
            line = json.dumps({"text": "long " * rng.randint(50, 300)}).encode()
        else:
            doc = f"doc {i} " + "\u00e9\u4e2d" * rng.randint(0, 5)
            line = json.dumps({"text": doc}, ensure_ascii=False).encode()
        pieces.append(line + (b"\r\n" if rng.random() < 0.3 else b"\n"))
    data = b"".join(pieces)
    return data if trailing_newline else data.removesuffix(b"\n")


def _read_in_ranges(path: Path, block_bytes: int, min_ranges: int = 1) -> list[dict]:
    """What ``read_dataset`` does, without Ray: plan, count, prefix-sum, read each range."""
    [specs] = readers.plan_reads(
        [readers.Source(str(path), path.name, "auto")], "line", block_bytes, min_ranges
    )
    newlines = [readers.count_newlines(str(path), s.start, s.end) for s in specs[:-1]]
    rows = []
    for spec in readers.number_lines(specs, newlines):
        rows += readers.read_range(spec.src, spec.start, spec.end, spec.first_line, "text")
    return rows


def _assert_ranges_cover(path: Path, ranges: list[tuple[int, int]]) -> None:
    data = path.read_bytes()
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start and data[start - 1 : start] == b"\n"
    assert all(start < end for start, end in ranges) or ranges == [(0, 0)]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
@pytest.mark.parametrize("trailing_newline", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranges_give_the_rows_of_a_whole_file_read(
    tmp_path: Path, seed: int, trailing_newline: bool, suffix: str
) -> None:
    path = tmp_path / f"corpus{suffix}"
    path.write_bytes(_random_corpus(seed, 80, trailing_newline))
    whole = readers.read_file(_src(path), "text", "line")
    assert any(r["error"].startswith("undecodable bytes") for r in whole)
    for block in [*BLOCKS, path.stat().st_size]:
        assert _read_in_ranges(path, block) == whole, f"block={block}"
        n = readers.ranges_per_file([path.stat().st_size], block, 1)[0]
        ranges = readers.line_ranges(str(path), path.stat().st_size, n)
        _assert_ranges_cover(path, ranges)
        if block <= 64:
            assert len(ranges) > 10  # really split, not one range that trivially matches


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"\n\n\n",
        b'{"text": "one line, no newline"}',
        b'{"text": "one line"}\n',
        b'{"text": "one line"}\r\n',
        b"\xff\xfe\n\n  \nx",
        b"a\nb\nc\nd\n",
        b"x" * 5000 + b"\nshort\n" + b"y" * 3000,
    ],
)
def test_edge_files(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    whole = readers.read_file(_src(path), "text", "line")
    for block in BLOCKS:
        assert _read_in_ranges(path, block) == whole, f"block={block}"
        n = readers.ranges_per_file([len(data)], block, 1)[0]
        _assert_ranges_cover(path, readers.line_ranges(str(path), len(data), n))


def test_empty_file_is_one_empty_range(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert readers.line_ranges(str(path), 0, 5) == [(0, 0)]
    assert _read_in_ranges(path, 1) == []


def test_long_line_makes_its_range_bigger(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    data = b"a\n" + b"x" * 1000 + b"\nb\nc\n"
    path.write_bytes(data)
    ranges = readers.line_ranges(str(path), len(data), len(data))  # 1-byte blocks
    assert ranges == [(0, 2), (2, 1003), (1003, 1005), (1005, 1007)]


def test_next_line_start_at_and_around_newlines(tmp_path: Path) -> None:
    data = b"ab\ncd\nef"
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as f:
        starts = [readers.next_line_start(f, p, len(data)) for p in range(len(data) + 1)]
    # pos 2 is on a newline (next start 3); pos 3 follows one (is a start itself).
    assert starts == [0, 3, 3, 3, 6, 6, 6, None, None]
    with open(path, "rb") as f:
        assert readers.next_line_start(f, 1, 2) is None  # the newline at 2 is past the limit
        assert readers.next_line_start(f, 1, 3) == 3


def test_next_line_start_works_on_pyarrow_files(tmp_path: Path) -> None:
    """URIs are read through pyarrow's random-access files: same seek/read contract."""
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"ab\ncd\nef")
    with fs.LocalFileSystem().open_input_file(str(path)) as f:
        assert [readers.next_line_start(f, p, 8) for p in (1, 3, 4, 7)] == [3, 3, 6, None]


class _CountingReader(io.BufferedReader):
    """A real file that remembers how many bytes were read from it."""

    total = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.total += len(data)
        return data


def test_driver_reads_only_a_few_bytes_per_split_point(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes((b"x" * 99 + b"\n") * 20_000 + b"y" * (3 * readers.SCAN_LIMIT))
    with _CountingReader(io.FileIO(path)) as f:
        assert readers.next_line_start(f, 1_000_050, 1_500_000) == 1_000_100
        assert f.total <= readers.SCAN_CHUNK
    with _CountingReader(io.FileIO(path)) as f:  # inside the 3 MiB line: give up
        limit = 2_500_000 - 1 + readers.SCAN_LIMIT
        assert readers.next_line_start(f, 2_500_000, limit) is None
        assert f.total == readers.SCAN_LIMIT


def test_ranges_per_file() -> None:
    kib, mib = 1 << 10, 1 << 20
    block = 16 * mib
    assert readers.ranges_per_file([100 * kib, 0], block, 8) == [1, 1]  # < 1 MiB: no spread
    assert readers.ranges_per_file([40 * mib], block, 2) == [3]  # enough blocks already
    assert readers.ranges_per_file([10 * mib], block, 4) == [4]  # the dedup benchmark case
    assert readers.ranges_per_file([mib + 1], block, 64) == [4]  # >= 256 KiB a range
    assert readers.ranges_per_file([9 * mib, 3 * mib], block, 8) == [6, 2]  # by size
    assert readers.ranges_per_file([100, 100], 10, 64) == [10, 10]  # one range per block


def test_unreadable_files_and_ranges_give_one_error_row(tmp_path: Path) -> None:
    missing = tmp_path / "gone.jsonl"
    [specs] = readers.plan_reads([readers.Source(str(missing), "gone.jsonl", "auto")], "line", 8, 4)
    assert specs == [readers.ReadSpec(_src(missing))]  # whole-file task reports it
    [row] = readers.read_spec(specs[0], "text", "line").to_pylist()
    assert row["id"] == "gone.jsonl:0" and row["error"].startswith("unreadable file")
    [row] = readers.read_range(_src(missing), 10, 20, 7, "text")
    assert row["id"] == "gone.jsonl:7" and row["error"].startswith("unreadable file")


def test_only_line_oriented_files_are_split(tmp_path: Path) -> None:
    lines = b"".join(b'{"text": "%d"}\n' % i for i in range(200))
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.txt").write_bytes(lines)
    (tmp_path / "c.json").write_text(json.dumps([{"text": str(i)} for i in range(200)]))
    sources = readers.expand_inputs([str(tmp_path)], "auto", {})
    by_line = readers.plan_reads(sources, "line", 256, 1)
    assert [len(specs) > 1 for specs in by_line] == [True, True, False]
    assert by_line[2][0].end is None
    by_file = readers.plan_reads(sources, "file", 256, 1)
    assert [len(specs) for specs in by_file[1:]] == [1, 1]


def test_read_block_mb_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="read_block_mb"):
        DataJobConfig(inputs=["x.jsonl"], read_block_mb=0)
    assert DataJobConfig(inputs=["x.jsonl"]).read_block_mb == 16.0


def test_count_newlines_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting tasks read in chunks; chunk edges must not lose or double-count newlines."""
    data = _random_corpus(3, 50, False)
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    monkeypatch.setattr(readers, "COUNT_CHUNK", 3)
    for start, end in [(0, len(data)), (0, 0), (5, 6), (7, 301), (100, len(data))]:
        assert readers.count_newlines(str(path), start, end) == data[start:end].count(b"\n")
