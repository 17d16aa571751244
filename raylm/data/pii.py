"""PII scrubbing with typed placeholders.

Regexes alone over-match (any 16 digits is not a card, any 18 digits is not an ID), so
card numbers must pass the Luhn check and Chinese resident IDs their ISO 7064 checksum
and a plausible birth date; near misses stay untouched.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from raylm.data.config import PiiConfig

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "cn_id": "<CN_ID>",
}

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_CN_ID = re.compile(r"(?<![0-9A-Za-z])[1-9]\d{16}[\dXx](?![0-9A-Za-z])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"  # international
    r"|(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"  # mainland-China mobile
    r"|0\d{2,3}-\d{7,8}"  # mainland-China landline
    r"|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}"  # North-American
    r")(?!\w)"
)
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def cn_id_ok(value: str) -> bool:
    """ISO 7064 MOD 11-2 checksum plus a plausible YYYYMMDD birth date."""
    year, month, day = int(value[6:10]), int(value[10:12]), int(value[12:14])
    if not (1900 <= year <= 2100 and 1 <= month <= 12 and 1 <= day <= 31):
        return False
    check = _ID_CHECK[sum(int(c) * w for c, w in zip(value[:17], _ID_WEIGHTS, strict=True)) % 11]
    return value[17].upper() == check


def _card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _ip(match: re.Match) -> bool:
    try:
        ipaddress.ip_address(match.group())
    except ValueError:
        return False
    return True


def _phone(match: re.Match) -> bool:
    return len(re.sub(r"\D", "", match.group())) >= 7


_ALWAYS: Callable[[re.Match], bool] = lambda m: True  # noqa: E731

# Order matters: IDs and cards before phones, whose patterns would eat their digits.
_RULES: tuple[tuple[str, tuple[re.Pattern, ...], Callable[[re.Match], bool]], ...] = (
    ("email", (_EMAIL,), _ALWAYS),
    ("cn_id", (_CN_ID,), lambda m: cn_id_ok(m.group())),
    ("credit_card", (_CARD,), _card),
    ("ip", (_IPV4, _IPV6), _ip),
    ("phone", (_PHONE,), _phone),
)


def scrub(
    text: str, cfg: PiiConfig, kinds: frozenset[str] | None = None
) -> tuple[str, dict[str, int]]:
    """``text`` with PII replaced, and how many of each type were replaced (only the
    types in ``kinds`` are looked for, when given: those the others cannot match)."""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    if not cfg.enabled:
        return text, counts
    for kind, patterns, valid in _RULES:
        if not getattr(cfg, kind) or (kinds is not None and kind not in kinds):
            continue
        for pattern in patterns:
            text = pattern.sub(_replacer(kind, valid, counts), text)
    return text, counts


def _replacer(kind: str, valid: Callable[[re.Match], bool], counts: dict[str, int]):
    def replace(match: re.Match) -> str:
        if not valid(match):
            return match.group()
        counts[kind] += 1
        return PLACEHOLDERS[kind]

    return replace


# A necessary condition of each type, for RE2 over a whole block (pyarrow's
# match_substring_regex): every match of a rule contains a match of its condition (the
# lookarounds dropped, \d widened to any decimal digit as Python's is). A placeholder
# never joins with the text around it into a new match (its characters are none of
# the digits, dots, dashes, colons and hex runs these need), so a type whose condition
# the original text misses finds nothing after the earlier types' replacements either.
_MAY_HOLD = {
    "email": r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2}",
    "cn_id": r"[1-9]\p{Nd}{16}[\p{Nd}Xx]",
    "credit_card": r"(?:\p{Nd}[ -]?){12}\p{Nd}",
    # IPv6 that ``ipaddress`` accepts has "::" or all eight groups ("OBJECT:0:X" has neither)
    "ip": r"(?:\p{Nd}{1,3}\.){3}\p{Nd}|::|(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]",
    "phone": (  # _PHONE without its lookarounds; international: the 7 digits _phone
        # wants, at most two of " .()-" apart (not "+0200", a date's time zone)
        r"\+\p{Nd}(?:[ .()-]{0,2}\p{Nd}){6}"
        r"|1[3-9]\p{Nd}[ -]?\p{Nd}{4}[ -]?\p{Nd}{4}|0\p{Nd}{2,3}-\p{Nd}{7}"
        r"|\p{Nd}{3}\)?[ .-]\p{Nd}{3}[ .-]\p{Nd}{4}"
    ),
}


def scrub_batch(texts: list[str], cfg: PiiConfig) -> tuple[list[str], list[dict[str, int]]]:
    """``scrub`` of every text of a block. No match, and no lookaround that decides one,
    reaches across a newline, so each line can be scrubbed alone; RE2 (in C++, over
    the block's lines) tells which lines may hold each type, and only those lines run
    the Python rules, for those types only: the same text and counts as ``scrub``."""
    fresh = [dict.fromkeys(PLACEHOLDERS, 0) for _ in texts]
    if not cfg.enabled or not texts:
        return list(texts), fresh
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        lines = pc.split_pattern(pa.array(texts, pa.large_string()), "\n")
    except (UnicodeEncodeError, pa.ArrowException):  # a lone surrogate: no RE2 for this block
        pairs = [scrub(t, cfg) for t in texts]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    flat = lines.flatten()
    kinds = [k for k in _MAY_HOLD if getattr(cfg, k)]
    may = np.stack(
        [pc.match_substring_regex(flat, _MAY_HOLD[k]).to_numpy(zero_copy_only=False) for k in kinds]
    ) if kinds else np.zeros((0, len(flat)), dtype=bool)  # fmt: skip
    hit_lines = np.flatnonzero(may.any(axis=0))
    out, counts = list(texts), fresh
    if not len(hit_lines):
        return out, counts
    owner = pc.list_parent_indices(lines).to_numpy()[hit_lines].tolist()
    offsets = lines.offsets.to_numpy()
    flags = may[:, hit_lines].T.tolist()
    parts: list[str] = []
    for n, (j, doc) in enumerate(zip(hit_lines.tolist(), owner, strict=True)):
        if n == 0 or doc != owner[n - 1]:
            parts = texts[doc].split("\n")
        found = frozenset(k for k, hit in zip(kinds, flags[n], strict=True) if hit)
        at = j - int(offsets[doc])
        parts[at], c = scrub(parts[at], cfg, found)
        for k, v in c.items():
            counts[doc][k] += v
        if n + 1 == len(owner) or owner[n + 1] != doc:
            out[doc] = "\n".join(parts)
    return out, counts
