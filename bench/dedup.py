"""Fuzzy dedup benchmark: raylm (Ray Data) vs datasketch (and rensa) on real text.

Corpus: distinct paragraphs of real text on this machine (the bundled license corpus,
/usr/share/common-licenses, docstrings of the Python standard library), plus controlled
near-duplicates (word substitutions/deletions at 1-12%) and exact copies. Ground truth
is the exact Jaccard similarity of the same word 5-gram shingle sets, from a sparse
matrix product (scipy), never from another MinHash. Quality is measured on the set of
removed documents: connected components of the pairs with Jaccard >= threshold, keeping
the smallest id per component, against each system's removed set.

Timing is end to end: read JSONL -> dedup -> write Parquet shards. raylm runs on the
local 2-CPU Ray (started once, its start-up time reported separately); the peers run
single-process. Run: ``.venv/bin/python bench/dedup.py`` (a few minutes).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from raylm.data.corpus import edit, paragraphs  # noqa: E402
from raylm.data.dedup import optimal_bands_rows, shingle_hashes  # noqa: E402

WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|\w+")


def stdlib_docstrings(min_words: int) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions: real prose."""
    out: dict[str, None] = {}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    for para in re.split(r"\n\s*\n", doc):
                        text = " ".join(para.split())
                        if len(text.split()) >= min_words:
                            out.setdefault(text, None)
    return list(out)


def doc_paragraphs(min_words: int) -> list[str]:
    """Paragraphs of the packages' copyright files: real legal prose with natural near-dups."""
    out: dict[str, None] = {}
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        for para in re.split(r"\n\s*\n", path.read_text(errors="ignore")):
            text = " ".join(para.split())
            if len(text.split()) >= min_words:
                out.setdefault(text, None)
    return list(out)


def metadata_paragraphs(min_words: int) -> list[str]:
    """Paragraphs of installed packages' METADATA/LICENSE files (project descriptions)."""
    out: dict[str, None] = {}
    site = Path(sysconfig.get_paths()["purelib"])
    skip = ("RECORD", "WHEEL", "INSTALLER", "top_level.txt", "entry_points.txt")
    for path in sorted(site.glob("*.dist-info/*")):
        if path.is_file() and not path.name.endswith(skip):
            for para in re.split(r"\n\s*\n", path.read_text(errors="ignore")):
                text = " ".join(para.split())
                if len(text.split()) >= min_words:
                    out.setdefault(text, None)
    return list(out)


def build_corpus(seed: int, dup_share: float) -> list[str]:
    rng = random.Random(seed)
    base = paragraphs(min_words=25, extra_dirs=("/usr/share/common-licenses",))
    base += doc_paragraphs(min_words=25)
    base += metadata_paragraphs(min_words=25)
    base += stdlib_docstrings(min_words=25)
    base = list(dict.fromkeys(base))
    docs = list(base)
    for text in rng.sample(base, int(len(base) * dup_share)):
        r = rng.random()
        docs.append(text if r < 0.15 else edit(text, rng, rng.uniform(0.01, 0.12)))
    rng.shuffle(docs)
    return docs


LONG_MIN_BYTES, LONG_MAX_BYTES = 8_000, 60_000


