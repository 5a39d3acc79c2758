"""What the replay store holds of branches: which are done, and their rows grouped by state (for analysis; the
critic's trainer reads them through afil_ray/replay/outcomes.py).

Branches live in each task's ``outcome=branch`` partition. A branch's steps are its own, from the restored state
on: ``state[0]`` is the observation it was restored to and ``chunks[0]`` (sampled at ``chunk_steps[0] == 0``) its
first chunk, the one its outcome is credited to. ``branch_group`` (parent id @ step) groups the branches of one
state, so a group is the same observation with K sampled chunks and their outcomes. The rows are plain columns
of the store's dataset, so DuckDB or pandas read them too, e.g.
``select branch_group, count(*), sum(success::int) from dataset where outcome = 'branch' group by 1``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from afil_ray.replay.shard_io import Selection, ShardCorruptError, selection_set
from afil_ray.replay.store import ReplayStore

OUTCOME = "branch"
KEY_COLUMNS = ["parent_episode_id", "branch_step", "branch_index"]
ROW_SCHEMA = pa.schema([
    pa.field("task", pa.string()),
    pa.field("branch_group", pa.string()),
    pa.field("parent_episode_id", pa.string()),
    pa.field("branch_step", pa.int32()),
    pa.field("branch_index", pa.int32()),
    pa.field("episode_id", pa.string()),
    pa.field("success", pa.bool_()),
    pa.field("length", pa.int32()),
    pa.field("first_state", pa.list_(pa.float32())),  # the restored observation's state vector
    pa.field("first_chunk", pa.list_(pa.float32())),  # the chunk sampled there, flat [H * A]
    pa.field("action_dim", pa.int32()),  # A, to reshape first_chunk to [H, A]
])


def branched_keys(store: ReplayStore, task: str) -> set[tuple[str, int, int]]:
    """(parent id, step, branch index) of every branch of ``task`` in the store, from a narrow column read."""
    keys: set[tuple[str, int, int]] = set()
    for shard in store.list_shards(task=task, outcome=OUTCOME):
        table = store.read_checked(shard.path, KEY_COLUMNS, verify=False)
        if table is None:  # gone, or damaged and now quarantined: those branches are simply made again
            continue
        cols = [table[c].to_pylist() for c in KEY_COLUMNS]
        keys |= {(p, int(s), int(i)) for p, s, i in zip(*cols, strict=True)}
    return keys


def _read(store: ReplayStore, tasks: Selection, columns: list[str]) -> pa.Table | None:
    """``columns`` of the stored branches of ``tasks`` (None: every task); None when there are none."""
    if not store.list_shards(task=tasks, outcome=OUTCOME):
        return None
    flt = ds.field("outcome") == OUTCOME
    if (wanted := selection_set(tasks)) is not None:
        flt &= ds.field("task").isin(sorted(wanted))
    table = store.dataset().to_table(columns=columns, filter=flt)
    return table if table.num_rows else None


def branch_rows(store: ReplayStore, tasks: Selection = None) -> pa.Table:
    """One row per stored branch: (task, group, parent, step, branch index, episode, success, length, restored
    state, first chunk), ordered by task, group and branch index; ``.to_pandas()`` for pandas."""
    columns = ["task", "branch_group", *KEY_COLUMNS, "episode_id", "success", "length", "state", "chunk_steps",
               "chunks", "action"]
    table = _read(store, tasks, columns)
    if table is None:
        return ROW_SCHEMA.empty_table()
    if pc.any(pc.not_equal(pc.list_element(table["chunk_steps"], 0), 0)).as_py():
        raise ShardCorruptError("a stored branch's first chunk is not sampled at its first step")
    first_action = pc.list_element(table["action"], 0)
    rows = pa.table({
        **{c: table[c] for c in ("task", "branch_group", *KEY_COLUMNS, "episode_id", "success", "length")},
        "first_state": pc.list_element(table["state"], 0),
        "first_chunk": pc.list_element(table["chunks"], 0),
        "action_dim": pc.cast(pc.list_value_length(first_action), pa.int32()),
    }).cast(ROW_SCHEMA)
    return rows.sort_by([("task", "ascending"), ("branch_group", "ascending"), ("branch_index", "ascending")])


def branch_outcomes(store: ReplayStore, tasks: Selection = None) -> pa.Table:
    """(task, branch_group, branch_index, success) of every stored branch: the narrow read that group counts need."""
    columns = ["task", "branch_group", "branch_index", "success"]
    table = _read(store, tasks, columns)
    return ROW_SCHEMA.empty_table().select(columns) if table is None else table


def group_outcomes(rows: pa.Table) -> pa.Table:
    """Per group of :func:`branch_rows` or :func:`branch_outcomes` rows: task, branch_group, branches, successes
    and whether its outcomes are mixed (the groups that contrast a good chunk with a bad one for one observation)."""
    if rows.num_rows == 0:
        return pa.table({"task": pa.array([], pa.string()), "branch_group": pa.array([], pa.string()),
                         "branches": pa.array([], pa.int64()), "successes": pa.array([], pa.int64()),
                         "mixed": pa.array([], pa.bool_())})
    counted = rows.append_column("won", pc.cast(rows["success"], pa.int64()))
    grouped = counted.group_by(["task", "branch_group"]).aggregate([("won", "count"), ("won", "sum")])
    branches, successes = grouped["won_count"], grouped["won_sum"]
    mixed = pc.and_(pc.greater(successes, 0), pc.less(successes, branches))
    out = pa.table({"task": grouped["task"], "branch_group": grouped["branch_group"], "branches": branches,
                    "successes": successes, "mixed": mixed})
    return out.sort_by([("task", "ascending"), ("branch_group", "ascending")])
