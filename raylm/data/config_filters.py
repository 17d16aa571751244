"""The data job's quality-filter settings (``filters:``): the heuristics and the
model-based perplexity filter, split from ``raylm.data.config`` to keep each file short."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from raylm.config import ConfigError, choice, positive, resolve_path

SCRIPTS = ("latin", "cjk", "cyrillic", "arabic")
PERPLEXITY_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class PerplexityConfig:
    """Model-based quality filter: each kept document's perplexity under a small causal
    LM, then the corpus's highest-perplexity share removed (``docs/data.md``)."""

    model: str | None = None
    """A causal LM (local directory, ``s3://`` URI or Hugging Face id) whose perplexity
    judges the text. None: the filter is off (the default)."""

    max_percentile: float = 90.0
    """Keep documents at or below this percentile of the corpus's perplexities; those
    above it are removed as ``filter:perplexity`` (90 drops about the worst 10%; 100
    drops none). Documents tied at the threshold are all kept."""

    batch_size: int = 16
    """Documents per forward pass (sorted by length, so padding stays small); memory
    grows with batch_size * max_tokens * the model's vocabulary."""

    max_tokens: int = 512
    """Tokens of each document scored (its first ones): bounds the cost of long documents."""

    device: str = "auto"
    """Where the model runs: ``cuda`` (block tasks then ask for ``gpus_per_task``),
    ``cpu``, or ``auto`` (cuda when the cluster has GPUs, else cpu)."""

    gpus_per_task: float = 0.25
    """Share of a GPU each block task asks for when scoring on cuda (0.25: four block
    tasks share a GPU, each with its own copy of the model)."""

    @property
    def enabled(self) -> bool:
        return self.model is not None

    def __post_init__(self) -> None:
        if self.model is not None and not str(self.model).strip():
            raise ConfigError("filters.perplexity.model is empty: give a model, or null (off)")
        if not 0.0 <= self.max_percentile <= 100.0:
            raise ConfigError(
                f"filters.perplexity.max_percentile={self.max_percentile} must be in [0, 100]"
            )
        positive("filters.perplexity.batch_size", self.batch_size)
        positive("filters.perplexity.max_tokens", self.max_tokens)
        choice("filters.perplexity.device", self.device, PERPLEXITY_DEVICES)
        if not 0.0 < self.gpus_per_task <= 1.0:
            raise ConfigError(
                f"filters.perplexity.gpus_per_task={self.gpus_per_task} must be in (0, 1]"
            )


