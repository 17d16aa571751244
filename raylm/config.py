"""Typed job configs: dataclasses merged with YAML and dotlist overrides by OmegaConf.

Every job has one root dataclass registered in ``JOBS``. Loading goes
dataclass defaults -> YAML file(s) -> ``key=value`` overrides, in OmegaConf's struct
mode, so a typo or a wrong type fails at load time, before any Ray worker starts.
OmegaConf's own messages are terse, so ``load`` rewrites them into ``ConfigError``s
that name the key, the value, what was expected and the closest valid key.

The stage-specific groups live next to their stage (``raylm.data.config`` ...) so
each stage owns its knobs; this module owns loading, validation and the registry.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import itertools
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

T = TypeVar("T")

WORKSPACE_ENV = "RAYLM_WORKSPACE"
"""Relative output paths resolve against this directory (default: the current one).

``raylm submit`` sets it for jobs on the local cluster, whose working directory is a
Ray-managed copy of the project that is deleted after the job."""


class ConfigError(ValueError):
    """A config a user wrote is wrong; the message says where and what was expected."""


def choice(key: str, value: str, options: Sequence[str]) -> None:
    """Reject ``value`` unless it is one of ``options`` (OmegaConf has no Literal type)."""
    if value not in options:
        hint = _suggest(str(value), options)
        raise ConfigError(f"{key}={value!r} is not one of {list(options)}{hint}")


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    """Reject numbers that would make a job divide by zero or loop forever."""
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}")


def resolve_path(path: str) -> str:
    """Make a relative local path absolute against the workspace; leave URIs alone."""
    if not path or "://" in path or os.path.isabs(path):
        return path
    return str(Path(os.environ.get(WORKSPACE_ENV, os.getcwd())) / path)


def resolve_model(name_or_path: str) -> str:
    """A local model dir (relative paths against the workspace) if it exists, else a hub id.

    ``outputs/models/tiny`` and ``meta-llama/Llama-3.1-8B`` look alike; only the disk can
    tell them apart, and Ray workers run in another working directory.
    """
    local = resolve_path(name_or_path)
    if Path(local).exists() or "://" in name_or_path:
        return local
    parts = name_or_path.split("/")
    if len(parts) == 2 and all(parts) and not name_or_path.startswith("."):
        return name_or_path  # ORG/NAME: a hub id
    raise ConfigError(
        f"model {name_or_path!r}: no such directory at {local}, and not a hub id (ORG/NAME)"
        + _working_dir_hint()
    )


def local_model(name_or_path: str) -> str:
    """What ``from_pretrained`` takes: :func:`resolve_model`'s answer, with a bucket URI
    copied into this node's cache first (``raylm.storage.local_dir``). Called where the
    weights are loaded, on the node that loads them; configs keep the URI, so every node
    of a multi-node run fetches its own copy."""
    from raylm import storage

    resolved = resolve_model(name_or_path)
    return storage.local_dir(resolved, key="model") if storage.is_remote(resolved) else resolved


def _working_dir_hint() -> str:
    """Why a path that exists on the submitter's machine is missing inside a Ray job."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ or WORKSPACE_ENV in os.environ:
        return ""
    return (
        f". This job runs in Ray's copy of --working-dir ({os.getcwd()}), which leaves out "
        ".gitignored files such as outputs/: pass an absolute path every node can reach or "
        f"an s3:// URI, or submit with {WORKSPACE_ENV}=<dir> in the job's env_vars "
        "(`raylm submit` does this)"
    )


@dataclasses.dataclass
class RayConfig:
    """How a job connects to Ray."""

    address: str | None = None
    """Ray cluster to run on (``auto``, ``ray://host:10001`` or ``host:6379``).
    None: ``RAY_ADDRESS``, else the raylm local cluster, else a fresh embedded one."""

    namespace: str = "raylm"
    """Ray namespace, so raylm's named actors and Serve apps do not collide with others."""


JOBS: dict[str, str] = {
    "check": "raylm.check:CheckJob",
    "data": "raylm.data.job:DataJob",
    "train": "raylm.train.job:TrainJob",
    "eval": "raylm.eval.job:EvalJob",
    "export": "raylm.export.job:ExportJob",
    "serve": "raylm.serve.job:ServeJob",
    "generate": "raylm.serve.job:GenerateJob",
    "pipeline": "raylm.pipeline.job:PipelineJob",
}
"""The registry: job name -> its ``raylm.job.Job`` class, as import strings so
``raylm --help`` stays fast and this base module imports no stage."""


def job_names() -> list[str]:
    return list(JOBS)


def job_path(job: str) -> str:
    if job not in JOBS:
        raise ConfigError(f"unknown job {job!r}; expected one of {list(JOBS)}{_suggest(job, JOBS)}")
    return JOBS[job]


def config_class(job: str) -> type:
    module, _, name = job_path(job).partition(":")
    return getattr(importlib.import_module(module), name).config


