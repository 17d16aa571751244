"""The block-at-once filters and PII scrubbing agree with the per-document code on
tricky text: CJK inside words, every line break ``str.splitlines`` knows, combining
marks, other scripts' digits, lone surrogates, n-gram ties, PII at line edges."""

from __future__ import annotations

import random

import pytest

from raylm.data import filters, pii, text_batch
from raylm.data.config import FilterConfig, PiiConfig

TRICKY = [
    "",
    "   \n\t ",
    "x",
    "GPU中文abc中 文字 text",
    "中文GPU和CPU，还有ＡＢＣ",
    "カタカナ・ひらがな゛ー漢字 한국어 텍스트",
    "e\u0301te\u0301 cafe\u0301 naïve",
    "٣٤٥ ١٣٨١٢٣٤٥٦٧٨ digits ۱۲۳",
    "line\r\nline\r\nline\rother\x1cline\x1dline\x85line\u2028line\u2029line\vline\fline",
    "same line\nsame line  \n  same line\nother one",
    "tab\tok but bell\x07 and zw\u200bsp and bom\ufeff",
    "lone \ud800 surrogate and \udfff",
    "astral 𠀀𠀁 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🙂👍🏽 🇨🇳 1️⃣",
    "aa b aa b ccc dddd ccc dddd",
    "b aa b aa dddd ccc dddd ccc",
    "one two three four five six one two three four five six seven",
    "the cat the cat the cat the cat sat on a mat",
    "a b c d e f g h i j",
    "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5",
    "★★★ ☆☆☆ ♥♥♥ deal 🙂🙂🙂🙂 now ★★★ $ € ¥",
    "under_score snake_case __dunder__ 1_000",
    "\n\n\nleading and trailing newlines\n\n\n",
]
CONFIGS = [
    FilterConfig(),
    FilterConfig(min_chars=5, max_chars=60, min_words=3, max_words=12),
    FilterConfig(script="cjk", min_script_ratio=0.5),
    FilterConfig(script="latin"),
    FilterConfig(min_mean_word_length=3, max_top_ngram_fraction=1.0),
    FilterConfig(max_dup_line_fraction=1.0, max_symbol_ratio=1.0, max_control_ratio=1.0),
    FilterConfig(max_emoji=0, min_mean_line_chars=5),
]
PIECES = [
    "word", "中文", "  ", "\n", "\r\n", "-", ".", ":", "@", "+", "(", ")", "x", "_", "::",
    "1", "13", "138", "0", "07", "4532", "0151", "1283", "0366", "86", "44", "20", "7946",
    "192", "168", "255", "256", "2001", "db8", "a@b.io", "jane.doe@mail.example.org",
    "11010519491231002X", "13812345678", "010-62345678", "(415) 555-0132", "+44 20 7946 0958",
    "4532 0151 1283 0366", "10.0.0.1", "2001:db8::1", "١٣٨١٢٣٤٥٦٧٨", "٤", "🙂", "ä",
]  # fmt: skip


def _fuzz_texts(seed: int, n: int, pieces: list[str]) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def _words_texts(seed: int, n: int) -> list[str]:
    """Texts from a small vocabulary, so n-grams and lines repeat and tie often."""
    rng = random.Random(seed)
    vocab = ["a", "bb", "ccc", "中", "文", "x中", "中x", "é", "_", "٣", "the", "cat", "🙂", "★"]
    seps = [" ", " ", " ", "\n", "", ", ", "\t", "\r\n", "・"]
    return [
        "".join(rng.choice(vocab) + rng.choice(seps) for _ in range(rng.randint(0, 40)))
        for _ in range(n)
    ]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_batch_filters_decide_as_the_per_document_ones(cfg: FilterConfig) -> None:
    texts = TRICKY + _words_texts(0, 400) + _fuzz_texts(1, 200, PIECES)
    expected = [filters.first_failure(t, cfg) for t in texts]
    assert filters.first_failures(texts, cfg) == expected
    assert len({e for e in expected}) > 2  # the inputs do exercise several filters


