"""The streaming order of training rows (``raylm.train.stream``), on real Parquet files.

What exact resume and the sample audit rely on: the order is a function of (data, seed,
epoch); ranks get equal, disjoint slices; every row is seen once per epoch; asking for
step s cold gives what an uninterrupted run saw at step s, reading only the window(s)
that step needs.
"""

from __future__ import annotations

import itertools
import math
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.config import ConfigError, load
from raylm.train import checkpoint as ckpt
from raylm.train.data import make_plan, open_stream, plan_shards
from raylm.train.stream import RankStream, pieces_of, plan_of_table, rows_taken, stop_step

ROOT = Path(__file__).resolve().parents[2]


def write_shards(out: str, files: list[int], group: int = 10, with_id: bool = True) -> str:
    """A data job's layout: ``out/shards/part-*.parquet`` of ``files[i]`` rows each."""
    n = 0
    for i, rows in enumerate(files):
        cols = {"input_ids": [[n + j, 1] for j in range(rows)],
                "loss_mask": [[1, 1]] * rows}  # fmt: skip
        if with_id:
            cols["id"] = [f"doc{n + j}" for j in range(rows)]
        fs, path = storage.filesystem(storage.join(out, "shards", f"part-{i:05d}-x.parquet"))
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as f:
            pq.write_table(pa.table(cols), f, row_group_size=group)
        n += rows
    return out


def ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def epoch_rows(plan, seed: int, world: int, epoch: int, per_step: int) -> list[list[str]]:
    """Each rank's ids over one epoch, step by step, as the workers would read them."""
    out = []
    for rank in range(world):
        s = RankStream(plan, seed, rank, world)
        steps = s.rows_per_rank // per_step
        out.append([i for k in range(steps) for i in ids(s.rows(epoch, k * per_step, per_step))])
    return out


@pytest.fixture
def plan(tmp_path: Path):
    write_shards(str(tmp_path), [35, 27, 18])  # 80 rows, row groups of 10 (and 5, 7, 8)
    return plan_shards(str(tmp_path), "pt", None, window=2)


def test_pieces_follow_files_and_row_groups_and_max_samples_cuts(plan) -> None:
    assert plan.rows == 80 and len(plan.pieces) == 4 + 3 + 2
    assert [(p.file, p.group, p.first_row, p.rows) for p in plan.pieces[:5]] == [
        (0, 0, 0, 10), (0, 1, 10, 10), (0, 2, 20, 10), (0, 3, 30, 5), (1, 0, 0, 10),
    ]  # fmt: skip
    cut = pieces_of([[10, 10, 5], [10]], limit=23)
    assert [(p.file, p.group, p.rows) for p in cut] == [(0, 0, 10), (0, 1, 10), (0, 2, 3)]
    assert plan.columns == ("input_ids", "loss_mask", "id")


def test_order_depends_only_on_seed_and_epoch(plan) -> None:
    a = epoch_rows(plan, seed=1, world=1, epoch=0, per_step=4)
    assert a == epoch_rows(plan, seed=1, world=1, epoch=0, per_step=4)
    assert a != epoch_rows(plan, seed=1, world=1, epoch=1, per_step=4)
    assert a != epoch_rows(plan, seed=2, world=1, epoch=0, per_step=4)
    assert sorted(a[0]) == sorted(f"doc{i}" for i in range(80))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_take_equal_disjoint_slices_of_one_stream(plan, world: int) -> None:
    """Each row at most once per epoch, equal counts per rank, at most world-1 unused,
    and the ranks' slices in rank order are the world-size-independent stream."""
    per_rank = epoch_rows(plan, seed=7, world=world, epoch=3, per_step=1)
    assert len({len(r) for r in per_rank}) == 1
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) and 80 - len(flat) < world
    stream = epoch_rows(plan, seed=7, world=1, epoch=3, per_step=1)[0]
    assert flat == stream[: len(flat)]


def test_a_cold_start_at_any_step_replays_the_uninterrupted_order(plan) -> None:
    per_step = 6
    whole = RankStream(plan, 5, rank=1, world=2)
    steps = whole.rows_per_rank // per_step
    reference = [ids(whole.rows(e, k * per_step, per_step)) for e in range(2) for k in range(steps)]
    for step in range(len(reference)):
        cold = RankStream(plan, 5, rank=1, world=2)
        epoch, k = divmod(step, steps)
        assert ids(cold.rows(epoch, k * per_step, per_step)) == reference[step]
        assert cold.windows_read <= 2  # only the window(s) the step falls in, never the rest


