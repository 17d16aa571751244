"""The data job's config: inputs and format at the top, one typed group per stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from raylm import templates
from raylm.config import ConfigError, RayConfig, choice, positive

# FilterConfig and the rest live in config_filters; re-exported where callers import them.
from raylm.data.config_filters import SCRIPTS, FilterConfig, PerplexityConfig  # noqa: F401
from raylm.data.formats import INPUT_FORMATS


@dataclass
class PiiConfig:
    """PII scrubbing: matches are replaced by typed placeholders and counted."""

    enabled: bool = True
    """Scrub at all."""

    email: bool = True
    """E-mail addresses -> ``<EMAIL>``."""

    phone: bool = True
    """Phone numbers, international (+CC ...), North-American and mainland-China -> ``<PHONE>``."""

    ip: bool = True
    """IPv4 and IPv6 addresses -> ``<IP_ADDRESS>``."""

    credit_card: bool = True
    """13-19 digit card numbers that pass the Luhn check -> ``<CREDIT_CARD>``."""

    cn_id: bool = True
    """18-character Chinese resident ID numbers with a valid checksum -> ``<CN_ID>``."""


@dataclass
class DedupConfig:
    """Exact (normalised-text hash) and fuzzy (MinHash-LSH) deduplication."""

    exact: bool = True
    """Drop documents whose normalised text (lower case, collapsed spaces) is identical."""

    fuzzy: bool = True
    """Drop near-duplicates found by ``method``."""

    method: str = "minhash"
    """Fuzzy dedup's method: ``minhash`` (MinHash-LSH on ``threshold``, Jaccard) or
    ``simhash`` (64-bit SimHash within ``hamming`` bits: 8 bytes a document, for
    near-identical pages; ``threshold``, ``num_perm``, bands and ``verify`` unused)."""

    hamming: int = 3
    """simhash: largest Hamming distance between near-duplicates' fingerprints (Manku
    et al. use 3 for web pages)."""

    simhash_blocks: int = 6
    """simhash: blocks the 64 bits are cut into; C(blocks, hamming) tables, each keyed
    by blocks - hamming blocks (more: fewer chance candidates, more tables)."""

    threshold: float = 0.8
    """Jaccard similarity of word-shingle sets above which two documents are duplicates."""

    num_perm: int = 128
    """MinHash permutations (signature length); more is more accurate and slower."""

    ngram: int = 5
    """Words per shingle (a document shorter than this is one shingle). A word is a run of
    letters, digits and ``_``, or one CJK / kana / hangul character; case is folded."""

    bands: int | None = None
    """LSH bands (None: chosen with ``rows`` from the threshold, as datasketch does)."""

    rows: int | None = None
    """Rows per band; bands * rows must not exceed num_perm."""

    verify: bool = True
    """Check each LSH candidate pair's exact Jaccard on its shingle sets, so no pair below
    the threshold is merged (LSH alone merges some); costs two shuffles of shingle sets."""

    false_positive_weight: float = 0.02
    """Weight of false positives when choosing bands/rows (1 - this weighs false negatives).
    Low by default because ``verify`` removes false positives; use 0.5 (datasketch's
    choice) with verify=false."""

    seed: int = 1
    """Seed of the hash permutations: the same seed gives the same clusters."""

    max_rounds: int = 50
    """Cap on label-propagation rounds of the connected components (graph diameter)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"dedup.threshold={self.threshold} must be in (0, 1)")
        positive("dedup.num_perm", self.num_perm)
        positive("dedup.ngram", self.ngram)
        positive("dedup.max_rounds", self.max_rounds)
        choice("dedup.method", self.method, ("minhash", "simhash"))
        positive("dedup.hamming", self.hamming, allow_zero=True)
        if not self.hamming < self.simhash_blocks <= 64:
            raise ConfigError(
                f"dedup.simhash_blocks={self.simhash_blocks} must be in (hamming={self.hamming}, 64]"
            )
        if (self.bands is None) != (self.rows is None):
            raise ConfigError("dedup.bands and dedup.rows must be set together (or both None)")
        if self.bands is not None and self.rows is not None:
            positive("dedup.bands", self.bands)
            positive("dedup.rows", self.rows)
            if self.bands * self.rows > self.num_perm:
                raise ConfigError(
                    f"dedup.bands*rows={self.bands * self.rows} exceeds num_perm={self.num_perm}"
                )
        if not 0.0 <= self.false_positive_weight <= 1.0:
            raise ConfigError("dedup.false_positive_weight must be in [0, 1]")


