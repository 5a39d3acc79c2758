"""``afil-ray demos``: fill the replay store with successful demonstrations (ManiSkill's motion planners, LIBERO's
scripted controller: afil_ray/demos/planner.py), in parallel and resumably.

Seeds are tried in order from ``demos.seed_start``. A seed already in the store (as a demo) or recorded as a
failed attempt is never tried again, so re-running with a larger ``--num`` adds only what is missing, and a run
killed part-way loses at most the demos not yet flushed (their seeds are simply tried again).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.dataset as ds
from tqdm import tqdm

from afil_ray.config import Config
from afil_ray.demos.planner import DemoMaker, DemoResult, demo_source
from afil_ray.envs.checks import check_runnable
from afil_ray.envs.tasks import get_task
from afil_ray.process_pool import spawn_map
from afil_ray.replay.ledger import AttemptLedger
from afil_ray.replay.store import ReplayStore
from afil_ray.run_id import new_run_id

log = logging.getLogger(__name__)
_FAILURES_KIND = "demo_failures"  # seeds without a demo, under <store>/_meta/


@dataclass
class DemoReport:
    task: str
    wanted: int
    existing: int
    added: int = 0
    failures: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    seconds: float = 0.0
    gave_up: int = 0  # consecutive failed seeds after which the run stopped short (0: it did not)

    @property
    def total(self) -> int:
        return self.existing + self.added

    def summary(self) -> str:
        tried = self.added + sum(self.failures.values())
        lines = [f"{self.task}: {self.total}/{self.wanted} demos in the store ({self.existing} before, "
                 f"{self.added} added from {tried} seeds tried in {self.seconds:.0f} s)"]
        if self.lengths:
            ls = sorted(self.lengths)
            lines.append(f"  added demo length: min {ls[0]}, median {ls[len(ls) // 2]}, max {ls[-1]}")
        for reason, n in self.failures.most_common():
            lines.append(f"  dropped {n}: {reason}")
        if self.gave_up:
            lines.append(f"  stopped short: the last {self.gave_up} seeds tried all failed (demos.give_up_after)")
        return "\n".join(lines)


def existing_demo_seeds(store: ReplayStore, task: str) -> set[int]:
    """Seeds of ``task``'s demos in the store made by its demonstrator (other sources' seeds mean other things)."""
    if not store.list_shards(task=task, outcome="demo"):
        return set()
    source = demo_source(get_task(task))
    flt = (ds.field("task") == task) & (ds.field("outcome") == "demo") & (ds.field("source") == source)
    return set(store.dataset().to_table(columns=["seed"], filter=flt)["seed"].to_pylist())


_worker_maker: DemoMaker | None = None


def _worker_init(cfg: Config) -> None:
    global _worker_maker
    _worker_maker = DemoMaker(cfg.env, cfg.demos)


def _worker_make(seed: int) -> DemoResult:
    assert _worker_maker is not None
    return _worker_maker.make(seed)


def generate_demos(cfg: Config, store: ReplayStore | None = None, progress: bool = True) -> DemoReport:
    """Add demos for ``cfg.env.task`` until the store holds ``cfg.demos.num`` of them."""
    check_runnable("env.task", cfg.env.task, planner=True)  # here, not as a worker that dies
    store = store or ReplayStore.from_config(cfg.replay)
    task, want = cfg.env.task, cfg.demos.num
    have = existing_demo_seeds(store, task)
    failures = AttemptLedger(store, _FAILURES_KIND, task, key="seed")
    done = have | set(failures.known())
    report = DemoReport(task=task, wanted=want, existing=len(have))
    need = want - len(have)
    if need <= 0:
        return report
    seeds: Iterator[int] = (s for s in itertools.count(cfg.demos.seed_start) if s not in done)
    t0 = time.time()
    bar = tqdm(total=need, desc=f"demos {task}", unit="demo", disable=not progress, dynamic_ncols=True)
    writer = store.writer(run_id=cfg.run_id or new_run_id("demos"))
    failed_in_a_row = 0
    try:
        for result in _results(cfg, seeds, need):
            failed_in_a_row = 0 if result.episode is not None else failed_in_a_row + 1
            if result.episode is not None:
                if report.added >= need:
                    continue  # an over-produced seed: not recorded, tried again if ever needed
                writer.add(result.episode)
                report.added += 1
                report.lengths.append(result.episode.length)
                bar.update(1)
            else:
                failures.add({"seed": result.seed, "reason": result.reason,
                              "planner_steps": result.planner_steps})
                report.failures[result.reason.split(":")[0]] += 1
            if (report.added + sum(report.failures.values())) % cfg.demos.flush_every == 0:
                writer.flush()
                failures.save()
            bar.set_postfix(dropped=sum(report.failures.values()))
            if report.added >= need:
                break
            if cfg.demos.give_up_after and failed_in_a_row >= cfg.demos.give_up_after:
                report.gave_up = failed_in_a_row
                log.warning("%s: the last %d seeds tried all failed; stopping with %d of %d demos "
                            "(demos.give_up_after)", task, failed_in_a_row, report.total, want)
                break
    finally:
        writer.close()
        failures.save()
        bar.close()
        report.seconds = time.time() - t0
    return report


def _results(cfg: Config, seeds: Iterator[int], need: int) -> Iterator[DemoResult]:
    """Demo results in seed order; keeps about as many seeds in flight as still needed."""
    workers = max(1, cfg.demos.workers)
    if workers == 1:
        maker = DemoMaker(cfg.env, cfg.demos)
        try:
            for seed in seeds:
                yield maker.make(seed)
        finally:
            maker.close()
        return
    produced = [0]  # demos stored so far (read by submit_more as results arrive)

    def crash(seed: int) -> str:
        return (f"a demo worker for {cfg.env.task} died while planning seed {seed} or another seed in flight (a "
                f"simulator or planner crash). Demos written so far are kept; re-run the same command to resume.")

    for _, result in spawn_map(_worker_make, seeds, workers=workers, initializer=_worker_init, initargs=(cfg,),
                               crash_message=crash, max_in_flight=2 * workers,
                               submit_more=lambda in_flight: produced[0] + in_flight < need + workers):
        produced[0] += result.episode is not None
        yield result
