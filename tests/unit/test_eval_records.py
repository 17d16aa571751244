"""Bad eval data fails with the file, line and field named; good data parses fully."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.eval.records import EvalDataError, load_eval_records, load_texts

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"prompt": "What version?", "reference": "2.0"}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bundled_sample_parses() -> None:
    records = load_eval_records(ROOT / "raylm/eval/sample/eval.jsonl")
    assert len(records) == 16
    assert any(r.messages for r in records) and any(r.prompt for r in records)
    assert len(load_texts(ROOT / "raylm/eval/sample/heldout.jsonl")) == 10


def test_record_fields(tmp_path: Path) -> None:
    rows = [
        GOOD | {"id": "q1", "topic": "versions"},
        {"messages": [{"role": "user", "content": "Hi"}], "reference": ["hello", "hi"]},
        GOOD | {"max_tokens": 4, "max_chars": 20},
    ]
    recs = load_eval_records(_write(tmp_path / "e.jsonl", rows))
    assert recs[0].id == "q1" and recs[0].extra == {"topic": "versions"}
    assert recs[1].id == f"{tmp_path / 'e.jsonl'}:2" and recs[1].references == ("hello", "hi")
    assert (recs[2].max_tokens, recs[2].max_chars) == (4, 20)
    assert len(load_eval_records(tmp_path / "e.jsonl", max_samples=2)) == 2


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": "q"}, "line 2: missing field 'reference'"),
        ({"prompt": "q", "reference": 3}, "field 'reference' must be a string or a non-empty list"),
        ({"prompt": "q", "reference": []}, "field 'reference' must be a string"),
        ({"reference": "a"}, "needs exactly one of 'prompt'"),
        ({"prompt": "q", "messages": [], "reference": "a"}, "found both"),
        ({"prompt": "  ", "reference": "a"}, "field 'prompt' must be a non-empty string"),
        ({"messages": [{"role": "bot", "content": "x"}], "reference": "a"}, "field 'messages[0]'"),
        (
            {"messages": [{"role": "assistant", "content": "x"}], "reference": "a"},
            "ends with an assistant turn",
        ),
        (GOOD | {"max_tokens": 0}, "field 'max_tokens' must be a positive integer"),
        ("not json {", "line 2: not valid JSON"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_bad_record_names_record_and_field(tmp_path: Path, bad, message: str) -> None:
    path = _write(tmp_path / "eval.jsonl", [GOOD, bad])
    with pytest.raises(EvalDataError) as err:
        load_eval_records(path)
    text = str(err.value).replace(str(path) + ":", "line ")
    assert message in text
    assert str(path) in str(err.value)


def test_perplexity_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.txt").write_text("first doc\nstill first\n\nsecond doc\n\n\n")
    assert load_texts(tmp_path / "d.txt") == ["first doc\nstill first", "second doc"]
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    _write(tmp_path / "d.jsonl", [{"text": "t"}, {"messages": chat}])
    assert load_texts(tmp_path / "d.jsonl") == ["t", chat]
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), shards / "part-0.parquet")
    pq.write_table(pa.table({"text": ["c"]}), shards / "part-1.parquet")
    assert load_texts(shards) == ["a", "b", "c"]
    pq.write_table(pa.table({"input_ids": [[1, 2]]}), tmp_path / "ids.parquet")
    pq.write_table(pa.table({"messages": [chat]}), tmp_path / "chat.parquet")
    assert load_texts(tmp_path / "chat.parquet") == [chat]
    with pytest.raises(EvalDataError, match="needs a 'text' or 'messages' column"):
        load_texts(tmp_path / "ids.parquet")
    _write(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: .*'text'.*got \['body'\]"):
        load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(EvalDataError, match="not found"):
        load_texts(tmp_path / "nope.jsonl")


def test_eval_job_rejects_a_bad_record_before_starting_ray(tmp_path: Path, capsys) -> None:
    """The entrypoint exits 2 with one line naming the record and field (no traceback)."""
    from raylm.runner import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = _write(tmp_path / "eval.jsonl", [GOOD, GOOD, {"prompt": "q", "answer": "a"}])
    argv = [
        f"model={model}",
        f"data.eval_path={data}",
        "metrics=[rouge_l]",
        f"output_dir={tmp_path / 'out'}",
        "ray.address=127.0.0.1:1",  # never reached: data is checked first
    ]
    assert main("eval", argv) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: missing field 'reference'" in err
    assert "fields: ['answer', 'prompt']" in err
    assert not (tmp_path / "out").exists()


def test_eval_and_perplexity_data_in_a_bucket(s3_bucket: str, tmp_path: Path) -> None:
    """The same readers on s3:// (jsonl, txt, a parquet prefix); a missing object is named
    with its config key and URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm import storage

    base = storage.join(s3_bucket, "eval-data")
    rows = [GOOD, {"prompt": "2+2?", "reference": ["4", "four"]}]
    storage.write_text(storage.join(base, "e.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    recs = load_eval_records(storage.join(base, "e.jsonl"))
    assert [r.references for r in recs] == [("2.0",), ("4", "four")]
    assert recs[0].id == f"{base}/e.jsonl:1"  # the URI keeps its scheme's //
    storage.write_text(storage.join(base, "d.txt"), "one\n\ntwo\n")
    assert load_texts(storage.join(base, "d.txt")) == ["one", "two"]
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), shards / "part-0.parquet")
    pq.write_table(pa.table({"text": ["c"]}), shards / "part-1.parquet")
    storage.copy_dir(str(shards), storage.join(base, "shards"))
    assert load_texts(storage.join(base, "shards")) == ["a", "b", "c"]
    missing = storage.join(base, "nope.jsonl")
    with pytest.raises(EvalDataError, match=f"not found: data.eval_path={missing}"):
        load_eval_records(missing)
    with pytest.raises(EvalDataError, match=f"not found: data.perplexity_path={missing}"):
        load_texts(missing)
