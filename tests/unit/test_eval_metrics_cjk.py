"""Metrics in any script: Chinese, Japanese, Korean, mixed and full-width text, and the
English cases unchanged. Every expected number is worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from raylm.config import ConfigError
from raylm.eval.config import EvalDataConfig, EvalJobConfig
from raylm.eval.metrics import (
    REGISTRY,
    bleu_stats,
    bleu_tokenizer,
    contains,
    exact_match,
    generation_stats,
    normalize,
    rouge_l,
)
from raylm.eval.text import contains_tokens, is_cjk, lcs_length, script_of, tokenize

NO_BUDGET = (0, None, None)


def test_the_issue_cases() -> None:
    """issue 16's done-when: 1, 1 and 0.727."""
    assert exact_match("北京。", ["北京"]) == 1.0
    assert contains("答案是北京。", ["北京"]) == 1.0
    # LCS of 我爱北京天安门 (7) and 我爱北京 (4) is 4: P 4/7, R 1, F1 = 8/11.
    assert rouge_l("我爱北京天安门", ["我爱北京"]) == pytest.approx(8 / 11)
    assert round(rouge_l("我爱北京天安门", ["我爱北京"]), 3) == 0.727


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("  The  Answer: PARIS! ", "the answer paris"),  # English as before
        ("北京。", "北京"),
        ("「北京」，《天安门》（广场）！？、", "北京天安门广场"),
        ("北京 天安门", "北京天安门"),  # spaces between CJK carry nothing
        ("ＡＢＣ　２０４８", "abc 2048"),  # full-width letters, digits, ideographic space
        ("答案：GPT-4 模型。", "答案gpt 4模型"),
        ("東京、大阪・京都。", "東京大阪京都"),  # Japanese punctuation, ・ included
        ("コーヒー", "コーヒー"),  # the long-vowel mark ー is a letter, not punctuation
        ("Straße", "strasse"),  # case folding
        ("zero\u200bwidth", "zero width"),
        ("नमस्ते, दुनिया!", "नमस्ते दुनिया"),  # combining marks stay inside the word
    ],
)
def test_normalize_any_script(text: str, want: str) -> None:
    assert normalize(text) == want


def test_tokenize_splits_cjk_per_character_and_keeps_words() -> None:
    assert tokenize("我爱北京") == ["我", "爱", "北", "京"]
    assert tokenize("GPT-4模型很好用，ｄｏｎ’ｔ！") == [
        "gpt",
        "4",
        "模",
        "型",
        "很",
        "好",
        "用",
        "don",
        "t",
    ]
    assert tokenize("私はコーヒーが好きです。") == list("私はコーヒーが好きです")
    assert tokenize("수도는 서울입니다") == list("수도는서울입니다")  # Hangul per syllable
    assert tokenize("ｶﾀｶﾅ") == list("カタカナ")  # half-width katakana, NFKC'd
    assert tokenize("привет, мир") == ["привет", "мир"]
    assert tokenize("") == []
    assert is_cjk("北") and is_cjk("は") and is_cjk("カ") and is_cjk("서")
    assert not is_cjk("a") and not is_cjk("。") and not is_cjk("ab")


def test_same_tokens_iff_same_normal_form() -> None:
    texts = ["北京 天安门", "北京天安门", "ai模型", "AI 模型", "a i模型", "2.0", "2 0", "20"]
    for x in texts:
        for y in texts:
            assert (tokenize(x) == tokenize(y)) == (normalize(x) == normalize(y)), (x, y)


def test_exact_match_cjk() -> None:
    assert exact_match("北京", ["北京市"]) == 0.0
    assert exact_match("北 京！", ["北京"]) == 1.0
    assert exact_match("２０４８", ["2048"]) == 1.0  # full-width digits
    assert exact_match("東京です。", ["東京です"]) == 1.0
    assert exact_match("Ｐａｒｉｓ．", ["paris"]) == 1.0
    assert exact_match("北京。", ["北京"], norm=False) == 0.0  # norm=False: stripped text


def test_contains_is_whole_token_in_every_script() -> None:
    assert contains("答案是北京。", ["北京"]) == 1.0
    assert contains("答案是上海。", ["北京"]) == 0.0
    assert contains("答案是2048。", ["2"]) == 0.0  # "2" is still not inside "2048"
    assert contains("答案是２０４８。", ["2048"]) == 1.0
    assert contains("第2章", ["2"]) == 1.0  # a number between CJK characters is a token
    assert contains("首都は東京です。", ["東京"]) == 1.0
    assert contains("수도는 서울입니다", ["서울"]) == 1.0  # why Hangul is per syllable
    assert contains("The model is GPT-4模型.", ["gpt-4"]) == 1.0  # mixed Chinese-English
    assert contains("The model is GPT-40.", ["gpt-4"]) == 0.0
    assert contains("答案是北京。", ["。"]) == 0.0  # a punctuation-only reference is empty
    assert contains("答案是北京。", ["北京"], norm=False) == 1.0  # substring mode as before
    assert contains_tokens(["a", "b", "c"], ["b", "c"]) and not contains_tokens(["ab"], ["b"])


