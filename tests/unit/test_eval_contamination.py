"""The contamination scan: n-gram overlap of eval examples with training text (English by
words, Chinese by characters), its thresholds, the training data found through the
lineage's manifests, and the gate rule that names the overlapping examples."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import ConfigError
from raylm.eval import contamination as ct
from raylm.eval.benchmarks import BenchmarkData
from raylm.eval.benchmarks.readers import ChoiceItem
from raylm.eval.config import EvalDataConfig, EvalJobConfig, GateConfig
from raylm.eval.config_scoring import BenchmarkConfig, ContaminationConfig
from raylm.eval.contamination import eval_sets, scan
from raylm.eval.gate import gate
from raylm.eval.records import EvalRecord
from raylm.eval.train_text import TrainSource, find_sources
from raylm.manifest import Manifest
from raylm.outputs import DatasetOutput, ModelOutput

EN_Q = "Explain why the sky appears blue during the day to a curious child in simple words"
EN_A = "Sunlight scatters off the tiny molecules of air and blue light scatters the most"
ZH_Q = "请用简单的语言解释为什么天空在白天看起来是蓝色的"
ZH_A = "阳光被空气中的微小分子散射，蓝光散射得最多，所以我们看到天空是蓝色的。"
UNRELATED = "What is the boiling point of water at sea level and why does it change with altitude"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture
def train(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "train.jsonl", [
        {"instruction": "Name three primary colours", "output": "Red, yellow and blue."},
        {"instruction": EN_Q, "output": EN_A},
        {"instruction": ZH_Q, "output": ZH_A},
    ])  # fmt: skip


def _scan(train: Path, examples: dict[str, str], **kw: float) -> dict:
    return scan({"eval": list(examples.items())}, [TrainSource(str(train))], **kw)["sets"]["eval"]


def _overlaps(res: dict) -> dict[str, float]:
    return {b["id"]: b["overlap"] for b in res["contaminated"]}


def test_copy_paraphrase_unrelated_english_and_chinese(train: Path) -> None:
    res = _scan(train, {
        "en-copy": f"{EN_Q}\n{EN_A}",
        "en-paraphrase": "Tell a kid in plain language the reason the daytime sky looks blue: "
                         "air molecules scatter sunlight, and blue is scattered more than red",
        "en-unrelated": UNRELATED,
        "zh-copy": f"{ZH_Q}\n{ZH_A}",
        "zh-paraphrase": "为何白昼的苍穹呈现蔚蓝之色？因为大气对短波长的光散射更强，人眼便见到蓝色。",
        "zh-unrelated": "长城是中国古代的军事防御工程，绵延数千公里，是世界文化遗产之一。",
    })  # fmt: skip
    assert _overlaps(res) == {"en-copy": 1.0, "zh-copy": 1.0}
    assert (res["n"], res["n_contaminated"], res["rate"]) == (6, 2, 2 / 6)
    by_id = {b["id"]: b for b in res["contaminated"]}
    assert by_id["en-copy"]["source"] == f"{train}:2" and by_id["zh-copy"]["source"] == f"{train}:3"
    assert by_id["zh-copy"]["snippet"].startswith(ZH_Q)


def test_case_punctuation_and_width_do_not_hide_a_copy(train: Path) -> None:
    res = _scan(train, {"loud": f"{EN_Q.upper()}!!! -- {EN_A}...", "wide": f"{ZH_Q}。{ZH_A}"})
    assert _overlaps(res) == {"loud": 1.0, "wide": 1.0}


def test_partial_copy_and_the_threshold_edges(train: Path) -> None:
    # 20 copied words then 8 new ones: 16 13-gram positions, 8 of them inside the copy.
    copied = " ".join(f"{EN_Q} {EN_A}".split()[:20])
    half = f"{copied} zebra quartz violin harbour pepper marble comet lantern"
    assert _overlaps(_scan(train, {"half": half}, min_overlap=0.5)) == {"half": 0.5}
    assert _overlaps(_scan(train, {"half": half}, min_overlap=0.51)) == {}
    assert _overlaps(_scan(train, {"half": half}, min_overlap=1.0)) == {}
    # One shared 13-gram out of many: contaminated only by GPT-3's any-n-gram rule.
    one = " ".join(EN_Q.split()[:13]) + " " + " ".join(f"w{i}" for i in range(40))
    assert _overlaps(_scan(train, {"one": one}, min_overlap=0.0)) == {
        "one": pytest.approx(1 / 41, abs=1e-4)
    }
    assert _overlaps(_scan(train, {"one": one}, min_overlap=0.05)) == {}
    # Twelve shared words are not a 13-gram.
    twelve = " ".join(EN_Q.split()[:12]) + " " + " ".join(f"w{i}" for i in range(20))
    assert _overlaps(_scan(train, {"twelve": twelve}, min_overlap=0.0)) == {}


def test_short_examples_match_whole_or_are_unchecked(train: Path) -> None:
    res = _scan(train, {
        "short-in": "Name three primary colours red yellow and blue",  # 8 tokens: one whole record
        "short-out": "Name three primary colours green purple and orange",
        "tiny": "red yellow blue",
    })  # fmt: skip
    assert _overlaps(res) == {"short-in": 1.0} and res["unchecked"] == 1
    assert _overlaps(_scan(train, {"nine": "Name three primary colours red yellow and blue"},
                           ngram=13, min_tokens=10)) == {}  # fmt: skip


def test_documents_never_join_across_records_or_batches(tmp_path: Path, monkeypatch) -> None:
    words = [f"w{i}" for i in range(26)]
    _jsonl(tmp_path / "t.jsonl", [{"text": " ".join(words[:13])}, {"text": " ".join(words[13:])}])
    spanning = " ".join(words[6:19])  # its 13-gram spans the two records: not in training
    inside = " ".join(words[:13])
    for batch in (1 << 20, 5):
        monkeypatch.setattr(ct, "BATCH_TOKENS", batch)
        res = _scan(tmp_path / "t.jsonl", {"span": spanning, "inside": inside})
        assert _overlaps(res) == {"inside": 1.0}


def test_parquet_text_and_registry_formats(tmp_path: Path) -> None:
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": EN_Q},
                                           {"role": "assistant", "content": EN_A}]]}),
                   tmp_path / "part-0.parquet")  # fmt: skip
    (tmp_path / "corpus.txt").write_text(f"intro line\n\n{ZH_Q}\n{ZH_A}\n")
    sources = [
        TrainSource(str(tmp_path / "part-0.parquet")),
        TrainSource(str(tmp_path / "corpus.txt")),
    ]
    res = scan({"eval": [("en", f"{EN_Q}\n{EN_A}"), ("zh", f"{ZH_Q}\n{ZH_A}")]}, sources)
    found = {b["id"]: b["source"] for b in res["sets"]["eval"]["contaminated"]}
    assert found == {
        "en": f"{tmp_path / 'part-0.parquet'}:#0",
        "zh": f"{tmp_path / 'corpus.txt'}:3",
    }


def test_eval_sets_cover_records_benchmarks_and_perplexity() -> None:
    records = [EvalRecord("r1", ("Paris",), prompt="Capital of France?"),
               EvalRecord("r2", ("hi",), messages=({"role": "user", "content": "Say hi"},))]  # fmt: skip
    item = ChoiceItem("mmlu-0", "geo", "Which is a river?", ("Nile", "Alps"), 0)
    bench = {"mmlu": BenchmarkData(BenchmarkConfig("mmlu", "mmlu", "x"), [item])}
    sets = eval_sets(records, ["doc text", [{"role": "user", "content": "chat doc"}]], bench)
    assert sets == {
        "eval": [("r1", "Capital of France?\nParis"), ("r2", "Say hi\nhi")],
        "mmlu": [("mmlu-0", "Which is a river?\nNile\nAlps")],
        "perplexity": [("doc 0", "doc text"), ("doc 1", "chat doc")],
    }


# ---- the training data the lineage names -------------------------------------------------


def _train_run(run: Path, data: str, base: Path, data_cfg: dict | None = None) -> Path:
    final = run / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    out = ModelOutput(path=str(final), adapter=True, base_model=str(base), tokenizer=str(final),
                      cutoff_len=64, stage="sft")  # fmt: skip
    config = {"data": data_cfg or {"path": data}, "model": {"name_or_path": str(base)}}
    Manifest.start("train", config, [data, str(base)]).finish({}, {}, out.to_record()).write(run)
    return final


def _base(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    return base


def test_an_adapter_finds_its_train_runs_data(tmp_path: Path, train: Path) -> None:
    final = _train_run(tmp_path / "run", str(train), _base(tmp_path))
    found = find_sources(str(final), [])
    assert [s.path for s in found] == [str(train)]
    assert found[0].via == str(tmp_path / "run" / "manifest.json")
    assert find_sources(str(tmp_path / "run"), []) == found  # the run dir names it too
    assert find_sources(str(tmp_path / "base"), []) == []  # no lineage above a plain model


def test_registry_data_skips_held_out_datasets(tmp_path: Path, train: Path) -> None:
    reg = tmp_path / "data"
    reg.mkdir()
    _jsonl(reg / "a.jsonl", [{"instruction": "q", "output": "a"}])
    _jsonl(reg / "held.jsonl", [{"instruction": "q", "output": "a"}])
    (reg / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl"},
                                                       "held": {"file_name": "held.jsonl"}}))  # fmt: skip
    cfg = {"path": str(reg), "datasets": [], "eval_datasets": ["held"]}
    final = _train_run(tmp_path / "run", str(reg), _base(tmp_path), cfg)
    assert [s.path for s in find_sources(str(final), [])] == [str(reg / "a.jsonl")]
    named = find_sources(str(final), [f"{reg}/dataset_info.json#held"])
    assert [s.path for s in named] == [str(reg / "held.jsonl")]


def _data_job(out: Path, raw: Path, tokenized: bool) -> Path:
    (out / "shards").mkdir(parents=True)
    msgs = [[{"role": "user", "content": EN_Q}, {"role": "assistant", "content": EN_A}]]
    pq.write_table(pa.table({"id": ["x:1"], "messages": msgs}), out / "shards/part-00000-a.parquet")
    record = DatasetOutput(path=str(out), task="sft", tokenized=tokenized, tokenizer=None,
                           tokenizer_hash=None, cutoff_len=None, rows=1).to_record()  # fmt: skip
    cfg = {"inputs": [str(raw)], "format": "auto", "columns": {}}
    Manifest.start("data", cfg, [str(raw)]).finish({}, {}, record).write(out)
    return out


@pytest.mark.parametrize("tokenized", [False, True])
def test_a_data_jobs_shards_or_raw_inputs(tmp_path: Path, train: Path, tokenized: bool) -> None:
    data = _data_job(tmp_path / "data-out", train, tokenized)
    final = _train_run(tmp_path / "run", str(data), _base(tmp_path))
    found = [s.path for s in find_sources(str(final), [])]
    shard = str(data / "shards/part-00000-a.parquet")
    assert found == ([str(train)] if tokenized else [shard])
    res = scan({"eval": [("copy", f"{EN_Q}\n{EN_A}")]}, find_sources(str(final), []))
    assert res["sets"]["eval"]["n_contaminated"] == 1
    assert [s.path for s in find_sources(str(final), [str(data)])] == found  # named directly


def test_explicit_train_data_and_missing_paths(tmp_path: Path, train: Path) -> None:
    assert [s.path for s in find_sources("unused", [str(train)])] == [str(train)]
    assert [s.path for s in find_sources("unused", [str(tmp_path)])] == [str(train)]
    with pytest.raises(ConfigError, match="nothing at"):
        find_sources("unused", [str(tmp_path / "nope.jsonl")])


# ---- config and gate ----------------------------------------------------------------------


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="min_overlap"):
        ContaminationConfig(min_overlap=1.5)
    with pytest.raises(ConfigError, match="min_tokens"):
        ContaminationConfig(ngram=5, min_tokens=8)
    with pytest.raises(ConfigError, match=r"max_contamination_rate=2"):
        GateConfig(max_contamination_rate=2)
    with pytest.raises(ConfigError, match=r"needs contamination\.enabled"):
        EvalJobConfig(model="m", metrics=["exact_match"], data=EvalDataConfig(eval_path="e"),
                      gate=GateConfig(max_contamination_rate=0))  # fmt: skip


def test_gate_names_the_set_rate_and_overlapping_examples(train: Path) -> None:
    examples = [(f"q{i}", f"{EN_Q}\n{EN_A}") for i in range(5)] + [("clean", UNRELATED)]
    cont = scan({"eval": examples, "other": [("x", UNRELATED)]}, [TrainSource(str(train))])
    verdict = gate({"metrics": {}, "contamination": cont}, GateConfig(max_contamination_rate=0.1))
    assert not verdict.passed
    failed = verdict.reasons[0]
    assert failed.startswith(
        "FAILED max_contamination_rate: eval set 'eval' has 5/6 examples overlapping the "
        "training data (rate 0.8333 > max 0.1)"
    )
    assert f"q0 (100% of its n-grams, from {train}:2): 'Explain why the sky" in failed
    assert "q2" in failed and "q3" not in failed and failed.endswith("; and 2 more")
    assert verdict.reasons[1].startswith("ok max_contamination_rate: eval set 'other' has 0/1")
    assert gate({"metrics": {}, "contamination": cont},
                GateConfig(max_contamination_rate=0.9)).passed  # fmt: skip
    missing = gate({"metrics": {}}, GateConfig(max_contamination_rate=0))
    assert not missing.passed and "no contamination scan" in missing.reasons[0]


def test_prepare_finds_the_training_data_or_fails_before_ray(tmp_path: Path, train: Path) -> None:
    from raylm.eval.job import EvalJob
    from raylm.eval.records import EvalDataError
    from raylm.eval.run import prepare

    evals = _jsonl(tmp_path / "eval.jsonl", [{"prompt": EN_Q, "reference": EN_A}])
    final = _train_run(tmp_path / "run", str(train), _base(tmp_path))

    def cfg(model: Path) -> EvalJobConfig:
        return EvalJobConfig(model=str(model), metrics=["exact_match"],
                             data=EvalDataConfig(eval_path=str(evals)),
                             contamination=ContaminationConfig(enabled=True))  # fmt: skip

    job = EvalJob()
    job.prepared = prepare(cfg(final))
    assert [s.path for s in job.prepared.train_sources] == [str(train)]
    assert str(train) in job.inputs(cfg(final))  # the manifest hashes what was scanned
    with pytest.raises(EvalDataError, match=r"no succeeded train run's manifest .*train_data"):
        prepare(cfg(_base(tmp_path / "other")))


def test_training_data_in_a_bucket_is_streamed(s3_bucket: str, tmp_path: Path) -> None:
    from raylm import storage

    base = storage.join(s3_bucket, "contamination")
    storage.write_text(
        f"{base}/train.jsonl", json.dumps({"instruction": EN_Q, "output": EN_A}) + "\n"
    )
    local = tmp_path / "zh.parquet"
    pq.write_table(pa.table({"text": ["无关的句子", f"{ZH_Q}{ZH_A}"]}), local)
    fs, inner = storage.filesystem(f"{base}/zh.parquet")
    with fs.open_output_stream(inner) as out:
        out.write(local.read_bytes())
    sources = find_sources("unused", [base])
    assert [s.path for s in sources] == [f"{base}/train.jsonl", f"{base}/zh.parquet"]
    res = scan({"eval": [("en", f"{EN_Q} {EN_A}"), ("zh", f"{ZH_Q}{ZH_A}")]}, sources)
    found = {b["id"]: b["source"] for b in res["sets"]["eval"]["contaminated"]}
    assert found == {"en": f"{base}/train.jsonl:1", "zh": f"{base}/zh.parquet:#1"}
