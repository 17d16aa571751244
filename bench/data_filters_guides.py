"""Record-stage cost of the guides' filters (raylm.data.guide_filters), one core.

    .venv/bin/python bench/data_filters_guides.py [--repeat 3] [--blocklist-words 5000]

The text mix is the LLaMA-Factory demo data in tests/assets: English web pages
(c4_demo), Wikipedia (wiki_demo), Chinese instructions and answers (alpaca_zh_demo),
the same Chinese converted to Traditional (OpenCC s2t) and a copy with emoji. It times
``filters.first_failure`` over every document with the default filters and with the
guides' filters added (Simplified share, emoji, mean line length, a blocklist of
``--blocklist-words`` words), and each guides' filter alone, in MB/s of UTF-8 text.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests/assets/llamafactory/data"


def corpus() -> list[str]:
    from opencc import OpenCC

    c4 = [json.loads(line)["text"] for line in (DATA / "c4_demo.jsonl").open()]
    wiki = [line for line in (DATA / "wiki_demo.txt").read_text().splitlines() if line.strip()]
    zh = [
        f"{r['instruction']}\n{r['input']}\n{r['output']}".strip()
        for r in json.loads((DATA / "alpaca_zh_demo.json").read_text())
    ]
    s2t = OpenCC("s2t")
    trad = [s2t.convert(t) for t in zh[:300]]
    rng = random.Random(0)
    emoji = [t + rng.choice(["🙂", "👍🏽", "🇨🇳", "❤️"]) for t in zh[300:600]]
    return c4 + wiki + zh + trad + emoji


def rate(texts: list[str], cfg, repeat: int) -> tuple[float, dict[str, int]]:
    from collections import Counter

    from raylm.data import filters

    mb = sum(len(t.encode()) for t in texts) / 1e6
    best, reasons = float("inf"), Counter()
    for _ in range(repeat):
        start = time.perf_counter()
        reasons = Counter(filters.first_failure(t, cfg) for t in texts)
        best = min(best, time.perf_counter() - start)
    return mb / best, {str(k): v for k, v in reasons.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--blocklist-words", type=int, default=5000)
    args = parser.parse_args()
    from raylm.data import guide_filters
    from raylm.data.config import FilterConfig

    texts = corpus()
    rng = random.Random(1)
    vocab = sorted({w.lower() for t in texts[:500] for w in t.split() if w.isalpha()})
    words = rng.sample(vocab, min(len(vocab), args.blocklist_words // 2))
    words += [
        "".join(rng.choice("的一是不了人我在有他这中大来上国个到说们为") for _ in range(3))
        for _ in range(args.blocklist_words - len(words))
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(words))
    guides = {
        "min_simplified_ratio": 0.95,
        "max_emoji": 0,
        "min_mean_line_chars": 10,
        "max_mean_line_chars": 800,
        "blocklist": [f.name],
        "max_blocklist_hits": 1000,
    }
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{len(texts)} documents, {mb:.2f} MB, blocklist of {len(words)} words")
    base, reasons = rate(texts, FilterConfig(), args.repeat)
    print(f"defaults: {base:.2f} MB/s  {reasons}")
    blocked = guide_filters.load_blocklist((f.name,))
    for name, fn in (
        ("simplified_ratio", guide_filters.simplified_ratio),
        ("emoji_count", guide_filters.emoji_count),
        ("mean_line_chars", guide_filters.mean_line_chars),
        ("blocklist.hits", blocked.hits),
    ):
        fn(texts[0])  # tables and automaton built outside the timing
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            for t in texts:
                fn(t)
            best = min(best, time.perf_counter() - start)
        print(f"{name}: {mb / best:.1f} MB/s on every document ({best / mb * 1e3:.1f} ms/MB)")
    full, reasons = rate(texts, FilterConfig(**guides), args.repeat)
    print(f"defaults + guides: {full:.2f} MB/s  {reasons}")


if __name__ == "__main__":
    main()