@dataclass
class LineDedupConfig:
    """Boilerplate removal across documents (C4, RefinedWeb): a line (or paragraph) found
    in more than ``max_docs`` documents is cut from all of them; pt jobs only."""

    enabled: bool = False
    """Run it (after the filters and PII, before exact and fuzzy dedup)."""

    unit: str = "line"
    """What is compared: ``line`` (split on newlines) or ``paragraph`` (blank lines)."""

    max_docs: int = 3
    """A unit in more documents than this is boilerplate (cookie notices, menus,
    footers); each document counts a unit once however often it repeats it there."""

    min_chars: int = 0
    """Units shorter than this (stripped) are never cut: ``1.``, ``}`` or a date repeat
    across documents without being boilerplate worth losing the context of."""

    min_doc_chars: int = 1
    """A document left with fewer characters (stripped) is removed, counted as
    ``filter:line_dedup``."""

    def __post_init__(self) -> None:
        choice("line_dedup.unit", self.unit, ("line", "paragraph"))
        positive("line_dedup.max_docs", self.max_docs)
        positive("line_dedup.min_chars", self.min_chars, allow_zero=True)
        positive("line_dedup.min_doc_chars", self.min_doc_chars, allow_zero=True)


@dataclass
class TokenizeConfig:
    """Tokenization and packing into training-ready shards (off: write cleaned records)."""

    enabled: bool = False
    """Tokenize; false writes the cleaned records (text / messages / pairs) instead."""

    tokenizer: str | None = None
    """A Hugging Face model or tokenizer directory (with a chat template for sft/dpo/kto,
    or a named ``template``)."""

    template: str | None = None
    """Chat template (LLaMA-Factory's ``template:``). None: the tokenizer's own template; a
    name from raylm.templates (chatml, default, llama3, qwen, qwen3, qwen3_nothink, mistral,
    gemma, alpaca, ...): that template replaces it, e.g. for a base model that has none.
    The train job must name the same one (``model.template``)."""

    cutoff_len: int = 1024
    """Longest example in tokens; longer ones are truncated (LLaMA-Factory's cutoff_len)."""

    pack: bool = False
    """Pack several short examples into rows of cutoff_len tokens (pt and sft only; dpo
    and kto rows are never packed)."""

    min_loss_tokens: int = 1
    """Drop examples with fewer trainable tokens (e.g. the answer was truncated away)."""

    def __post_init__(self) -> None:
        positive("tokenize.cutoff_len", self.cutoff_len)
        templates.check(self.template, "tokenize.template")
        positive("tokenize.min_loss_tokens", self.min_loss_tokens, allow_zero=True)
        if self.enabled and not self.tokenizer:
            raise ConfigError("tokenize.enabled=true needs tokenize.tokenizer (a model directory)")


@dataclass
class MixConfig:
    """A pretraining mix: named sources, curated together, each then sampled to its
    weight's share of a token (or byte) budget."""

    sources: dict[str, list[str]] = field(default_factory=dict)
    """Source name -> its inputs (files, globs, directories, URIs, registries, as
    ``inputs``). Setting it turns mixing on; the top-level ``inputs`` must then be empty."""

    weights: dict[str, float] = field(default_factory=dict)
    """Source name -> weight, one per source, >= 0; normalised by their sum (0.7/0.3 and
    7/3 are the same recipe). A source's share of the budget is weight / sum."""

    target_tokens: int | None = None
    """Output budget in tokens of ``tokenize.tokenizer`` (after curation; needs
    ``tokenize.enabled``). Exactly one of target_tokens and target_bytes is set."""

    target_bytes: int | None = None
    """Output budget in UTF-8 bytes of the documents' text (every message's content for
    conversations): the unit when the job does not tokenize."""

    max_repeats: float | None = 4.0
    """Most passes over a source's curated documents (4: the epochs Muennighoff et al.
    find nearly as good as fresh data). A source that would need more is capped here and
    reported as ``capped`` (its realised share falls short). None: no cap."""

    seed: int = 0
    """Seed of the per-document hash that orders each source for sampling."""

    @property
    def enabled(self) -> bool:
        return bool(self.sources)

    @property
    def unit(self) -> str:
        return "tokens" if self.target_tokens is not None else "bytes"

    @property
    def target(self) -> int:
        return int(self.target_tokens if self.target_tokens is not None else self.target_bytes)

    def shares(self) -> dict[str, float]:
        """Each source's share of the budget (weights normalised)."""
        return {n: self.weights[n] / sum(self.weights.values()) for n in self.sources}

    def __post_init__(self) -> None:
        if not self.sources:
            if self.weights or self.target_tokens or self.target_bytes:
                raise ConfigError("mix.weights / mix.target_* are set but mix.sources is empty")
            return
        for name, inputs in self.sources.items():
            if not name or not inputs:
                raise ConfigError(f"mix.sources.{name}: give a name and at least one input")
        for name in self.weights:  # a misspelt source name: did you mean ...
            choice("mix.weights key", name, list(self.sources))
        missing = [n for n in self.sources if n not in self.weights]
        if missing:
            raise ConfigError(f"mix.weights has no weight for source(s) {missing}")
        for name, weight in self.weights.items():
            positive(f"mix.weights.{name}", weight, allow_zero=True)
        if not sum(self.weights.values()) > 0:
            raise ConfigError("mix.weights are all 0: give at least one source a weight")
        if (self.target_tokens is None) == (self.target_bytes is None):
            raise ConfigError("mix needs exactly one budget: mix.target_tokens or mix.target_bytes")
        positive(f"mix.target_{self.unit}", self.target)
        if self.max_repeats is not None:
            positive("mix.max_repeats", self.max_repeats)


