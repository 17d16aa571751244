"""Train-data benchmarks: worker memory as the corpus grows, checkpoints to S3 vs disk.

    .venv/bin/python bench/train_data.py [--rows 5000] [--scales 1,10] [--cutoff 256]
                                         [--only memory|checkpoint] [--out outputs/bench/train_data]

1. Memory per train worker (rank 0 of 2) over one epoch, the corpus at 1x and 10x
   (``--rows`` packed rows of ``--cutoff`` tokens per 1x, in the data job's shard schema
   and row groups), each case in a fresh process: peak RSS growth over the process after
   its imports and a warm-up of the code paths both cases share (Arrow compute kernels,
   the S3 client). ``in_memory`` is the path train workers took before streaming (the
   rank's slice as Python rows, as ``load_shard_rows`` held them; the driver held all
   rows on top of that); ``stream`` is ``raylm.train.stream.RankStream`` read step by step
   (8 rows a step) from local disk, and at 10x also from a local S3 server (moto).
2. Checkpoint transfer: a real ZeRO-3 checkpoint (2 ranks, a ~25M-parameter model) copied
   the way the train job moves it: upload into ``storage_path`` as Ray Train does
   (``pyarrow.fs.copy_files`` from the worker's temp dir) and download for a resume
   (``raylm.storage.copy_dir``, pyarrow's default 1 MiB chunks; and the same copy with
   64 MiB chunks), to the local disk and to the local S3 server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PER_STEP = 8


# ---- shards in the data job's schema ------------------------------------------------------
def write_shards(out: Path, rows: int, cutoff: int, files: int) -> Path:
    """``files`` packed-pt shard files of ``rows`` rows each (random token ids)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.data.shards import ROW_GROUP_ROWS

    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    offsets = pa.array(np.arange(0, (rows + 1) * cutoff, cutoff, dtype=np.int32))
    for f in range(files):
        ids = rng.integers(3, 1000, rows * cutoff, dtype=np.int32)
        pos = np.tile(np.arange(cutoff, dtype=np.int32), rows)
        table = pa.table({
            "source_ids": [[f"pt.jsonl:{f * rows + i}"] for i in range(rows)],
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(rows * cutoff, np.int8))),
            "position_ids": pa.ListArray.from_arrays(offsets, pa.array(pos)),
        })  # fmt: skip
        pq.write_table(table, shards / f"part-{f:05d}-bench.parquet", row_group_size=ROW_GROUP_ROWS)
    meta = {"task": "pt", "tokenized": True, "num_rows": rows * files, "cutoff_len": cutoff}
    (out / "dataset_meta.json").write_text(json.dumps(meta))
    return out


