"""raylm's stream batching: the first chunk is never held back, nothing is lost or reordered."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator
from types import SimpleNamespace

import pytest

from raylm.serve.server import carries_text, eager_batches, single_process_executor


async def ticking(n: int, gap_s: float, fail_at: int | None = None) -> AsyncGenerator[int, None]:
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("engine died")
        yield i
        await asyncio.sleep(gap_s)


async def collect(source: AsyncGenerator[int, None], interval_s: float | None) -> list:
    start = time.perf_counter()
    out = []
    async for batch in eager_batches(source, interval_s):
        out.append((time.perf_counter() - start, batch))
    return out


def test_first_chunk_goes_out_before_the_interval() -> None:
    out = asyncio.run(collect(ticking(6, 0.05), interval_s=1.0))
    first_at, first = out[0]
    assert first == [0]
    assert first_at < 0.5  # ray.serve.llm's Batcher would hold it for the full second
    assert [i for _, batch in out for i in batch] == list(range(6))
    assert len(out) < 6  # later chunks are batched, not sent one by one


def test_every_chunk_arrives_in_order_when_batched() -> None:
    out = asyncio.run(collect(ticking(50, 0.001), interval_s=0.02))
    assert [i for _, batch in out for i in batch] == list(range(50))
    assert all(batch for _, batch in out)


@pytest.mark.parametrize(("interval", "expected"), [(None, [[0, 1, 2]]), (0, [[0], [1], [2]])])
def test_none_collects_all_and_zero_sends_each(interval, expected) -> None:
    out = asyncio.run(collect(ticking(3, 0.0), interval_s=interval))
    assert [batch for _, batch in out] == expected


def test_engine_error_reaches_the_client_after_what_came_before() -> None:
    seen: list[int] = []

    async def run() -> None:
        async for batch in eager_batches(ticking(5, 0.01, fail_at=3), 0.005):
            seen.extend(batch)

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(run())
    assert seen == [0, 1, 2]


def test_client_going_away_stops_reading_the_engine() -> None:
    produced: list[int] = []

    async def endless() -> AsyncGenerator[int, None]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1
            await asyncio.sleep(0.001)

    async def run() -> None:
        stream = eager_batches(endless(), 0.01)
        async for _ in stream:
            break
        await stream.aclose()
        count = len(produced)
        await asyncio.sleep(0.05)
        assert len(produced) == count  # the reader task was cancelled

    asyncio.run(run())


@pytest.mark.parametrize(
    ("world_size", "backend", "expected"),
    [(1, "mp", "uni"), (2, "mp", "mp"), (1, "ray", "ray"), (4, "ray", "ray")],
)
def test_only_a_one_worker_multiprocess_engine_runs_in_process(world_size, backend, expected):
    from types import SimpleNamespace

    from raylm.serve.server import single_process_executor

    cfg = SimpleNamespace(world_size=world_size, distributed_executor_backend=backend)
    assert single_process_executor(cfg) == (expected != backend)
    assert cfg.distributed_executor_backend == expected


@pytest.mark.parametrize(
    ("world_size", "backend", "enabled", "after"),
    [
        (1, "mp", True, "uni"),  # vLLM's CPU default for one device: switched
        (1, "mp", False, "mp"),  # engine.single_process=false keeps vLLM's choice
        (2, "mp", True, "mp"),  # tensor parallel needs its worker processes
        (1, "ray", True, "ray"),  # GPU engines under Ray's executor are left alone
    ],
)
def test_single_process_executor_only_for_one_cpu_worker(
    world_size: int, backend: str, enabled: bool, after: str
) -> None:
    pc = SimpleNamespace(world_size=world_size, distributed_executor_backend=backend)
    assert single_process_executor(pc, enabled) == (after != backend)
    assert pc.distributed_executor_backend == after


def sse(choice: dict) -> str:
    return f"data: {json.dumps({'id': 'x', 'choices': [choice]})}\n\n"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (sse({"index": 0, "text": "Hello"}), True),
        (sse({"index": 0, "text": ""}), False),  # a token that decodes to nothing yet
        (sse({"index": 0, "delta": {"role": "assistant", "content": ""}}), False),
        (sse({"index": 0, "delta": {"content": "Hi"}}), True),
        (sse({"index": 0, "delta": {"reasoning_content": "hmm"}}), True),
        (sse({"index": 0, "delta": {"tool_calls": [{"index": 0}]}}), True),
        ("data: " + json.dumps({"choices": [], "usage": {"completion_tokens": 3}}) + "\n\n", False),
        ("data: [DONE]\n\n", False),
        (sse({"index": 0, "text": ""}) + sse({"index": 0, "text": "a"}), True),
        ("data: {broken\n\n", True),  # unknown shapes are never held back
        (RuntimeError("an error response object"), True),
    ],
)
def test_carries_text(item, expected: bool) -> None:
    assert carries_text(item) is expected


def test_chunks_go_out_at_once_until_the_first_text() -> None:
    """Two empty chunks (say a role chunk, then half a character), then text, then more."""
    items = ["", "", "a", "b", "c", "d", "e", "f"]

    async def source() -> AsyncGenerator[str, None]:
        for item in items:
            yield item
            await asyncio.sleep(0.05)

    async def run() -> list:
        start, out = time.perf_counter(), []
        async for batch in eager_batches(source(), 1.0, is_first_text=bool):
            out.append((time.perf_counter() - start, batch))
        return out

    out = asyncio.run(run())
    first_text_at = next(t for t, batch in out if "a" in batch)
    assert first_text_at < 0.5  # not held for the 1 s interval
    assert [b for _, b in out[:3]] == [[""], [""], ["a"]]
    assert [i for _, b in out for i in b] == items
    assert len(out) < len(items)  # batched after the first text
