"""The online learner: retrains the failure head on harvested failures and publishes weight versions.

It is the offline :class:`~afil_ray.train.Trainer` in ``loop.learner_mode`` (``failure_head`` by default: the
rest is frozen, so only the failure head is shipped; ``critic`` likewise ships only the success critic), fed by a
replay store that rollout workers keep growing: it re-reads the store every ``loop.refresh_every`` steps,
publishes a version every ``loop.publish_every`` steps and checkpoints every ``loop.checkpoint_every``. A restarted
learner resumes from its newest checkpoint and numbers its next version after the board's newest, so versions stay
monotonic across restarts.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from afil_ray.config import Config, stored_outcomes
from afil_ray.loop.weights import WeightPacket, pack
from afil_ray.replay.store import ReplayStore
from afil_ray.train import Trainer

log = logging.getLogger(__name__)

# what each training mode changes, hence what a weight version must carry
SHIPPED = {
    "failure_head": ("failure_head",),
    "success_only": ("backbone", "success_head"),
    "joint": ("backbone", "success_head", "failure_head"),
    "critic": ("critic",),
    "outcome": ("success_head", "outcome"),
}


@dataclass
class LearnerReport:
    seconds: float
    step: int
    steps: int  # optimizer steps in this call
    waiting_for: int = 0  # failure episodes still missing before training can start (0: training)
    failure_episodes: int = 0
    published: list[tuple[int, float, int]] = field(default_factory=list)  # (version, seconds to publish, bytes)
    metrics: dict[str, float] = field(default_factory=dict)  # means over the call
    checkpoint: str | None = None


def learner_config(cfg: Config) -> Config:
    """The trainer's view of a loop config: its own run directory, starting from ``loop.init_from``."""
    out = copy.deepcopy(cfg)
    out.train.mode = cfg.loop.learner_mode
    out.run_dir = str(Path(cfg.run_dir) / "learner")
    out.train.init_from = cfg.loop.init_from
    out.train.checkpoint_every = cfg.loop.checkpoint_every
    return out


class OnlineLearner:
    """Plain class; ``learners.learner.LearnerActor`` is its Ray shell.

    ``publish(packet)`` ships a packet (on Ray: to the board actor, which stores it as an object it owns, so a
    published version outlives the learner that trained it) and
    ``latest_version()`` reads the board's newest version.
    """

    def __init__(self, cfg: Config, publish: Callable[[WeightPacket], None],
                 latest_version: Callable[[], int]) -> None:
        if not cfg.loop.init_from:
            raise ValueError("loop.init_from must name the success-only checkpoint the loop starts from")
        self.cfg = learner_config(cfg)
        self.publish_fn, self.latest_version = publish, latest_version
        self.components = SHIPPED[self.cfg.train.mode]
        self.store = ReplayStore(self.cfg.replay.root)
        self.tasks = list(self.cfg.data.tasks) or self.cfg.env.tasks
        self.trainer: Trainer | None = None
        self._steps_since_publish = 0

    def failure_episodes(self) -> int:
        """Episodes of what this mode learns from: failures (the failure head), branches (the critic's contrast
        data, ``train.mode=critic``)."""
        critic = self.cfg.train.mode == "critic"
        rows, outcomes = self.store.stats(), ["branch"] if critic else stored_outcomes(self.cfg.data.failure_outcomes)
        return sum(r.episodes for r in rows if r.task in self.tasks and r.outcome in outcomes)

    def _start(self) -> int:
        """Build the trainer once enough failures are stored (it needs data to sample from); returns how many
        failure episodes are still missing (0 once training)."""
        if self.trainer is not None:
            return 0
        have = self.failure_episodes()
        if have < self.cfg.loop.min_failures:
            return self.cfg.loop.min_failures - have
        self.trainer = Trainer(self.cfg, progress=False, tensorboard=False)
        log.info("learner starts at step %d with %d failure episodes", self.trainer.step, have)
        return 0

    def publish(self) -> tuple[int, float, int]:
        t0 = time.perf_counter()
        version = self.latest_version() + 1
        packet = pack(self.trainer.inference_policy, self.components, version, self.trainer.step)
        self.publish_fn(packet)
        self._steps_since_publish = 0
        return version, time.perf_counter() - t0, packet.nbytes

    def train(self, seconds: float) -> LearnerReport:
        """Train for ``seconds`` (or wait for failures); publishes and checkpoints on its step schedule."""
        t0 = time.perf_counter()
        missing = self._start()
        if missing:
            time.sleep(min(seconds, 1.0))
            return LearnerReport(seconds=time.perf_counter() - t0, step=0, steps=0, waiting_for=missing,
                                 failure_episodes=self.cfg.loop.min_failures - missing)
        trainer, lc = self.trainer, self.cfg.loop
        report = LearnerReport(seconds=0.0, step=trainer.step, steps=0)
        sums: dict[str, list[float]] = {}
        budget = self.cfg.loop.max_learner_steps
        while time.perf_counter() - t0 < seconds and (budget is None or trainer.step < budget):
            if trainer.step % lc.refresh_every == 0:
                trainer.refresh_data()
            for k, v in trainer.train_step().items():
                sums.setdefault(k, []).append(v)
            report.steps += 1
            self._steps_since_publish += 1
            if self._steps_since_publish >= lc.publish_every:
                report.published.append(self.publish())
            if trainer.step % lc.checkpoint_every == 0:
                report.checkpoint = str(trainer.save())
                if trainer.policy.critic is not None and self.cfg.train.mode == "critic":  # how it ranks, held out
                    report.metrics.update(trainer.evaluate_critic(Path(report.checkpoint)).scalars())
        report.seconds = time.perf_counter() - t0
        report.step = trainer.step
        report.failure_episodes = self.failure_episodes()
        report.metrics = {**{k: float(np.mean(v)) for k, v in sums.items()}, **report.metrics}
        if report.steps:
            report.metrics["learner/steps_per_s"] = report.steps / report.seconds
        return report

    def stop(self) -> str | None:
        """Final checkpoint (and a last version, so actors end on the newest weights)."""
        if self.trainer is None:
            return None
        if self._steps_since_publish:
            self.publish()
        return str(self.trainer.save())
