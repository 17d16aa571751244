"""LLaMA-Factory's inference YAMLs (llamafactory-cli api/chat) load as the serve job and its
do_predict YAML as the generate job; every inference key has one fate; LLaMA-Factory's
BLEU-4 and ROUGE are reproduced on hand-checkable examples (and against the real
rouge_chinese / nltk / jieba where installed)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from llamafactory_helpers import LF, example

from raylm import config, templates
from raylm.config import ConfigError
from raylm.eval import lf_metrics
from raylm.serve import llamafactory_keys as keys
from raylm.train import llamafactory_keys as train_keys

DOCS = Path(__file__).resolve().parents[2] / "docs" / "llamafactory.md"
INFERENCE = (
    "inference/qwen3.yaml",
    "inference/qwen3_full_sft.yaml",
    "inference/qwen3_lora_sft.yaml",
)
PREDICT = "extras/nlg_eval/llama3_lora_predict.yaml"


def refused_keys(err: ConfigError) -> list[str]:
    return sorted(re.findall(r"^  - (\w+)", str(err), flags=re.M))


def serve_yaml(tmp_path: Path, **data: object) -> Path:
    path = tmp_path / "infer.yaml"
    path.write_text(json.dumps({"model_name_or_path": "outputs/m", "template": "qwen3"} | data))
    return path


@pytest.mark.parametrize("rel", INFERENCE)
def test_inference_examples_load_as_serve_configs(
    rel: str, tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = example(rel, tmp_path, tiny_model)
    with caplog.at_level(logging.INFO):
        cfg = config.load("serve", [path])
    assert cfg.model.path == str(tiny_model)
    extra = cfg.engine.extra
    assert extra["chat_template"] == templates.get("qwen3_nothink").jinja()
    assert extra["trust_remote_code"] is True
    assert cfg.engine.max_model_len == 4096  # LLaMA-Factory's vllm_maxlen
    assert "infer_backend=huggingface: served by raylm's vLLM engine" in caplog.text
    if "lora" in rel:
        assert cfg.lora.adapters == {"sft": "saves/qwen3-4b/lora/sft"}
        assert cfg.lora.max_lora_rank == 32  # LLaMA-Factory's vllm_max_lora_rank
        assert "clients pass model='raylm:sft'" in caplog.text
    else:
        assert not cfg.lora.enabled
    with pytest.raises(ConfigError, match=r"infer_backend='huggingface': an inference YAML .*"
                       r"`raylm serve FILE`"):  # fmt: skip
        config.load("train", [path])


def test_predict_example_loads_as_generate_config(tmp_path: Path, tiny_model: Path) -> None:
    path = example(PREDICT, tmp_path, tiny_model)
    cfg = config.load("generate", [path])
    assert (cfg.model, cfg.lora_path) == (str(tiny_model), "saves/llama3-8b/lora/sft")
    assert (cfg.input.path, cfg.input.datasets) == ("data", ["identity", "alpaca_en_demo"])
    assert (cfg.input.template, cfg.input.limit) == ("llama3", 50)
    assert cfg.output_dir == str(tmp_path / "saves" / "run")
    s = cfg.sampling  # LLaMA-Factory's generating defaults, as its do_predict uses them
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k) == (1024, 0.95, 0.7, 50)
    assert cfg.engine.max_model_len == 2048 + 1024  # cutoff_len + the completion budget
    for job in ("train", "serve"):
        with pytest.raises(ConfigError, match="`raylm generate FILE`") as err:
            config.load(job, [path])
        assert "do_predict" in refused_keys(err.value)


def test_serve_mappings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = config.load("serve", [serve_yaml(
            tmp_path, infer_backend="vllm", infer_dtype="float32", vllm_maxlen=256,
            vllm_gpu_util=0.5, vllm_enforce_eager=False, vllm_max_lora_rank=8,
            vllm_config='{"seed": 3}', do_sample=False, top_p=0.9, max_new_tokens=64,
            repetition_penalty=1.1, flash_attn="fa2", stage="sft", learning_rate=1e-4,
        )])  # fmt: skip
    e = cfg.engine
    assert (e.dtype, e.max_model_len, e.gpu_memory_utilization, e.enforce_eager) == (
        "float32", 256, 0.5, False,
    )  # fmt: skip
    assert cfg.lora.max_lora_rank == 8 and e.extra["seed"] == 3
    assert e.extra["override_generation_config"] == {
        "temperature": 0.0, "top_p": 0.9, "max_new_tokens": 64, "repetition_penalty": 1.1,
    }  # fmt: skip
    for line in ("'flash_attn': vLLM picks its own attention backend",
                 "'learning_rate': a training/data argument"):  # fmt: skip
        assert line in caplog.text
    # the engine arguments reach vLLM through raylm.engine's one builder
    from raylm.engine import engine_kwargs

    built = engine_kwargs(e, "/m")
    assert built["chat_template"] == templates.get("qwen3").jinja()
    assert built["override_generation_config"]["top_p"] == 0.9


REFUSALS: list[tuple[dict[str, object], list[str], str]] = [
    ({"infer_backend": "sglang"}, ["infer_backend"], "raylm serves with vLLM only"),
    ({"infer_backend": "ktransformers", "use_kt": True}, ["infer_backend", "use_kt"], "vLLM"),
    ({"adapter_name_or_path": "a,b"}, ["adapter_name_or_path"], "merge the others"),
    ({"num_beams": 4, "length_penalty": 2.0}, ["length_penalty", "num_beams"], "beam search"),
    ({"quantization_bit": 4}, ["quantization_bit"], "already-quantized checkpoint"),
    ({"enable_thinking": False}, ["enable_thinking"], "_nothink"),
    ({"default_system": "be brief"}, ["default_system"], "first message of each request"),
    ({"skip_special_tokens": False}, ["skip_special_tokens"], "in each request"),
    ({"add_tokens": "<x>"}, ["add_tokens"], "never changes the vocabulary"),
    ({"template": "gemma2"}, ["template"], "efficient_eos|unknown|not"),
    ({"vllm_config": "{bad"}, ["vllm_config"], "not a JSON object"),
]


@pytest.mark.parametrize(("extra", "named", "match"), REFUSALS)
def test_serve_refusals_name_the_key(extra: dict, named: list, match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        config.load("serve", [serve_yaml(tmp_path, **extra)])
    assert refused_keys(err.value) == named


def test_refused_keys_at_default_and_unknown_keys(tmp_path: Path) -> None:
    cfg = config.load("serve", [serve_yaml(tmp_path, num_beams=1, enable_thinking=True,
                                           model_revision="main", quantization_bit=None)])  # fmt: skip
    assert cfg.engine.max_model_len == 4096
    with pytest.raises(ConfigError, match=r"'temprature' \(did you mean 'temperature'\?\)"):
        config.load("serve", [serve_yaml(tmp_path, temprature=0.5)])


def test_predict_refusals(tmp_path: Path, tiny_model: Path) -> None:
    def load(**extra: object) -> object:
        return config.load("generate", [example(PREDICT, tmp_path, tiny_model, **extra)])

    with pytest.raises(ConfigError) as err:
        load(predict_with_generate=False, stage="dpo", do_train=True)
    assert refused_keys(err.value) == ["do_train", "predict_with_generate", "stage"]
    assert load(do_sample=False, max_new_tokens=16).sampling.temperature == 0.0
    with pytest.raises(ConfigError, match="has no dataset"):
        from raylm.serve.job import GenerateJob

        cfg = load(eval_dataset="nope", dataset_dir=str(LF / "data"), adapter_name_or_path=None)
        GenerateJob().setup(cfg)


def test_key_tables_cover_every_inference_argument() -> None:
    """Each LLaMA-Factory model and generating argument (and each inference-relevant data
    argument) has one serve/generate fate; the rest is known to the train tables; the
    docs list the serve tables."""
    tables = [keys.MAPPED, keys.NOOP, keys.REFUSED]
    mine = [k for t in tables for k in t]
    assert len(mine) == len(set(mine)), "a key in two tables"
    lines = (LF / "hparams_keys.txt").read_text().splitlines()
    lf_args = [ln for ln in lines if ln and not ln.startswith("#")]
    model_args = lf_args[: lf_args.index("kt_lora_expert_intermediate_size") + 1]
    generating = lf_args[lf_args.index("do_sample") :]
    assert sorted(set(model_args + generating) - set(mine)) == []
    assert set(keys.DEFAULTS) <= set(keys.REFUSED)
    assert set(mine) <= set(train_keys.known())  # the train loader names each too
    text = DOCS.read_text()
    section = text[text.index("## Inference and prediction") :]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))
    assert sorted(set(mine) - documented) == []


# ---- LLaMA-Factory's metrics --------------------------------------------------------


def test_bleu4_by_hand() -> None:
    """label "abcd", prediction "abce" (characters): 1-grams 3/4, 2-grams 2/3, 3-grams
    1/2, 4-grams 0/1 -> method3 makes it 1/(2^1 * 1); lengths equal, so no penalty."""
    want = (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    assert lf_metrics.sentence_bleu4(list("abcd"), list("abce")) == pytest.approx(want)
    # shorter prediction "ab": 1-grams 2/2, 2-grams 1/1, then 1/(2*1), 1/(4*1); BP e^(1-4/2)
    want = (1 * 1 * 0.5 * 0.25) ** 0.25 * 2.718281828459045 ** (1 - 2)
    assert lf_metrics.sentence_bleu4(list("abcd"), list("ab")) == pytest.approx(want)
    assert lf_metrics.sentence_bleu4(list("abcd"), list("xy")) == 0.0


def test_rouge_by_hand() -> None:
    """hyp "the cat sat", ref "the cat ran": unigram sets share 2 of 3 (F 2/3), bigrams
    1 of 2 (F 1/2), LCS 2 of 3 (F 2/3); repeated words count once in ROUGE-N (sets)."""
    got = lf_metrics.rouge("the cat sat", "the cat ran")
    assert got["rouge-1"] == pytest.approx(2 / 3, abs=1e-7)
    assert got["rouge-2"] == pytest.approx(1 / 2, abs=1e-7)
    assert got["rouge-l"] == pytest.approx(2 / 3, abs=1e-7)
    rep = lf_metrics.rouge("a a a", "a b")  # sets {a} vs {a, b}: P 1, R 1/2; LCS 1 of 3 / 2
    assert rep["rouge-1"] == pytest.approx(2 / 3, abs=1e-7)
    assert rep["rouge-l"] == pytest.approx(2 * (1 / 3 * 1 / 2) / (1 / 3 + 1 / 2), abs=1e-7)


def test_example_scores_and_means() -> None:
    s = lf_metrics.example_scores("Hello, world!", "Hello, world!")
    assert s == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    assert lf_metrics.example_scores("", "x") == dict.fromkeys(lf_metrics.METRICS, 0.0)
    mean = lf_metrics.predict_metrics(["Hello, world!", ""], ["Hello, world!", "x"])
    assert mean == dict.fromkeys(lf_metrics.METRICS, 50.0)


def test_metrics_match_llamafactory_packages() -> None:
    """The exact computation of LLaMA-Factory's ComputeSimilarity, with its own packages
    (jieba, rouge-chinese, nltk: not raylm dependencies, in the dev extra for this test)."""
    import jieba
    import rouge_chinese
    from nltk.translate import bleu_score as bleu

    pairs = [("我爱北京天安门。你好吗？", "我爱北京。你好"), ("the cat sat on the mat", "a cat sat"),
             ("3.14% of dogs ran!", "dogs ran fast.")]  # fmt: skip
    for pred, label in pairs:
        hyp, ref = list(jieba.cut(pred)), list(jieba.cut(label))
        scores = rouge_chinese.Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
        want = {k: round(v["f"] * 100, 4) for k, v in scores.items()}
        smooth = bleu.SmoothingFunction().method3
        want["bleu-4"] = round(bleu.sentence_bleu([list(label)], list(pred),
                                                  smoothing_function=smooth) * 100, 4)  # fmt: skip
        assert lf_metrics.example_scores(pred, label) == want


# ---- the predict path's records and files -------------------------------------------


def test_predict_prompts_labels_and_files(tmp_path: Path, tiny_model: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.serve.predict import PREDICTIONS, RESULTS, prepare, write_results

    path = example(PREDICT, tmp_path, tiny_model, dataset_dir=str(LF / "data"), max_samples=2)
    cfg = config.load("generate", [path], ["input.template=qwen3_nothink"])
    out = tmp_path / "out"
    ready, labels = prepare(cfg, str(out))
    rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == len(labels) == 4  # 2 per dataset
    first = json.loads((LF / "data" / "identity.json").read_text())[0]
    assert rows[0]["label"] == first["output"]
    assert rows[0]["prompt"].startswith("<|im_start|>user\n" + first["instruction"])
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert (ready.input.path, ready.input.chat, ready.input.datasets) == (
        str(out / "prompts.jsonl"), False, [],
    )  # fmt: skip
    assert ready.sampling.stop_token_ids  # the template's stop word
    preds = ["x", labels[1], "", labels[3]]
    (out / "predictions").mkdir()
    table = pa.table({"row_id": [1, 0, 2, 3], "prompt": [r["prompt"] for r in rows],
                      "completion": [preds[1], preds[0], preds[2], preds[3]]})  # fmt: skip
    pq.write_table(table, out / "predictions" / "part-00000.parquet")
    results = write_results(str(out), labels, started=0.0)
    lines = [json.loads(x) for x in (out / PREDICTIONS).read_text().splitlines()]
    assert set(lines[0]) == {"prompt", "predict", "label"}
    assert {(x["predict"], x["label"]) for x in lines} == set(zip(preds, labels, strict=True))
    saved = json.loads((out / RESULTS).read_text())
    assert saved == results and saved["predict_samples"] == 4
    for name in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert 0.0 < saved[name] < 100.0


def test_chat_loop_keeps_the_history_in_the_client() -> None:
    """``raylm chat``: each request carries the whole conversation; clear forgets it."""
    from raylm.serve.chat import chat_loop

    seen: list[list[dict]] = []

    def complete(messages: list[dict]) -> list[str]:
        seen.append([dict(m) for m in messages])
        return ["re: ", messages[-1]["content"]]

    turns = iter(["hi", "again", "clear", "new", "exit"])
    out: list[str] = []
    history = chat_loop(complete, read=lambda _: next(turns), write=out.append, system="S")
    assert [len(m) for m in seen] == [2, 4, 2]  # system + turns; reset by clear
    assert seen[1][2] == {"role": "assistant", "content": "re: hi"}
    assert history[-1] == {"role": "assistant", "content": "re: new"}
    assert "History has been removed.\n" in out
