"""The filesystem layer, against a real S3-compatible server and the local disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm import storage
from raylm.manifest import Manifest
from raylm.outputs import ModelOutput, read_output


def test_join_keeps_a_uri_whole() -> None:
    assert storage.join("s3://b/runs/", "/x/", "manifest.json") == "s3://b/runs/x/manifest.json"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.is_remote("gs://b/k") and not storage.is_remote("file:///tmp/x")
    assert not storage.is_remote("outputs/run")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_files_round_trip(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/rt"
    uri = storage.join(base, "a", "b.json")
    assert not storage.exists(uri) and storage.listdir(storage.join(base, "a")) == []
    storage.write_text(uri, "一 two")
    storage.write_text(uri, "一 two 3")  # overwrite in place
    assert storage.read_text(uri) == "一 two 3"
    assert storage.listdir(storage.join(base, "a")) == ["b.json"]
    assert storage.is_dir(storage.join(base, "a"))
    storage.delete_dir(storage.join(base, "a"))
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError, match=r"b\.json: no such file"):
        storage.read_text(uri)


def test_a_manifest_and_its_typed_output_live_in_a_bucket(s3_bucket: str) -> None:
    run = storage.join(s3_bucket, "runs", "sft")
    model = ModelOutput(f"{run}/final", True, "/base", f"{run}/final", 128, "sft")
    written = (
        Manifest(job="train", config={"lr": 1e-4}).finish({}, {}, model.to_record()).write(run)
    )
    assert written == f"{run}/manifest.json"
    assert read_output(ModelOutput, run) == model
    assert Manifest.read(storage.join(s3_bucket, "nothing-here")) is None


def test_an_unknown_scheme_is_named() -> None:
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.exists("ftp://host/x")


def test_checkpoint_markers_on_object_storage(s3_bucket: str) -> None:
    """Only a checkpoint with its COMPLETE object counts, and a re-save of a step wins."""
    from raylm.train import checkpoint as ckpt

    run = storage.join(s3_bucket, "ckpt-run")
    first, partial, again = (storage.join(run, ckpt.checkpoint_name(s)) for s in (2, 4, 2))
    storage.write_text(storage.join(first, "trainer_state_rank0.pt"), "x")
    ckpt.mark_complete(first, 2, world_size=2)
    storage.write_text(storage.join(partial, "trainer_state_rank0.pt"), "half")
    assert ckpt.latest_complete(run) == (2, first)
    storage.write_text(storage.join(again, "trainer_state_rank0.pt"), "x")
    ckpt.mark_complete(again, 2, world_size=1)
    assert ckpt.latest_complete(run) == (2, again)
    assert [(s, ok) for s, _, ok in ckpt.list_checkpoints(run)] == [
        (2, True),
        (2, True),
        (4, False),
    ]


def test_bucket_inputs_are_fingerprinted_by_their_listing(s3_bucket: str) -> None:
    """A rewritten object changes the hash; the manifest itself does not count."""
    from raylm.manifest import hash_path

    base = storage.join(s3_bucket, "hashed")
    storage.write_text(storage.join(base, "a.jsonl"), "one")
    first = hash_path(base)
    assert first.startswith("listing:") and hash_path(base) == first
    storage.write_text(storage.join(base, "manifest.json"), "{}")
    assert hash_path(base) == first
    storage.write_text(storage.join(base, "a.jsonl"), "one, rewritten")
    assert hash_path(base) != first
    assert hash_path(storage.join(base, "a.jsonl")).startswith("listing:")
    with pytest.raises(FileNotFoundError, match="no such object"):
        hash_path(storage.join(base, "nope"))


def test_local_dir_copies_a_bucket_dir_once_and_again_when_it_changes(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "home"))
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    uri = storage.join(s3_bucket, "local-dir", "model")
    storage.copy_dir(str(src), uri)

    first = Path(storage.local_dir(uri, key="model.path"))
    assert first.is_relative_to(storage.cache_root()) and first.name.startswith("model-")
    assert (first / "config.json").read_text() == '{"a": 1}'
    assert (first / "sub" / "w.bin").read_bytes() == b"\0" * 1000
    stamp = (first / "config.json").stat().st_mtime_ns
    assert storage.local_dir(uri) == str(first)  # the same listing: the cached copy
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in Path(storage.cache_root()).iterdir()] == [first.name]  # no temp

    # A rewrite shows in the listing by size or modification time (S3 keeps whole seconds).
    storage.write_text(storage.join(uri, "config.json"), '{"a": 22}')
    second = Path(storage.local_dir(uri))
    assert second != first and (second / "config.json").read_text() == '{"a": 22}'
    assert (first / "config.json").read_text() == '{"a": 1}'  # a reader of the old one keeps it
    assert storage.local_dir(str(src)) == str(src)  # a local path is used in place


def test_local_dir_names_a_missing_prefix(s3_bucket: str) -> None:
    missing = storage.join(s3_bucket, "no", "such", "model")
    with pytest.raises(storage.StorageError, match=f"model.path={missing}: no such directory"):
        storage.local_dir(missing, key="model.path")
    storage.write_text(storage.join(s3_bucket, "local-dir", "file.txt"), "x")
    with pytest.raises(storage.StorageError, match="is an object, expected a directory"):
        storage.local_dir(storage.join(s3_bucket, "local-dir", "file.txt"))


def test_local_dir_racers_both_get_a_whole_copy(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads copying the same listing at once: one rename wins, both use it."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "home"))
    uri = storage.join(s3_bucket, "local-dir", "raced")
    for i in range(4):
        storage.write_text(storage.join(uri, f"f{i}.txt"), str(i) * 100)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: storage.local_dir(uri), range(2))
    assert a == b and sorted(p.name for p in Path(a).iterdir()) == [f"f{i}.txt" for i in range(4)]
    assert [p.name for p in Path(storage.cache_root()).iterdir()] == [Path(a).name]


def test_a_model_in_a_bucket_loads_from_this_nodes_copy(
    s3_bucket: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Configs keep the URI; the loading side gets a local copy (what from_pretrained needs)."""
    from raylm.config import local_model, resolve_model
    from raylm.tokenizer import load_tokenizer

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "home"))
    uri = storage.join(s3_bucket, "models", "tiny-local-model")
    storage.copy_dir(str(tiny_model), uri)
    assert resolve_model(uri) == uri
    local = Path(local_model(uri))
    assert local.is_relative_to(storage.cache_root()) and (local / "config.json").is_file()
    assert load_tokenizer(uri).encode("hello") == load_tokenizer(str(tiny_model)).encode("hello")
    assert local_model(str(tiny_model)) == str(tiny_model)