def test_english_cases_unchanged() -> None:
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert contains("The capital is Paris.", ["paris"]) == 1.0
    assert contains("Version 2.0 of it", ["2.0"]) == 1.0
    assert contains("2048 tokens", ["2"]) == 0.0
    assert contains("anything", [""]) == 0.0
    p, r = 4 / 5, 4 / 6
    assert rouge_l("The cat sat on mat", ["the cat is on the mat"]) == pytest.approx(
        2 * p * r / (p + r)
    )
    assert rouge_l("c b a", ["a b c"]) == pytest.approx(1 / 3)


def test_rouge_l_cjk_and_mixed() -> None:
    # 東京に行きます (7) vs 東京へ行きます (7): LCS 東京行きます = 6, F1 = 6/7.
    assert rouge_l("東京に行きます", ["東京へ行きます"]) == pytest.approx(6 / 7)
    # Mixed: [我, 用, pytorch, 训, 练] vs [我, 用, tensorflow, 训, 练]: LCS 4 of 5 and 5.
    assert rouge_l("我用PyTorch训练", ["我用 TensorFlow 训练"]) == pytest.approx(4 / 5)
    assert rouge_l("。！", ["北京"]) == 0.0  # punctuation only: no tokens
    assert rouge_l("北京天安门", ["上海", "北京"]) == pytest.approx(2 * (2 / 5) / (2 / 5 + 1))
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4


def test_bleu_tokenizer_choice() -> None:
    assert bleu_tokenizer("auto", [["the cat sat"]]) == "13a"
    assert bleu_tokenizer("auto", [["the cat"], ["我爱北京"]]) == "zh"
    assert bleu_tokenizer("auto", [["東京に行きます"]]) == "cjk"  # kana: Japanese
    assert bleu_tokenizer("auto", [["東京"], ["北京"]]) == "zh"  # Han alone reads as Chinese
    assert bleu_tokenizer("auto", [["서울"]]) == "cjk"
    assert bleu_tokenizer("13a", [["我爱北京"]]) == "13a"  # an explicit setting wins
    assert script_of(["hello", "東京に"]) == "ja"


def test_bleu_chinese_equals_sacrebleu_zh() -> None:
    hyps, refs = ["我爱北京天安门。", "今天天气很好"], ["我爱北京。", "今天的天气很好"]
    stats = generation_stats(["bleu"], hyps, [[r] for r in refs], [NO_BUDGET] * 2)["bleu"]
    want = sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score
    assert REGISTRY["bleu"].score(stats) == pytest.approx(want)
    assert want > 0  # with 13a each sentence would be one token and score 0
    assert sacrebleu.corpus_bleu(hyps, [refs], tokenize="13a").score == pytest.approx(0.0)


def test_bleu_japanese_per_character() -> None:
    hyp, ref = "東京へ行きます。", "東京に行きます。"
    stats = np.array([bleu_stats(hyp, [ref], "cjk")])
    # Per character (、。 kept as tokens by 13a): the same as sacrebleu's char tokenizer here.
    want = sacrebleu.corpus_bleu([hyp], [[ref]], tokenize="char").score
    assert REGISTRY["bleu"].score(stats) == pytest.approx(want)
    auto = generation_stats(["bleu"], [hyp], [[ref]], [NO_BUDGET])["bleu"]
    assert np.array_equal(auto, stats)
    # Mixed Japanese-English: English words stay whole (char would split them by letter).
    sys_len = bleu_stats("PyTorchで学習", ["PyTorchで学習"], "cjk")[0]
    assert sys_len == 4  # pytorch, で, 学, 習


def test_bleu_full_width_digits_match_ascii() -> None:
    assert bleu_stats("２０４８ tokens", ["2048 tokens"]) == bleu_stats(
        "2048 tokens", ["2048 tokens"]
    )


def test_bleu_english_unchanged_under_auto() -> None:
    hyps = ["the cat sat on the mat", "hello"]
    refs = ["the cat is on the mat", "hello world"]
    stats = generation_stats(["bleu"], hyps, [[r] for r in refs], [NO_BUDGET] * 2)["bleu"]
    assert REGISTRY["bleu"].score(stats) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


def test_generation_stats_on_a_chinese_set() -> None:
    preds = ["北京。", "答案是北京。", "我爱北京天安门"]
    refs = [["北京"], ["北京"], ["我爱北京"]]
    names = ["exact_match", "contains", "rouge_l"]
    stats = generation_stats(names, preds, refs, [NO_BUDGET] * 3)
    assert REGISTRY["exact_match"].score(stats["exact_match"]) == pytest.approx(1 / 3)
    assert REGISTRY["contains"].score(stats["contains"]) == 1.0
    assert REGISTRY["rouge_l"].score(stats["rouge_l"]) == pytest.approx((1 + 4 / 7 + 8 / 11) / 3)


def test_bleu_tokenize_setting_is_checked() -> None:
    data = EvalDataConfig(eval_path="x.jsonl")
    cfg = EvalJobConfig(model="m", metrics=["bleu"], data=data, bleu_tokenize="zh")
    assert cfg.bleu_tokenize == "zh"
    with pytest.raises(ConfigError, match="bleu_tokenize"):
        EvalJobConfig(model="m", metrics=["bleu"], data=data, bleu_tokenize="jieba")
