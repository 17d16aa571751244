"""LLaMA-Factory's ``dataset_dir: REMOTE:<repo>`` and ``tokenized_path`` (issue 14).

REMOTE: the registry and its files come from a Hub dataset repo through huggingface_hub
itself; with no network here, a local HTTP server speaks the Hub's download API
(``llamafactory_helpers.HubMirror``) and HF_ENDPOINT points at it, as a user's mirror
would, so the real download, cache and offline paths run. tokenized_path: the first run
tokenizes and saves, later runs read the saved set back, refusing one made otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from llamafactory_helpers import DEMO_REPO, LF, HubMirror, demo_hub, example, hub_env, lf

from raylm import config
from raylm.config import ConfigError
from raylm.manifest import MANIFEST

RAY = "train_lora/qwen3_lora_sft_ray.yaml"
PRE = "train_lora/qwen3_preprocess.yaml"
FAST = ["data.max_samples=8"]  # the examples say 1000 per dataset: tokenizing takes long


def _load(rel: str, tmp_path: Path, model: Path, *overrides: str, **extra: object):
    return config.load("train", [example(rel, tmp_path, model, **extra)], [*FAST, *overrides])


# ---- REMOTE: a Hub dataset repo --------------------------------------------------------


def test_remote_dataset_dir_reads_the_repo_through_the_hub_api(
    tmp_path: Path, tiny_model: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raylm.train.data import data_inputs

    cfg = _load(RAY, tmp_path, tiny_model)
    assert cfg.data.path == f"hf://datasets/{DEMO_REPO}"
    cache = tmp_path / "hub"
    with demo_hub(monkeypatch, cache) as mirror:
        sources = data_inputs(cfg)["sources"]
    assert sorted({s.dataset for s in sources}) == ["alpaca_en_demo", "identity"]
    snapshot = cache / f"datasets--{DEMO_REPO.replace('/', '--')}" / "snapshots"
    assert all(Path(s.path).parent.parent == snapshot for s in sources), sources
    assert all(Path(s.path).read_bytes() == (LF / "data" / Path(s.path).name).read_bytes()
               for s in sources)  # fmt: skip
    commit = mirror.commits[DEMO_REPO]  # the files at the commit the registry was read at
    assert f"datasets/{DEMO_REPO}/resolve/main/dataset_info.json" in mirror.requests
    assert f"datasets/{DEMO_REPO}/resolve/{commit}/identity.json" in mirror.requests
    assert not any("c4_demo" in r for r in mirror.requests)  # only the named datasets

    hub_env(monkeypatch, None, cache, offline=True)  # mirror gone: the cache serves
    assert [s.path for s in data_inputs(cfg)["sources"]] == [s.path for s in sources]


def test_a_repo_that_cannot_be_fetched_names_repo_endpoint_and_offline_mode(
    tmp_path: Path, tiny_model: Path, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raylm.train.data import data_inputs

    cfg = _load(RAY, tmp_path, tiny_model, "data.path=hf://datasets/org/absent")
    with demo_hub(monkeypatch, tmp_path / "hub"), pytest.raises(ConfigError) as err:
        data_inputs(cfg)
    assert "hf://datasets/org/absent" in str(err.value)
    assert "RepositoryNotFoundError" in str(err.value)
    hub_env(monkeypatch, None, tmp_path / "hub", offline=True)  # nothing cached, offline
    with pytest.raises(ConfigError, match=r"org/absent.*endpoint http://127\.0\.0\.1:9 "
                       r"\(HF_HUB_OFFLINE=1: the cache only"):  # fmt: skip
        data_inputs(cfg)
    hub_env(monkeypatch, None, tmp_path / "hub")  # online, nothing listening
    with pytest.raises(ConfigError, match=r"endpoint http://127\.0\.0\.1:9 \(HF_HUB_OFFLINE "
                       r"unset.*hf download org/absent --repo-type dataset"):  # fmt: skip
        data_inputs(cfg)


def test_hub_settings_are_read_when_a_run_resolves_not_at_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub fixes its settings when imported (a driver that imported
    transformers early would miss a job's env); raylm reads them at each resolution."""
    import huggingface_hub  # noqa: F401  (imported first, as transformers does)

    from raylm.data.hub import Hub, hub_path, parse

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Hub.from_env() == Hub("https://huggingface.co", str(tmp_path / "home" / "hub"), True)
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror:8080/")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert Hub.from_env().endpoint == "http://mirror:8080" and not Hub.from_env().offline
    assert hub_path("REMOTE:llamafactory/demo_data") == "hf://datasets/llamafactory/demo_data"
    assert parse("hf://datasets/org/set@v1.0") == ("org/set", "v1.0")
    with pytest.raises(ConfigError, match="expected hf://datasets/<org>/<name>"):
        parse("hf://datasets/a/b/c")


