"""LoRA adapters from a local or shared filesystem, for ray.serve.llm's multiplexing.

``ray.serve.llm`` loads adapters on demand (Serve model multiplexing: a request for
``BASE:NAME`` goes to a replica that has NAME loaded, or loads it there), but only from
cloud storage: its LoraConfig rejects a local path. Training writes adapters to a
directory, so raylm swaps the loader (``raylm.serve.ray_llm.lora_loader_cls``): the
replica resolves NAME to a directory (an explicit name -> path map, then a
sub-directory of ``adapters_dir``) and hands that path to vLLM unchanged. Because the
lookup happens per request, an adapter copied into ``adapters_dir`` later is served
without redeploying the base model.
"""

from __future__ import annotations

import re
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def valid_name(name: str) -> bool:
    """Adapter names become path components: refuse anything that could escape the dir."""
    return bool(_NAME.match(name)) and ".." not in name


def list_adapters(adapters_dir: str | None, adapters: dict[str, str]) -> dict[str, str]:
    """Every servable adapter right now: name -> directory holding ``adapter_config.json``."""
    found: dict[str, str] = {}
    if adapters_dir and Path(adapters_dir).is_dir():
        for sub in sorted(Path(adapters_dir).iterdir()):
            if valid_name(sub.name) and (sub / ADAPTER_CONFIG).is_file():
                found[sub.name] = str(sub)
    for name, path in adapters.items():
        if (Path(path) / ADAPTER_CONFIG).is_file():
            found[name] = str(path)
    return found


def resolve_adapter(name: str, adapters_dir: str | None, adapters: dict[str, str]) -> str | None:
    """The directory of adapter ``name``, or None if there is no such adapter (yet)."""
    if name in adapters and (Path(adapters[name]) / ADAPTER_CONFIG).is_file():
        return adapters[name]
    if adapters_dir and valid_name(name):
        candidate = Path(adapters_dir) / name
        if (candidate / ADAPTER_CONFIG).is_file():
            return str(candidate)
    return None
