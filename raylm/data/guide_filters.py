"""The guides' Chinese-corpus filters: Simplified share, emoji, mean line length, blocklist.

Kept apart from ``raylm.data.filters`` (Gopher's heuristics) because each needs data or
a compiled engine: OpenCC's character tables, Unicode's emoji properties (the ``regex``
module knows them; ``re`` does not), an Aho-Corasick automaton. All are off by default,
and ``failure`` runs only the ones a config turns on, so a job without them pays nothing.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

import regex

from raylm.data.config import FilterConfig

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


@cache
def traditional_only() -> frozenset[str]:
    """Characters OpenCC converts away when going Traditional -> Simplified and that are
    no Simplified character themselves: 後 髮 臺 (but not 乾 or 台, which Simplified
    text uses too; nor 著, which both standards share).

    From OpenCC's own tables (opencc-python-reimplemented ships them as text): a
    Traditional-only character is a key of TSCharacters whose conversions do not
    include itself, and which is not a key of STCharacters (those are Simplified).
    """
    base = resources.files("opencc") / "dictionary"
    t2s = _table(base.joinpath("TSCharacters.txt").read_text(encoding="utf-8"))
    s2t = _table(base.joinpath("STCharacters.txt").read_text(encoding="utf-8"))
    return frozenset(c for c, targets in t2s.items() if c not in targets and c not in s2t)


def _table(text: str) -> dict[str, list[str]]:
    out = {}
    for line in text.splitlines():
        key, _, values = line.partition("\t")
        if key:
            out[key] = values.split()
    return out


@cache
def _traditional_re() -> re.Pattern[str]:
    """Traditional-only characters of the BMP as one character class: ``re`` looks those
    up in a bitmap, but scans a class with astral characters one by one (40x slower), so
    the few astral ones (``_ASTRAL``) are counted apart, and only in texts that have any."""
    return re.compile(
        "[" + "".join(sorted(c for c in traditional_only() if c < "\U00010000")) + "]"
    )


_ASTRAL = re.compile(r"[\U00010000-\U0010ffff]")


def simplified_ratio(text: str) -> float:
    """Share of Han characters that are not Traditional-only (1.0 with no Han at all:
    nothing in it is Traditional; ``filters.script`` is what demands Chinese)."""
    han = len(_HAN.findall(text))
    if not han:
        return 1.0
    traditional = len(_traditional_re().findall(text))
    if _ASTRAL.search(text):
        table = traditional_only()
        traditional += sum(1 for c in _ASTRAL.findall(text) if c in table)
    return 1.0 - traditional / han


_EMOJI = regex.compile(
    r"\p{Regional_Indicator}{2}"  # a flag
    r"|[0-9#*]\uFE0F?\u20E3"  # a keycap
    # An emoji-presentation pictograph, any pictograph of the emoji planes (U+1F000+,
    # some unassigned yet), or a text-default one (© ® ™ ♥ ☺) made emoji by VS16, a skin
    # tone or a ZWJ; then its modifiers, tags, and the rest of a ZWJ sequence.
    r"|(?:\p{Emoji_Presentation}|(?=\p{Extended_Pictographic})[\U0001F000-\U0001FAFF]"
    r"|\p{Extended_Pictographic}(?=[\uFE0F\u200D\p{Emoji_Modifier}]))"
    r"[\uFE0F\p{Emoji_Modifier}\U000E0020-\U000E007F]*"
    r"(?:\u200D\p{Extended_Pictographic}[\uFE0F\p{Emoji_Modifier}]*)*"
)


def emoji_count(text: str) -> int:
    """Emoji in ``text``, a ZWJ family or a flag counting once (Unicode's emoji data, UTS
    #51): unlike ``filters.symbol_ratio`` (category S*), currency, math, © ® ™ ° without
    VS16 are not emoji."""
    if text.isascii():
        return 0
    return len(_EMOJI.findall(text))


def mean_line_chars(text: str) -> float:
    """Mean characters per non-empty line (stripped): how long a document's paragraphs
    run, which tells prose from menus and lists of links (0.0 for an empty text)."""
    lines = [len(line.strip()) for line in text.splitlines()]
    lines = [n for n in lines if n]
    return sum(lines) / len(lines) if lines else 0.0


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


class Blocklist:
    """Blocked words and phrases in one Aho-Corasick automaton (pyahocorasick, C): one
    pass over a document whatever the list's size. Matching is on lower-cased text; a
    phrase with CJK characters matches anywhere (CJK has no spaces), others only as
    whole words (no letter, digit or ``_`` of a spaced script on either side)."""

    def __init__(self, phrases: list[str]) -> None:
        import ahocorasick

        self.size = 0
        self._auto = ahocorasick.Automaton()
        for phrase in {p.strip().lower() for p in phrases}:
            if phrase and not phrase.startswith("#"):
                self._auto.add_word(phrase, (len(phrase), bool(_CJK.search(phrase))))
                self.size += 1
        if self.size:
            self._auto.make_automaton()

    def hits(self, text: str, limit: int | None = None) -> int:
        """Matches in ``text`` (stops counting past ``limit``)."""
        if not self.size:
            return 0
        low, n = text.lower(), 0
        for end, (length, anywhere) in self._auto.iter(low):
            start = end - length + 1
            if anywhere or (_boundary(low, start - 1) and _boundary(low, end + 1)):
                n += 1
                if limit is not None and n > limit:
                    break
        return n


def _boundary(text: str, i: int) -> bool:
    if i < 0 or i >= len(text):
        return True
    c = text[i]
    return not (c.isalnum() or c == "_") or bool(_CJK.match(c))


@cache
def load_blocklist(paths: tuple[str, ...]) -> Blocklist:
    """The automaton of these files, built once per worker process."""
    from raylm import storage

    return Blocklist([line for p in paths for line in storage.read_text(p).splitlines()])


def any_enabled(cfg: FilterConfig) -> bool:
    """Whether any guides' filter is on (a batch skips the per-document pass if none)."""
    return (
        cfg.min_mean_line_chars is not None
        or cfg.max_mean_line_chars is not None
        or cfg.min_simplified_ratio is not None
        or cfg.max_emoji is not None
        or cfg.max_emoji_ratio is not None
        or bool(cfg.blocklist)
    )


def failure(text: str, cfg: FilterConfig) -> str | None:
    """Name of the first guides' filter ``text`` fails, or None; only enabled ones run."""
    lo, hi = cfg.min_mean_line_chars, cfg.max_mean_line_chars
    if lo is not None or hi is not None:
        mean = mean_line_chars(text)
        if lo is not None and mean < lo:
            return "min_mean_line_chars"
        if hi is not None and mean > hi:
            return "max_mean_line_chars"
    if cfg.min_simplified_ratio is not None and simplified_ratio(text) < cfg.min_simplified_ratio:
        return "simplified_ratio"
    if cfg.max_emoji is not None or cfg.max_emoji_ratio is not None:
        n = emoji_count(text)
        if cfg.max_emoji is not None and n > cfg.max_emoji:
            return "emoji"
        if cfg.max_emoji_ratio is not None and n:
            chars = len(text) - sum(c.isspace() for c in text)
            if n / max(chars, 1) > cfg.max_emoji_ratio:
                return "emoji_ratio"
    if cfg.blocklist:
        blocked = load_blocklist(tuple(cfg.blocklist))
        if blocked.hits(text, cfg.max_blocklist_hits) > cfg.max_blocklist_hits:
            return "blocklist"
    return None