@dataclass
class FilterConfig:
    """Quality filters. Each only reads; a removed document is counted under its filter."""

    enabled: bool = True
    """Run the filters at all (false: only normalisation, PII and dedup)."""

    nfkc: bool = True
    """Unicode NFKC-normalise all text first (full-width forms, ligatures, compat chars)."""

    min_chars: int = 1
    """Drop documents shorter than this many characters (after normalisation)."""

    max_chars: int | None = None
    """Drop documents longer than this many characters (None: no bound)."""

    min_words: int = 0
    """Drop documents with fewer words (a CJK character counts as one word)."""

    max_words: int | None = None
    """Drop documents with more words (None: no bound)."""

    script: str | None = None
    """Required script: latin, cjk, cyrillic or arabic (None: any script)."""

    min_script_ratio: float = 0.95
    """Share of letters that must be in ``script`` (e.g. 0.95 keeps >= 95% CJK)."""

    max_symbol_ratio: float = 0.1
    """Largest share of symbol/emoji characters (Unicode S* categories) among non-space ones."""

    max_control_ratio: float = 0.0
    """Largest share of control characters other than tab/newline (0: any one drops it)."""

    max_dup_line_fraction: float = 0.3
    """Gopher: largest share of lines that repeat an earlier line."""

    max_top_ngram_fraction: float = 0.2
    """Gopher: largest share of characters covered by the most frequent word 2-gram."""

    max_dup_ngram_fraction: float = 0.15
    """Gopher: largest share of characters inside repeated word 5-grams."""

    min_mean_word_length: float = 0.0
    """Gopher: smallest mean word length in characters (Gopher uses 3; 0 disables)."""

    max_mean_word_length: float = 12.0
    """Gopher: largest mean word length (Gopher uses 10; catches minified code, hashes)."""

    min_simplified_ratio: float | None = None
    """Smallest share of Han characters that are Simplified (Simplified-only or shared),
    i.e. not Traditional-only by OpenCC's tables (the guides keep > 0.95; None: off)."""

    max_emoji: int | None = None
    """Most emoji a document may hold (0: any emoji drops it; None: off). Emoji are
    Unicode's emoji (pictographs with emoji presentation, VS16, skin tones, ZWJ
    sequences, flags, keycaps), not symbols: ``$ € © + ™ ° ±`` do not count."""

    max_emoji_ratio: float | None = None
    """Largest share of emoji among non-space characters (None: off)."""

    min_mean_line_chars: float | None = None
    """Smallest mean length of a document's non-empty lines in characters (the guides'
    "100 characters on average"; None: off)."""

    max_mean_line_chars: float | None = None
    """Largest mean length of non-empty lines (the guides' 800; None: off)."""

    blocklist: list[str] = field(default_factory=list)
    """Files of blocked words or phrases, one a line (``#`` starts a comment): CJK
    phrases match as substrings, others as whole words, case-insensitively."""

    max_blocklist_hits: int = 0
    """Most blocklist matches a document may hold (0: any match drops it)."""

    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    """Model-based filter: perplexity under a small causal LM, cut at a percentile of the
    corpus (off unless ``perplexity.model`` is set; ``enabled: false`` turns it off too)."""

    examples: int = 3
    """Examples of removed documents per filter written to stats.json (truncated text)."""

    @property
    def perplexity_on(self) -> bool:
        """The perplexity filter runs: filters on and a model named."""
        return self.enabled and self.perplexity.enabled

    def __post_init__(self) -> None:
        if self.script is not None:
            choice("filters.script", self.script, SCRIPTS)
        for name in ("min_chars", "min_words", "examples", "min_mean_word_length"):
            positive(f"filters.{name}", getattr(self, name), allow_zero=True)
        for name in (
            "min_script_ratio",
            "max_symbol_ratio",
            "max_control_ratio",
            "max_dup_line_fraction",
            "max_top_ngram_fraction",
            "max_dup_ngram_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"filters.{name}={value} must be a fraction in [0, 1]")
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ConfigError(f"filters.max_chars={self.max_chars} < min_chars={self.min_chars}")
        self._check_guides()
        if self.max_words is not None and self.max_words < self.min_words:
            raise ConfigError(f"filters.max_words={self.max_words} < min_words={self.min_words}")

    def _check_guides(self) -> None:
        for name in ("min_simplified_ratio", "max_emoji_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"filters.{name}={value} must be a fraction in [0, 1]")
        for name in ("max_emoji", "min_mean_line_chars", "max_mean_line_chars"):
            if getattr(self, name) is not None:
                positive(f"filters.{name}", getattr(self, name), allow_zero=True)
        positive("filters.max_blocklist_hits", self.max_blocklist_hits, allow_zero=True)
        lo, hi = self.min_mean_line_chars, self.max_mean_line_chars
        if lo is not None and hi is not None and hi < lo:
            raise ConfigError(f"filters.max_mean_line_chars={hi} < min_mean_line_chars={lo}")
        # Workers run elsewhere: resolve against the workspace now, and fail before the run.
        self.blocklist = [resolve_path(str(p)) for p in self.blocklist]
        for path in self.blocklist:
            if "://" not in path and not os.path.isfile(path):
                raise ConfigError(f"filters.blocklist: {path!r} is not a file")
