"""`raylm generate` numbers rows in input order, however Ray Data splits and schedules them.

Each prediction and each quarantined failure carries the row id of its prompt; a wrong
number silently pairs completions with the wrong prompts.
"""

from __future__ import annotations

import pytest

from raylm.serve.batch import _with_row_ids


@pytest.mark.usefixtures("ray_connected")
def test_row_ids_follow_input_order_when_blocks_finish_out_of_order() -> None:
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = False  # the default

    def slow_first_blocks(batch: dict) -> dict:
        """Early blocks finish last, as a slow read task or a busy node would make them."""
        import time

        time.sleep(1.0 if int(batch["i"][0]) < 100 else 0.0)
        return batch

    ds = ray.data.from_items(
        [{"i": i, "text": f"prompt {i}"} for i in range(400)], override_num_blocks=40
    ).map_batches(slow_first_blocks, batch_format="numpy", num_cpus=0.25)
    rows = _with_row_ids(ds).take_all()
    assert len(rows) == 400
    assert all(r["text"] == f"prompt {r['row_id']}" for r in rows)
