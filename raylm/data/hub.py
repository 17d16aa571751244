"""Datasets registered in a Hugging Face Hub dataset repo (LLaMA-Factory's
``dataset_dir: REMOTE:org/name``; raylm spells it ``data.path: hf://datasets/org/name``,
huggingface_hub's own URI, with an optional ``@revision``).

The driver resolves such a path once, before any record is read: the repo's
``dataset_info.json`` and the files of the named datasets are fetched with
huggingface_hub into its cache, all at the commit the registry was read at (a repo
pushed to mid-run cannot mix two versions), and the registry comes back with every
named entry pointing at local files. From there it is an ordinary registry, read by
``raylm.data.sources.registry_sources`` like any other; raw data is tokenized on the
driver, so workers never need the files.

An entry may name a file or folder of the repo (``file_name``), or, as LLaMA-Factory's
own hub registries do, a Hub dataset and its config (``hf_hub_url`` + ``subset``, read
from the ``configs`` of that repo's README, or its data files when it declares none).

huggingface_hub reads its environment once, when it is imported; here it is read at
every resolution, so a job honours what is set when it runs: HF_ENDPOINT (a mirror),
HF_HUB_CACHE / HF_HOME (where the cache is: one pre-populated for an offline cluster),
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (the cache only, no request), HF_TOKEN.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylm.config import ConfigError

PREFIX = "hf://datasets/"
DATASET_INFO = "dataset_info.json"
HUB_KEYS = ("hf_hub_url", "subset", "split", "folder", "revision", "ms_hub_url", "om_hub_url")
"""Entry keys that say where a hub dataset is; a resolved entry has ``file_name`` instead."""
DATA_EXTENSIONS = (".json", ".jsonl", ".ndjson", ".parquet", ".txt", ".text")
SPLIT_WORDS = ("train", "test", "validation", "valid", "dev", "eval")


def is_hub(path: str) -> bool:
    return path.startswith(PREFIX)


def hub_path(remote: str) -> str:
    """``REMOTE:org/name`` (LLaMA-Factory's dataset_dir) -> ``hf://datasets/org/name``."""
    return PREFIX + remote.partition(":")[2].strip().strip("/")


def parse(path: str) -> tuple[str, str]:
    """``(repo id, revision)`` of ``hf://datasets/org/name[@revision]`` (revision: main)."""
    repo, _, revision = path.removeprefix(PREFIX).strip("/").partition("@")
    if not repo or len(repo.split("/")) > 2 or any(not p for p in repo.split("/")):
        raise ConfigError(f"data.path={path!r}: expected {PREFIX}<org>/<name>[@revision]")
    return repo, revision or "main"


def _first(err: Exception) -> str:
    """huggingface_hub's messages run to paragraphs; the first line says what failed."""
    return next((ln for ln in str(err).splitlines() if ln.strip()), "").rstrip(".")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class Hub:
    """huggingface_hub's settings as the environment has them now."""

    endpoint: str
    cache_dir: str
    offline: bool

    @classmethod
    def from_env(cls) -> Hub:
        env = os.environ.get
        home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
        return cls(
            endpoint=(env("HF_ENDPOINT") or "https://huggingface.co").rstrip("/"),
            cache_dir=os.path.expandvars(os.path.expanduser(cache)),
            offline=_truthy(env("HF_HUB_OFFLINE")) or _truthy(env("TRANSFORMERS_OFFLINE")),
        )

    def fail(self, repo: str, what: str, err: Exception) -> ConfigError:
        """Where it looked and how to make it work, whichever way the fetch failed."""
        mode = "HF_HUB_OFFLINE=1: the cache only" if self.offline else "HF_HUB_OFFLINE unset"
        return ConfigError(
            f"{PREFIX}{repo}: cannot fetch {what} from endpoint {self.endpoint} ({mode}; "
            f"cache {self.cache_dir}): {type(err).__name__}: {_first(err)}. Fetch it where "
            f"the Hub (or an HF_ENDPOINT mirror) is reachable, e.g. `hf download {repo} "
            "--repo-type dataset` with the same HF_HOME / HF_HUB_CACHE, or point dataset_dir "
            "(data.path) at a local copy"
        )

    def download(self, repo: str, filename: str, revision: str) -> str:
        """The local path of one file of the repo (from the cache when it is there)."""
        from huggingface_hub import hf_hub_download

        try:
            return hf_hub_download(
                repo, filename, repo_type="dataset", revision=revision, endpoint=self.endpoint,
                cache_dir=self.cache_dir, local_files_only=self.offline,
            )  # fmt: skip
        except Exception as err:  # not found, unreachable, offline and not cached, ...
            raise self.fail(repo, f"{filename!r} at {revision}", err) from err

    def listing(self, repo: str, revision: str, snapshot: str) -> list[str]:
        """Every file of the repo at ``revision`` (offline: those in the cached snapshot)."""
        if self.offline:
            return sorted(
                os.path.relpath(p, snapshot)
                for p in glob.glob(os.path.join(snapshot, "**"), recursive=True)
                if os.path.isfile(p)
            )
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.endpoint)
        try:
            tree = api.list_repo_tree(repo, recursive=True, revision=revision, repo_type="dataset")
            return sorted(f.path for f in tree if isinstance(f, RepoFile))
        except Exception as err:
            raise self.fail(repo, f"the file list at {revision}", err) from err


