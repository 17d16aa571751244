"""Cost of line dedup's block work (raylm.data.line_dedup), one core, no Ray.

    .venv/bin/python bench/data_line_dedup.py

The same demo-data mix as bench/data_filters_guides.py, one block: the record stage
(parse, normalise, PII, sign) for scale, then line dedup's two passes over the block:
hashing the lines and counting them (here in one process; the job shuffles the hashes),
then cutting the frequent ones and re-signing the changed documents. ``max_docs=1``, so
every line found in two documents is cut: far more than boilerplate on real web text.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def main() -> None:
    import pyarrow as pa
    from data_filters_guides import corpus

    from raylm.data import line_dedup, steps
    from raylm.data.config import DataJobConfig, DedupConfig, FilterConfig, LineDedupConfig

    texts = corpus()
    raw = [
        {
            "id": f"x:{i}",
            "source": "x",
            "raw": json.dumps({"text": t}, ensure_ascii=False),
            "nbytes": len(t.encode()),
            "fmt": "text",
            "columns": "{}",
            "error": "",
        }
        for i, t in enumerate(texts)
    ]
    mb = sum(r["nbytes"] for r in raw) / 1e6
    for fuzzy in (False, True):
        cfg = DataJobConfig(
            inputs=["x"],
            format="text",
            filters=FilterConfig(enabled=False),
            dedup=DedupConfig(fuzzy=fuzzy),
            line_dedup=LineDedupConfig(enabled=True, max_docs=1),
        )
        t0 = time.perf_counter()
        block, _ = steps.process_block(pa.Table.from_pylist(raw), cfg, "pt")
        t1 = time.perf_counter()
        freq = line_dedup.frequent_units_local(block, 1)
        t2 = time.perf_counter()
        _, st = line_dedup.cut_block(block, freq, cfg)
        t3 = time.perf_counter()
        print(
            f"fuzzy={fuzzy} {mb:.2f} MB: record stage {mb / (t1 - t0):.2f} MB/s, "
            f"line keys+count {mb / (t2 - t1):.1f} MB/s, "
            f"cut+resign {mb / (t3 - t2):.1f} MB/s {st}"
        )


if __name__ == "__main__":
    main()
