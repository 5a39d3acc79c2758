"""Turns actor reports into TensorBoard scalars, in one place (the driver), so no node needs a shared disk
for its event files and every dashboard reads one run directory.

Tags: ``rollout/`` success and failure rates per task (rolling window and cumulative), episodes/s, env
steps/s; ``replay/`` episodes by outcome; ``learner/`` loss per head, grad norm, steps/s; ``sync/`` weight
version, staleness per actor, publish time, bytes per version, publish-to-applied latency; ``sampler/`` mean w
and cos; ``eval/`` success rate per sampler; ``branches/`` branch actors' states, branches, success rate and mixed
states; ``critic/`` the learner's held-out AUROCs (train.mode=critic); ``detect/`` the live alarm (loop.monitor):
rolling share of failures flagged and of successes false-alarmed (episodes judged by a calibrated threshold), each
actor's threshold, the mean largest score by outcome, the median lead from alarm to episode end; with loop.handover,
``detect/handover/``: the rolling success as run and with the demonstrator's hand-overs on the same episodes,
hand-overs per episode, the share of hand-overs that succeeded and the demonstrator's share of rollout time.
Rollout-side scalars are indexed by total env steps, learner scalars by learner step.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from afil_ray.loop.branching import BranchRoundReport
from afil_ray.loop.evaluator import EvalReport
from afil_ray.loop.harvest import RolloutReport
from afil_ray.loop.learner import LearnerReport


@dataclass
class TaskRates:
    window: deque[bool]
    successes: int = 0
    episodes: int = 0

    def add(self, success: bool) -> None:
        self.window.append(success)
        self.successes += success
        self.episodes += 1


@dataclass
class LoopMetrics:
    """Running totals of the loop plus the TensorBoard writer; ``summary()`` is what the driver prints."""

    tb_dir: Path
    rolling_window: int = 50
    env_steps: int = 0
    episodes_by_outcome: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rates: dict[str, TaskRates] = field(default_factory=dict)
    staleness: list[int] = field(default_factory=list)  # versions behind, one entry per rollout report
    latency: list[float] = field(default_factory=list)  # publish-to-applied seconds, every application
    push_bytes: list[int] = field(default_factory=list)
    push_seconds: list[float] = field(default_factory=list)
    published_versions: list[int] = field(default_factory=list)  # in the order the learner reported them
    versions_applied: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))  # worker -> versions
    learner_step: int = 0
    newest_version: int = 0
    last_eval: EvalReport | None = None
    simulator_errors: int = 0
    actor_restarts: int = 0
    branches: int = 0  # branch rollouts stored by the branch actors
    branch_successes: int = 0
    branch_states: int = 0
    branch_mixed: int = 0  # branched states whose branches have both outcomes
    # the live alarm's verdicts (fired or not) on episodes judged by a calibrated threshold, rolling, by outcome
    alarms: dict[str, deque[bool]] = field(default_factory=dict)
    # loop.handover: (success as run, success with the hand-over) of the newest episodes, and the counts so far
    handover_window: deque[tuple[bool, bool]] = field(init=False)
    handover_counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.tb_dir.mkdir(parents=True, exist_ok=True)
        self.handover_window = deque(maxlen=self.rolling_window)
        self.writer = SummaryWriter(str(self.tb_dir), flush_secs=10)
        self.started = time.time()
        self.first_report: tuple[float, int] | None = None  # (monotonic time, env steps) of the first round
        self.last_report: tuple[float, int] | None = None

    def steady_env_steps_per_s(self) -> float | None:
        """Env steps per second between the first and the last rollout round: start-up and shutdown excluded,
        the gaps between rounds included."""
        if self.first_report is None or self.last_report[0] <= self.first_report[0]:
            return None
        return (self.last_report[1] - self.first_report[1]) / (self.last_report[0] - self.first_report[0])

    def _scalar(self, tag: str, value: float, step: int | None = None) -> None:
        self.writer.add_scalar(tag, value, self.env_steps if step is None else step)

    def rollout(self, r: RolloutReport) -> None:
        now = time.monotonic()
        if self.first_report is None:
            self.first_report = (now, self.env_steps + r.env_steps)
        self.last_report = (now, self.env_steps + r.env_steps)
        self.env_steps += r.env_steps
        self.simulator_errors += len(r.simulator_errors)
        for ep in r.episodes:
            self.rates.setdefault(ep.task, TaskRates(deque(maxlen=self.rolling_window))).add(ep.success)
            self.episodes_by_outcome["success" if ep.success else "failure"] += 1
        for task, rate in self.rates.items():
            rolling = float(np.mean(rate.window)) if rate.window else 0.0
            self._scalar(f"rollout/success_rate_rolling/{task}", rolling)
            self._scalar(f"rollout/failure_rate_rolling/{task}", 1.0 - rolling)
            self._scalar(f"rollout/success_rate_cumulative/{task}", rate.successes / rate.episodes)
            self._scalar(f"rollout/failure_rate_cumulative/{task}", 1.0 - rate.successes / rate.episodes)
        if r.seconds > 0:
            self._scalar(f"rollout/env_steps_per_s/worker{r.worker}", r.env_steps / r.seconds)
            self._scalar(f"rollout/episodes_per_s/worker{r.worker}", len(r.episodes) / r.seconds)
        for outcome, n in self.episodes_by_outcome.items():
            self._scalar(f"replay/episodes/{outcome}", n)
        stale = r.latest_version - r.version
        self.staleness.append(stale)
        self._scalar(f"sync/staleness/worker{r.worker}", stale)
        self._scalar(f"sync/applied_version/worker{r.worker}", r.version)
        for version, seconds in r.applied:
            self.latency.append(seconds)
            self.versions_applied[r.worker].add(version)
            self._scalar("sync/publish_to_applied_s", seconds)
        self._alarms(r)
        if r.handover:
            self._handovers(r)
        if r.w_mean is not None:
            self._scalar("sampler/w_mean", r.w_mean)
        if r.cos_mean is not None:
            self._scalar("sampler/cos_mean", r.cos_mean)

    def _alarms(self, r: RolloutReport) -> None:
        judged = [ep for ep in r.episodes if ep.max_failure_score is not None]
        if not judged:
            return
        for outcome in ("success", "failure"):
            mine = [ep for ep in judged if ep.success == (outcome == "success")]
            if mine:
                self._scalar(f"detect/max_score/{outcome}", float(np.mean([ep.max_failure_score for ep in mine])))
            window = self.alarms.setdefault(outcome, deque(maxlen=self.rolling_window))
            window.extend(ep.alarm_step is not None for ep in mine if np.isfinite(ep.alarm_threshold))
        if self.alarms["failure"]:
            self._scalar("detect/failures_flagged_rolling", float(np.mean(self.alarms["failure"])))
        if self.alarms["success"]:
            self._scalar("detect/false_alarms_rolling", float(np.mean(self.alarms["success"])))
        threshold = judged[-1].alarm_threshold
        if np.isfinite(threshold):
            self._scalar(f"detect/threshold/worker{r.worker}", threshold)
        leads = [ep.length - ep.alarm_step for ep in judged if not ep.success and ep.alarm_step is not None]
        if leads:
            self._scalar("detect/lead_steps_median", float(np.median(leads)))

    def _handovers(self, r: RolloutReport) -> None:
        counts = self.handover_counts
        for ep in r.episodes:
            handed = ep.handover_success is not None
            self.handover_window.append((ep.success, ep.handover_success if handed else ep.success))
            counts["episodes"] += 1
            counts["handovers"] += handed
            counts["won"] += bool(ep.handover_success)
            counts["of_successes"] += handed and ep.success
        counts["seconds"] += r.seconds
        counts["handover_s"] += r.handover_s
        if self.handover_window:
            as_run, with_handover = np.mean(self.handover_window, axis=0)
            self._scalar("detect/handover/success_as_run_rolling", float(as_run))
            self._scalar("detect/handover/success_with_rolling", float(with_handover))
        if counts["episodes"]:
            self._scalar("detect/handover/per_episode", counts["handovers"] / counts["episodes"])
        if counts["handovers"]:
            self._scalar("detect/handover/won", counts["won"] / counts["handovers"])
        if counts["seconds"]:
            self._scalar("detect/handover/time_share", counts["handover_s"] / counts["seconds"])

    def branch(self, r: BranchRoundReport) -> None:
        """Branch counts, indexed by env steps like the rollouts they come from."""
        self.branches += r.branches
        self.branch_successes += r.successes
        self.branch_states += r.states
        self.branch_mixed += r.mixed
        self._scalar("branches/total", self.branches)
        self._scalar("branches/states", self.branch_states)
        self._scalar("branches/mixed_states", self.branch_mixed)
        if self.branches:
            self._scalar("branches/success_rate", self.branch_successes / self.branches)
        if r.seconds > 0:
            self._scalar(f"branches/per_s/worker{r.worker}", r.branches / r.seconds)

    def learner(self, r: LearnerReport) -> None:
        self.learner_step = r.step
        if r.waiting_for:
            self._scalar("learner/waiting_for_failures", r.waiting_for, r.step)
            return
        for key, value in r.metrics.items():
            tag = key.replace("losses/", "learner/loss_").replace("train/", "learner/").replace("time/", "learner/")
            self._scalar(tag, value, r.step)
        self._scalar("learner/failure_episodes", r.failure_episodes, r.step)
        for version, seconds, nbytes in r.published:
            self.newest_version = max(self.newest_version, version)
            self.published_versions.append(version)
            self.push_seconds.append(seconds)
            self.push_bytes.append(nbytes)
            self._scalar("sync/version", version, r.step)
            self._scalar("sync/push_seconds", seconds, r.step)
            self._scalar("sync/bytes_per_push", nbytes, r.step)

    def progress(self) -> dict[str, str]:
        """The live console line: throughput, episodes, rolling success and failure rate (all tasks pooled),
        the newest weight version and the learner's step."""
        sps = self.steady_env_steps_per_s()
        window = [s for rate in self.rates.values() for s in rate.window]
        success = float(np.mean(window)) if window else None
        return {"env_steps/s": "-" if sps is None else f"{sps:.0f}",
                "episodes": str(sum(self.episodes_by_outcome.values())),
                "success": "-" if success is None else f"{success:.2f}",
                "failure": "-" if success is None else f"{1 - success:.2f}",
                "version": str(self.newest_version), "learner_step": str(self.learner_step)}

    def evaluation(self, r: EvalReport) -> None:
        self.last_eval = r
        for sampler, rate in r.success_rate.items():
            self._scalar(f"eval/success_rate/{sampler}", rate, r.version)

    def summary(self) -> dict:
        return {
            "wall_s": round(time.time() - self.started, 1),
            "env_steps": self.env_steps,
            "env_steps_per_s": self.steady_env_steps_per_s(),
            "episodes": dict(self.episodes_by_outcome),
            "success_rate_cumulative": {t: round(r.successes / r.episodes, 3) for t, r in self.rates.items()},
            "learner_step": self.learner_step,
            "versions_published": self.newest_version,
            "versions_monotonic": all(a < b for a, b in itertools.pairwise(self.published_versions)),
            "versions_applied_per_worker": {w: len(v) for w, v in sorted(self.versions_applied.items())},
            "publish_to_applied_s_median": float(np.median(self.latency)) if self.latency else None,
            "bytes_per_version": int(np.median(self.push_bytes)) if self.push_bytes else None,
            "staleness_histogram": {int(k): int(v) for k, v in zip(*np.unique(self.staleness, return_counts=True),
                                                                    strict=True)} if self.staleness else {},
            "eval": None if self.last_eval is None else {"version": self.last_eval.version,
                                                         **self.last_eval.success_rate},
            "simulator_errors": self.simulator_errors,
            "actor_restarts": self.actor_restarts,
            "branches": {"states": self.branch_states, "branches": self.branches, "successes": self.branch_successes,
                         "mixed_states": self.branch_mixed},
            "detect": {f"{'failures_flagged' if k == 'failure' else 'false_alarms'}_rolling":
                       round(float(np.mean(v)), 3) if v else None for k, v in sorted(self.alarms.items())},
            "handover": None if not self.handover_counts else {
                **{k: int(self.handover_counts[k]) for k in ("episodes", "handovers", "won", "of_successes")},
                "success_as_run_rolling": round(float(np.mean([a for a, _ in self.handover_window])), 3)
                if self.handover_window else None,
                "success_with_rolling": round(float(np.mean([w for _, w in self.handover_window])), 3)
                if self.handover_window else None},
        }

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