@dataclass
class DataJobConfig:
    """The ``data`` job: raw corpora -> cleaned, deduplicated, tokenized Parquet shards."""

    inputs: list[str] = field(default_factory=list)
    """Files, directories, globs or URIs (jsonl, json, parquet, txt), or a LLaMA-Factory
    ``dataset_info.json`` (``path/dataset_info.json#name1,name2`` selects datasets).
    Required unless ``mix.sources`` names the inputs instead."""

    format: str = "auto"
    """Record format: auto (per record), text, alpaca, sharegpt, openai, preference.

    It sets the job's kind: pt (text), sft (conversations), dpo (preference) or kto
    (conversations whose ``columns`` name a ``kto_tag``, as LLaMA-Factory's feedback data
    registers it: the last answer and a boolean good/bad label). A kto job's shards have
    input_ids, loss_mask, kto_label and KTO's mismatched pairs (kl_input_ids,
    kl_loss_mask), what the train job's stage kto reads."""

    columns: dict[str, str] = field(default_factory=dict)
    """Canonical name -> column, LLaMA-Factory style (prompt, query, response, system,
    history, messages, chosen, rejected, role_tag, content_tag, tools, kto_tag). A
    ``kto_tag`` column (boolean) makes the records KTO examples; ``tools`` holds function
    schemas that the chat template renders with the conversation."""

    text_column: str = "text"
    """Column holding the document of raw-text records."""

    id_column: str | None = None
    """Column with a record id (None: ``file:line`` ids, deterministic)."""

    text_unit: str = "line"
    """Plain-text files: one document per ``line`` or per ``file``."""

    read_block_mb: float = 16.0
    """Largest byte range of a JSONL or line-text file that one read task reads: bounds
    that task's memory and sets read parallelism (a corpus of >= 1 MiB is also split
    into >= 2 ranges per cluster CPU, none under 256 KiB, so one big file uses them all)."""

    filters: FilterConfig = field(default_factory=FilterConfig)
    """Quality filters."""

    pii: PiiConfig = field(default_factory=PiiConfig)
    """PII scrubbing."""

    line_dedup: LineDedupConfig = field(default_factory=LineDedupConfig)
    """Boilerplate lines or paragraphs cut across documents (off by default)."""

    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Deduplication."""

    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    """Tokenization and packing."""

    mix: MixConfig = field(default_factory=MixConfig)
    """Mixing recipe: weighted sources sampled to a budget (off: ``inputs`` as one corpus)."""

    output_dir: str = "outputs/data"
    """Where shards/, stats.json, quarantine/, dedup/ and manifest.json go (replaced)."""

    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster connection."""

    def __post_init__(self) -> None:
        choice("format", self.format, INPUT_FORMATS)
        choice("text_unit", self.text_unit, ("line", "file"))
        positive("read_block_mb", self.read_block_mb)
        if self.mix.enabled and self.inputs:
            raise ConfigError("give inputs or mix.sources (whose inputs are read), not both")
        if not self.inputs and not self.mix.enabled:
            raise ConfigError(
                "inputs is empty: give at least one file, glob or directory (or mix.sources)"
            )
        if self.mix.target_tokens is not None and not self.tokenize.enabled:
            raise ConfigError(
                "mix.target_tokens counts tokens of tokenize.tokenizer: set "
                "tokenize.enabled=true, or give the budget in mix.target_bytes"
            )

    def all_inputs(self) -> list[str]:
        """``inputs``, or every mix source's inputs in order."""
        return self.inputs or [i for inputs in self.mix.sources.values() for i in inputs]
