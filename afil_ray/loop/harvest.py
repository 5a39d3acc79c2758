"""The rollout worker: runs the current policy in a vectorized simulator and harvests every finished episode.

Every finished episode (success or failure) goes to the replay store, committed before the worker steps on,
so a killed worker loses at most the episodes still running. Failures keep their simulator snapshots (failure
correction restores them); successes drop theirs unless asked. Between steps the worker asks its weight source
for a newer version (at most every ``loop.weight_poll_s``) and applies it: envs whose action queues still hold
actions of the old chunk finish them, every later chunk comes from the new weights.

With ``loop.monitor`` set, the worker also scores every re-planning state with that failure signal (the episode
keeps the scores) and judges each finished episode with its live alarm (afil_ray/detect/live.py); the verdicts
travel in the report to TensorBoard's ``detect/``. With ``loop.handover`` as well, every episode the alarm fired on
is handed to the task's demonstrator at the alarm (``Corrector.take_over``: from the last snapshot at or before it,
which in an exactly restoring simulator is the hand-over the episode would have had live; false alarms on successes
are handed over too, as they would be live); the episode it became is stored beside the policy's own (source
``handover``, when the demonstrator finished it), and the report says which hand-overs succeeded.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from afil_ray.config import Config
from afil_ray.correction import Corrector
from afil_ray.detect.live import LIVE_ALARM_KEY, LiveAlarm
from afil_ray.detect.monitor import FailureMonitor
from afil_ray.detect.signals import CRITIC_SIGNALS, FailureSignals
from afil_ray.envs.base import SimulatorError, VecEnv
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.tasks import episode_instruction
from afil_ray.loop.board import WeightSource
from afil_ray.loop.weights import WeightPacket, actor_policy, apply
from afil_ray.replay.episode import Episode
from afil_ray.replay.store import ReplayStore
from afil_ray.rollout import ChunkedRollout, RolloutStats

log = logging.getLogger(__name__)
ROLLOUT_SEED_BASE = 1_000_000  # demo seeds start at 0 and evaluation seeds at 100000
MAX_CONSECUTIVE_CRASHES = 3


@dataclass
class EpisodeSummary:
    task: str
    success: bool
    length: int
    seed: int
    policy_version: int
    # the live alarm's view (loop.monitor): the episode's largest failure score, the threshold it was judged by
    # (inf before the alarm is calibrated) and the step the alarm fired at (None: never)
    max_failure_score: float | None = None
    alarm_threshold: float | None = None
    alarm_step: int | None = None
    # loop.handover: whether the episode the alarm fired on succeeded once handed to the demonstrator (None: not
    # handed over), and why not when it did not
    handover_success: bool | None = None
    handover_reason: str | None = None


@dataclass
class RolloutReport:
    """What one ``run`` call did; the driver turns it into TensorBoard scalars."""

    worker: int
    seconds: float
    env_steps: int
    version: int  # weight version in use at the end of the call
    latest_version: int  # newest version the worker knew of (staleness = latest - version)
    episodes: list[EpisodeSummary] = field(default_factory=list)
    applied: list[tuple[int, float]] = field(default_factory=list)  # (version, publish-to-applied seconds)
    w_mean: float | None = None
    cos_mean: float | None = None
    shards_written: int = 0
    simulator_errors: list[str] = field(default_factory=list)
    handover: bool = False  # loop.handover: the alarmed episodes were handed to the demonstrator
    handover_s: float = 0.0  # of ``seconds``, how long the demonstrator's hand-overs took


class RolloutWorker:
    """Plain class; ``actors.rollout.RolloutActor`` is its Ray shell."""

    def __init__(self, cfg: Config, index: int, weights: WeightSource, *, seed_start: int | None = None,
                 make_env: Any = make_vec_env) -> None:
        self.cfg, self.index, self.weights, self.make_env = cfg, index, weights, make_env
        self.policy = actor_policy(cfg)
        self.version = 0
        self.store = ReplayStore.from_config(cfg.replay)
        self.writer = self.store.writer(f"rollout{index}-{np.random.SeedSequence().entropy % 2**32:08x}",
                                        max_pending=0, run_id=cfg.run_id or "")
        if seed_start is None:  # a restarted worker must not repeat its predecessor's seeds
            seed_start = ROLLOUT_SEED_BASE + int(np.random.default_rng().integers(0, 2**30))
        self.seeds = itertools.count(seed_start)
        self.generator = torch.Generator().manual_seed(seed_start)
        self.env: VecEnv | None = None
        self.rollout: ChunkedRollout | None = None
        self._last_poll = -np.inf
        self._applied: list[tuple[int, float]] = []
        self._crashes = 0
        self.monitor, self.alarm = self._monitor(cfg)
        self.correctors: dict[str, Corrector] = {}  # loop.handover: each task's demonstrator, made when first needed
        # a restarted worker picks up the newest version before its simulator starts the first episodes, which
        # are labelled with the version they start with
        self._poll(force=True)
        self._start_env()

    def _monitor(self, cfg: Config) -> tuple[FailureMonitor | None, LiveAlarm | None]:
        """The failure monitor and its live alarm, when ``loop.monitor`` asks for one. The signals read
        ``self.policy``, which new weight versions update in place."""
        if cfg.loop.monitor is None:
            return None, None
        if cfg.loop.monitor in CRITIC_SIGNALS and self.policy.critic is None:
            raise ValueError(f"loop.monitor={cfg.loop.monitor} needs a critic: {cfg.loop.init_from} has none and "
                             f"loop.learner_mode={cfg.loop.learner_mode} trains none (use train.mode=critic)")
        signals = FailureSignals(self.policy, cfg.sampler, k=cfg.detect.spread_k, seed=cfg.seed,
                                 signals=[cfg.loop.monitor])
        return FailureMonitor(signals, threshold=np.inf), LiveAlarm(cfg.detect.alpha, cfg.loop.monitor_window,
                                                                     time_aware=cfg.loop.monitor_time_aware)

    def _summary(self, ep: Episode) -> EpisodeSummary:
        summary = EpisodeSummary(ep.task, bool(ep.success), ep.length, ep.seed, ep.policy_version)
        verdict = None if self.alarm is None else self.alarm.observe(ep)
        if verdict is not None:
            summary.max_failure_score, summary.alarm_threshold = verdict.max_score, verdict.threshold
            summary.alarm_step = verdict.alarm_step
            if np.isfinite(verdict.threshold):  # judged: the stored episode says what the alarm said
                ep.extra[LIVE_ALARM_KEY] = {"step": verdict.alarm_step, "threshold": verdict.threshold}
        return summary

    def _hand_over(self, ep: Episode, summary: EpisodeSummary) -> Episode | None:
        """The demonstrator's take-over at the alarm, when it fired and ``loop.handover`` asks for it; returns the
        episode it became if it succeeded (for the store)."""
        if not self.cfg.loop.handover or summary.alarm_step is None:
            return None
        if ep.task not in self.correctors:
            self.correctors[ep.task] = Corrector(self.cfg.env.for_task(ep.task), self.cfg.correct, self.cfg.demos)
        taken, _, reason = self.correctors[ep.task].take_over(ep, summary.alarm_step)
        summary.handover_success, summary.handover_reason = taken is not None, reason
        return taken

    def _start_env(self) -> None:
        self.env = self.make_env(self.cfg.env)
        self.rollout = ChunkedRollout(self.env, self.policy, self.cfg.sampler, self.seeds, source="rollout",
                                      policy_version=self.version, generator=self.generator,
                                      instruct=episode_instruction(self.cfg.env.paraphrase), monitor=self.monitor)

    def _poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_poll < self.cfg.loop.weight_poll_s:
            return
        self._last_poll = now
        packet = self.weights.poll(self.version, block=force)
        if packet is not None:
            self.apply(packet)

    def apply(self, packet: WeightPacket) -> None:
        apply(self.policy, packet)
        self.version = packet.version
        if self.rollout is not None:  # None before the first simulator starts
            self.rollout.set_policy(self.policy, packet.version)
        self._applied.append((packet.version, time.time() - packet.published_at))

    def _keep(self, episode: Episode) -> Episode:
        if episode.success and not self.cfg.loop.keep_success_snapshots:
            return dataclasses.replace(episode, snapshot_steps=[], snapshots=[])
        return episode

    def _recover(self, error: SimulatorError) -> None:
        """Rebuild the simulator after a crash; the episodes it was running are lost, stored ones are not."""
        self._crashes += 1
        log.error("rollout worker %d: simulator crashed (%d in a row): %s", self.index, self._crashes, error)
        if self._crashes > MAX_CONSECUTIVE_CRASHES:
            raise SimulatorError(f"rollout worker {self.index}: {self._crashes} simulator crashes in a row, "
                                 f"last: {error}") from error
        try:
            self.env.close()
        except Exception:  # a crashed simulator may not close cleanly; it is being replaced anyway
            log.exception("rollout worker %d: closing the crashed simulator failed", self.index)
        self._start_env()

    def run(self, seconds: float) -> RolloutReport:
        """Step for ``seconds`` of wall time; every episode that finishes is durable before this returns."""
        t0 = time.perf_counter()
        report = RolloutReport(worker=self.index, seconds=0.0, env_steps=0, version=self.version,
                               latest_version=self.version, handover=self.cfg.loop.handover)
        w: list[float] = []
        cos: list[float] = []
        self.rollout.stats = RolloutStats()
        while time.perf_counter() - t0 < seconds:
            self._poll()
            try:
                finished = self.rollout.step()
            except SimulatorError as e:
                report.simulator_errors.append(str(e))
                w, cos = w + self.rollout.stats.w, cos + self.rollout.stats.cos
                self._recover(e)
                continue
            self._crashes = 0
            report.env_steps += self.env.num_envs
            if finished:
                summaries = [self._summary(ep) for ep in finished]
                for ep in finished:
                    self.writer.add(self._keep(ep))
                report.shards_written += len(self.writer.flush())  # the policy's episodes first: durable
                if self.cfg.loop.handover:
                    t_handover = time.perf_counter()
                    for ep, summary in zip(finished, summaries, strict=True):
                        taken = self._hand_over(ep, summary)
                        if taken is not None:
                            self.writer.add(self._keep(taken))
                    report.shards_written += len(self.writer.flush())
                    report.handover_s += time.perf_counter() - t_handover
                report.episodes += summaries
        w, cos = w + self.rollout.stats.w, cos + self.rollout.stats.cos
        report.seconds = time.perf_counter() - t0
        report.version, report.latest_version = self.version, max(self.version, self.weights.latest_version())
        report.applied, self._applied = self._applied, []
        report.w_mean = float(np.mean(w)) if w else None
        report.cos_mean = float(np.mean(cos)) if cos else None
        return report

    def close(self) -> None:
        """Commit what is buffered (nothing normally: every finished episode is flushed) and free the env."""
        self.writer.close()
        if self.env is not None:
            self.env.close()
            self.env = None
        for corrector in self.correctors.values():
            corrector.close()
        self.correctors = {}