def resolve(path: str, names: list[str]) -> tuple[str, dict[str, Any]]:
    """``(registry path, registry)`` for ``names`` in the repo ``path`` names: the path of
    its ``dataset_info.json`` in the local snapshot, and its entries with each named one's
    files fetched and named by local path (``file_name``)."""
    repo, revision = parse(path)
    if not names:
        raise ConfigError(
            f"data.path={path!r} is a Hub dataset repo: name its datasets (data.datasets, "
            "LLaMA-Factory's dataset)"
        )
    hub = Hub.from_env()
    info = hub.download(repo, DATASET_INFO, revision)
    snapshot, commit = os.path.dirname(info), os.path.basename(os.path.dirname(info))
    try:
        with open(info) as f:
            registry = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: {DATASET_INFO} is not valid JSON: {err}") from None
    if not isinstance(registry, dict):
        raise ConfigError(f"{path}: {DATASET_INFO}: expected an object of name -> entry")
    resolved = dict(registry)
    for name in dict.fromkeys(names):
        entry = registry.get(name)
        if not isinstance(entry, dict):
            continue  # registry_sources names a missing dataset with the ones there are
        if "file_name" in entry:
            local = _fetch(hub, repo, commit, snapshot, str(entry["file_name"]))
        elif "hf_hub_url" in entry:
            local = _subset(hub, entry, (repo, commit, snapshot), f"{path}: dataset {name!r}")
        else:
            continue  # script_url and the like: registry_sources says why not
        resolved[name] = {k: v for k, v in entry.items() if k not in HUB_KEYS} | {
            "file_name": local
        }
    return info, resolved


def _fetch(hub: Hub, repo: str, commit: str, snapshot: str, name: str) -> str:
    """A file, folder or glob of the repo, fetched; its local path (a glob stays a glob,
    over the snapshot: every file it matches is fetched)."""
    name = name.strip("/")
    if not any(c in name for c in "*?["):
        try:
            return hub.download(repo, name, commit)
        except ConfigError as err:
            folder = [f for f in hub.listing(repo, commit, snapshot) if f.startswith(name + "/")]
            if not folder:
                raise err from None
            for f in folder:
                hub.download(repo, f, commit)
            return os.path.join(snapshot, name)
    matched = [f for f in hub.listing(repo, commit, snapshot) if fnmatch.fnmatch(f, name)]
    if not matched:
        raise ConfigError(f"{PREFIX}{repo}@{commit}: no file matches {name!r}")
    for f in matched:
        hub.download(repo, f, commit)
    return os.path.join(snapshot, name)


def _subset(hub: Hub, entry: dict[str, Any], here: tuple[str, str, str], where: str) -> str:
    """The local files of a Hub dataset's config and split (``hf_hub_url``, ``subset``,
    ``split``, ``folder``: what LLaMA-Factory hands ``datasets.load_dataset``)."""
    repo = str(entry["hf_hub_url"])
    if repo == here[0] and not entry.get("revision"):
        commit, snapshot = here[1], here[2]
    else:
        commit, snapshot = _snapshot(hub, repo, str(entry.get("revision") or "main"))
    files = hub.listing(repo, commit, snapshot)
    pattern = _split_pattern(hub, repo, commit, files, entry, where)
    return _fetch(hub, repo, commit, snapshot, pattern)


