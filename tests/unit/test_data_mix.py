"""Mixing recipes (``raylm.data.mix``): config refusals, and the sampling arithmetic run
in-process on the functions the cluster runs per block.

Tolerance: a source's partial pass stops at the 24-bit hash boundary closest to its
budget, so its realised units are within one document's units of the target (and the
whole passes are exact); the tests assert that, per source.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from raylm.config import ConfigError, load
from raylm.data import mix
from raylm.data.config import DataJobConfig, MixConfig, TokenizeConfig

ROOT = Path(__file__).resolve().parents[2]


def _mix(**kw) -> MixConfig:
    base = {"sources": {"web": ["a.jsonl"], "code": ["b.jsonl"]}, "weights": {"web": 3, "code": 1}}
    return MixConfig(**(base | {"target_bytes": 1000} | kw))


# ---- config -----------------------------------------------------------------------------


def test_example_config_loads() -> None:
    cfg = load("data", [ROOT / "conf/data/mix_example.yaml"])
    assert cfg.mix.enabled and cfg.inputs == [] and cfg.mix.unit == "tokens"
    assert abs(sum(cfg.mix.shares().values()) - 1) < 1e-9
    assert cfg.all_inputs() == [i for v in cfg.mix.sources.values() for i in v]


def test_weights_are_normalised() -> None:
    assert _mix().shares() == {"web": 0.75, "code": 0.25}
    assert _mix(weights={"web": 0.75, "code": 0.25}).shares() == _mix().shares()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"weights": {"web": 1, "cod": 1}}, r"did you mean 'code'"),
        ({"weights": {"web": 1}}, r"no weight for source\(s\) \['code'\]"),
        ({"weights": {"web": -1, "code": 1}}, r"mix.weights.web=-1 must be >= 0"),
        ({"weights": {"web": 0, "code": 0}}, "all 0"),
        ({"target_tokens": 5}, "exactly one budget"),
        ({"target_bytes": None}, "exactly one budget"),
        ({"target_bytes": 0}, r"mix.target_bytes=0 must be > 0"),
        ({"max_repeats": 0.0}, r"mix.max_repeats=0.0 must be > 0"),
        ({"sources": {"web": [], "code": ["b"]}}, "at least one input"),
    ],
)
def test_mix_refusals(kw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _mix(**kw)


def test_job_refusals() -> None:
    with pytest.raises(ConfigError, match="not both"):
        DataJobConfig(inputs=["x.jsonl"], mix=_mix())
    with pytest.raises(ConfigError, match="inputs is empty"):
        DataJobConfig()
    with pytest.raises(ConfigError, match=r"tokenize\.enabled=true, or give the budget"):
        DataJobConfig(mix=_mix(target_bytes=None, target_tokens=100))
    tok = TokenizeConfig(enabled=True, tokenizer="some/model")
    assert DataJobConfig(mix=_mix(target_bytes=None, target_tokens=100), tokenize=tok)
    with pytest.raises(ConfigError, match=r"mix\.sources is empty"):
        MixConfig(weights={"a": 1})


def test_unknown_mix_key_suggests() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key 'mix.wieghts' \(did you mean 'weights'\?\)"
    ):
        load("data", [], ["inputs=[a]", "mix.wieghts.web=1"])


def test_overrides_set_sources_and_weights() -> None:
    cfg = load("data", [], ["mix.sources.web=[a.jsonl]", "mix.sources.code=[b.jsonl]",
                            "mix.weights.web=2", "mix.weights.code=1", "mix.target_bytes=10"])  # fmt: skip
    assert cfg.mix.shares() == pytest.approx({"web": 2 / 3, "code": 1 / 3})


def test_a_file_in_two_sources_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "x.jsonl").write_text('{"text": "hi"}\n')
    two = MixConfig(sources={"a": [str(tmp_path / "a")], "b": [str(tmp_path / "b")]},
                    weights={"a": 1, "b": 1}, target_bytes=10)  # fmt: skip
    sources, owner = mix.mix_sources(two, "text", {})
    assert len({s.name for s in sources}) == 2  # both x.jsonl: renamed apart
    assert sorted(owner.values()) == ["a", "b"]
    both = MixConfig(sources={"a": [str(tmp_path / "a")], "b": [str(tmp_path / "a/x.jsonl")]},
                     weights={"a": 1, "b": 1}, target_bytes=10)  # fmt: skip
    with pytest.raises(ConfigError, match="belongs to one source"):
        mix.mix_sources(both, "text", {})


def test_curation_counts_per_source() -> None:
    owner = {"a.jsonl": "web", "s3://b/c.jsonl": "code"}
    rows = [("a.jsonl:1", "", 5), ("a.jsonl:2", "filter:min_words", 7),
            ("s3://b/c.jsonl:#0", "quarantine:bad JSON", 3), ("s3://b/c.jsonl:#1", "", 4)]  # fmt: skip
    table = pa.table({"id": [f"id{i}" for i in range(4)], "source": [r[0] for r in rows],
                      "status": [r[1] for r in rows], "nbytes": [r[2] for r in rows]})  # fmt: skip
    labels, counts = mix.curation_block(table, owner)
    assert labels.to_pylist() == [{"id": "id0", "source": "web"}, {"id": "id3", "source": "code"}]
    assert counts == {"web": {"documents_in": 2, "bytes_in": 12, "passed": 1, "filter": 1},
                      "code": {"documents_in": 2, "bytes_in": 7, "quarantine": 1, "passed": 1}}  # fmt: skip
    none_kept, _ = mix.curation_block(table.slice(1, 2), owner)  # a block with no kept row
    assert none_kept.num_rows == 0 and none_kept.schema.field("id").type == pa.string()


# ---- the plan ---------------------------------------------------------------------------


def test_plan_down_up_and_capped() -> None:
    cfg = MixConfig(sources={"a": ["x"], "b": ["y"], "c": ["z"], "d": ["w"]},
                    weights={"a": 1, "b": 1, "c": 1, "d": 1}, target_bytes=4000,
                    max_repeats=3.0)  # fmt: skip
    totals = {"a": {"documents": 10, "units": 4000}, "b": {"documents": 5, "units": 400},
              "c": {"documents": 3, "units": 300}}  # fmt: skip
    plans = mix.plan_sources(cfg, totals)
    a, b, c, d = (plans[n] for n in "abcd")
    assert (a.target, a.passes, a.partial, a.capped) == (1000, 0, 1000, False)  # down 4x
    assert (b.passes, b.partial, b.want, b.capped) == (2, 200, 1000, False)  # up 2.5x
    assert (c.passes, c.partial, c.want, c.capped) == (3, 0, 900, True)  # needs 3.33x > 3
    assert (d.want, d.capped) == (0, True)  # nothing left after curation
    uncapped = mix.plan_sources(MixConfig(**{**cfg.__dict__, "max_repeats": None}), totals)
    assert (uncapped["c"].passes, uncapped["c"].partial) == (3, 100)


def test_boundary_and_cut() -> None:
    import numpy as np

    hist = np.array([5, 0, 7, 3])
    assert mix.boundary(hist, 5) == (0, 0)
    assert mix.boundary(hist, 6) == (2, 5)
    assert mix.closest_cut(np.array([4, 4, 4]), 6) == 1  # 4 is as close as 8: the first
    assert mix.closest_cut(np.array([4, 4, 4]), 7) == 2


# ---- sampling in-process ----------------------------------------------------------------


def _blocks(sizes: dict[str, int], seed: int = 0, n_blocks: int = 3) -> list[pa.Table]:
    """Documents of random lengths (10-200 words), spread over blocks, sources mixed."""
    rng = random.Random(seed)
    rows = [
        {
            "id": f"{name}.jsonl:{i}",
            "doc": json.dumps({"text": "w " * rng.randint(10, 200)}),
            "source": name,
        }
        for name, n in sizes.items()
        for i in range(n)
    ]
    rng.shuffle(rows)
    return [pa.Table.from_pylist(rows[b::n_blocks]) for b in range(n_blocks)]


def _sample(blocks: list[pa.Table], cfg: MixConfig):
    """``raylm.data.mix.sample`` without Ray: the same block functions, in order."""
    measured = [mix.measure_block(b, None, cfg.unit, cfg.seed, 1) for b in blocks]
    kept = [m for m, _ in measured]
    plans = mix.plan_sources(cfg, mix.sum_counts([c for _, c in measured]))

    def histograms(buckets):
        return mix.sum_hists([mix.hist_block(b, buckets) for b in kept])

    mix.set_thresholds(plans, histograms)
    spec = {n: (p.passes, p.threshold) for n, p in plans.items()}
    n_passes = max(p.passes + bool(p.threshold) for p in plans.values())
    rows = [
        r
        for k in range(n_passes)
        for b in kept
        for r in mix.select_block(b, k, spec)[0].to_pylist()
    ]
    return plans, rows


def test_shares_match_weights_down_and_up() -> None:
    blocks = _blocks({"web": 600, "code": 150, "books": 50})
    cfg = MixConfig(sources={"web": ["a"], "code": ["b"], "books": ["c"]},
                    weights={"web": 5, "code": 3, "books": 2}, target_bytes=80_000)  # fmt: skip
    plans, rows = _sample(blocks, cfg)
    units = Counter()
    for r in rows:
        units[r["source"]] += r["units"]
    largest = max(r["units"] for r in rows)
    assert plans["web"].passes == 0 and plans["books"].passes >= 1  # down and up
    for name, plan in plans.items():
        assert abs(units[name] - plan.target) <= largest, (name, units[name], plan.target)
        assert abs(units[name] / sum(units.values()) - plan.share) < 0.01
    # Whole passes: every curated document the same number of times, or once more.
    copies = Counter(r["id"].partition("#")[0] for r in rows if r["source"] == "books")
    assert set(copies.values()) <= {plans["books"].passes, plans["books"].passes + 1}
    assert len(copies) == 50
    assert len({r["id"] for r in rows}) == len(rows)  # repeats are id#k


def test_deterministic_under_a_seed() -> None:
    cfg = MixConfig(sources={"web": ["a"], "code": ["b"]}, weights={"web": 1, "code": 1},
                    target_bytes=30_000, seed=7)  # fmt: skip
    ids = [r["id"] for r in _sample(_blocks({"web": 300, "code": 100}), cfg)[1]]
    again = [r["id"] for r in _sample(_blocks({"web": 300, "code": 100}, n_blocks=5), cfg)[1]]
    assert sorted(ids) == sorted(again)  # whatever the blocks
    other = MixConfig(**{**cfg.__dict__, "seed": 8})
    assert sorted(ids) != sorted(
        r["id"] for r in _sample(_blocks({"web": 300, "code": 100}), other)[1]
    )


def test_capped_source_reported_and_others_exact() -> None:
    cfg = MixConfig(sources={"web": ["a"], "tiny": ["b"]}, weights={"web": 1, "tiny": 1},
                    target_bytes=20_000, max_repeats=1.5)  # fmt: skip
    plans, rows = _sample(_blocks({"web": 400, "tiny": 10}), cfg)
    tiny = plans["tiny"]
    assert tiny.capped and tiny.want == int(1.5 * tiny.units)
    got = sum(r["units"] for r in rows if r["source"] == "tiny")
    assert abs(got - tiny.want) <= max(r["units"] for r in rows)
    assert not plans["web"].capped


def test_text_bytes_of_conversations() -> None:
    doc = {
        "messages": [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "ok"}]
    }
    assert mix.text_bytes([json.dumps(doc)]) == [len("héllo\nok".encode())]
