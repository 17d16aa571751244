"""The guides' filters: each with a true positive and the near miss it must let through
(Traditional vs Simplified, emoji vs currency and text symbols, short vs long lines,
blocked words vs words that only contain them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.config import ConfigError
from raylm.data import filters, guide_filters
from raylm.data.config import FilterConfig

SIMPLIFIED = "我们的头发很长，后来台风来了，大家都躲在家里看书。"
TRADITIONAL = "我們的頭髮很長，後來颱風來了，大家都躲在家裡看書。"


def test_traditional_only_table_keeps_shared_characters() -> None:
    table = guide_filters.traditional_only()
    assert {"後", "髮", "臺", "們", "書"} <= table
    # Simplified text writes these too (乾坤, 台州) or both standards share them (著).
    assert not {"乾", "台", "著", "发", "后", "我", "的"} & table


def test_simplified_ratio_tells_the_standards_apart() -> None:
    assert guide_filters.simplified_ratio(SIMPLIFIED) == 1.0
    assert guide_filters.simplified_ratio(TRADITIONAL) < 0.7
    assert guide_filters.simplified_ratio("no Han at all") == 1.0
    cfg = FilterConfig(min_simplified_ratio=0.95)
    assert guide_filters.failure(TRADITIONAL, cfg) == "simplified_ratio"
    assert guide_filters.failure(SIMPLIFIED, cfg) is None
    # One Traditional character in a long Simplified text stays above 95 %.
    assert guide_filters.failure(SIMPLIFIED * 2 + "後", cfg) is None


@pytest.mark.parametrize(
    "text",
    [
        "🙂",
        "©\ufe0f",
        "®\ufe0f",
        "♥\ufe0f",
        "👍🏽",
        "🇨🇳",
        "1\ufe0f\u20e3",
        "🌡",
        "👨\u200d👩\u200d👧",
    ],
)
def test_emoji_are_counted_once_each(text: str) -> None:
    assert guide_filters.emoji_count(text) == 1
    assert guide_filters.failure(f"价格很好 {text} 值得买", FilterConfig(max_emoji=0)) == "emoji"


@pytest.mark.parametrize("text", ["$ € £ ¥ © ® + − × ÷ ° ± ‰ ™ ♥ ☺ ★ → ✓", "1# *", "价格 ¥100"])
def test_symbols_are_not_emoji(text: str) -> None:
    assert guide_filters.emoji_count(text) == 0
    cfg = FilterConfig(max_emoji=0, max_symbol_ratio=1.0)
    assert guide_filters.failure(text, cfg) is None


def test_emoji_ratio_and_count_bound() -> None:
    text = "好" * 50 + "🙂🙂"
    assert guide_filters.failure(text, FilterConfig(max_emoji=2)) is None
    assert guide_filters.failure(text, FilterConfig(max_emoji=1)) == "emoji"
    assert guide_filters.failure(text, FilterConfig(max_emoji_ratio=0.01)) == "emoji_ratio"
    assert guide_filters.failure(text, FilterConfig(max_emoji_ratio=0.05)) is None


def test_mean_line_chars_bounds() -> None:
    long_line = "字" * 300
    menu = "\n".join(["首页", "新闻", "关于我们", "联系"] * 5)
    assert guide_filters.mean_line_chars("ab\n\n  abcd  \n") == 3.0
    cfg = FilterConfig(min_mean_line_chars=100, max_mean_line_chars=800)
    assert guide_filters.failure(menu, cfg) == "min_mean_line_chars"
    assert guide_filters.failure(long_line + "\n" + long_line, cfg) is None
    assert guide_filters.failure("字" * 900, cfg) == "max_mean_line_chars"


def test_blocklist_words_and_cjk_phrases(tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("# toxicity list\nbadword\n坏词\nTwo Words\n", encoding="utf-8")
    cfg = FilterConfig(blocklist=[str(words)])
    for bad in ("a BadWord here", "这里有坏词。", "say two words now", "中badword文"):
        assert guide_filters.failure(bad, cfg) == "blocklist", bad
    for fine in ("badwords and notbadword", "bad word", "two-wordsmith", "坏 词"):
        assert guide_filters.failure(fine, cfg) is None, fine
    allow_one = FilterConfig(blocklist=[str(words)], max_blocklist_hits=1)
    assert guide_filters.failure("badword once", allow_one) is None
    assert guide_filters.failure("badword, badword", allow_one) == "blocklist"


def test_guides_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_simplified_ratio"):
        FilterConfig(min_simplified_ratio=95)
    with pytest.raises(ConfigError, match="max_mean_line_chars"):
        FilterConfig(min_mean_line_chars=800, max_mean_line_chars=100)
    with pytest.raises(ConfigError, match="not a file"):
        FilterConfig(blocklist=[str(tmp_path / "missing.txt")])
    with pytest.raises(ConfigError, match="max_emoji"):
        FilterConfig(max_emoji=-1)


def test_first_failure_runs_them_after_gophers() -> None:
    """Through ``filters.first_failure``: a document Gopher keeps meets the guides' bar."""
    cfg = FilterConfig(min_simplified_ratio=0.95, max_emoji=0)
    assert filters.first_failure(SIMPLIFIED, cfg) is None
    assert filters.first_failure(TRADITIONAL, cfg) == "simplified_ratio"
    assert filters.first_failure(SIMPLIFIED + "🙂", cfg) == "emoji"


def test_defaults_leave_every_guides_filter_off() -> None:
    text = TRADITIONAL + " 🙂\n短"
    assert guide_filters.failure(text, FilterConfig()) is None
