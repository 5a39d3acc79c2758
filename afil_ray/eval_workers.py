"""Where evaluation units run: in this process, in spawned processes, or in Ray eval actors.

A unit is one arm on one run (all ``eval.episodes`` seeds with that run's noise). A unit is the same
computation wherever it runs (its own env, the same seeds in the same slots, per-episode noise), so results do
not depend on how many workers there are or what kind: the paired protocol stays exact when it is spread out.
Workers get the policy object itself (pickled once per worker), so they need no shared file system.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import torch

from afil_ray.config import Config, ConfigError, SamplerConfig
from afil_ray.envs.maniskill import ManiSkillVecEnv
from afil_ray.process_pool import spawn_map
from afil_ray.replay.episode import Episode

BACKENDS = ("auto", "processes", "ray")
Unit = tuple[int, int]  # (arm index, run)


class EvalWorker:
    """An env and a policy copy that run evaluation units. Plain class: a process or a Ray actor hosts it."""

    def __init__(self, cfg: Config, policy: torch.nn.Module, torch_threads: int = 0) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.cfg = cfg
        self.policy = policy.eval()
        self.env = ManiSkillVecEnv(cfg.env)

    def run(self, sampler: SamplerConfig, run: int, keep_snapshots: bool = False) -> list[Episode]:
        from afil_ray.evaluate import run_episodes

        return run_episodes(self.env, self.cfg, self.policy, sampler, run, keep_snapshots=keep_snapshots)

    def close(self) -> None:
        self.env.close()


def resolve_backend(cfg: Config) -> str:
    """``ray`` when asked, or (auto) when a Ray cluster is attached; ``processes`` otherwise."""
    backend = cfg.eval.backend
    if backend not in BACKENDS:
        raise ConfigError(f"eval.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    import ray

    return "ray" if ray.is_initialized() or os.environ.get("RAY_ADDRESS") else "processes"


def run_units(cfg: Config, policy: torch.nn.Module, samplers: list[SamplerConfig], units: list[Unit],
              keep_snapshots: bool = False) -> Iterator[tuple[Unit, list[Episode]]]:
    """``(unit, episodes)`` in the order of ``units`` (so a harvest writes the same store whichever worker is
    faster), on ``eval.workers`` workers of the resolved backend."""
    workers = max(1, min(cfg.eval.workers, len(units)))
    if workers == 1:
        worker = EvalWorker(cfg, policy)
        try:
            for unit in units:
                yield unit, worker.run(samplers[unit[0]], unit[1], keep_snapshots)
        finally:
            worker.close()
        return
    policy = policy.to("cpu")
    if resolve_backend(cfg) == "ray":
        yield from _ray_units(cfg, policy, samplers, units, workers, keep_snapshots)
    else:
        yield from _process_units(cfg, policy, samplers, units, workers, keep_snapshots)


_worker: EvalWorker | None = None
_samplers: list[SamplerConfig] = []
_keep_snapshots = False


def _init_process(cfg: Config, policy: torch.nn.Module, torch_threads: int, samplers: list[SamplerConfig],
                  keep_snapshots: bool) -> None:
    global _worker, _samplers, _keep_snapshots
    logging.getLogger("mani_skill").setLevel(logging.ERROR)
    _worker = EvalWorker(cfg, policy, torch_threads)
    _samplers, _keep_snapshots = samplers, keep_snapshots


def _run_in_process(unit: Unit) -> list[Episode]:
    assert _worker is not None
    return _worker.run(_samplers[unit[0]], unit[1], _keep_snapshots)


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _process_units(cfg: Config, policy: torch.nn.Module, samplers: list[SamplerConfig], units: list[Unit],
                   workers: int, keep_snapshots: bool) -> Iterator[tuple[Unit, list[Episode]]]:
    def crash(unit: Unit) -> str:
        return (f"an eval worker for {cfg.env.task} died (a simulator crash) while running unit (arm {unit[0]}, run "
                f"{unit[1]}) or another in flight; re-run the evaluation")

    init = (cfg, policy, _threads_per_worker(workers), samplers, keep_snapshots)
    yield from spawn_map(_run_in_process, units, workers=workers, initializer=_init_process, initargs=init,
                         crash_message=crash)


def _ray_units(cfg: Config, policy: torch.nn.Module, samplers: list[SamplerConfig], units: list[Unit],
               workers: int, keep_snapshots: bool) -> Iterator[tuple[Unit, list[Episode]]]:
    import ray

    from actors.evaluator import EvalUnitActor

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    threads = max(1, int(cfg.eval.worker_cpus))
    policy_ref = ray.put(policy)
    actors = [EvalUnitActor.options(num_cpus=cfg.eval.worker_cpus, num_gpus=cfg.eval.worker_gpus)
              .remote(cfg, policy_ref, threads) for _ in range(workers)]
    pending = list(units)
    in_flight: dict[ray.ObjectRef, tuple[Unit, object]] = {}

    def submit(actor: object) -> None:
        if pending:
            unit = pending.pop(0)
            in_flight[actor.run.remote(samplers[unit[0]], unit[1], keep_snapshots)] = (unit, actor)  # type: ignore[attr-defined]

    held: dict[Unit, list[Episode]] = {}  # finished before an earlier unit
    order = iter(units)
    next_unit = next(order, None)
    try:
        for actor in actors:
            submit(actor)
        while in_flight:
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            unit, actor = in_flight.pop(done)
            submit(actor)
            held[unit] = ray.get(done)
            while next_unit is not None and next_unit in held:
                yield next_unit, held.pop(next_unit)
                next_unit = next(order, None)
    finally:
        for actor in actors:
            ray.kill(actor)
