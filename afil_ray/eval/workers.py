"""Where evaluation units run: in this process, in spawned processes, or wherever a runner sends them.

A unit is one arm (:class:`afil_ray.eval.arms.Arm`: a sampler and a probe) on one run (all ``eval.episodes``
seeds with that run's noise). A unit is the same computation wherever it runs (its own env, the same seeds in
the same slots, per-episode noise), so results do not depend on how many workers there are or what kind: the
paired protocol stays exact when it is spread out.
Workers get the policy object itself (pickled once per worker), so they need no shared file system.

This module knows no Ray: the composition root (``afil_ray/driver.py``) hands evaluation a :data:`UnitRunner`
that places :class:`EvalWorker` s as Ray actors; without one, units run in spawned processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from afil_ray.config import Config, ConfigError
from afil_ray.envs.factory import make_vec_env
from afil_ray.eval.arms import Arm
from afil_ray.eval.episodes import run_episodes
from afil_ray.process_pool import spawn_map
from afil_ray.replay.episode import Episode

Unit = tuple[int, int]  # (arm index, run)
# (cfg, policy, arms, units, workers, keep_snapshots) -> (unit, episodes) in the order of ``units``
UnitRunner = Callable[[Config, torch.nn.Module, list[Arm], list[Unit], int, bool],
                      Iterator[tuple[Unit, list[Episode]]]]


class EvalWorker:
    """An env and a policy copy that run evaluation units. Plain class: a process or a Ray actor hosts it."""

    def __init__(self, cfg: Config, policy: torch.nn.Module, torch_threads: int = 0) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = cfg
        self.policy = policy.eval()
        self.env = make_vec_env(cfg.env)

    def run(self, arm: Arm, run: int, keep_snapshots: bool = False) -> list[Episode]:
        return run_episodes(self.env, self.cfg, self.policy, arm, run, keep_snapshots=keep_snapshots)

    def close(self) -> None:
        self.env.close()


def run_units(cfg: Config, policy: torch.nn.Module, arms: list[Arm], units: list[Unit],
              keep_snapshots: bool = False, runner: UnitRunner | None = None) -> Iterator[tuple[Unit, list[Episode]]]:
    """``(unit, episodes)`` in the order of ``units`` (so a harvest writes the same store whichever worker is
    faster), on ``eval.workers`` workers: here for one, else through ``runner`` (processes when None)."""
    workers = max(1, min(cfg.eval.workers, len(units)))
    if workers == 1:
        worker = EvalWorker(cfg, policy)
        try:
            for unit in units:
                yield unit, worker.run(arms[unit[0]], unit[1], keep_snapshots)
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
    return _worker.run(_arms[unit[0]], unit[1], _keep_snapshots)


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def process_units(cfg: Config, policy: torch.nn.Module, arms: list[Arm], units: list[Unit],
                  workers: int, keep_snapshots: bool) -> Iterator[tuple[Unit, list[Episode]]]:
    """The units on ``workers`` spawned processes, each with its own env and policy copy."""
    def crash(unit: Unit) -> str:
        return (f"an eval worker for {cfg.env.task} died (a simulator crash) while running unit (arm {unit[0]}, run "
                f"{unit[1]}) or another in flight; re-run the evaluation")

    init = (cfg, policy, _threads_per_worker(workers), arms, keep_snapshots)
    yield from spawn_map(_run_in_process, units, workers=workers, initializer=_init_process, initargs=init,
                         crash_message=crash)
