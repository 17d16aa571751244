"""LoRA adapters from a filesystem or a bucket, for ray.serve.llm's multiplexing.

``ray.serve.llm`` loads adapters on demand (Serve model multiplexing: a request for
``BASE:NAME`` goes to a replica that has NAME loaded, or loads it there), but only from
cloud storage, through its own downloader and its own layout rules. Training writes
adapters to a directory (local, shared, or ``s3://``), so raylm swaps the loader
(``raylm.serve.ray_llm.lora_loader_cls``): the replica resolves NAME to a directory (an
explicit name -> path map, then a sub-directory of ``adapters_dir``), and one in a bucket
is copied to the node's cache (``storage.local_dir``) before vLLM, which loads local
directories only, gets it. Because the lookup happens per request, an adapter copied
into ``adapters_dir`` later (a folder or a bucket prefix) is served without redeploying
the base model.
"""

from __future__ import annotations

import re

from raylm import storage

ADAPTER_CONFIG = "adapter_config.json"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def valid_name(name: str) -> bool:
    """Adapter names become path components: refuse anything that could escape the dir."""
    return bool(_NAME.match(name)) and ".." not in name


def is_adapter(path: str) -> bool:
    """Whether ``path`` (a directory or a bucket prefix) holds ``adapter_config.json``."""
    return storage.is_file(storage.join(path, ADAPTER_CONFIG))


def _in_dir(adapters_dir: str) -> dict[str, str]:
    """name -> path of every adapter directly under ``adapters_dir``: one recursive
    listing (a paginated LIST on a bucket, rather than a request per sub-directory)."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(adapters_dir)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except (NotADirectoryError, FileNotFoundError):
        return {}
    found = {}
    for info in infos:
        parent, _, base = info.path[len(root.rstrip("/")) :].strip("/").rpartition("/")
        if base == ADAPTER_CONFIG and info.is_file and "/" not in parent and valid_name(parent):
            found[parent] = storage.join(adapters_dir, parent)
    return found


def list_adapters(adapters_dir: str | None, adapters: dict[str, str]) -> dict[str, str]:
    """Every servable adapter right now: name -> directory holding ``adapter_config.json``."""
    found = dict(sorted(_in_dir(adapters_dir).items())) if adapters_dir else {}
    for name, path in adapters.items():
        if is_adapter(path):
            found[name] = path
    return found


def resolve_adapter(name: str, adapters_dir: str | None, adapters: dict[str, str]) -> str | None:
    """The directory (or bucket prefix) of adapter ``name``, or None if there is no such
    adapter (yet)."""
    if name in adapters and is_adapter(adapters[name]):
        return adapters[name]
    if adapters_dir and valid_name(name):
        candidate = storage.join(adapters_dir, name)
        if is_adapter(candidate):
            return candidate
    return None


def local_adapter(name: str, adapters_dir: str | None, adapters: dict[str, str]) -> str | None:
    """A local directory vLLM can load adapter ``name`` from (a bucket's is copied to this
    node's cache once per version), or None if there is no such adapter."""
    path = resolve_adapter(name, adapters_dir, adapters)
    return storage.local_dir(path, key=f"LoRA adapter {name!r}") if path else None


def saved_chat_template(path: str) -> str | None:
    """The chat template saved with a tokenizer in ``path`` (a directory or bucket prefix):
    ``chat_template.jinja``, else ``tokenizer_config.json``'s; None when it has none."""
    import json

    jinja = storage.join(path, "chat_template.jinja")
    if storage.exists(jinja):
        return storage.read_text(jinja)
    config = storage.join(path, "tokenizer_config.json")
    if storage.exists(config):
        template = json.loads(storage.read_text(config)).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def adapters_chat_template(base: str, adapters: dict[str, str]) -> str | None:
    """The template the named adapters were trained with, when the base renders chats
    otherwise: vLLM renders every request with one template (the base tokenizer's), so
    an adapter trained with a named template (``model.template``) would be served with
    the base's, or none. Adapters that disagree among themselves cannot share a server."""
    found = {name: saved_chat_template(path) for name, path in adapters.items()}
    distinct = {t for t in found.values() if t}
    if len(distinct) > 1:
        from raylm.config import ConfigError

        raise ConfigError(
            f"lora.adapters {sorted(found)} were trained with different chat templates, and "
            "one server renders every request with one: serve them from separate apps, or "
            "set engine.extra.chat_template to the one to use"
        )
    template = next(iter(distinct), None)
    return template if template and template != saved_chat_template(base) else None