def load(job: str, paths: Iterable[str | Path] = (), overrides: Sequence[str] = ()) -> Any:
    """Build the typed config of ``job`` from YAML files and ``a.b=value`` overrides.

    Returns an instance of the job's dataclass (``__post_init__`` validation has run).
    A YAML in another tool's format (LLaMA-Factory's, for train) is translated first.
    """
    cls = config_class(job)
    cfg = OmegaConf.structured(cls)
    for path in paths:
        cfg = _merge(cfg, _read_yaml(job, Path(path)), source=str(path))
    if overrides:
        cfg = _merge(cfg, _parse_overrides(overrides), source="command-line overrides")
    return to_object(cfg, cls)


def to_object(cfg: DictConfig, cls: type[T]) -> T:
    """Instantiate the dataclasses, turning missing values and validation into ConfigError."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        docs = "; ".join(f"{k}: {field_doc(cls, k) or 'no description'}" for k in missing)
        raise ConfigError(f"missing required value(s): {', '.join(missing)} ({docs})")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, cls, source="config") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A config instance as plain data, e.g. for manifests and the resolved YAML."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)  # type: ignore[return-value]


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def save_resolved(obj: Any, out_dir: str | Path) -> str:
    """Write ``config.resolved.yaml`` beside a job's output (local or in a bucket)."""
    from raylm import storage

    out = storage.join(str(out_dir), "config.resolved.yaml")
    storage.write_text(out, to_yaml(obj))
    return out


def _read_yaml(job: str, path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    # A config class may read a foreign format (the train config reads LLaMA-Factory's).
    translate = getattr(config_class(job), "from_foreign_yaml", None)
    return translate(data, str(path)) if translate else data


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key=value (e.g. train.lr=1e-4), got {bad}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from None


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err, OmegaConf.get_type(base), source) from None


def _explain(err: OmegaConfBaseException, cls: Any, source: str) -> ConfigError:
    """Turn an OmegaConf error into one naming the key, the value and what was expected."""
    full_key = str(getattr(err, "full_key", "") or "")
    if isinstance(err, ConfigKeyError | ConfigAttributeError) and "not in" in str(err):
        parent, _, leaf = full_key.rpartition(".")
        valid = field_names(cls, parent)
        where = f"under '{parent}'" if parent else "at the top level"
        return ConfigError(
            f"{source}: unknown key '{full_key}'{_suggest(leaf, valid)}. "
            f"Valid keys {where}: {', '.join(valid)}"
        )
    if isinstance(err, ValidationError):
        expected = _field_type(cls, full_key)
        value = getattr(err, "value", None) if hasattr(err, "value") else None
        shown = repr(value) if value is not None else "the given value"
        return ConfigError(
            f"{source}: wrong type for '{full_key}': {shown} cannot be used as {expected}. "
            f"({str(err).splitlines()[0]})"
        )
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{source}: missing required value '{full_key}'")
    cause = err.__cause__ or err
    if isinstance(cause, ConfigError):
        return cause
    return ConfigError(f"{source}: {str(cause).splitlines()[0]}")


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _walk(cls: Any, dotted: str) -> Any:
    """The type at ``a.b`` below ``cls``: a dataclass, a plain type, or None if absent."""
    for part in filter(None, dotted.split(".")):
        hints = typing.get_type_hints(cls) if _is_dc(cls) else {}
        if part not in hints:
            return None
        cls = _strip_optional(hints[part])
    return cls


def _is_dc(cls: Any) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def _strip_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else hint


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def field_names(cls: Any, dotted: str = "") -> list[str]:
    target = _walk(cls, dotted)
    return [f.name for f in dataclasses.fields(target)] if _is_dc(target) else []


def _field_type(cls: Any, full_key: str) -> str:
    hint = _walk(cls, full_key)
    return "the declared type" if hint is None else _type_name(hint)


@cache
def _attribute_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field), as litgpt writes them;
    a subclass's own override its bases' (GRPO and PPO share ``RolloutConfig``'s)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if _is_dc(base):
            docs |= _attribute_docs(base)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body  # type: ignore[attr-defined]
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def field_doc(cls: Any, dotted: str) -> str:
    parent, _, leaf = dotted.rpartition(".")
    owner = _walk(cls, parent)
    return _attribute_docs(owner).get(leaf, "") if _is_dc(owner) else ""


def describe(cls: Any, prefix: str = "", owner: Any = None) -> list[tuple[str, str, str]]:
    """Every key below ``cls`` as (dotted key, default, doc): ``raylm config keys``.

    ``owner`` is the group's default instance where its parent builds one with its own
    values (eval's engine is float32 where serve's is auto): those are the defaults shown.
    """
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = _strip_optional(hints[f.name])
        if owner is not None:
            value: Any = getattr(owner, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        if _is_dc(sub):
            rows.extend(describe(sub, f"{key}.", value if _is_dc(type(value)) else None))
            continue
        default = "(required)" if value is dataclasses.MISSING else repr(value)
        rows.append((key, f"{_type_name(hints[f.name])} = {default}", docs.get(f.name, "")))
    return rows