# ---- one measurement (its own process) ---------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _warm_up() -> None:
    """Pay the one-time costs both modes share before the baseline: Arrow's compute
    kernels (the first ``take`` alone costs ~40 MB of RSS), Parquet, numpy's RNG."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"a": [[1, 2]] * 8}), sink)
    table = pq.read_table(pa.BufferReader(sink.getvalue()))
    table.take(pa.array(np.random.default_rng(0).permutation(8))).to_pylist()


def measure(mode: str, path: str, rank: int, world: int) -> dict:
    """Peak RSS growth of one rank's data over an epoch, after imports and warm-up."""
    from raylm import storage
    from raylm.train.data import plan_shards
    from raylm.train.stream import RankStream

    _warm_up()
    storage.filesystem(path)  # a bucket's client too: its set-up is not the data's
    base = _rss()
    t0 = time.perf_counter()
    if mode == "in_memory":
        rows = _old_rank_rows(path, rank, world)
        seen = len(rows)
    else:
        stream = RankStream(plan_shards(path, "pt", None, 4), 42, rank, world)
        seen = 0
        for k in range(stream.rows_per_rank // PER_STEP):
            seen += len(stream.rows(0, k * PER_STEP, PER_STEP))
    secs = time.perf_counter() - t0
    return {"peak_growth": _peak() - base, "baseline_rss": base, "rows": seen, "seconds": secs}


def _old_rank_rows(path: str, rank: int, world: int) -> list[dict]:
    """What a worker held before streaming: its equal slice of every row, as the Python
    lists ``load_shard_rows`` built (the driver's ``read_table().to_pylist()`` of all rows,
    split by Ray Data, is left out: that was the driver's memory, not the worker's)."""
    import pyarrow.parquet as pq

    table = pq.read_table(f"{path}/shards")
    n = table.num_rows // world
    part = table.slice(rank * n, n)
    del table
    wanted = ("input_ids", "loss_mask", "position_ids")
    return [{k: r[k] for k in wanted} for r in part.to_pylist()]


def run_measure(mode: str, path: str, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--measure", mode, "--path", path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or dict(os.environ))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- a local S3 server -------------------------------------------------------------------
@contextlib.contextmanager
def s3_server(log: Path) -> Iterator[str]:
    """moto's S3 server on a free loopback port, this process's AWS env pointed at it;
    yields a bucket URI. Stopped by PID."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"], timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket="raylm-bench")
        yield "s3://raylm-bench"
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---- sections ----------------------------------------------------------------------------
def bench_memory(out: Path, rows: int, scales: list[int], cutoff: int, bucket: str | None) -> dict:
    from raylm import storage

    results: dict = {"rows_per_1x": rows, "cutoff": cutoff, "world": 2, "rank": 0}
    for scale in scales:
        local = write_shards(out / f"shards_{scale}x", rows, cutoff, scale)
        size = sum(f.stat().st_size for f in (local / "shards").glob("*.parquet"))
        case = {"parquet_bytes": size}
        for mode in ("in_memory", "stream"):
            case[mode] = run_measure(mode, str(local))
        if bucket and scale == max(scales):
            remote = storage.join(bucket, f"shards_{scale}x")
            storage.copy_dir(str(local), remote)
            case["stream_s3"] = run_measure("stream", remote)
        results[f"{scale}x"] = case
        print(json.dumps({f"{scale}x": case}), flush=True)
    return results


def bench_checkpoint(out: Path, bucket: str) -> dict:
    """Upload/download seconds of one real ZeRO-3 checkpoint: local disk vs local S3."""
    import pyarrow.fs as pafs

    from raylm import storage

    ckpt = _real_checkpoint(out)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    result: dict = {
        "checkpoint_bytes": size,
        "files": sum(1 for f in ckpt.rglob("*") if f.is_file()),
    }
    for where, root in (("local_disk", str(out / "storage")), ("s3", storage.join(bucket, "ckpt"))):
        for i in range(3):
            dst = storage.join(root, f"checkpoint_{i}")
            fs, path = storage.filesystem(dst)
            t0 = time.perf_counter()
            fs.create_dir(path, recursive=True)
            pafs.copy_files(str(ckpt), path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)  # fmt: skip
            up = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                storage.copy_dir(dst, tmp)
                down = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                pafs.copy_files(path, tmp, source_filesystem=fs, chunk_size=64 << 20,
                                destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
                big = time.perf_counter() - t0
            result.setdefault(where, []).append(
                {"save_s": round(up, 3), "load_s": round(down, 3),
                 "load_s_64mib_chunks": round(big, 3)}
            )  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def _real_checkpoint(out: Path) -> Path:
    """A ZeRO-3 checkpoint of a ~25M-parameter Llama (bench/train.py's size) from a
    1-step run of the train job, reused when present."""
    from raylm.models.tiny import TinySpec, build

    found = _checkpoints(out / "ckpt_run")
    if found:
        return found[-1]
    model = out / "model"
    if not (model / "config.json").exists():
        build(model, TinySpec(hidden_size=512, intermediate_size=1536, num_layers=6,
                              num_heads=8, num_kv_heads=8))  # fmt: skip
    _ray_checkpoint_run(model, out / "ckpt_run")
    return _checkpoints(out / "ckpt_run")[-1]


def _checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories (Ray Train also writes ``checkpoint_manager_snapshot.json``)."""
    return sorted(p for p in root.glob("*/checkpoint_*") if p.is_dir())


def _ray_checkpoint_run(model: Path, storage_path: Path) -> None:
    """One step and one checkpoint through the real train job (embedded Ray)."""
    cmd = [sys.executable, str(ROOT / "jobs/train.py"), str(ROOT / "conf/train/pt_full.yaml"),
           f"model.name_or_path={model}", f"storage_path={storage_path}", "run_name=ckpt",
           "train.max_steps=1", "checkpoint.save_steps=1"]  # fmt: skip
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/raylm/torch_extensions"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--scales", default="1,10")
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--only", choices=("memory", "checkpoint"))
    parser.add_argument("--out", default="outputs/bench/train_data")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.path, rank=0, world=2)))
        return
    out = Path(args.out).resolve()
    shutil.rmtree(out / "storage", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with s3_server(out / "moto.log") as bucket:
        if args.only in (None, "memory"):
            scales = [int(s) for s in args.scales.split(",")]
            results["memory"] = bench_memory(out, args.rows, scales, args.cutoff, bucket)
        if args.only in (None, "checkpoint"):
            results["checkpoint"] = bench_checkpoint(out, bucket)
    path = out / "results.json"  # one section re-run keeps the other's figures
    old = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(old | results, indent=2))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
