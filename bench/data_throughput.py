"""Record-stage throughput of the data job, per stage, against datatrove on the same files.

    .venv/bin/python bench/data_throughput.py [--mb 100] [--repeat 1] [--skip-job]
        [--skip-datatrove] [--datatrove-python /tmp/dtvenv/bin/python]

The corpus is real text found on this machine, written as four JSONL files of equal
size: ``en_short`` (paragraphs of /usr/share/doc, the C4 and Wikipedia demo data, one to
five a document), ``en_long`` (whole /usr/share/doc files and Python standard-library
modules), ``zh_short`` (the Chinese Alpaca demo records and groups of Chinese gettext
translations: zh_CN / zh_TW .mo files of the installed packages) and ``zh_long``
(hundreds of those translations and paragraphs a document, some English lines among
them). Each stage runs in this one process (one core) over all four files, so its
figure is MB/s per core of UTF-8 input. The whole data job (default filters and PII,
dedup off) runs on a 2-CPU local Ray; its per-core rate is MB / (seconds * 2).
datatrove's GopherRepetitionFilter + GopherQualityFilter + PIIFormatter run in one
process on the same files (datatrove lives in its own venv: ``--datatrove-python``).
"""

from __future__ import annotations

import argparse
import gettext
import gzip
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests/assets/llamafactory/data"
_CJK = re.compile(r"[\u4e00-\u9fff]")
SLICES = ("en_short", "en_long", "zh_short", "zh_long")


# ---- the corpus: real text of this machine --------------------------------------------


def _doc_texts(limit_mb: float) -> list[str]:
    """Text files of /usr/share/doc (gzipped ones too) and the Python standard library."""
    paths = sorted(Path("/usr/share/doc").rglob("*")) + sorted(
        Path(os.__file__).parent.glob("**/*.py")
    )
    out, total = [], 0
    for p in paths:
        if not p.is_file() or p.stat().st_size < 200 or p.stat().st_size > 2_000_000:
            continue
        try:
            raw = p.read_bytes()
            text = (gzip.decompress(raw) if p.suffix == ".gz" else raw).decode("utf-8")
        except (OSError, UnicodeDecodeError, gzip.BadGzipFile, EOFError):
            continue
        if "\x00" in text:
            continue
        out.append(text)
        total += len(raw)
        if total > limit_mb * 1e6:
            break
    return out


def _zh_messages() -> list[str]:
    """Chinese UI translations of the installed packages (gettext catalogs), and the
    Chinese Alpaca demo's instructions and answers."""
    found: dict[str, None] = {}
    mos = sorted(Path("/usr/share/locale").glob("zh_*/LC_MESSAGES/*.mo"))
    mos += sorted(Path("/usr/share/vim").glob("*/lang/zh_*UTF-8/LC_MESSAGES/*.mo"))
    for mo in mos:
        try:
            catalog = gettext.GNUTranslations(mo.open("rb"))._catalog  # type: ignore[attr-defined]
        except (OSError, UnicodeDecodeError, gettext.error):  # type: ignore[attr-defined]
            continue
        for value in catalog.values():
            if isinstance(value, str) and _CJK.search(value):
                found.setdefault(value.strip(), None)
    for r in json.loads((DATA / "alpaca_zh_demo.json").read_text()):
        found.setdefault(f"{r['instruction']}\n{r['input']}\n{r['output']}".strip(), None)
    return list(found)


