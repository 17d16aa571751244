"""Reading inputs: registries and file formats, and byte ranges of line-oriented files
that give exactly the rows of a whole-file read.

The range functions are plain Python on real files, no Ray; ``read_dataset`` itself is
tested on a cluster in tests/integration/test_data_pipeline.py.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from raylm.config import ConfigError
from raylm.data import readers, rows, sources
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
        [sources.Source(str(path), path.name, "auto")], "line", block_bytes, min_ranges
    )
    newlines = [rows.count_newlines(str(path), s.start, s.end) for s in specs[:-1]]
    out = []
    for spec in readers.number_lines(specs, newlines):
        out += rows.read_range(spec.src, spec.start, spec.end, spec.first_line, "text")
    return out


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
    whole = rows.read_file(_src(path), "text", "line")
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
    whole = rows.read_file(_src(path), "text", "line")
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
    [specs] = readers.plan_reads([sources.Source(str(missing), "gone.jsonl", "auto")], "line", 8, 4)
    assert specs == [readers.ReadSpec(_src(missing))]  # whole-file task reports it
    [row] = readers.read_spec(specs[0], "text", "line").to_pylist()
    assert row["id"] == "gone.jsonl:0" and row["error"].startswith("unreadable file")
    [row] = rows.read_range(_src(missing), 10, 20, 7, "text")
    assert row["id"] == "gone.jsonl:7" and row["error"].startswith("unreadable file")


def test_only_line_oriented_files_are_split(tmp_path: Path) -> None:
    lines = b"".join(b'{"text": "%d"}\n' % i for i in range(200))
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.txt").write_bytes(lines)
    (tmp_path / "c.json").write_text(json.dumps([{"text": str(i)} for i in range(200)]))
    found = sources.expand_inputs([str(tmp_path)], "auto", {})
    by_line = readers.plan_reads(found, "line", 256, 1)
    assert [len(specs) > 1 for specs in by_line] == [True, True, False]
    assert by_line[2][0].end is None
    by_file = readers.plan_reads(found, "file", 256, 1)
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
    monkeypatch.setattr(rows, "COUNT_CHUNK", 3)
    for start, end in [(0, len(data)), (0, 0), (5, 6), (7, 301), (100, len(data))]:
        assert rows.count_newlines(str(path), start, end) == data[start:end].count(b"\n")


def _rows(path: Path, fmt: str = "auto", **kw) -> list[dict]:
    src = {"path": str(path), "name": path.name, "fmt": fmt, "columns": "{}"}
    return rows.read_file(src, kw.get("text_column", "text"), kw.get("text_unit", "line"))


def test_readers_keep_every_record_and_flag_bad_ones(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n\n{"text": \n{"text": "bad \xff"}\n')
    read = _rows(jsonl)
    assert [r["id"] for r in read] == ["a.jsonl:1", "a.jsonl:3", "a.jsonl:4"]
    assert read[0]["error"] == "" and read[1]["error"] == ""  # bad JSON is found later
    assert read[2]["error"].startswith("undecodable bytes")
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert [r["id"] for r in _rows(js)] == ["b.json:#0", "b.json:#1"]
    broken = tmp_path / "c.json"
    broken.write_text("[{]")
    assert _rows(broken)[0]["error"].startswith("bad JSON")
    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "d.parquet")
    assert [json.loads(r["raw"]) for r in _rows(tmp_path / "d.parquet")] == [
        {"text": "p"},
        {"text": "q"},
    ]
    txt = tmp_path / "e.txt"
    txt.write_text("first doc\nsecond doc\n")
    assert len(_rows(txt)) == 2 and len(_rows(txt, text_unit="file")) == 1


def test_json_file_holding_one_object_or_json_lines(tmp_path: Path) -> None:
    """A .json file may hold one object, or JSON Lines (Hugging Face's json loader reads
    both); a broken array stays one bad document."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"text": "x"}, indent=2))
    assert [(r["id"], json.loads(r["raw"])) for r in _rows(one)] == [("one.json:#0", {"text": "x"})]
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": \n')
    read = _rows(lines)
    assert [r["id"] for r in read] == ["lines.json:1", "lines.json:3", "lines.json:4"]
    with pytest.raises(rows.BadRow, match="bad JSON"):
        rows.parse_row(read[2])
    src = sources.Source(str(lines), str(lines), "auto")
    with pytest.raises(rows.BadRow, match=f"{lines}:4: bad JSON"):
        list(rows.records(src))