def test_batch_words_are_the_regex_words() -> None:
    texts = TRICKY + _words_texts(2, 200)
    found = text_batch.Words.of(text_batch.Batch.of(texts))
    for i, text in enumerate(texts):
        expected = filters.words(text)
        assert found.per_text[i] == len(expected), text
        mine = found.owner == i
        assert found.lengths[mine].tolist() == [len(w) for w in expected], text
        ids = found.ids[mine].tolist()  # equal ids exactly where the words are equal
        assert [ids.index(x) for x in ids] == [expected.index(w) for w in expected], text


def test_top_ngram_tie_takes_the_first_seen_gram() -> None:
    # "aa b" and "ccc dddd" both occur twice; the first seen decides the fraction
    first = "aa b aa b ccc dddd ccc dddd"
    assert filters.top_ngram_fraction(filters.words(first)) == pytest.approx(2 * 3 / 20)
    cfg = FilterConfig(max_top_ngram_fraction=0.5, max_dup_ngram_fraction=1.0)
    assert filters.first_failures([first], cfg) == [filters.first_failure(first, cfg)] == [None]
    later = "ccc dddd ccc dddd aa b aa b"  # 2 * 7 / 20
    assert filters.first_failures([later], cfg) == ["top_ngram"]


def test_blocks_with_no_text_and_filters_off() -> None:
    assert filters.first_failures([], FilterConfig()) == []
    assert filters.first_failures(["", "x"], FilterConfig(enabled=False)) == [None, None]
    assert filters.first_failures(["", ""], FilterConfig()) == ["min_chars", "min_chars"]
    for texts in (["・・ ゛"], ["   ", "\n"], ["・", "", "★"]):
        cfg = FilterConfig(max_symbol_ratio=1.0)
        assert filters.first_failures(texts, cfg) == [filters.first_failure(t, cfg) for t in texts]


@pytest.mark.parametrize("cfg", [PiiConfig(), PiiConfig(email=False, ip=False)])
def test_batch_pii_scrubs_as_the_per_document_code(cfg: PiiConfig) -> None:
    texts = TRICKY + _fuzz_texts(3, 600, PIECES)
    texts += ["call +44 20\n7946 0958", "mail a@b.io\nx", "a@b.co:1:2::3", "v6 ::1\n::2",
              "at 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "OBJECT:0:CXXABI_1.3 a:b:c:d",
              "Date: Wed May 31 21:38:26 2017 +0200", "+44 (20) 7946-0958, +1 (555) 01",
              "+86 138 0013 8000 +1-800-555-0199 +4 4 4 4 4 4 4"]  # fmt: skip
    expected = [pii.scrub(t, cfg) for t in texts]
    clean, counts = pii.scrub_batch(texts, cfg)
    assert list(zip(clean, counts, strict=True)) == expected
    assert sum(sum(c.values()) for _, c in expected) > 50  # plenty of PII was there


def test_batch_pii_without_a_lone_surrogate_path_and_switched_off() -> None:
    texts = ["a@b.io \ud800", "10.0.0.1"]
    assert list(zip(*pii.scrub_batch(texts, PiiConfig()), strict=True)) == [
        pii.scrub(t, PiiConfig()) for t in texts
    ]
    off = pii.scrub_batch(texts, PiiConfig(enabled=False))
    assert off[0] == texts and all(sum(c.values()) == 0 for c in off[1])


def test_batch_nfkc_is_pythons_on_every_code_point_and_combining_sequences() -> None:
    points = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    texts = ["".join(map(chr, points[i : i + 64])) for i in range(0, len(points), 64)]
    rng = random.Random(4)
    marks = ["a", "e", "\u0301", "\u0308", "\u0323", "\u0345", "\u1100", "\u1161", "\u11a8"]
    marks += ["가", "ﬁ", "ＡＢ", "①", "㎏", "，", "ｶﾞ", "\u0f73", "\u3099", "\ud800"]
    texts += ["".join(rng.choice(marks) for _ in range(12)) for _ in range(2000)] + TRICKY
    assert filters.nfkc_batch(texts) == [filters.nfkc(t) for t in texts]