def build_corpus(out: Path, mb: float, seed: int = 0) -> dict[str, Path]:
    """Four JSONL files of about ``mb / 4`` MB each (see the module docstring)."""
    rng = random.Random(seed)
    target = mb * 1e6 / 4
    docs = _doc_texts(min(120.0, mb * 1.5))
    paras = [p for d in docs for p in re.split(r"\n\s*\n", d) if len(p) > 40]
    paras += [json.loads(line)["text"] for line in (DATA / "c4_demo.jsonl").open()]
    paras += [x for x in (DATA / "wiki_demo.txt").read_text().splitlines() if x.strip()]
    zh = _zh_messages()
    makers: dict[str, Callable[[], str]] = {
        "en_short": lambda: "\n\n".join(rng.sample(paras, rng.randint(1, 5))),
        "en_long": lambda: rng.choice(docs),
        "zh_short": lambda: "\n".join(rng.sample(zh, rng.randint(1, 8))),
        "zh_long": lambda: "\n".join(
            rng.choice(paras) if rng.random() < 0.1 else rng.choice(zh)
            for _ in range(rng.randint(100, 600))
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, make in makers.items():
        path, size = out / f"{name}.jsonl", 0
        with path.open("w", encoding="utf-8") as f:
            while size < target:
                line = json.dumps({"text": make()}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
        files[name] = path
    return files


# ---- per-stage timing, one process ----------------------------------------------------


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Least CPU seconds of this process over ``repeat`` runs, and the last result: CPU
    time, not wall time, so other work on a shared machine does not count (the stages
    are single-threaded: numpy, pandas and Arrow's kernels on one array each)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result


def _read(path: Path) -> list[Any]:
    """The read tasks' blocks of one file (16 MB byte ranges, as the job cuts them)."""
    from raylm.data.readers import ReadSpec, line_ranges, read_spec
    from raylm.data.rows import count_newlines

    src = {"path": str(path), "name": path.name, "fmt": "auto", "columns": "{}"}
    ranges = line_ranges(str(path), path.stat().st_size, max(1, path.stat().st_size >> 24))
    blocks, first = [], 1
    for start, end in ranges:
        blocks.append(read_spec(ReadSpec(src, start, end, first), "text", "line"))
        first += count_newlines(str(path), start, end)
    return blocks


def stage_rates(
    files: dict[str, Path], repeat: int, probes: bool = True
) -> dict[str, dict[str, float]]:
    """MB/s per core of each stage over each slice (and ``all``)."""
    from raylm.data import dedup, filters, pii, steps
    from raylm.data.config import DataJobConfig, DedupConfig

    cfg = DataJobConfig(inputs=["x"], dedup=DedupConfig(exact=False, fuzzy=False))
    start = time.perf_counter()  # once per worker process: the code-point class table
    filters.first_failures(["warm up", "预热"], cfg.filters), filters.nfkc_batch(["预热，"])
    print(f"class table and imports, once per process: {time.perf_counter() - start:.2f} s")
    table: dict[str, dict[str, float]] = {}
    for name, path in files.items():
        mb = path.stat().st_size / 1e6
        row: dict[str, float] = {}
        seconds, blocks = _best(lambda p=path: _read(p), repeat)
        row["read"] = seconds
        texts = [json.loads(r)["text"] for b in blocks for r in b.column("raw").to_pylist()]
        row["parse (json)"], _ = _best(lambda t=blocks: _parse(t), repeat)
        raw = texts
        row["normalise (NFKC), per document"], texts = _best(
            lambda t=raw: [filters.nfkc(x) for x in t], repeat
        )
        row["normalise (NFKC), batch"], batch_texts = _best(
            lambda t=raw: filters.nfkc_batch(t), repeat
        )
        assert batch_texts == texts, f"{name}: batch NFKC differs"
        for label, fn in _filter_probes(cfg).items() if probes else ():
            row[f"filter {label}"], _ = _best(lambda f=fn, t=texts: [f(x) for x in t], repeat)
        row["filters, per document"], doc_fail = _best(
            lambda t=texts: [filters.first_failure(x, cfg.filters) for x in t], repeat
        )
        if hasattr(filters, "first_failures"):
            row["filters, batch"], batch_fail = _best(
                lambda t=texts: filters.first_failures(t, cfg.filters), repeat
            )
            assert list(batch_fail) == doc_fail, f"{name}: batch filters disagree"
        row["PII, per document"], doc_pii = _best(
            lambda t=texts: [pii.scrub(x, cfg.pii) for x in t], repeat
        )
        if hasattr(pii, "scrub_batch"):
            row["PII, batch"], batch_pii = _best(
                lambda t=texts: pii.scrub_batch(t, cfg.pii), repeat
            )
            assert list(zip(*batch_pii, strict=True)) == doc_pii, f"{name}: batch PII disagrees"
        row["hashing (exact)"], _ = _best(lambda t=texts: dedup.exact_hashes(t), repeat)
        row["record stage, row by row (before)"], old = _best(
            lambda b=blocks: [_row_by_row(x, cfg) for x in b], repeat
        )
        row["record stage (process_block)"], new = _best(
            lambda b=blocks: [steps.process_block(x, cfg, "pt") for x in b], repeat
        )
        assert all(n[0].equals(o) for n, o in zip(new, old, strict=True)), f"{name}: rows differ"
        table[name] = {k: mb / v for k, v in row.items()}
        table[name]["MB"] = mb
        table[name]["docs"] = len(texts)
        kept = sum(f is None for f in doc_fail)
        print(f"{name}: {len(texts)} docs, {mb:.1f} MB, {kept} pass the filters", flush=True)
    return table


def _row_by_row(block: Any, cfg: Any) -> Any:
    """The record stage as it ran before blocks were vectorised: every row through each
    step's per-row ``run`` (the per-document filters and PII), then signed."""
    import pyarrow as pa

    from raylm.data import steps

    todo = [s(cfg, "pt") for s in steps.STEPS]
    out = [steps.new_row(r) for r in block.to_pylist()]
    for row in out:
        for step in todo:
            step.run(row)
            if row["status"]:
                break
    kept = [r for r in out if not r["status"]]
    for row in kept:
        row["doc"] = json.dumps(row["_payload"], ensure_ascii=False)
        row["_text"] = steps.dedup_text(row["_payload"])
    steps.Sign(cfg).run(kept)
    steps.Score(cfg).run(kept)
    for row in kept:  # as the job does since 40e38e2: ``doc`` holds a kept row's text
        row["raw"] = ""
    return pa.Table.from_pylist(out, schema=steps.PROCESSED_SCHEMA)


def _parse(blocks: list[Any]) -> None:
    from raylm.data import formats

    for b in blocks:
        for raw in b.column("raw").to_pylist():
            formats.to_payload(json.loads(raw), "auto", {}, "text", "pt")


def _filter_probes(cfg: Any) -> dict[str, Callable[[str], Any]]:
    """Each default filter's per-document function, timed alone over every document."""
    from raylm.data import filters

    return {
        "words": filters.words,
        "symbol_ratio": filters.symbol_ratio,
        "control_ratio": filters.control_ratio,
        "dup_lines": filters.dup_line_fraction,
        "top_ngram": lambda t: filters.top_ngram_fraction(filters.words(t)),
        "dup_ngrams": lambda t: filters.dup_ngram_fraction(filters.words(t)),
    }


# ---- the whole job, and datatrove ------------------------------------------------------


def job_rate(files: dict[str, Path], out: Path, dedup: bool = False) -> dict[str, float]:
    """The data job (default filters and PII; dedup off unless ``dedup``: then its
    defaults, exact and MinHash signing in the record stage) on a 2-CPU local Ray."""
    import ray

    from raylm.data.config import DataJobConfig, DedupConfig
    from raylm.data.pipeline import run

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = DataJobConfig(
        inputs=[str(p) for p in files.values()],
        dedup=DedupConfig() if dedup else DedupConfig(exact=False, fuzzy=False),
        output_dir=str(out / "job"),
    )
    start = time.perf_counter()
    stats = run(cfg)
    wall = time.perf_counter() - start
    ray.shutdown()
    mb = sum(p.stat().st_size for p in files.values()) / 1e6
    record = stats["seconds"]["read_clean_sign"]
    print(f"job: {wall:.1f} s wall, seconds {json.dumps(stats['seconds'])}", flush=True)
    return {"record stage": mb / record / 2, "whole job": mb / wall / 2, "wall_s": wall}


DATATROVE = """
import json, sys, time
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.formatters import PIIFormatter
out = {}
for path in sys.argv[1:]:
    start = time.process_time()
    docs = (Document(text=json.loads(line)["text"], id=str(i)) for i, line in enumerate(open(path)))
    steps = [GopherRepetitionFilter(), GopherQualityFilter(), PIIFormatter()]
    data = docs
    for step in steps:
        data = step.run(data, rank=0, world_size=1)
    kept = sum(1 for _ in data)
    out[path] = {"seconds": time.process_time() - start, "kept": kept}
print(json.dumps(out))
"""


def datatrove_rates(files: dict[str, Path], python: str) -> dict[str, float]:
    """datatrove's Gopher quality + repetition filters and PII formatter, one process
    (its CPU seconds, as for raylm's stages)."""
    res = subprocess.run(
        [python, "-c", DATATROVE, *[str(p) for p in files.values()]],
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(res.stdout.strip().splitlines()[-1])
    rates = {n: p.stat().st_size / 1e6 / found[str(p)]["seconds"] for n, p in files.items()}
    total = sum(p.stat().st_size for p in files.values()) / 1e6
    rates["all"] = total / sum(v["seconds"] for v in found.values())
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default="")
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--skip-datatrove", action="store_true")
    parser.add_argument("--job-only", action="store_true", help="only the whole data job")
    parser.add_argument(
        "--job-dedup", action="store_true", help="the whole job with dedup's defaults on"
    )
    parser.add_argument(
        "--no-probes", action="store_true", help="skip timing each per-document filter alone"
    )
    parser.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="raylm_throughput_"))
    files = build_corpus(out / "corpus", args.mb)
    total_mb = sum(p.stat().st_size for p in files.values()) / 1e6
    if args.job_only:
        return _print_job(job_rate(files, out, args.job_dedup), total_mb)
    table = stage_rates(files, args.repeat, probes=not args.no_probes)
    stages = [k for k in table[SLICES[0]] if k not in ("MB", "docs")]
    table["all"] = {k: total_mb / sum(t["MB"] / t[k] for t in table.values()) for k in stages}
    print("\nMB/s per core | " + " | ".join((*SLICES, "all")))
    for k in stages:
        print(f"{k} | " + " | ".join(f"{table[s][k]:.2f}" for s in (*SLICES, "all")))
    if not args.skip_datatrove:
        dt = datatrove_rates(files, args.datatrove_python)
        print("datatrove Gopher + PII | " + " | ".join(f"{dt[s]:.2f}" for s in (*SLICES, "all")))
    if not args.skip_job:
        _print_job(job_rate(files, out, args.job_dedup), total_mb)


def _print_job(job: dict[str, float], total_mb: float) -> None:
    print(f"job (2 CPUs): record stage {job['record stage']:.2f} MB/s/core, whole job "
          f"{job['whole job']:.2f} MB/s/core ({job['wall_s']:.1f} s for {total_mb:.0f} MB)")  # fmt: skip
    for label in ("record stage", "whole job"):
        hours = 1e6 / (job[label] * 8) / 3600
        print(f"1 TB on 8 cores at the {label}'s rate: {hours:.1f} h (the bar: 2 h)")


if __name__ == "__main__":
    main()
