"""Connected components of the verified near-duplicate graph: a cluster's representative
is its smallest id.

Large graphs use min-label propagation as plain Ray tasks (each round one shuffle of the
edges and labels, until no label changes; rounds ~ graph diameter, small in practice).
Graphs that fit one task (nearly always: edges are verified near-duplicate pairs) are
solved in that task, which gives the same answer without a dozen rounds of scheduling.
Either way the result does not depend on partitioning, block order or node count.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute

from raylm.data.blocks import apply_pandas, map_blocks, num_rows, shuffle_blocks


def _count_kind(table: pa.Table, kind: int) -> int:
    return int(pa.compute.sum(pa.compute.equal(table.column("kind"), kind)).as_py() or 0)


_LABEL, _EDGE, _MSG = 0, 1, 2


def _initial_state(df: pd.DataFrame) -> pd.DataFrame:
    """Every node labelled by itself, having just sent its id to each neighbour."""
    both = pd.concat(
        [
            pd.DataFrame({"node": df["src"], "other": df["dst"]}),
            pd.DataFrame({"node": df["dst"], "other": df["src"]}),
        ],
        ignore_index=True,
    )
    nodes = both["node"].drop_duplicates()
    return pd.concat(
        [
            both.assign(kind=_EDGE, label=both["node"]),
            pd.DataFrame({"node": both["other"], "kind": _MSG, "other": "", "label": both["node"]}),
            pd.DataFrame({"node": nodes, "kind": _LABEL, "other": "", "label": nodes}),
        ],
        ignore_index=True,
    )


def _propagate(df: pd.DataFrame) -> pd.DataFrame:
    """One round at the nodes of this partition: take the smallest label offered, pass it on."""
    labels = df[df["kind"] != _EDGE].groupby("node")["label"].min()
    old = df[df["kind"] == _LABEL].groupby("node")["label"].min().reindex(labels.index)
    changed = labels.index[(labels < old).to_numpy()]
    edges = df[df["kind"] == _EDGE]
    moving = edges[edges["node"].isin(changed)]
    out_labels = pd.DataFrame(
        {"node": labels.index, "kind": _LABEL, "other": "", "label": labels.to_numpy()}
    )
    msgs = pd.DataFrame(
        {
            "node": moving["other"].to_numpy(),
            "kind": _MSG,
            "other": "",
            "label": labels.reindex(moving["node"]).to_numpy(),
        }
    )
    return pd.concat([out_labels, edges, msgs], ignore_index=True)


def _label_dups(table: pa.Table) -> pa.Table:
    df = table.to_pandas()
    df = df[(df["kind"] == _LABEL) & (df["node"] != df["label"])]
    return pa.table(
        {
            "id": pa.array(df["node"].tolist(), pa.string()),
            "dup_of": pa.array(df["label"].tolist(), pa.string()),
            "method": pa.array(["fuzzy"] * len(df), pa.string()),
        }
    )


LOCAL_CC_MAX_EDGES = 200_000
"""Up to this many edges, connected components run in one task (see ``_local_components``)."""


def _local_components(*tables: pa.Table) -> tuple[pa.Table, int]:
    """(id, dup_of=smallest id of its component, method) for non-smallest nodes, and rounds.

    The same answer as the distributed propagation, for graphs that fit one task: min-label
    propagation over integer codes (ids in sorted order, so the smallest code is the
    smallest id) with pointer jumping, in numpy. Each distributed round is a shuffle and
    a count (~0.15 s of task scheduling on a small cluster); a few hundred near-duplicate
    pairs of long documents would otherwise spend more on rounds than on anything else.
    """
    ends = [t.column(c).to_numpy(zero_copy_only=False) for c in ("src", "dst") for t in tables]
    half = sum(t.num_rows for t in tables)
    ids, codes = np.unique(np.concatenate(ends).astype(object), return_inverse=True)
    a, b = codes[:half], codes[half:]
    label, rounds = np.arange(len(ids)), 0
    while True:
        rounds += 1
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]  # pointer jumping: a label's own label is at least as small
        if np.array_equal(new, label):
            break
        label = new
    dup = label != np.arange(len(ids))
    table = pa.table(
        {
            "id": pa.array(ids[dup].tolist(), pa.string()),
            "dup_of": pa.array(ids[label[dup]].tolist(), pa.string()),
            "method": pa.array(["fuzzy"] * int(dup.sum()), pa.string()),
        }
    )
    return table, rounds


def connected_components(
    edges: list, max_rounds: int, n_edges: int | None = None
) -> tuple[list, int]:
    """Blocks of (id, dup_of=smallest id of its component) for non-smallest nodes, and rounds.

    Small graphs (``LOCAL_CC_MAX_EDGES``) in one task, larger ones by distributed
    min-label propagation, one shuffle per round.
    """
    import ray

    n_edges = num_rows(edges) if n_edges is None else n_edges
    if n_edges <= LOCAL_CC_MAX_EDGES:
        table, rounds = ray.remote(_local_components).options(num_returns=2).remote(*edges)
        return [table], ray.get(rounds)
    state = map_blocks(edges, apply_pandas, _initial_state)
    for rounds in range(1, max_rounds + 1):
        state = shuffle_blocks(state, "node", _propagate)
        if sum(ray.get(map_blocks(state, _count_kind, _MSG))) == 0:
            return map_blocks(state, _label_dups), rounds
    raise RuntimeError(
        f"connected components did not converge in dedup.max_rounds={max_rounds} rounds"
    )
