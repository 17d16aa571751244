"""Text normalisation and tokenisation for any script, shared by the eval metrics.

One place decides what "the same answer" means, so exact_match, contains, ROUGE-L and
BLEU agree on it and work for Chinese, Japanese and Korean as well as English:

- ``normalize``: NFKC (full-width letters and digits become ASCII: ``２０４８`` is
  ``2048``), case folding, every punctuation character removed (ASCII ``string.punctuation``,
  which includes symbols such as ``$+<=>^|~``, and every Unicode ``P*`` character: full-width
  and CJK punctuation such as ``。，！？、「」《》（）``), whitespace collapsed, and no space
  next to a CJK character (Chinese and Japanese do not separate words with spaces, so
  ``北京 天安门`` and ``北京天安门`` are the same answer).
- ``tokenize``: the words of the normalised text. A CJK character is a token of its own;
  any other run of non-space characters is one word (Latin, Cyrillic, Greek, Arabic, Hebrew,
  Devanagari with its combining marks, ...). Scripts written without spaces that are not
  CJK (Thai, Lao, Khmer, Myanmar) are not segmented: a run between spaces is one word.

CJK here is Han (with its radicals and compatibility ideographs), Hiragana, Katakana
(including half-width forms), Bopomofo, and **Hangul**. Hangul is split per syllable too,
although Korean puts spaces between words: Korean attaches particles and endings to the
word (서울은, 서울에서, 서울입니다), so whole-space-delimited tokens would make a reference
``서울`` never "contained" in ``수도는 서울입니다`` and give no ROUGE credit for it; per
syllable, it is found and partially credited, as Chinese is. The price, the same as for
Chinese without a word segmenter: containment may match inside a longer word (北京 is found
in 南北京城).

BLEU keeps sacrebleu's own tokenisers (``bleu_tokenizer`` picks one for the eval set);
LLaMA-Factory's metrics (``lf_metrics``) keep LLaMA-Factory's own segmentation (punctuation
and case kept) and share ``lcs_length`` from here.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable, Sequence

CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2E80, 0x2FDF),  # CJK radicals supplement, Kangxi radicals
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3031, 0x3035),  # kana repeat marks
    (0x3038, 0x303C),
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana (its ・ is punctuation and removed before)
    (0x3100, 0x312F),  # Bopomofo
    (0x3130, 0x318F),  # Hangul compatibility Jamo
    (0x31A0, 0x31BF),  # Bopomofo extended
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xA960, 0xA97F),  # Hangul Jamo extended A
    (0xAC00, 0xD7FF),  # Hangul syllables, Jamo extended B
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFFDC),  # half-width Katakana and Hangul (NFKC makes them full width)
    (0x1AFF0, 0x1B16F),  # Kana extended / supplement
    (0x20000, 0x323AF),  # CJK extensions B-H, compatibility supplement
)
"""Code point ranges whose characters are tokens of their own."""

_CJK = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in CJK_RANGES)
_SPACE_BY_CJK = re.compile(rf"\s+(?=[{_CJK}])|(?<=[{_CJK}])\s+")
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_HAN = re.compile(
    r"[\u2e80-\u2fdf\u3005-\u3007\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U000323af]"
)
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f\U0001aff0-\U0001b16f]")
_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7ff\uffa0-\uffdc]")
_ONE_CJK = re.compile(rf"([{_CJK}])")
_ZERO_WIDTH_SPACES = {0x200B, 0x2060, 0xFEFF}


class _PunctuationTable(dict):
    """``str.translate`` table, filled on demand: punctuation and zero-width spaces become
    a space, the soft hyphen goes, everything else stays."""

    def __missing__(self, code: int) -> int | str | None:
        ch = chr(code)
        value: int | str | None = code
        if code in _ZERO_WIDTH_SPACES or ch in string.punctuation:
            value = " "
        elif code == 0xAD:
            value = None
        elif unicodedata.category(ch).startswith("P"):
            value = " "
        self[code] = value
        return value


_TABLE = _PunctuationTable()


def is_cjk(ch: str) -> bool:
    """Whether one character is CJK (a token of its own)."""
    return len(ch) == 1 and any(lo <= ord(ch) <= hi for lo, hi in CJK_RANGES)


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation-free text with single spaces and none next to CJK:
    ``"  The  Answer: PARIS! "`` is ``"the answer paris"``, ``"北京。"`` is ``"北京"``."""
    text = unicodedata.normalize("NFKC", text).casefold().translate(_TABLE)
    return _SPACE_BY_CJK.sub("", " ".join(text.split()))


def tokenize(text: str) -> list[str]:
    """Tokens of the normalised text: one per CJK character, one per other word.
    Two texts have the same tokens exactly when they normalise to the same string."""
    return _TOKEN.findall(normalize(text))


def contains_tokens(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    """Whether ``needle`` occurs in ``haystack`` as consecutive whole tokens."""
    if not needle:
        return False
    sep = "\x1f"  # whitespace, so never inside a token
    return f"{sep}{sep.join(needle)}{sep}" in f"{sep}{sep.join(haystack)}{sep}"


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def script_of(texts: Iterable[str]) -> str:
    """The CJK script the texts are written in: ``ja`` if any has kana, else ``ko`` if any
    has Hangul, else ``zh`` if any has Han, else ``other``."""
    found = {"ja": False, "ko": False, "zh": False}
    for text in texts:
        found["ja"] = found["ja"] or bool(_KANA.search(text))
        found["ko"] = found["ko"] or bool(_HANGUL.search(text))
        found["zh"] = found["zh"] or bool(_HAN.search(text))
        if found["ja"]:
            break
    return next((s for s in ("ja", "ko", "zh") if found[s]), "other")


def cjk_split(text: str) -> str:
    """Spaces around every CJK character, the rest unchanged (BLEU's ``cjk`` tokenizer
    applies this after sacrebleu's 13a)."""
    return " ".join(_ONE_CJK.sub(r" \1 ", text).split())