def test_windows_shuffle_rows_across_their_row_groups_and_one_is_held(plan) -> None:
    s = RankStream(plan, 3, rank=0, world=1)
    s.rows(0, 0, 1)
    window = [plan.pieces[i] for i in s._epoch.windows[0]]
    offsets = [0, 35, 62]  # first doc number of each file
    expected = {f"doc{offsets[p.file] + p.first_row + i}" for p in window for i in range(p.rows)}
    first = ids(s.rows(0, 0, len(expected)))
    assert set(first) == expected and len(window) == 2  # the whole window, nothing else
    assert first != sorted(first, key=lambda i: int(i[3:]))  # shuffled across both groups
    s.rows(0, 40, 5)
    assert s._window is not None and s._window[:2] == (0, s._epoch.locate(40)[0])


def test_rows_without_an_id_column_get_file_and_row_ids(tmp_path: Path) -> None:
    write_shards(str(tmp_path), [12], group=5, with_id=False)
    plan = plan_shards(str(tmp_path), "pt", None, window=1)
    seen = epoch_rows(plan, seed=0, world=1, epoch=0, per_step=3)[0]
    assert sorted(seen) == sorted(f"part-00000-x.parquet:{i}" for i in range(12))


def test_shards_missing_a_needed_column_are_named(tmp_path: Path) -> None:
    write_shards(str(tmp_path), [4])
    with pytest.raises(ConfigError, match=r"part-00000-x.parquet lacks columns \['chosen_input"):
        plan_shards(str(tmp_path), "dpo", None, window=1)


def test_an_in_memory_plan_is_one_fully_shuffled_window() -> None:
    table = pa.table({"id": [str(i) for i in range(30)], "input_ids": [[i] for i in range(30)]})
    plan = pickle.loads(pickle.dumps(plan_of_table(table, shuffle_row_groups=4)))
    got = epoch_rows(plan, seed=42, world=2, epoch=0, per_step=5)
    assert sorted(got[0] + got[1]) == sorted(str(i) for i in range(30))


def test_shards_stream_from_a_bucket(s3_bucket: str, tmp_path: Path) -> None:
    """The driver plans from footers in the bucket; a worker (here: this process, as a
    Ray worker with the forwarded credentials would) streams the rows from it."""
    base = write_shards(storage.join(s3_bucket, "stream-test"), [25, 15])
    plan = plan_shards(base, "pt", 30, window=2)
    assert plan.base == f"{base}/shards" and plan.rows == 30
    got = epoch_rows(plan, seed=1, world=2, epoch=0, per_step=5)
    assert sorted(got[0] + got[1]) == sorted(f"doc{i}" for i in range(30))


def test_a_worker_gets_its_stream_from_the_plan_dataset(tiny_model: Path) -> None:
    """What build_dataset hands every rank (one pickled plan) opens as that rank's
    slice; raw rows tokenized in the driver travel inside the plan."""
    cfg = load("train", [ROOT / "conf/train/pt_full.yaml"],
               [f"model.name_or_path={tiny_model}", "data.max_samples=20"])  # fmt: skip
    from raylm.train.data import data_inputs

    plan = make_plan(cfg, data_inputs(cfg))

    class Shard:
        def iter_rows(self):
            return iter([{"plan": pickle.dumps(plan)}])

    a, b = (open_stream(Shard(), cfg, rank, 2) for rank in (0, 1))
    assert a.rows_per_rank == b.rows_per_rank == 10
    both = ids(a.rows(0, 0, 10)) + ids(b.rows(0, 0, 10))
    assert sorted(both, key=int) == [str(i) for i in range(20)]
    assert set(itertools.chain(*(r.keys() for r in a.rows(0, 0, 2)))) >= {"input_ids", "loss_mask"}


def run_ids(plan, worlds, steps: int, per_step: int, seed: int = 9) -> list[tuple[int, list]]:
    """(epoch, ids of every rank) per step, as a run whose size follows ``worlds`` reads."""
    out = []
    for step in range(steps):
        world = [w for first, w in worlds if first <= step][-1]
        ranks = [RankStream(plan, seed, r, world, per_step, worlds) for r in range(world)]
        got = [r.step(step) for r in ranks]
        out.append((got[0][0], [i for _, rows in got for i in ids(rows)]))
    return out


def test_steps_at_one_world_size_read_what_rows_reads(plan) -> None:
    s = RankStream(plan, 4, rank=1, world=2, per_step=4)
    assert s.steps_per_epoch == 10
    for step in (0, 7, 10, 23):
        epoch, rows = RankStream(plan, 4, 1, 2, 4).step(step)
        assert epoch == step // 10 and ids(rows) == ids(s.rows(epoch, step % 10 * 4, 4))


RESIZES = [((0, 2), (4, 1)), ((0, 1), (3, 2)), ((0, 2), (4, 1), (6, 2)), ((0, 3), (2, 1), (9, 2))]
"""Shrink, grow, shrink then grow back (the elastic test's run, back on two workers), and
two resizes in one epoch."""


