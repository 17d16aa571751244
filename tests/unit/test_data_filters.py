"""Every filter and PII type: a true positive and a near miss that must survive."""

from __future__ import annotations

import pytest

from raylm.data import filters, pii
from raylm.data.config import FilterConfig, PiiConfig

PROSE = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    "software and associated documentation files, to deal in the Software without restriction."
)


@pytest.mark.parametrize(
    ("overrides", "bad", "reason"),
    [
        ({"min_chars": 50}, "too short a text", "min_chars"),
        ({"max_chars": 100}, PROSE, "max_chars"),
        ({"min_words": 5}, "two words", "min_words"),
        ({"max_words": 10}, PROSE, "max_words"),
        ({"script": "cjk"}, PROSE, "script_ratio"),
        ({"script": "latin"}, "这是一个完全用中文写成的句子，没有任何拉丁字母。", "script_ratio"),
        ({}, "★★★ ☆☆☆ ♥♥♥ deal 🙂🙂🙂🙂 now ★★★", "symbol_ratio"),
        ({}, "tab\tok but bell\x07 is not", "control_ratio"),
        ({}, "same line\nsame line\nsame line\nother", "dup_lines"),
        ({}, "the cat the cat the cat the cat sat on a mat", "top_ngram"),
        (
            {"max_top_ngram_fraction": 1.0},
            "one two three four five six one two three four five six seven",
            "dup_ngrams",
        ),
        ({"min_mean_word_length": 3}, "a b c d e f g h i j", "min_mean_word_length"),
        ({}, "3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5", "max_mean_word_length"),
    ],
)
def test_each_filter_catches_its_case(overrides: dict, bad: str, reason: str) -> None:
    cfg = FilterConfig(**overrides)
    assert filters.first_failure(bad, cfg) == reason
    assert filters.first_failure(PROSE, FilterConfig()) is None


def test_near_misses_pass() -> None:
    cfg = FilterConfig(script="cjk", min_script_ratio=0.9)
    assert (
        filters.first_failure(
            "这是一个中文句子，里面有一个词 GPU 也没关系吧。我们继续写更多的中文内容。", cfg
        )
        is None
    )
    assert (
        filters.first_failure(
            "The price is 5 € per month, or about $5 in the United States.", FilterConfig()
        )
        is None
    )
    lines_only = FilterConfig(max_top_ngram_fraction=1.0, max_dup_ngram_fraction=1.0)
    assert filters.first_failure("line one\nline two\nline three\nline one", lines_only) is None
    assert filters.words("中文 text") == ["中", "文", "text"]


def test_nfkc_folds_compatibility_forms() -> None:
    assert filters.nfkc("ＡＢＣ１２３ ﬁne") == "ABC123 fine"


CASES = [
    ("email", "write to jane.doe+lists@mail.example.org today", "user@localhost is fine"),
    ("phone", "call +44 20 7946 0958 now", "in the year 2024 we had 3 releases"),
    ("phone", "手机号 13812345678 请联系", "订单号 23812345678 不是手机"),
    ("phone", "座机 010-62345678 上班时间", "version 010-62 is old"),
    ("phone", "US office (415) 555-0132", "page 415 of 555"),
    ("ip", "host 192.168.0.1 answered", "value 999.168.0.1 is not an address"),
    ("ip", "v6 at 2001:db8::8a2e:370:7334 ok", "the time was 12:30:45"),
    ("credit_card", "card 4532 0151 1283 0366 on file", "card 4532 0151 1283 0367 fails Luhn"),
    ("cn_id", "证件 11010519491231002X 已登记", "证件 110105194912310021 校验位错误"),
]


@pytest.mark.parametrize(("kind", "hit", "miss"), CASES)
def test_pii_true_positive_and_near_miss(kind: str, hit: str, miss: str) -> None:
    cfg = PiiConfig()
    clean, counts = pii.scrub(hit, cfg)
    assert counts[kind] == 1 and pii.PLACEHOLDERS[kind] in clean
    assert sum(counts.values()) == 1
    untouched, none = pii.scrub(miss, cfg)
    assert untouched == miss and sum(none.values()) == 0


def test_pii_types_can_be_switched_off() -> None:
    text = "mail a@b.io from 10.0.0.1"
    clean, counts = pii.scrub(text, PiiConfig(email=False))
    assert "a@b.io" in clean and counts["ip"] == 1
    assert pii.scrub(text, PiiConfig(enabled=False))[0] == text
