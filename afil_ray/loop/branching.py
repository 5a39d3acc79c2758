"""The loop's branch worker: matched-state branches from the rollouts the loop keeps storing, with the newest weights.

Each round it asks its weight source for a newer version, then branches (``afil_ray.branches``) the stored rollouts
of one task after another, at most ``loop.branch_states_per_round`` states per task and call, until the round's
time is up or no task has states left to branch; the branches go to the store, where the learner (in
``train.mode=critic``) picks them up as the critic's contrast data. A policy with a critic chooses the open states
by its V (``branches.open_low``..``open_high``), so the states branched follow the critic as it learns. Each task's
simulator is built on first use and kept. Branching is resumable per branch, so a restarted worker loses at most
the branches it was rolling out.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from afil_ray.branches import branch_task, critic_scorer
from afil_ray.config import Config
from afil_ray.envs.base import VecEnv
from afil_ray.envs.factory import make_vec_env
from afil_ray.loop.board import WeightSource
from afil_ray.loop.weights import actor_policy, apply
from afil_ray.replay.store import ReplayStore


@dataclass
class BranchRoundReport:
    """What one ``run`` call branched; the driver turns it into TensorBoard scalars."""

    worker: int
    seconds: float
    version: int
    states: int = 0
    branches: int = 0
    successes: int = 0
    mixed: int = 0  # of this round's states, those whose branches have both outcomes
    idle: bool = False  # no task had states left to branch
    per_task: dict[str, int] = field(default_factory=dict)  # task -> branches this round


class BranchWorker:
    """Plain class; ``actors.branch.BranchActor`` is its Ray shell."""

    def __init__(self, cfg: Config, index: int, weights: WeightSource, *, make_env: Any = make_vec_env) -> None:
        self.cfg, self.index, self.weights, self.make_env = cfg, index, weights, make_env
        self.policy = actor_policy(cfg)
        self.version = 0
        self.store = ReplayStore.from_config(cfg.replay)
        # branches roll out the success head as it is (the contrast of its own chunks), whatever the actors use
        self.task_cfgs = {t: dataclasses.replace(cfg, env=cfg.env.for_task(t),
                                                 sampler=dataclasses.replace(cfg.sampler, kind="success_only"),
                                                 branches=dataclasses.replace(
                                                     cfg.branches, max_states=cfg.loop.branch_states_per_round))
                          for t in cfg.env.tasks}
        self.envs: dict[str, VecEnv] = {}
        self._next_task = 0
        self._poll(block=True)

    def _poll(self, block: bool = False) -> None:
        packet = self.weights.poll(self.version, block=block)
        if packet is not None:
            apply(self.policy, packet)
            self.version = packet.version

    def _env(self, task: str) -> VecEnv:
        if task not in self.envs:
            self.envs[task] = self.make_env(self.task_cfgs[task].env)
        return self.envs[task]

    def run(self, seconds: float) -> BranchRoundReport:
        """Branch for about ``seconds`` (a call in progress finishes its states); returns what it made."""
        t0 = time.perf_counter()
        report = BranchRoundReport(worker=self.index, seconds=0.0, version=self.version)
        tasks = list(self.task_cfgs)
        empty = 0
        while time.perf_counter() - t0 < seconds and empty < len(tasks):
            self._poll()
            task = tasks[self._next_task % len(tasks)]
            self._next_task += 1
            scorer = critic_scorer(self.policy.v) if self.policy.critic is not None else None
            done = branch_task(self.task_cfgs[task], self.policy, self.store, scorer=scorer, progress=False,
                               policy_version=self.version, env=self._env(task),
                               extra={"branch_worker": self.index})
            empty = empty + 1 if done.branches == 0 else 0
            report.states += done.states
            report.branches += done.branches
            report.successes += done.successes
            report.mixed += done.mixed
            report.per_task[task] = report.per_task.get(task, 0) + done.branches
        report.idle = empty >= len(tasks)
        if report.idle:  # nothing to branch yet: wait for the rollouts instead of re-reading the store at once
            time.sleep(max(0.0, min(1.0, seconds - (time.perf_counter() - t0))))
        report.seconds = time.perf_counter() - t0
        report.version = self.version
        return report

    def close(self) -> None:
        for env in self.envs.values():
            env.close()
        self.envs = {}