def test_dataset_info_registry(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text("[]")
    (tmp_path / "dataset_info.json").write_text(
        json.dumps(
            {
                "mine": {
                    "file_name": "d.json",
                    "formatting": "sharegpt",
                    "columns": {"messages": "conv"},
                    "tags": {"role_tag": "who", "user_tag": "customer"},
                },
                "pairs": {"file_name": "d.json", "ranking": True},
                "plain": {"file_name": "d.json"},
            }
        )
    )
    found = sources.expand_inputs([f"{tmp_path}/dataset_info.json#mine"], "auto", {})
    assert [(s.fmt, s.columns) for s in found] == [
        ("sharegpt", {"messages": "conv", "role_tag": "who", "user_tag": "customer"})
    ]
    every = sources.expand_inputs([f"{tmp_path}/dataset_info.json"], "auto", {})
    assert sorted(s.fmt for s in every) == ["alpaca", "preference", "sharegpt"]
    registry = str(tmp_path / "dataset_info.json")
    assert sources.registry_sources(registry, ["plain"], "openai")[0].fmt == "openai"
    assert sources.registry_sources(registry, ["mine"], "sharegpt")[0].fmt == "sharegpt"


@pytest.mark.parametrize(
    ("entry", "fmt", "message"),
    [
        ({"formatting": "sharegpt"}, "alpaca", "dataset 'x' is sharegpt data but format='alpaca'"),
        ({"formatting": "chatml"}, "auto", "formatting='chatml' is not a record format"),
        ({}, "auto", None),
    ],
)
def test_registry_format_rules(tmp_path: Path, entry: dict, fmt: str, message: str | None) -> None:
    (tmp_path / "d.jsonl").write_text("")
    registry = tmp_path / "dataset_info.json"
    registry.write_text(json.dumps({"x": {"file_name": "d.jsonl", **entry}}))
    if message is None:
        assert sources.registry_sources(str(registry), ["x"], fmt)[0].fmt == "alpaca"
        return
    with pytest.raises(ConfigError, match=message):
        sources.registry_sources(str(registry), ["x"], fmt)


def test_registry_errors_name_the_dataset(tmp_path: Path) -> None:
    registry = tmp_path / "dataset_info.json"
    registry.write_text(json.dumps({"hub": {"hf_hub_url": "org/set"}, "gone": {"file_name": "no"}}))
    with pytest.raises(ConfigError, match="dataset 'hub' needs 'file_name'"):
        sources.registry_sources(str(registry), ["hub"])
    with pytest.raises(ConfigError, match=r"dataset 'gone' file .*no not found"):
        sources.registry_sources(str(registry), ["gone"])
    with pytest.raises(
        ConfigError, match=r"has no dataset\(s\) \['other'\]; it has \['gone', 'hub'\]"
    ):
        sources.registry_sources(str(registry), ["other"])


# ---- several datasets in one run: LLaMA-Factory's mixing, Hugging Face's semantics -------

STOPPING = {
    "interleave_under": "first_exhausted",
    "interleave_over": "all_exhausted",
    "interleave_once": "all_exhausted_without_replacement",
}


def _hf_order(lengths: list[int], strategy: str, probs: list[float] | None, seed: int) -> list:
    """``(dataset, row)`` of datasets' own concatenate/interleave on the same inputs."""
    from datasets import Dataset, concatenate_datasets, interleave_datasets

    parts = [Dataset.from_dict({"d": [i] * n, "r": list(range(n))}) for i, n in enumerate(lengths)]
    if strategy == "concat":
        mixed = concatenate_datasets(parts)
    else:
        mixed = interleave_datasets(parts, probabilities=probs, seed=seed,
                                    stopping_strategy=STOPPING[strategy])  # fmt: skip
    return list(zip(mixed["d"], mixed["r"], strict=True))


MIXES = [("concat", None)] + [(s, p) for s in STOPPING for p in (None, [0.2, 0.5, 0.3])]


@pytest.mark.parametrize(("strategy", "probs"), MIXES)
@pytest.mark.parametrize("lengths", [[7, 3, 12], [1, 9, 4]])
def test_mixing_is_hugging_face_interleave_row_for_row(
    strategy: str, probs: list[float] | None, lengths: list[int]
) -> None:
    """Same algorithm, so the same sequence, not only the same counts per source."""
    for seed in (0, 42):
        assert sources.mix_order(lengths, strategy, probs, seed) == _hf_order(
            lengths, strategy, probs, seed
        )


def test_mixing_counts_per_source() -> None:
    under = sources.mix_order([5, 2], "interleave_under", None, 0)
    assert under == [(0, 0), (1, 0), (0, 1), (1, 1)]  # stops when the 2-row set runs out
    over = sources.mix_order([5, 2], "interleave_over", None, 0)
    assert [d for d, _ in over].count(1) == 5 and sorted({r for d, r in over if d == 1}) == [0, 1]
    once = sources.mix_order([5, 2], "interleave_once", [0.5, 0.5], 3)
    assert sorted(once) == [(0, r) for r in range(5)] + [(1, 0), (1, 1)]


def test_held_out_split_is_hugging_face_train_test_split() -> None:
    from datasets import Dataset

    data = Dataset.from_dict({"i": list(range(97))})
    for val_size in (0.1, 0.5, 5):
        split = data.train_test_split(test_size=val_size, seed=42)
        train, held = sources.held_out(97, val_size, 42)
        assert (train, held) == (split["train"]["i"], split["test"]["i"])
    assert len(sources.held_out(10, 0.01, 0)[1]) == 1  # a share rounds up
    with pytest.raises(ConfigError, match="leave at least one to train on"):
        sources.held_out(3, 3, 0)


def test_mixing_settings_that_cannot_sample_are_refused() -> None:
    with pytest.raises(ConfigError, match="mix_strategy='concat'"):
        sources.check_mix("concat", [0.5, 0.5], ["a", "b"])
    with pytest.raises(ConfigError, match="has 1 values for 2"):
        sources.check_mix("interleave_under", [1.0], ["a", "b"])
    with pytest.raises(ConfigError, match="sum to 1"):
        sources.check_mix("interleave_under", [0.5, 0.6], ["a", "b"])
    with pytest.raises(ConfigError, match="never draws one"):
        sources.check_mix("interleave_over", [1.0, 0.0], ["a", "b"])
    sources.check_mix("interleave_under", [1.0, 0.0], ["a", "b"])  # fine: stops at a's end


def test_dataset_records_keep_max_samples_per_dataset_and_fill_placeholders(
    tmp_path: Path,
) -> None:
    recs = [{"instruction": f"who {i}", "output": "I am {{name}} by {{author}}"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:3]) + "\n{bad\n")
    registry = {"a": {"file_name": "a.json"}, "b": {"file_name": "b.jsonl"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(registry))
    found = sources.registry_sources(str(tmp_path / "dataset_info.json"), ["a", "b"])
    data = rows.dataset_records(found, {"name": "Raylm"}, limit=3)
    assert {n: len(r) for n, r in data.records.items()} == {"a": 3, "b": 3}
    assert data.totals == {"a": 5, "b": 4}  # b's bad 4th line is past max_samples: counted
    assert data.records["a"][0][1]["output"] == "I am Raylm by {{author}}"
    assert data.placeholders == {"a": {"author"}, "b": {"author"}}
    with pytest.raises(rows.BadRow, match=r"b/b.jsonl:4: bad JSON"):
        rows.dataset_records(found, {}, limit=None)
    mixed = rows.mix_datasets(data, "interleave_over", [0.5, 0.5], val_size=2, seed=0)
    assert len(mixed.held_out) == 2 and all(rows.accounted(c) for c in mixed.counts)
    doc = rows.stats_document(mixed, rows.mix_datasets(data, "concat", None, 0, 0), {"seed": 0})
    assert [c["role"] for c in doc["datasets"]] == ["train", "train", "eval", "eval"]
    assert doc["held_out_rows"] == 2 + 6 and doc["accounting_ok"]
