"""Typed stage outputs: what one job hands the next, recorded in its manifest.

A stage never guesses where the previous one put things (``train_dir / "final"``) or
what it assumed (the tokenizer, the cutoff): it reads the previous stage's manifest and
gets one of these back. The pipeline wires stages from them, and the train job checks a
data job's tokenizer and cutoff against its own before it spends a GPU-hour.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from raylm import templates
from raylm.config import ConfigError
from raylm.manifest import Manifest, hash_path

Out = TypeVar("Out", bound="StageOutput")


@dataclasses.dataclass
class StageOutput:
    """Base of every typed output; ``kind`` tells a manifest reader which class it is."""

    kind: ClassVar[str] = ""

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_record(cls: type[Out], record: dict[str, Any] | None, where: str) -> Out:
        """The typed output of a manifest, failing with what was found instead."""
        if not record or record.get("kind") != cls.kind:
            found = (record or {}).get("kind", "nothing")
            raise ConfigError(
                f"{where}: expected a {cls.kind} output, its manifest records {found}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in fields})


@dataclasses.dataclass
class DatasetOutput(StageOutput):
    """A data job's shards, and the choices baked into them."""

    kind: ClassVar[str] = "dataset"

    path: str
    """The data job's output directory (holding ``shards/`` and ``dataset_meta.json``)."""

    task: str
    """pt, sft or dpo: the kind of records the shards hold."""

    tokenized: bool
    """Whether rows are token ids (else text records)."""

    tokenizer: str | None
    """The tokenizer the shards were made with (path or hub id); None when untokenized."""

    tokenizer_hash: str | None
    """Content hash of the tokenizer's files, so two paths to one tokenizer agree."""

    cutoff_len: int | None
    """Longest sequence in tokens; None when untokenized."""

    rows: int
    """Rows in the shards (sequences after packing when tokenized)."""

    template: str | None = None
    """The named chat template the shards were rendered with (``raylm.templates``);
    None: the tokenizer's own. Part of ``tokenizer_hash`` too."""


@dataclasses.dataclass
class ModelOutput(StageOutput):
    """A trained model a later stage can score, export or serve."""

    kind: ClassVar[str] = "model"

    path: str
    """Directory loadable by transformers / vLLM: full weights or a PEFT adapter."""

    adapter: bool
    """True when ``path`` is a LoRA adapter that needs ``base_model`` under it."""

    base_model: str
    """The model trained from (path or hub id): what an adapter is applied to."""

    tokenizer: str
    """The tokenizer the model was trained with (saved beside full weights too)."""

    cutoff_len: int
    """Longest sequence in tokens seen in training."""

    stage: str
    """Training objective that produced it (pt, sft, dpo, ...)."""

    merged: str | None = None
    """For an adapter: a full model with the adapter merged in, if one was written."""

    source: str | None = None
    """For a quantized export: the unquantized (merged) model it was made from, which
    the pipeline's export_eval stage compares it with."""

    trained_adapter: str | None = None
    """An OFT run: the PEFT adapter it trained, kept beside the merged weights ``path``
    holds (``final/oft_adapter``; PEFT applies it to ``base_model``). Not for serving:
    vLLM has no OFT adapters, so ``path`` is already merged and ``adapter`` is false."""


@dataclasses.dataclass
class EvalOutput(StageOutput):
    """An eval job's verdict: where the report is and whether the gate passed."""

    kind: ClassVar[str] = "eval"

    report: str
    """``eval.json``: metrics with confidence intervals and the gate verdict."""

    gate_passed: bool
    """The deployment gate's verdict."""

    model: str
    """The model directory that was scored."""


@dataclasses.dataclass
class ServiceOutput(StageOutput):
    """A running Serve app: how to reach it and what it serves."""

    kind: ClassVar[str] = "service"

    url: str
    """OpenAI base URL (``.../v1``)."""

    app_name: str
    """Serve application name (``raylm serve down NAME``)."""

    model: str
    """Model directory the app serves."""

    adapters: dict[str, str] = dataclasses.field(default_factory=dict)
    """LoRA name -> adapter directory served beside the base model."""

    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    """Version name -> model directory, when the app serves several (``model`` is the
    one ``model.version`` names); empty for a one-version app."""

    traffic: dict[str, float] = dataclasses.field(default_factory=dict)
    """The deployed split between ``versions`` (``raylm serve promote`` changes the
    running app's, not this record)."""


def read_output(cls: type[Out], out_dir: str | Path) -> Out:
    """The typed output recorded in the manifest of a finished job's directory."""
    manifest = Manifest.read(out_dir)
    where = f"{out_dir}/manifest.json"
    if manifest is None:
        raise ConfigError(f"{where}: no manifest; run the job that writes {out_dir} first")
    if manifest.status != "succeeded":
        raise ConfigError(f"{where}: status {manifest.status!r}, expected 'succeeded'")
    return cls.from_record(manifest.output, where)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def tokenizer_hash(name_or_path: str, template: str | None = None) -> str:
    """One hash per tokenizer and chat template, whatever path reaches it.

    Hashes the files that define tokenization (not the weights), so a model directory
    and its copy agree, and a retrained model with the same tokenizer does too. A hub id
    that is not on disk is recorded by name. A named template (``raylm.templates``)
    changes the rendered text and the EOS, so it is part of the hash: shards rendered with
    one template never pass for another's. None (the tokenizer's own template, in its
    files) leaves the hash as it always was.
    """
    root = Path(name_or_path)
    files = [root / f for f in TOKENIZER_FILES if (root / f).is_file()]
    named = f"template={template}:{templates.get(template).digest()}" if template else ""
    if not files:
        return f"name:{name_or_path}" + (f"+{named}" if named else "")
    listing = "\n".join([*(f"{f.name}={hash_path(f)}" for f in files), *([named] if named else [])])
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