def _snapshot(hub: Hub, repo: str, revision: str) -> tuple[str, str]:
    """``(commit, local snapshot dir)`` of another repo at ``revision``: the commit its
    first file downloads at (offline: the cache's ref)."""
    folder = os.path.join(hub.cache_dir, f"datasets--{repo.replace('/', '--')}")
    if hub.offline:
        ref = os.path.join(folder, "refs", revision)
        commit = Path(ref).read_text().strip() if os.path.isfile(ref) else revision
        if not os.path.isdir(os.path.join(folder, "snapshots", commit)):
            raise hub.fail(repo, f"revision {revision}", FileNotFoundError(ref))
        return commit, os.path.join(folder, "snapshots", commit)
    files = hub.listing(repo, revision, "")
    if not files:
        raise ConfigError(f"{PREFIX}{repo}@{revision} holds no files")
    first = "README.md" if "README.md" in files else files[0]
    snapshot = hub.download(repo, first, revision)[: -len(first)].rstrip("/")
    return os.path.basename(snapshot), snapshot


def _split_pattern(
    hub: Hub, repo: str, commit: str, files: list[str], entry: dict[str, Any], where: str
) -> str:
    """The one path or glob of the split, from the README's ``configs`` (Hugging Face's
    dataset card), else the repo's data files (those named for the split, when any are)."""
    subset, split = entry.get("subset"), str(entry.get("split") or "train")
    folder = str(entry.get("folder") or "").strip("/")
    configs = _configs(hub, repo, commit) if "README.md" in files else []
    if configs or subset:
        by_name = {str(c.get("config_name", "default")): c for c in configs}
        default = [n for n, c in by_name.items() if c.get("default")]
        default = default or (list(by_name) if len(by_name) == 1 else ["default"])
        config = by_name.get(str(subset or default[0]))
        if config is None:
            raise ConfigError(
                f"{where}: {repo} has no config {subset or 'default'!r}; its README "
                f"declares {sorted(by_name)} (the entry's subset)"
            )
        splits = _data_files(config.get("data_files"))
        if split not in splits or len(splits[split]) != 1:
            raise ConfigError(
                f"{where}: config {config.get('config_name', 'default')!r} of {repo} has "
                f"splits {splits}; raylm reads a split of one path or glob, split {split!r}"
            )
        base = "/".join(p for p in (folder, str(config.get("data_dir") or "").strip("/")) if p)
        return f"{base}/{splits[split][0]}" if base else splits[split][0]
    data = [f for f in files if f.lower().endswith(DATA_EXTENSIONS) and f != DATASET_INFO]
    data = [f for f in data if not folder or f.startswith(folder + "/")]
    named = [f for f in data if any(w in os.path.basename(f).lower() for w in SPLIT_WORDS)]
    if named:
        data = [f for f in named if split in os.path.basename(f).lower()]
    if not data or (not named and split != "train"):
        raise ConfigError(f"{where}: {repo} has no data files for split {split!r}")
    shared = os.path.commonpath(data) if len(data) > 1 else data[0]
    return shared if len(data) == 1 else f"{shared}/**"


def _configs(hub: Hub, repo: str, commit: str) -> list[dict[str, Any]]:
    """The ``configs`` of the dataset card's YAML header (none when it has no header)."""
    import yaml

    with open(hub.download(repo, "README.md", commit), encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---"):
        return []
    header = text[3:].partition("\n---")[0]
    configs = (yaml.safe_load(header) or {}).get("configs") or []
    return [c for c in configs if isinstance(c, dict)]


def _data_files(value: Any) -> dict[str, list[str]]:
    """A config's ``data_files`` (a path, a list of paths, or split -> path(s) records) as
    split -> paths."""
    if isinstance(value, str):
        return {"train": [value]}
    if isinstance(value, dict):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in value.items()}
    out: dict[str, list[str]] = {}
    for item in value or []:
        if isinstance(item, str):
            out.setdefault("train", []).append(item)
        elif isinstance(item, dict) and "path" in item:
            path = item["path"]
            out.setdefault(str(item.get("split", "train")), []).extend(
                [path] if isinstance(path, str) else list(path)
            )
    return out
