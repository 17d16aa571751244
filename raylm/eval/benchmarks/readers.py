"""Readers of the public benchmarks' file layouts, from local files only.

Each reader returns plain records in one shape per kind (multiple choice, math, code), so
scoring never depends on which benchmark a file came from. The layouts are those of the
public releases (see docs/evaluation.md, "Benchmarks"):

- MMLU (``cais/mmlu``): ``question``, ``choices`` (list), ``answer`` (index), ``subject``;
  also the original release's header-less csv ``question,A,B,C,D,answer`` per subject.
- C-Eval (``ceval/ceval-exam``): ``id,question,A,B,C,D,answer[,explanation]``, one
  ``<subject>_<split>.csv`` per subject.
- CMMLU (``haonan-li/cmmlu``): ``,Question,A,B,C,D,Answer`` (a leading index column), one
  ``<subject>.csv`` per subject.
- GSM8K: ``question``, ``answer`` ending in ``#### N``.
- HumanEval: ``task_id, prompt, canonical_solution, test, entry_point``.
- MBPP: ``task_id, text, code, test_list[, test_setup_code]``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylm.eval.records import EvalDataError

LETTERS = "ABCDEFGHIJ"
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question: the right option is ``choices[answer]``."""

    id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class MathItem:
    """A word problem whose answer is a number (GSM8K): ``solution`` is the worked answer."""

    id: str
    question: str
    solution: str
    answer: str


@dataclass(frozen=True)
class CodeTask:
    """A function to complete; ``test`` is run after ``prompt + completion``."""

    id: str
    prompt: str
    test: str
    entry_point: str | None
    canonical_solution: str


def split_files(path: str | Path, split: str) -> list[Path]:
    """The files of ``split`` under ``path``: the file itself, ``<split>.<ext>``, the shards
    ``<split>-*.<ext>`` of a Hugging Face download, or every file of ``<split>/`` (one per
    subject), sorted so the order is stable."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise EvalDataError(f"benchmark path {p} does not exist (benchmarks read local files)")
    for ext in EXTENSIONS:
        if (p / f"{split}{ext}").is_file():
            return [p / f"{split}{ext}"]
    shards = sorted(f for f in p.glob(f"{split}-*") if f.suffix in EXTENSIONS)
    if shards:  # a Hugging Face dataset download: test-00000-of-00001.parquet
        return shards
    sub = p / split
    files = sorted(f for f in sub.glob("*") if f.suffix in EXTENSIONS) if sub.is_dir() else []
    if not files:
        raise EvalDataError(
            f"no {split!r} split under {p}: expected {split}.jsonl/.json/.csv/.parquet "
            f"or a {split}/ directory of per-subject files"
        )
    return files


def read_rows(path: Path, header: bool = True) -> list[dict[str, Any]]:
    """Rows of one jsonl / json list / csv / parquet file, as dicts."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json":
        data = json.loads(text)
        return data if isinstance(data, list) else next(iter(data.values()))
    if path.suffix == ".csv":
        if not header:
            return [dict(enumerate(r)) for r in csv.reader(io.StringIO(text)) if r]
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EvalDataError(f"{path}:{n}: not valid JSON ({err})") from None
    return rows


def _subject(path: Path, split: str) -> str:
    stem = path.stem
    return stem[: -len(split) - 1] if stem.endswith(f"_{split}") else stem


def _letter_index(where: str, value: Any, n: int) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        idx = int(value)
    else:
        idx = LETTERS.find(str(value).strip().upper()[:1]) if str(value).strip() else -1
    if not 0 <= idx < n:
        raise EvalDataError(f"{where}: answer {value!r} is not one of the {n} options")
    return idx


def read_choice(fmt: str, path: str | Path, split: str) -> list[ChoiceItem]:
    """MMLU / C-Eval / CMMLU items of one split."""
    items: list[ChoiceItem] = []
    for f in split_files(path, split):
        headerless = fmt == "mmlu" and f.suffix == ".csv"
        for i, row in enumerate(read_rows(f, header=not headerless)):
            where = f"{f}:{i + 1}"
            try:
                items.append(_choice_item(fmt, f, split, i, row, headerless))
            except KeyError as err:
                raise EvalDataError(f"{where}: {fmt} record lacks {err}") from None
    return items


def _choice_item(fmt: str, f: Path, split: str, i: int, row: dict, headerless: bool) -> ChoiceItem:
    where = f"{f}:{i + 1}"
    subject = _subject(f, split)
    if headerless:  # the original MMLU csv: question, A, B, C, D, answer
        choices = tuple(str(row[k]) for k in range(1, 5))
        return ChoiceItem(where, subject, str(row[0]), choices, _letter_index(where, row[5], 4))
    if fmt == "mmlu":
        choices = tuple(str(c) for c in row["choices"])
        return ChoiceItem(
            str(row.get("id", where)),
            str(row.get("subject") or subject),
            str(row["question"]),
            choices,
            _letter_index(where, row["answer"], len(choices)),
        )
    q, ans = ("question", "answer") if fmt == "ceval" else ("Question", "Answer")
    choices = tuple(str(row[k]) for k in "ABCD" if k in row)
    rid = row.get("id") if fmt == "ceval" else None
    return ChoiceItem(
        f"{subject}/{rid if rid not in (None, '') else i}",
        str(row.get("subject") or subject),
        str(row[q]),
        choices,
        _letter_index(where, row[ans], len(choices)),
    )


def gsm8k_answer(solution: str) -> str:
    """The number after GSM8K's ``####``, commas removed."""
    if "####" not in solution:
        raise EvalDataError(f"GSM8K answer without '#### N': {solution[-80:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def read_math(path: str | Path, split: str) -> list[MathItem]:
    items = []
    for f in split_files(path, split):
        for i, row in enumerate(read_rows(f)):
            where = f"{f}:{i + 1}"
            if "question" not in row or "answer" not in row:
                raise EvalDataError(f"{where}: gsm8k record needs question and answer")
            sol = str(row["answer"])
            items.append(
                MathItem(str(row.get("id", where)), row["question"], sol, gsm8k_answer(sol))
            )
    return items


def read_code(fmt: str, path: str | Path, split: str) -> list[CodeTask]:
    tasks = []
    for f in split_files(path, split):
        for i, row in enumerate(read_rows(f)):
            where = f"{f}:{i + 1}"
            try:
                tasks.append(_code_task(fmt, row))
            except KeyError as err:
                raise EvalDataError(f"{where}: {fmt} record lacks {err}") from None
    return tasks


def mbpp_prompt(row: dict) -> str:
    """lm-eval's MBPP prompt: the task, its tests, then ``[BEGIN]``."""
    tests = "\n".join(row["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def _code_task(fmt: str, row: dict) -> CodeTask:
    if fmt == "humaneval":
        return CodeTask(
            str(row["task_id"]),
            row["prompt"],
            f"{row['test']}\n\ncheck({row['entry_point']})\n",
            row["entry_point"],
            row["canonical_solution"],
        )
    setup = row.get("test_setup_code") or ""
    test = "\n".join([setup, *row["test_list"]]) + "\n"
    return CodeTask(str(row["task_id"]), mbpp_prompt(row), test, None, row["code"])


def read_benchmark(fmt: str, path: str | Path, split: str) -> list[Any]:
    if fmt in ("mmlu", "ceval", "cmmlu"):
        return read_choice(fmt, path, split)
    if fmt == "gsm8k":
        return read_math(path, split)
    return read_code(fmt, path, split)
