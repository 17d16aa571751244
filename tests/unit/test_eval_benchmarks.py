"""Benchmark readers, answer extraction, pass@k and the code sandbox, on the shipped samples."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from raylm.config import ConfigError
from raylm.eval.benchmarks import metric_of
from raylm.eval.benchmarks.answers import extract_answer, math_prompt, numeric_equal
from raylm.eval.benchmarks.choice import context, encode_pair
from raylm.eval.benchmarks.code_exec import (
    network_namespace,
    pass_at_k,
    program_of,
    run_program,
    run_programs,
    truncate,
)
from raylm.eval.benchmarks.readers import read_benchmark, read_choice, read_code, read_math
from raylm.eval.bootstrap import confidence_interval, paired_bootstrap
from raylm.eval.config import BenchmarkConfig, EvalJobConfig, GateConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "benchmarks"


def test_multiple_choice_readers_read_each_public_layout() -> None:
    mmlu = read_choice("mmlu", ASSETS / "mmlu", "test")
    assert len(mmlu) == 12 and {i.subject for i in mmlu} == {
        "abstract_algebra",
        "high_school_geography",
        "college_biology",
    }
    assert mmlu[0].choices == ("2", "3", "6", "1") and mmlu[0].answer == 1
    ceval = read_choice("ceval", ASSETS / "ceval", "val")
    assert len(ceval) == 12 and ceval[0].subject == "computer_network"
    assert ceval[0].question.startswith("TCP/IP") and ceval[0].answer == 1  # "B"
    cmmlu = read_choice("cmmlu", ASSETS / "cmmlu", "test")
    assert len(cmmlu) == 12 and cmmlu[0].subject == "chinese_history" and cmmlu[0].answer == 2
    assert cmmlu[0].choices == ("夏朝", "商朝", "秦朝", "汉朝")
    assert len(read_choice("ceval", ASSETS / "ceval", "dev")) == 4


def test_original_mmlu_csv_layout(tmp_path: Path) -> None:
    d = tmp_path / "test"
    d.mkdir()
    (d / "anatomy_test.csv").write_text('"What is 1+1?",1,2,3,4,B\n')
    (item,) = read_choice("mmlu", tmp_path, "test")
    assert (item.subject, item.choices, item.answer) == ("anatomy", ("1", "2", "3", "4"), 1)


def test_hugging_face_parquet_shards(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "q?", "answer": "1 + 1 = 2\n#### 2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    (item,) = read_math(tmp_path, "test")
    assert item.answer == "2"


def test_bad_answer_is_named(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5, "subject": "s"}\n')
    with pytest.raises(ConfigError, match=r"x\.jsonl:1.*answer 5"):
        read_choice("mmlu", f, "test")


def test_prompt_is_lm_evals_mmlu_format() -> None:
    items = read_choice("mmlu", ASSETS / "mmlu", "test")
    dev = read_choice("mmlu", ASSETS / "mmlu", "dev")
    assert context("mmlu", items[0], []) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the order of the element 2 in the group Z_6 under addition.\n"
        "A. 2\nB. 3\nC. 6\nD. 1\nAnswer:"
    )
    one_shot = context("mmlu", items[0], dev[:1])
    assert "The number of elements of Z_5 is\nA. 4\nB. 5\nC. 6\nD. 25\nAnswer: B\n\n" in one_shot
    ceval = read_choice("ceval", ASSETS / "ceval", "val")
    assert context("ceval", ceval[0], []).endswith("D. 数据链路\n答案：")


def test_encode_pair_moves_trailing_space_like_lm_eval() -> None:
    class Chars:
        def encode(self, s: str) -> list[int]:
            return [ord(c) for c in s]

    ctx, cont = encode_pair(Chars(), "Answer: ", "A")
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(" "), ord("A")]


def test_gsm8k_reader_and_answer_extraction() -> None:
    items = read_math(ASSETS / "gsm8k", "test")
    assert len(items) == 10 and items[4].answer == "850"  # "1,200 - 350" ... "#### 850"
    assert math_prompt(items[0], []).endswith("Answer:")
    assert extract_answer("So she has 8 apples.\n#### 8\n\nQuestion: next") == "8"
    assert extract_answer("The answer is $\\boxed{1,250}$.") == "1250"
    assert extract_answer("\\boxed{\\frac{1}{2}} and 7") == "2"
    assert extract_answer("3 + 4 = 7 so the total is 7.") == "7"
    assert extract_answer("no number here") is None
    assert numeric_equal("18.00", "18") and numeric_equal("-3", "-3.0")
    assert not numeric_equal("17", "18") and not numeric_equal(None, "1")


def test_pass_at_k_matches_the_combinatorial_formula() -> None:
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 5), (5, 5, 2), (7, 2, 3)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    programs = []
    for fmt, path in (("humaneval", "humaneval/HumanEval.jsonl"), ("mbpp", "mbpp")):
        for t in read_code(fmt, ASSETS / path, "test"):
            programs.append(program_of(fmt, t.prompt, t.canonical_solution, t.test))
            programs.append(program_of(fmt, t.prompt, "    return None\n", t.test))
    results = run_programs(programs, timeout_s=20, memory_mb=512, workers=4)
    assert [ok for ok, _ in results[0::2]] == [True] * 20, results[0::2]
    assert not any(ok for ok, _ in results[1::2])


def test_sandbox_limits() -> None:
    t0 = time.monotonic()
    ok, why = run_program("while True: pass", timeout_s=1.5)
    assert not ok and "timed out" in why and time.monotonic() - t0 < 10
    ok, why = run_program("x = bytearray(900 * 1024 * 1024)", memory_mb=256)
    assert not ok and "MemoryError" in why
    ok, why = run_program("import socket\nsocket.socket()")
    assert not ok and "socket" in why
    ok, why = run_program("import subprocess\nsubprocess.run(['true'])")
    assert not ok and "subprocess" in why
    ok, why = run_program("open('/tmp/raylm-sandbox-escape', 'w').write('x')")
    assert not ok and "not allowed" in why
    ok, why = run_program("open('scratch.txt', 'w').write('x')\nimport os\nprint(os.environ)")
    assert ok, why
    assert isinstance(network_namespace(), bool)


@pytest.mark.parametrize(
    "exit_call", ["import sys; sys.exit(0)", "exit()", "import os; os._exit(0)", "raise SystemExit"]
)
def test_exiting_before_the_tests_finish_fails(exit_call: str) -> None:
    """Exit 0 before the asserts ran is not a pass, from the solution or from a function
    the tests call."""
    early = f"def add(a, b):\n    return 0\n{exit_call}\nassert add(1, 2) == 3\n"
    ok, why = run_program(early)
    assert not ok and "before its tests finished" in why, why
    inside = f"def add(a, b):\n    {exit_call}\nassert add(1, 2) == 3\n"
    ok, why = run_program(inside)
    assert not ok and "before its tests finished" in why, why
    ok, why = run_program("def add(a, b):\n    return a + b\nassert add(1, 2) == 3\n")
    assert ok, why


def test_truncation_at_lm_eval_stop_sequences() -> None:
    assert truncate("humaneval", "    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate("mbpp", "def f():\n    return 1\n[DONE] trailing") == "def f():\n    return 1\n"


def test_read_benchmark_dispatch() -> None:
    assert len(read_benchmark("humaneval", ASSETS / "humaneval/HumanEval.jsonl", "test")) == 10
    assert read_benchmark("mbpp", ASSETS / "mbpp", "test")[0].entry_point is None


def test_benchmark_statistics_work_with_the_bootstrap() -> None:
    acc = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    base = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    ci = confidence_interval(metric_of("mmlu/acc"), acc, 200)
    assert ci.value == 0.75 and ci.ci_low <= 0.75 <= ci.ci_high
    comp = paired_bootstrap(metric_of("mmlu/acc"), acc, base, 200)
    assert comp.diff == pytest.approx(0.5) and comp.higher_is_better


def test_benchmark_config_and_gate_keys() -> None:
    b = BenchmarkConfig(name="mmlu", format="mmlu", path="x")
    assert b.metric_names() == ["mmlu/acc", "mmlu/acc_norm"]
    code = BenchmarkConfig(name="he", format="humaneval", path="x", n_samples=5, k=[1, 5])
    assert code.metric_names() == ["he/pass@1", "he/pass@5"]
    with pytest.raises(ConfigError, match="format"):
        BenchmarkConfig(name="x", format="arc", path="x")
    with pytest.raises(ConfigError, match="k=5"):
        BenchmarkConfig(name="x", format="mbpp", path="x", k=[5])
    cfg = EvalJobConfig(
        model="m", metrics=[], benchmarks=[b], gate=GateConfig(min_metric={"mmlu/acc": 0.3})
    )
    assert cfg.gate.min_metric == {"mmlu/acc": 0.3}
    with pytest.raises(ConfigError, match="gsm8k/exact_match"):
        EvalJobConfig(
            model="m",
            metrics=[],
            benchmarks=[b],
            gate=GateConfig(min_metric={"gsm8k/exact_match": 0.3}),
        )
    with pytest.raises(ConfigError, match="unique"):
        EvalJobConfig(model="m", metrics=[], benchmarks=[b, b])