def test_hub_entries_resolve_through_the_dataset_cards_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLaMA-Factory's own hub registries name a Hub dataset and its config
    (``hf_hub_url`` + ``subset``) rather than a file: the README's configs say which."""
    from raylm.data.hub import resolve
    from raylm.data.sources import registry_sources

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "identity.json").write_text((LF / "data" / "identity.json").read_text())
    for part in ("00", "01"):
        (repo / "data" / f"chat-{part}.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: identity\n  data_files:\n  - split: train\n"
        "    path: identity.json\n- config_name: chat\n  data_files: data/chat-*.jsonl\n---\n"
    )
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "test"):
        (other / f"{split}.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    registry = {
        "identity": {"hf_hub_url": "org/cards", "subset": "identity"},
        "chat": {"hf_hub_url": "org/cards", "subset": "chat", "formatting": "alpaca"},
        "elsewhere": {"hf_hub_url": "org/plain", "split": "test"},
        "nosuch": {"hf_hub_url": "org/cards", "subset": "nosuch"},
    }
    (repo / "dataset_info.json").write_text(json.dumps(registry))
    with HubMirror({"org/cards": repo, "org/plain": other}) as endpoint:
        hub_env(monkeypatch, endpoint, tmp_path / "cache")
        names = ["identity", "chat", "elsewhere"]
        info, resolved = resolve("hf://datasets/org/cards", names)
        found = registry_sources(info, names, "auto", resolved)
        with pytest.raises(ConfigError, match=r"no config 'nosuch'; .*\['chat', 'identity'\]"):
            resolve("hf://datasets/org/cards", ["nosuch"])
    assert sorted(Path(s.path).name for s in found if s.dataset == "chat") == [
        "chat-00.jsonl", "chat-01.jsonl",
    ]  # fmt: skip
    assert [Path(s.path).name for s in found if s.dataset == "elsewhere"] == ["test.jsonl"]
    assert "datasets--org--plain" in next(s.path for s in found if s.dataset == "elsewhere")
    assert {s.dataset for s in found} == set(names)
    assert resolved["chat"] == {"formatting": "alpaca", "file_name": resolved["chat"]["file_name"]}


# ---- tokenized_path ----------------------------------------------------------------------


def _made(cfg) -> tuple[dict, list[dict]]:
    """The first run's data step: read, tokenize, save; the source and the rows."""
    import pyarrow.parquet as pq

    from raylm.train.data import data_inputs, make_plan

    source = data_inputs(cfg)
    assert source["kind"] == "raw"
    make_plan(cfg, source)
    shard = Path(cfg.data.tokenized_path) / "shards" / "part-00000.parquet"
    return source, pq.read_table(shard).to_pylist()


def test_tokenized_path_is_made_on_the_first_run_and_read_back_after(
    tmp_path: Path, tiny_model: Path, workspace: Path
) -> None:
    from raylm.train.data import data_inputs, make_plan

    cfg = _load(PRE, tmp_path, tiny_model, "data.val_size=2")
    saved = Path(cfg.data.tokenized_path)
    assert saved == tmp_path / "saves" / "tokenized"
    first, rows = _made(cfg)
    assert len(rows) == 14 and len(first["held_out"]) == 2  # 8 + 8 examples, 2 held out
    assert (saved / MANIFEST).exists() and (saved / "held_out.parquet").exists()
    meta = json.loads((saved / "dataset_meta.json").read_text())
    assert (meta["tokenizer"], meta["template"], meta["cutoff_len"]) == (
        str(tiny_model), "qwen3_nothink", 2048,
    )  # fmt: skip

    again = data_inputs(cfg)  # the raw data is not read again
    assert (again["kind"], again["path"], again["limit"]) == ("shards", str(saved), None)
    assert again["held_out"] == first["held_out"] and again["stats"] == first["stats"]
    plan = make_plan(cfg, again)  # one row group, as the first run's in-memory plan
    assert (plan.base, plan.files, plan.rows) == (str(saved / "shards"), ("part-00000.parquet",),
                                                  len(rows))  # fmt: skip

    as_shards = config.load("train", [example(PRE, tmp_path, tiny_model)],
                            [f"data.path={saved}", "data.tokenized_path=null"])  # fmt: skip
    assert data_inputs(as_shards)["kind"] == "shards"  # a data job output, checked as one


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.cutoff_len=64", "cutoff_len: saved 2048, this run 64"),
        ("model.template=null", "template: saved 'qwen3_nothink', this run None"),
        ("data.max_samples=4", "max_samples: saved 8, this run 4"),
        ("stage=pt", "stage: saved 'sft', this run 'pt'"),
    ],
)
def test_a_saved_set_made_otherwise_is_refused_naming_the_difference(
    override: str, named: str, tmp_path: Path, tiny_model: Path, workspace: Path
) -> None:
    from raylm.train.data import data_inputs

    _made(_load(PRE, tmp_path, tiny_model))
    with pytest.raises(ConfigError, match="was tokenized for another run") as err:
        data_inputs(_load(PRE, tmp_path, tiny_model, override))
    assert named in str(err.value) and "Delete the directory" in str(err.value)


def test_a_half_written_set_is_made_again_and_a_foreign_dir_is_refused(
    tmp_path: Path, tiny_model: Path, workspace: Path
) -> None:
    from raylm.train.data import data_inputs

    cfg = _load(PRE, tmp_path, tiny_model)
    saved = Path(cfg.data.tokenized_path)
    _made(cfg)
    (saved / MANIFEST).unlink()  # died before the manifest: never read
    assert data_inputs(cfg)["kind"] == "raw"
    _made(cfg)
    assert data_inputs(cfg)["kind"] == "shards"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"neither empty nor a tokenized set.*notes\.txt"):
        data_inputs(_load(PRE, tmp_path, tiny_model, f"data.tokenized_path={mine}"))


def test_tokenized_path_alone_trains_on_the_saved_set(tmp_path: Path) -> None:
    """LLaMA-Factory reads a saved set with no dataset named: so does raylm, as shards."""
    path = lf(tmp_path, tokenized_path="/sets/sft")
    data = yaml.safe_load(path.read_text())
    del data["dataset"]
    path.write_text(yaml.safe_dump(data))
    cfg = config.load("train", [path])
    assert (cfg.data.path, cfg.data.tokenized_path, cfg.data.datasets) == ("/sets/sft", None, [])
