"""Peak memory of the whole data job with exact and fuzzy dedup, at growing corpus sizes.

    .venv/bin/python bench/data_memory.py [--gb 0.6,3] [--object-store-gb 2] [--out DIR]

Memory is the machine's, as the issue measured it: ``total - available`` sampled every
0.2 s from before Ray starts until it is shut down, minus the idle level read just
before. That counts what every Ray process holds (driver, GCS, raylet, workers, the
object store's shared memory), which per-process RSS would double-count for shared
pages and miss for the page cache of spilled objects; it also counts anything else that
runs, so run it on a quiet machine (the load average is printed). The corpus is
bench/data_throughput.py's real-text mix (English and Chinese, short and long documents,
with the exact and near duplicates its sampling with replacement makes), written once
at the largest size; smaller sizes read a prefix of each file. The job runs on an
embedded 2-CPU Ray with its default object store (30 % of memory) or, with
``--object-store-gb``, a capped one that spills the rest to disk; each row also gives
the peak within each stage the job times (``stats.json``'s ``seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
from data_throughput import build_corpus


def used() -> int:
    vm = psutil.virtual_memory()
    return vm.total - vm.available


class Sampler(threading.Thread):
    """``used()`` every 0.2 s from start to ``stop``, off the job's threads."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples = [(time.perf_counter(), used())]
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append((time.perf_counter(), used()))

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int | None:
        return max((u for t, u in self.samples if start <= t <= end), default=None)


def stage_peaks(sampler: Sampler, start: float, seconds: dict[str, float], idle: int) -> dict:
    """Peak above idle within each stage the job timed (its laps follow one another)."""
    out = {}
    for stage, secs in seconds.items():
        peak = sampler.peak(start, start + secs)  # None: the stage took under one sample
        out[stage] = None if peak is None else round((peak - idle) / 1e9, 2)
        start += secs
    return out


def prefix(files: dict[str, Path], mb: float, out: Path) -> list[Path]:
    """The first ``mb / 4`` MB of whole lines of each file (the sizes below the largest)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, src in files.items():
        dst, budget = out / f"{name}.jsonl", mb * 1e6 / len(files)
        with src.open("rb") as f, dst.open("wb") as g:
            for line in f:
                if budget <= 0:
                    break
                g.write(line)
                budget -= len(line)
        paths.append(dst)
    return paths


def job(paths: list[Path], out: Path, object_store_gb: float) -> dict:
    import ray

    from raylm.data.config import DataJobConfig
    from raylm.data.pipeline import run

    idle = used()
    sampler = Sampler()
    sampler.start()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=int(object_store_gb * 2**30) if object_store_gb else None)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = DataJobConfig(inputs=[str(p) for p in paths], output_dir=str(out))
    start = time.perf_counter()
    stats = run(cfg)
    wall = time.perf_counter() - start
    ray.shutdown()
    sampler.stop.set()
    sampler.join()
    mb = sum(p.stat().st_size for p in paths) / 1e6
    return {
        "MB": round(mb, 1),
        "wall_s": round(wall, 1),
        "MB_s_core": round(mb / wall / 2, 2),
        "peak_above_idle_GB": round((max(u for _, u in sampler.samples) - idle) / 1e9, 2),
        "stage_peak_above_idle_GB": stage_peaks(sampler, start, stats["seconds"], idle),
        "idle_used_GB": round(idle / 1e9, 2),
        "seconds": stats["seconds"],
        "documents_in": stats["documents_in"],
        "exact_dups": stats["exact_dups"],
        "fuzzy_dups": stats["fuzzy_dups"],
        "load_avg_1m": round(os.getloadavg()[0], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", default="0.6,3", help="corpus sizes, comma-separated")
    parser.add_argument(
        "--object-store-gb", type=float, default=0, help="Ray's object store size (0: default)"
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    sizes = sorted(float(x) for x in args.gb.split(","))
    out = Path(args.out or tempfile.mkdtemp(prefix="raylm_memory_"))
    t0 = time.perf_counter()
    files = build_corpus(out / "corpus", sizes[-1] * 1000)
    print(f"corpus of {sizes[-1]} GB built in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for gb in sizes:
        paths = (
            list(files.values()) if gb == sizes[-1] else prefix(files, gb * 1000, out / f"c{gb}")
        )
        row = {"GB": gb, **job(paths, out / f"job{gb}", args.object_store_gb)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {out / 'memory.json'}")


if __name__ == "__main__":
    main()