@pytest.mark.parametrize("worlds", RESIZES)
def test_a_resized_run_takes_every_row_of_the_epoch_at_most_once(plan, worlds) -> None:
    """Elastic resume: what is left of the epoch is re-split over the new ranks, so the
    epoch of the resize sees no row twice; the next epoch starts on the whole stream."""
    steps = run_ids(plan, worlds, 40, per_step=4)
    first = [i for epoch, got in steps if epoch == 0 for i in got]
    assert len(first) == len(set(first)) and 80 - len(first) < 4 * max(w for _, w in worlds)
    second = [i for epoch, got in steps if epoch == 1 for i in got]
    assert second and len(second) == len(set(second))


def test_resized_keeps_the_history_a_checkpoint_carries(plan) -> None:
    s = RankStream(plan, 9, rank=0, world=1, per_step=4)
    assert s.resized(None, saved_world=2, step=4) == ((0, 2), (4, 1))
    again = RankStream(plan, 9, rank=0, world=1, per_step=4)
    assert again.resized([[0, 2], [4, 1]], saved_world=1, step=6) == ((0, 2), (4, 1))
    assert ids(again.step(6)[1]) == ids(s.step(6)[1])


def test_a_data_path_in_a_bucket_is_shards_or_a_raw_file_or_named(
    s3_bucket: str, tiny_model: Path
) -> None:
    from raylm.train.data import data_inputs

    def cfg(path: str):
        return load("train", [ROOT / "conf/train/pt_full.yaml"],
                    [f"model.name_or_path={tiny_model}", f"data.path={path}"])  # fmt: skip

    with pytest.raises(ConfigError, match=r"found nothing at s3://raylm-test/nowhere"):
        data_inputs(cfg(f"{s3_bucket}/nowhere"))
    raw = f"{s3_bucket}/raw/pt.jsonl"
    storage.write_bytes(raw, (ROOT / "conf/train/data/pt_demo.jsonl").read_bytes())
    source = data_inputs(cfg(raw))
    assert source["kind"] == "raw" and source["path"] == raw
    assert make_plan(cfg(raw), source).rows == 64


@pytest.mark.parametrize("worlds", RESIZES)
def test_an_epochs_run_ends_where_its_resized_epoch_ends(plan, worlds) -> None:
    """The run's length follows the epoch's rows, not the last size's steps per epoch."""
    epochs = [epoch for epoch, _ in run_ids(plan, worlds, 40, per_step=4)]
    assert stop_step(1.0, worlds, 80, 4) == epochs.index(1)
    assert stop_step(2.0, worlds, 80, 4) == epochs.index(2)


def test_stop_step_counts_epochs_as_a_run_that_never_resized_did() -> None:
    for epochs, per_step, world in itertools.product((0.3, 1.0, 1.1, 2.5, 3.0), (1, 4), (1, 3)):
        steps_per_epoch = 80 // world // per_step
        expected = math.ceil(epochs * steps_per_epoch)  # as before elastic resume
        assert stop_step(epochs, ((0, world),), 80, per_step) == expected


def test_a_fractional_epoch_honours_its_rows_across_a_resize() -> None:
    # 80 rows, 4 per rank-step. Epoch 1 starts at step 10 on 2 ranks: half of it is 5
    # steps x 8 rows = 40 rows; 3 steps (24) at 2 ranks, then 16 at 1 rank = 4 steps.
    assert stop_step(1.5, ((0, 2), (13, 1)), 80, 4) == 10 + 3 + 4
    # Shrunk in epoch 0 (16 steps in all, see above); epoch 1 at 1 rank: 10 of its 20.
    assert stop_step(1.5, ((0, 2), (4, 1)), 80, 4) == 16 + 10


def test_samples_seen_follows_the_world_sizes() -> None:
    assert rows_taken(6, ((0, 2), (4, 1)), 4) == 4 * 2 * 4 + 2 * 1 * 4
    assert rows_taken(3, ((0, 2), (4, 1)), 4) == 3 * 2 * 4
    assert rows_taken(10, ((0, 1), (3, 2), (6, 1)), 2) == 3 * 2 + 3 * 4 + 4 * 2


def test_the_history_travels_in_the_checkpoint_marker(plan, tmp_path: Path) -> None:
    """Shrink to one rank, checkpoint, grow back to two: the marker's JSON history is
    what the grown run continues, and its two ranks take the rest of the epoch."""
    one = RankStream(plan, 9, rank=0, world=1, per_step=4)
    one.resized(None, saved_world=2, step=4)
    ckpt.mark_complete(str(tmp_path), 6, 1, one.worlds)
    record = ckpt.marker(str(tmp_path))
    two = [RankStream(plan, 9, r, 2, 4) for r in range(2)]
    for s in two:
        assert s.resized(record["worlds"], record["world_size"], 6) == ((0, 2), (4, 1), (6, 2))
    expected = run_ids(plan, ((0, 2), (4, 1), (6, 2)), 8, per_step=4)
    assert [i for s in two for i in ids(s.step(7)[1])] == expected[7][1]
