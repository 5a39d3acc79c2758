"""``afil-ray branch`` for one task: matched-state branches from the store's rollouts, written back into it.

Parents are the task's stored episodes of ``branches.from_outcomes``. Which of their states are chosen is
``states.py``; each chosen state gets ``branches.per_state`` branches (``rollout.py``), stored as ``branch`` episodes
(``records.py``). Resumable: a branch whose (parent, step, index) is in the store is never rolled out again, so a
killed run finishes its interrupted groups and goes on, and a larger ``per_state`` or ``states_per_episode`` adds
only what is missing. Parents are found from a narrow column read; a parent's full episode (snapshots, the bulk of
the store) is read, a shard at a time, only when it has branches to make.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from afil_ray.branches.records import branch_outcomes, branched_keys, group_outcomes
from afil_ray.branches.rollout import BranchJob, BranchRunner
from afil_ray.branches.states import Scorer, choose_steps, eligible_steps, open_points
from afil_ray.config import Config, ConfigError
from afil_ray.envs.base import VecEnv
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.tasks import get_task
from afil_ray.replay.episode import table_to_episodes
from afil_ray.replay.shard_io import ShardFile
from afil_ray.replay.store import ReplayStore
from afil_ray.rollout import ChunkPolicy
from afil_ray.run_id import new_run_id

_NARROW = ["episode_id", "length", "snapshot_steps", "chunk_steps", "obs_mode", "control_mode"]


@dataclass
class BranchReport:
    task: str
    parents: int = 0  # parents with branches to make in this call
    states: int = 0  # states (groups) branched in this call
    branches: int = 0
    successes: int = 0
    mixed: int = 0  # of this call's groups, those whose branches (earlier ones included) have both outcomes
    done_before: int = 0  # groups in the store before this call
    other_modes: int = 0  # parents recorded in another obs or control mode than env's (cannot be restored here)
    seconds: float = 0.0
    groups: list[str] = field(default_factory=list)  # this call's groups

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.branches if self.branches else None

    def summary(self) -> str:
        rate = "-" if self.success_rate is None else f"{self.success_rate:.2f}"
        other = f"; {self.other_modes} parents in another obs/control mode skipped" if self.other_modes else ""
        return (f"{self.task}: branched {self.states} states of {self.parents} episodes: {self.branches} branches, "
                f"success {rate}, {self.mixed} of {self.states} groups mixed ({self.done_before} groups from "
                f"earlier runs; {self.seconds:.0f} s){other}")


Started = dict[int, set[int]]  # a parent's step -> branch indices of it already in the store


def _pending(cfg: Config, store: ReplayStore, task: str, done: set[tuple[str, int, int]], scorer: Scorer | None,
             limit: int, report: BranchReport) -> tuple[list[ShardFile], dict[str, Started]]:
    """Shards holding parents with branches to make, and those parents with their started states (from a narrow
    column read)."""
    bc, env = cfg.branches, cfg.env
    started: dict[str, Started] = defaultdict(lambda: defaultdict(set))
    for parent, step, index in done:
        started[parent][step].add(index)
    want = set(range(bc.per_state))
    quota = bc.states_per_episode
    shards, parents = [], {}
    for shard in store.list_shards(task=task, outcome=list(bc.from_outcomes)):
        table = store.read_checked(shard.path, _NARROW, verify=False)
        if table is None:  # gone, or damaged and now quarantined
            continue
        rows = table.to_pylist()
        for row in rows:
            steps = eligible_steps(row["snapshot_steps"] or [], row["chunk_steps"] or [], min(row["length"], limit))
            if not steps:
                continue
            if (row["obs_mode"], row["control_mode"]) != (env.obs_mode, env.control_mode):
                report.other_modes += 1
                continue
            pid = row["episode_id"]
            begun = {s: idx for s, idx in started.get(pid, {}).items() if s in steps}
            if scorer is None:  # the chosen states are known without the episode
                work = any(want - begun.get(s, set()) for s in choose_steps(pid, steps, bc, started=begun))
            else:  # open states are known only once scored: any unfinished group, or room for a new one
                resumed = choose_steps(pid, steps, bc, started=begun, is_open=lambda _: False)
                work = any(want - begun[s] for s in resumed) or (
                    len(resumed) < (quota or len(steps)) and len(begun) < len(steps))
            if work:
                parents[pid] = begun
                if not shards or shards[-1] is not shard:
                    shards.append(shard)
    return shards, parents


def _jobs(cfg: Config, store: ReplayStore, shards: list[ShardFile], parents: dict[str, Started],
          scorer: Scorer | None, limit: int, report: BranchReport) -> Iterator[BranchJob]:
    """The branches to make, a parent's states in step order and each state's missing indices in order, reading
    one parent shard at a time; stops adding states at ``branches.max_states``."""
    bc = cfg.branches
    for shard in shards:
        table = store.read_checked(shard.path)
        for parent in table_to_episodes(table) if table is not None else ():
            started = parents.get(parent.episode_id)
            if started is None:
                continue
            counted = False
            for point in open_points(parent, bc, scorer, started=started, limit=limit):
                missing = [k for k in range(bc.per_state) if k not in started.get(point.step, set())]
                if not missing:
                    continue
                if bc.max_states is not None and report.states >= bc.max_states:
                    return
                report.states += 1
                report.groups.append(point.group)
                if not counted:
                    report.parents += 1
                    counted = True
                for k in missing:
                    yield BranchJob(point, k)


def branch_task(cfg: Config, policy: ChunkPolicy, store: ReplayStore | None = None, *, scorer: Scorer | None = None,
                progress: bool = True, policy_version: int = -1, extra: dict[str, Any] | None = None,
                env: VecEnv | None = None) -> BranchReport:
    """Branch the stored rollouts of ``cfg.env.task`` (one task) with ``policy``; returns what was done.
    ``env``: a simulator of that task to branch in, which the caller keeps (the loop's branch worker reuses one
    across calls); None: one is built and closed here."""
    if len(cfg.env.tasks) != 1:
        raise ConfigError(f"env.task: branch_task runs one task, got {cfg.env.tasks}")
    store = store or ReplayStore.from_config(cfg.replay)
    task = cfg.env.tasks[0]
    report = BranchReport(task=task)
    t0 = time.time()
    limit = cfg.env.max_episode_steps or get_task(task).max_episode_steps  # states at or past it have no budget
    done = branched_keys(store, task)
    report.done_before = len({(p, s) for p, s, _ in done})
    shards, parents = _pending(cfg, store, task, done, scorer, limit, report)
    if not parents:
        report.seconds = time.time() - t0
        return report
    bar = tqdm(desc=f"branch {task}", unit="branch", disable=not progress, dynamic_ncols=True)
    owned = env is None
    env = make_vec_env(cfg.env) if owned else env
    writer = store.writer(run_id=cfg.run_id or new_run_id("branch"))
    try:
        runner = BranchRunner(env, policy, cfg.sampler, seed=cfg.branches.seed, policy_version=policy_version,
                              extra=extra)
        for episode in runner.run(_jobs(cfg, store, shards, parents, scorer, limit, report)):
            writer.add(episode)
            report.branches += 1
            report.successes += episode.success
            if report.branches % 16 == 0:
                writer.flush()
            bar.update(1)
            bar.set_postfix(states=report.states, success=f"{report.successes / report.branches:.2f}")
    finally:
        writer.close()
        if owned:
            env.close()
        bar.close()
    if report.groups:
        groups = group_outcomes(branch_outcomes(store, task))
        mine = groups.filter(pc.is_in(groups["branch_group"], value_set=pa.array(report.groups, pa.string())))
        report.mixed = int(pc.sum(pc.cast(mine["mixed"], "int64")).as_py() or 0)
    report.seconds = time.time() - t0
    return report
