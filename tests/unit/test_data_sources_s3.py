"""Inputs in a bucket: objects, prefixes, globs and a ``dataset_info.json`` registry, read
through the session's real S3-compatible server (moto), as local ones are."""

from __future__ import annotations

import json

import pytest

from raylm import storage
from raylm.config import ConfigError
from raylm.data import rows, sources


@pytest.fixture(scope="module")
def corpus(s3_bucket: str) -> str:
    base = storage.join(s3_bucket, "corpus")
    storage.write_text(f"{base}/a.jsonl", '{"text": "one"}\n{"text": "two"}\n')
    storage.write_text(f"{base}/b.jsonl", '{"text": "three"}\n')
    storage.write_text(f"{base}/sub/c.txt", "four\n")
    storage.write_text(f"{base}/.hidden.jsonl", '{"text": "never"}\n')
    alpaca = [{"instruction": "Say hi", "output": "Hi"}]
    storage.write_text(f"{base}/reg/alpaca.json", json.dumps(alpaca))
    registry = {"hi": {"file_name": "alpaca.json"}, "gone": {"file_name": "nope.json"}}
    storage.write_text(f"{base}/reg/dataset_info.json", json.dumps(registry))
    return base


def test_a_prefix_lists_every_object_under_it_and_skips_hidden_ones(corpus: str) -> None:
    found = sources.expand_inputs([f"{corpus}/"], "text", {})
    assert [s.path for s in found] == [
        f"{corpus}/a.jsonl", f"{corpus}/b.jsonl", f"{corpus}/reg/alpaca.json",
        f"{corpus}/reg/dataset_info.json", f"{corpus}/sub/c.txt",
    ]  # fmt: skip
    assert [s.name for s in found][:2] == ["a.jsonl", "b.jsonl"]  # short, relative names


def test_globs_in_a_bucket_follow_shell_rules(corpus: str) -> None:
    assert sources.list_files(f"{corpus}/*.jsonl") == [f"{corpus}/a.jsonl", f"{corpus}/b.jsonl"]
    assert sources.list_files(f"{corpus}/**/*.txt") == [f"{corpus}/sub/c.txt"]
    assert sources.list_files(f"{corpus}/[ab].jsonl") == [f"{corpus}/a.jsonl", f"{corpus}/b.jsonl"]
    assert sources.list_files(f"{corpus}/nothing/*.jsonl") == []
    [one] = sources.expand_inputs([f"{corpus}/a.jsonl"], "text", {})
    assert (one.path, one.name) == (f"{corpus}/a.jsonl", "a.jsonl")


def test_a_registry_in_a_bucket_resolves_its_files_beside_it(corpus: str) -> None:
    [src] = sources.expand_inputs([f"{corpus}/reg/dataset_info.json#hi"], "auto", {})
    assert (src.path, src.fmt, src.name) == (
        f"{corpus}/reg/alpaca.json",
        "alpaca",
        "hi/alpaca.json",
    )
    records = list(rows.records(src))
    assert records[0][1] == {"instruction": "Say hi", "output": "Hi"}
    with pytest.raises(ConfigError, match=r"dataset 'gone' file .*/reg/nope.json not found"):
        sources.expand_inputs([f"{corpus}/reg/dataset_info.json#gone"], "auto", {})
    with pytest.raises(ConfigError, match=r"dataset registry not found: s3://.*/x/dataset_info"):
        sources.expand_inputs([f"{corpus}/x/dataset_info.json"], "auto", {})


def test_missing_objects_and_a_first_record_peek_read_only_a_head(corpus: str) -> None:
    with pytest.raises(ConfigError, match=r"input 's3://.*/missing.jsonl' matches no file"):
        sources.expand_inputs([f"{corpus}/missing.jsonl"], "text", {})
    found = sources.expand_inputs([f"{corpus}/a.jsonl"], "auto", {})
    assert rows.peek_first_record(found, "text") == {"text": "one"}


def test_an_output_dir_in_a_missing_bucket_is_named(s3_bucket: str) -> None:
    from raylm.data.config import DataJobConfig
    from raylm.data.pipeline import _fresh_output_dir

    cfg = DataJobConfig(inputs=["x.jsonl"], output_dir="s3://raylm-no-such-bucket/out")
    with pytest.raises(ConfigError, match=r"output_dir='s3://raylm-no-such-bucket/out' cannot"):
        _fresh_output_dir(cfg)
    assert _fresh_output_dir(DataJobConfig(inputs=["x"], output_dir=f"{s3_bucket}/o")) == (
        f"{s3_bucket}/o"
    )