def long_documents(
    min_bytes: int = LONG_MIN_BYTES, max_bytes: int = LONG_MAX_BYTES, packages: bool = False
) -> list[str]:
    """Whole files of tens of KB: licences, packages' copyright files, stdlib modules,
    and with ``packages`` the installed packages' modules (site-packages: about 12 MB of
    long files on this machine without them, hundreds with them, vendored copies and
    versioned twins among them as natural near-duplicates).

    Long documents stress what short paragraphs hide: the per-shingle cost of MinHash
    and the size of the shingle sets that verification moves. Files over ``max_bytes``
    are cut at the last line break before it (a source file's first 60 KB is still
    one real document); distinct texts only (many copyright files are identical).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in Path("/usr/share/common-licenses").glob("*") if p.is_file())
    files += sorted(Path("/usr/share/doc").glob("*/copyright"))
    files += sorted(
        p
        for p in stdlib.rglob("*.py")
        if "test" not in p.parts and "tests" not in p.parts and "site-packages" not in p.parts
    )
    if packages:
        site = Path(sysconfig.get_paths()["purelib"])
        files += sorted(
            p for p in site.rglob("*.py") if "test" not in p.parts and "tests" not in p.parts
        )
    out: dict[str, None] = {}
    for path in files:
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        if len(text.encode()) > max_bytes:
            text = text.encode()[:max_bytes].decode(errors="ignore").rpartition("\n")[0]
        if len(text.encode()) >= min_bytes:
            out.setdefault(text, None)
    return list(out)


def build_long_corpus(
    seed: int, dup_share: float, target_mb: float, packages: bool = False
) -> list[str]:
    """About ``target_mb`` of long documents: distinct files plus controlled copies of
    ``dup_share`` of them (15 % verbatim, 85 % with 1-12 % of words edited), shuffled."""
    rng = random.Random(seed)
    base = long_documents(packages=packages)
    rng.shuffle(base)
    budget, picked = target_mb * 1e6 / (1 + dup_share), []
    for text in base:
        if budget <= 0:
            break
        picked.append(text)
        budget -= len(text.encode())
    docs = list(picked)
    for text in rng.sample(picked, int(len(picked) * dup_share)):
        r = rng.random()
        docs.append(text if r < 0.15 else edit(text, rng, rng.uniform(0.01, 0.12)))
    rng.shuffle(docs)
    return docs


def shingle_strings(text: str, n: int = 5) -> list[str]:
    words = WORD.findall(text.lower())
    if len(words) < n:
        return [" ".join(words)]
    return sorted({" ".join(words[i : i + n]) for i in range(len(words) - n + 1)})


# ---- ground truth ----------------------------------------------------------------------


def components_removed(n: int, pairs: list[tuple[int, int]]) -> set[int]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i for i in range(n) if find(i) != i}


def exact_truth(docs: list[str], threshold: float) -> set[int]:
    from scipy import sparse

    sets = [shingle_hashes(d, 5) for d in docs]
    vocab: dict[int, int] = {}
    rows, cols = [], []
    for i, s in enumerate(sets):
        for h in s.tolist():
            cols.append(vocab.setdefault(h, len(vocab)))
            rows.append(i)
    a = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), (len(docs), len(vocab))
    )
    inter = sparse.triu(a @ a.T, k=1).tocoo()
    sizes = np.asarray(a.sum(axis=1)).ravel()
    jac = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    keep = jac >= threshold
    return components_removed(
        len(docs), list(zip(inter.row[keep].tolist(), inter.col[keep].tolist(), strict=True))
    )


def score(pred: set[int], truth: set[int]) -> dict[str, float]:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 1.0
    r = tp / len(truth) if truth else 1.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


# ---- systems ---------------------------------------------------------------------------


def write_jsonl(docs: list[str], path: Path) -> None:
    with path.open("w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": f"{i:07d}", "text": d}) + "\n")


def read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    with path.open() as f:
        for line in f:
            rec = json.loads(line)
            ids.append(rec["id"])
            texts.append(rec["text"])
    return ids, texts


def run_datasketch(src: Path, out: Path, threshold: float, num_perm: int) -> set[int]:
    from datasketch import MinHash, MinHashLSH

    ids, texts = read_jsonl(src)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    pairs = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode() for s in shingle_strings(text)])
        pairs += [(int(j), i) for j in lsh.query(m)]
        lsh.insert(str(i), m)
    removed = components_removed(len(texts), pairs)
    kept = [i for i in range(len(texts)) if i not in removed]
    pq.write_table(pa.table({"id": [ids[i] for i in kept], "text": [texts[i] for i in kept]}), out)
    return removed


def run_rensa(src: Path, out: Path, threshold: float, num_perm: int) -> set[int]:
    from rensa import RMinHash, RMinHashLSH

    bands = max(
        (b for b in range(1, num_perm + 1) if num_perm % b == 0),
        key=lambda b: -_band_error(threshold, b, num_perm // b),
    )
    ids, texts = read_jsonl(src)
    lsh = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=bands)
    pairs = []
    for i, text in enumerate(texts):
        m = RMinHash(num_perm=num_perm, seed=1)
        m.update(shingle_strings(text))
        pairs += [(int(j), i) for j in lsh.query(m)]
        lsh.insert(i, m)
    removed = components_removed(len(texts), pairs)
    kept = [i for i in range(len(texts)) if i not in removed]
    pq.write_table(pa.table({"id": [ids[i] for i in kept], "text": [texts[i] for i in kept]}), out)
    return removed


def _band_error(threshold: float, b: int, r: int) -> float:
    lo, hi = np.linspace(0, threshold, 257), np.linspace(threshold, 1, 257)
    return float(np.trapezoid(1 - (1 - lo**r) ** b, lo) + np.trapezoid((1 - hi**r) ** b, hi)) / 2


def run_raylm(src: Path, out: Path, threshold: float, num_perm: int) -> set[int]:
    from raylm.data.config import DataJobConfig, DedupConfig, FilterConfig, PiiConfig
    from raylm.data.pipeline import run

    cfg = DataJobConfig(
        inputs=[str(src)],
        format="text",
        id_column="id",
        filters=FilterConfig(enabled=False, nfkc=False),
        pii=PiiConfig(enabled=False),
        dedup=DedupConfig(threshold=threshold, num_perm=num_perm),
        output_dir=str(out),
    )
    stats = run(cfg)
    print(f"  raylm stage seconds: {json.dumps(stats['seconds'])}", flush=True)
    kept = pq.read_table(out / "shards", columns=["id"]).column("id").to_pylist()
    n = sum(1 for _ in src.open())
    return set(range(n)) - {int(i) for i in kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
    parser.add_argument("--dup-share", type=float, default=0.5)
    parser.add_argument("--max-docs", type=int, default=0, help="cap the corpus (0: all)")
    parser.add_argument(
        "--corpus",
        choices=("short", "long"),
        default="short",
        help="short: paragraphs (default); long: whole files of tens of KB",
    )
    parser.add_argument("--long-mb", type=float, default=10.0, help="size of the long corpus")
    parser.add_argument(
        "--long-packages",
        action="store_true",
        help="long corpus: add the installed packages' modules (for more than ~12 MB)",
    )
    parser.add_argument("--systems", default="raylm,datasketch,rensa")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.corpus == "long":
        corpus = build_long_corpus(0, args.dup_share, args.long_mb, args.long_packages)
    else:
        corpus = build_corpus(seed=0, dup_share=args.dup_share)
    if args.max_docs:
        corpus = corpus[: args.max_docs]
    mb = sum(len(d.encode()) for d in corpus) / 1e6
    print(
        f"corpus: {len(corpus)} docs, {mb:.1f} MB; datasketch bands/rows {optimal_bands_rows(args.threshold, args.num_perm)}"
    )
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"ray.init: {time.perf_counter() - t0:.1f} s (once, not in the timings below)")
    ray.data.DataContext.get_current().enable_progress_bars = False
    wanted = args.systems.split(",")
    systems = {
        k: v
        for k, v in {"raylm": run_raylm, "datasketch": run_datasketch, "rensa": run_rensa}.items()
        if k in wanted
    }
    try:
        import rensa  # noqa: F401
    except ImportError:
        systems.pop("rensa", None)
        print("rensa not installed: skipped")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for frac in [float(f) for f in args.fractions.split(",")]:
            docs = corpus[: int(len(corpus) * frac)]
            src = Path(tmp) / f"in_{frac}.jsonl"
            write_jsonl(docs, src)
            truth = exact_truth(docs, args.threshold)
            doc_mb = sum(len(d.encode()) for d in docs) / 1e6
            for name, fn in systems.items():
                out = Path(tmp) / f"{name}_{frac}"
                out.mkdir()
                start = time.perf_counter()
                pred = fn(
                    src,
                    out if name == "raylm" else out / "kept.parquet",
                    args.threshold,
                    args.num_perm,
                )
                secs = time.perf_counter() - start
                cores = 2 if name == "raylm" else 1
                row = {
                    "fraction": frac,
                    "system": name,
                    "docs": len(docs),
                    "mb": round(doc_mb, 2),
                    "true_dups": len(truth),
                    "seconds": round(secs, 2),
                    "docs_per_s_per_core": round(len(docs) / secs / cores, 1),
                    "mb_per_s_per_core": round(doc_mb / secs / cores, 3),
                    **{k: round(v, 4) for k, v in score(pred, truth).items()},
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        "\n| fraction | docs | MB | system | seconds | docs/s/core | MB/s/core | precision | "
        "recall | F1 | speed-up vs datasketch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = next(
            (r for r in rows if r["fraction"] == row["fraction"] and r["system"] == "datasketch"),
            None,
        )
        ratio = f"{base['seconds'] / row['seconds']:.2f}x" if base else "-"
        print(
            f"| {row['fraction']:.0%} | {row['docs']} | {row['mb']} | {row['system']} | "
            f"{row['seconds']} | {row['docs_per_s_per_core']} | {row['mb_per_s_per_core']} | "
            f"{row['precision']} | {row['recall']} | {row['f1']} | {ratio} |"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
