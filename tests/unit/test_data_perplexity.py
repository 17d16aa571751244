"""The perplexity filter's parts without Ray: the score (batched, padding-aware, equal to
a hand computation with the model) and the percentile cut (ties, empty, 0 and 100)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from raylm.config import ConfigError, load
from raylm.data import perplexity
from raylm.data.config import DataJobConfig, FilterConfig, PerplexityConfig
from raylm.data.perplexity_cut import STATUS, above, kept_scores, mark_block, threshold
from raylm.data.steps import process_rows

TEXTS = [
    "The cat sat on the mat.",
    "A much longer document about the weather, the sea and the ships that sail on it.",
    "zq xv 93 !!",
    "Short.",
]


@pytest.fixture(scope="module")
def lm(tiny_model: Path):
    return perplexity.load(str(tiny_model), "cpu")


def by_hand(model, tokenizer, text: str, max_tokens: int = 512) -> float:
    """exp(mean NLL) from one unpadded forward pass and an explicit log-softmax."""
    import torch

    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[: max_tokens + 1]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return math.exp(nll.mean().item())


def test_perplexity_equals_a_hand_computation(lm) -> None:
    model, tok = lm
    got = perplexity.perplexities(TEXTS, model, tok, batch_size=16, max_tokens=512)
    want = [by_hand(model, tok, t) for t in TEXTS]
    assert got == pytest.approx(want, rel=1e-5)
    assert len(set(got)) == len(got)  # the model tells these texts apart


def test_perplexity_is_the_same_alone_and_in_a_padded_batch(lm) -> None:
    model, tok = lm
    batched = perplexity.perplexities(TEXTS, model, tok, batch_size=4, max_tokens=512)
    alone = [perplexity.perplexities([t], model, tok, 1, 512)[0] for t in TEXTS]
    assert batched == pytest.approx(alone, rel=1e-5)
    # and the pads really are there: the shortest text shares a batch with the longest
    lengths = [len(ids) for ids in perplexity.token_ids(TEXTS, tok, 512)]
    assert min(lengths) < max(lengths)


def test_perplexity_scores_only_the_first_max_tokens(lm) -> None:
    model, tok = lm
    text = TEXTS[1]
    head = perplexity.perplexities([text], model, tok, 1, max_tokens=5)[0]
    assert head == pytest.approx(by_hand(model, tok, text, max_tokens=5), rel=1e-5)
    assert head != pytest.approx(perplexity.perplexities([text], model, tok, 1, 512)[0])


def test_an_empty_text_is_unscored_not_guessed(lm) -> None:
    model, tok = lm
    assert perplexity.perplexities(["", "Short."], model, tok, 2, 512)[0] is None


def test_threshold_and_cut_at_the_edges() -> None:
    scores = np.array([5.0, 1.0, 2.0, 2.0, 2.0, 9.0])
    assert threshold(np.empty(0), 50) is None and not above(np.empty(0), None).any()
    assert threshold(scores, 100) == 9.0 and not above(scores, 9.0).any()  # 100: none
    assert threshold(scores, 0) == 1.0  # 0: only the documents tied at the minimum stay
    assert above(scores, 1.0).tolist() == [True, False, True, True, True, True]
    # ties at the threshold are all kept: the median is 2.0, three documents hold it
    assert threshold(scores, 50) == 2.0
    assert above(scores, 2.0).tolist() == [True, False, False, False, False, True]
    same = np.full(4, 3.0)
    assert not above(same, threshold(same, 10)).any()  # all tied: nothing to rank


def test_threshold_interpolates_so_x_percent_is_dropped() -> None:
    scores = np.arange(1.0, 11.0)  # ten distinct scores
    assert above(scores, threshold(scores, 90)).sum() == 1
    assert above(scores, threshold(scores, 50)).sum() == 5
    # a near miss: 9 sits just below the 90th percentile (9.1) and stays
    assert threshold(scores, 90) == pytest.approx(9.1) and not above(np.array([9.0]), 9.1)[0]


def test_mark_block_leaves_removed_and_unscored_rows_alone() -> None:
    table = pa.table(
        {
            "status": ["", "", "filter:min_words", "", ""],
            "perplexity": pa.array([10.0, 50.0, 99.0, None, 30.0], pa.float64()),
        }
    )
    assert sorted(kept_scores(table).tolist()) == [10.0, 30.0, 50.0]
    marked, n = mark_block(table, 30.0)
    assert n == 1
    assert marked.column("status").to_pylist() == ["", STATUS, "filter:min_words", "", ""]
    assert mark_block(table, None)[1] == 0


def test_score_step_scores_kept_documents_only(tiny_model: Path) -> None:
    filters = FilterConfig(min_words=3, perplexity=PerplexityConfig(model=str(tiny_model)))
    cfg = DataJobConfig(inputs=["x"], filters=filters)
    raw = [json.dumps({"text": t}) for t in ("one two three four", "two words")]
    rows = [
        {"id": f"a:{i}", "source": f"a:{i}", "raw": r, "error": "", "fmt": "text"}
        | {"columns": "{}", "nbytes": len(r)}
        for i, r in enumerate(raw)
    ]
    out, stats = process_rows(rows, cfg, "pt")
    assert out[0]["perplexity"] > 1 and out[1]["perplexity"] is None
    assert out[1]["status"] == "filter:min_words"
    assert stats["perplexity"] == {"scored": 1, "unscored": 0}
    off, stats = process_rows(rows, DataJobConfig(inputs=["x"], filters=FilterConfig()), "pt")
    assert off[0]["perplexity"] is None and stats["perplexity"] == {}


def test_config_checks_and_did_you_mean() -> None:
    assert not FilterConfig().perplexity_on  # off by default
    assert not FilterConfig(enabled=False, perplexity=PerplexityConfig(model="a/b")).perplexity_on
    for bad in ({"max_percentile": 101}, {"batch_size": 0}, {"gpus_per_task": 0}, {"model": " "}):
        with pytest.raises(ConfigError):
            PerplexityConfig(**bad)
    with pytest.raises(ConfigError, match="did you mean 'max_tokens'"):
        load("data", [], ["inputs=[x]", "filters.perplexity.max_token=3"])
    with pytest.raises(ConfigError, match="did you mean 'cpu'"):
        load("data", [], ["inputs=[x]", "filters.perplexity.device=gpu"])


def test_a_retrained_model_at_the_same_path_makes_saved_blocks_stale(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Scores are saved with each block (``raylm.data.resume``): new weights at the same
    path must change the fingerprint, or a rerun would reuse the old model's scores."""
    import os
    import shutil

    from raylm.data.resume import config_fingerprint

    model = shutil.copytree(tiny_model, tmp_path / "model")
    on = FilterConfig(perplexity=PerplexityConfig(model=str(model)))
    cfg = DataJobConfig(inputs=["x"], filters=on)
    before = config_fingerprint(cfg, "pt")
    assert config_fingerprint(DataJobConfig(inputs=["x"]), "pt") != before
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert config_fingerprint(cfg, "pt") != before
