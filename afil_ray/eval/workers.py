"""Where evaluation units run: in this process, in spawned processes, or wherever a runner sends them.

A unit is one arm (:class:`afil_ray.eval.arms.Arm`: a sampler and a probe) on one run (all ``eval.episodes``
seeds with that run's noise) of one task of ``env.task``: ``(task, arm index, run)``. The units of every task are
spread over the workers at once, not one task after another, so that the workers (spawned processes, or Ray eval
actors on a cluster) stay busy across tasks: one arm and one run on five tasks is five units that two workers
share, where units of one task at a time would be one unit and an idle worker per task. Units come task-major
(every unit of the first task, then the next task's), and a Ray eval actor takes a pending unit of the task whose
env it holds before any other (afil_ray/driver.py), so a worker switches task only when it must.

A unit is the same computation wherever it runs (a fresh env of its task, the same seeds in the same slots,
per-episode noise), so results do not depend on how many workers there are or what kind, nor on which units ran
before: the paired protocol stays exact when it is spread out. A worker is given the whole config and builds a
fresh env for every unit, closing the previous one: a reset restores the initial state but not all of the
simulator's internal state, so on a reused env later physics depends on the units that ran there before
(docs/results.md, "Does the next chunk decide the outcome?"). Building an env takes seconds, a unit minutes. One
env at a time keeps a worker's memory that of one simulator however many tasks it serves.
Workers get the policy object itself (pickled once per worker), so they need no shared file system.

This module knows no Ray: the composition root (``afil_ray/driver.py``) hands evaluation a :data:`UnitRunner`
that places :class:`EvalWorker` s as Ray actors; without one, units run in spawned processes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import torch

from afil_ray.config import Config, ConfigError
from afil_ray.envs.base import VecEnv
from afil_ray.envs.factory import make_vec_env
from afil_ray.eval.arms import Arm
from afil_ray.eval.episodes import run_episodes
from afil_ray.process_pool import spawn_map
from afil_ray.replay.episode import Episode

Unit = tuple[str, int, int]  # (task, arm index, run)
# (cfg, policy, arms, units, workers, keep_snapshots) -> (unit, episodes) in the order of ``units``
UnitRunner = Callable[[Config, torch.nn.Module, list[Arm], list[Unit], int, bool],
                      Iterator[tuple[Unit, list[Episode]]]]


def task_units(tasks: list[str], arms: int, runs: int) -> list[Unit]:
    """Every ``(task, arm index, run)`` of ``tasks`` x ``arms`` arms x ``runs`` runs, task-major (then arm, then
    run): the order results are reported in."""
    return [(task, a, r) for task in tasks for a in range(arms) for r in range(runs)]


class EvalWorker:
    """A policy copy and the env of the task it last ran that run evaluation units of any task of ``cfg.env.task``.
    Plain class: a process or a Ray actor hosts it."""

    def __init__(self, cfg: Config, policy: torch.nn.Module, torch_threads: int = 0) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = cfg
        self.policy = policy.eval()
        self.task: str | None = None  # the task of ``env`` (None: no env open)
        self.env: VecEnv | None = None

    def run(self, task: str, arm: Arm, run: int, keep_snapshots: bool = False) -> list[Episode]:
        """Unit ``(task, arm, run)``: ``arm``'s episodes of ``run`` on ``task``'s env."""
        cfg = dataclasses.replace(self.cfg, env=self.cfg.env.for_task(task))
        self.close()  # a fresh env per unit, so that no earlier unit's simulator state reaches this one's physics
        self.env, self.task = make_vec_env(cfg.env), task
        return run_episodes(self.env, cfg, self.policy, arm, run, keep_snapshots=keep_snapshots)

    def close(self) -> None:
        if self.env is not None:
            env, self.env, self.task = self.env, None, None
            env.close()


def run_units(cfg: Config, policy: torch.nn.Module, arms: list[Arm], units: list[Unit],
              keep_snapshots: bool = False, runner: UnitRunner | None = None) -> Iterator[tuple[Unit, list[Episode]]]:
    """``(unit, episodes)`` in the order of ``units`` (so a harvest writes the same store whichever worker is
    faster), on ``eval.workers`` workers (no more than there are units, of whichever tasks): here for one, else
    through ``runner`` (processes when None). ``cfg`` names every task of ``units`` in ``env.task``."""
    workers = max(1, min(cfg.eval.workers, len(units)))
    if workers == 1:
        worker = EvalWorker(cfg, policy)
        try:
            for unit in units:
                task, arm, run = unit
                yield unit, worker.run(task, arms[arm], run, keep_snapshots)
        finally:
            worker.close()
        return
    if runner is None:
        if cfg.eval.backend == "ray":
            raise ConfigError("eval.backend=ray needs Ray eval actors, which the afil-ray command places; "
                              "called as a library, pass runner=afil_ray.driver.eval_runner")
        runner = process_units
    yield from runner(cfg, policy.to("cpu"), arms, units, workers, keep_snapshots)


_worker: EvalWorker | None = None
_arms: list[Arm] = []
_keep_snapshots = False


def _init_process(cfg: Config, policy: torch.nn.Module, torch_threads: int, arms: list[Arm],
                  keep_snapshots: bool) -> None:
    global _worker, _arms, _keep_snapshots
    _worker = EvalWorker(cfg, policy, torch_threads)
    _arms, _keep_snapshots = arms, keep_snapshots


def _run_in_process(unit: Unit) -> list[Episode]:
    assert _worker is not None
    task, arm, run = unit
    return _worker.run(task, _arms[arm], run, _keep_snapshots)


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def describe(unit: Unit, arms: list[Arm], with_task: bool = True) -> str:
    """``PullCube-v1 static:w=0.05 run 1`` (``static:w=0.05 run 1`` without the task): a unit as progress bars and
    error messages name it."""
    task, arm, run = unit
    return f"{task + ' ' if with_task else ''}{arms[arm].name} run {run}"


def process_units(cfg: Config, policy: torch.nn.Module, arms: list[Arm], units: list[Unit],
                  workers: int, keep_snapshots: bool) -> Iterator[tuple[Unit, list[Episode]]]:
    """The units on ``workers`` spawned processes, each with its own policy copy and one env at a time."""
    def crash(unit: Unit) -> str:
        return (f"an eval worker died (a simulator crash) while running unit ({describe(unit, arms)}) or another in "
                "flight; re-run the evaluation")

    init = (cfg, policy, _threads_per_worker(workers), arms, keep_snapshots)
    yield from spawn_map(_run_in_process, units, workers=workers, initializer=_init_process, initargs=init,
                         crash_message=crash)
