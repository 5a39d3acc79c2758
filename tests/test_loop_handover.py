"""Acting on the live alarm in the loop (``loop.handover``): an episode the alarm fired on is handed to the planner
from the last snapshot before the alarm, the episode it became is stored linked to the policy's own, and the
success with hand-overs reaches TensorBoard's ``detect/handover/``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from afil_ray.config import ConfigError, load_config
from afil_ray.correction import HANDOVER_SOURCE
from afil_ray.detect.intervention import loop_handovers
from afil_ray.detect.live import LIVE_ALARM_KEY, AlarmVerdict
from afil_ray.loop.harvest import EpisodeSummary, RolloutReport
from afil_ray.loop.metrics import LoopMetrics
from afil_ray.replay.episode import Episode

ALARM_STEP = 9  # between the snapshots at 8 and 12 (env.snapshot_every=4): the planner takes over at 8


class AlarmAt:
    """A live alarm that fires on every episode at one step: the hand-over, not the alarm, is under test."""

    def __init__(self, step: int) -> None:
        self.step = step

    def observe(self, episode: Episode) -> AlarmVerdict:
        return AlarmVerdict(bool(episode.success), episode.length, 1.0, 0.5, self.step)


def test_a_handed_over_episode_is_the_policys_prefix_then_the_planner_and_is_stored_linked(tmp_path):
    from afil_ray.loop.board import LocalWeightSource, WeightBoard
    from afil_ray.loop.harvest import RolloutWorker
    from afil_ray.replay.store import ReplayStore
    from tests.loop_fixtures import loop_config, make_start_checkpoint

    cfg = loop_config(tmp_path, monitor="spread", handover=True)
    cfg.env.max_episode_steps, cfg.env.snapshot_every, cfg.detect.spread_k = 80, 4, 2
    make_start_checkpoint(cfg)
    worker = RolloutWorker(cfg, 0, LocalWeightSource(WeightBoard()), seed_start=8_200_000)
    worker.alarm = AlarmAt(ALARM_STEP)
    reports = []
    for _ in range(30):  # a few seconds at a time until episodes finish (slow when the machine is loaded)
        reports.append(worker.run(3.0))
        if sum(len(r.episodes) for r in reports) >= 2:
            break
    worker.close()
    summaries = [s for r in reports for s in r.episodes]
    assert len(summaries) >= 2 and all(r.handover for r in reports)
    assert sum(r.handover_s for r in reports) > 0
    stored = ReplayStore(cfg.replay.root).read_episodes()
    own = {e.episode_id: e for e in stored if e.source == "rollout"}
    taken = {e.parent_episode_id: e for e in stored if e.source == HANDOVER_SOURCE}
    by_seed = {e.seed: e for e in own.values()}
    assert all(s.handover_success is not None for s in summaries)  # the alarm fired on every episode
    assert any(s.handover_success for s in summaries), [s.handover_reason for s in summaries]
    for summary in summaries:
        parent = by_seed[summary.seed]
        assert (parent.episode_id in taken) == summary.handover_success, summary.handover_reason
        if not summary.handover_success:
            continue
        child = taken[parent.episode_id]
        assert child.outcome == "corrected" and child.success and child.seed == parent.seed
        assert child.extra["handover_step"] == 8 and child.extra["alarm_step"] == ALARM_STEP
        assert child.extra["parent_outcome"] == parent.outcome
        assert (child.state[:8] == parent.state[:8]).all() and (child.action[:8] == parent.action[:8]).all()
        assert child.length <= cfg.env.max_episode_steps
    # the store alone pairs the episodes as run with their hand-overs (scripts/loop_handover_report.py)
    report = loop_handovers(stored, "spread")
    assert report.comparison.n == len(own) >= len(summaries) and report.handovers == len(own)
    assert report.handovers_won == len(taken) == sum(bool(s.handover_success) for s in summaries)
    assert report.comparison.arm_successes == len(taken)  # every episode was handed over


def _judged(success: bool, alarm_step: int | None, eid: str) -> Episode:
    n = 20
    return Episode(task="PullCube-v1", outcome="success" if success else "failure", episode_id=eid,
                   seed=int.from_bytes(eid.encode(), "little"),
                   state=np.zeros((n, 3), np.float32), action=np.zeros((n, 2), np.float32),
                   reward=np.zeros(n, np.float32), step_success=np.full(n, success), terminated=np.zeros(n, bool),
                   truncated=np.zeros(n, bool), final_state=np.zeros(3, np.float32), instruction="pull the cube",
                   source="rollout", extra={LIVE_ALARM_KEY: {"step": alarm_step, "threshold": 0.5}})


def test_loop_handovers_pair_each_judged_episode_with_its_handover():
    saved = dataclasses.replace(_judged(True, None, "f1"), outcome="corrected", source=HANDOVER_SOURCE,
                                parent_episode_id="f1", episode_id="h1", extra={})
    episodes = [_judged(False, 5, "f1"),  # alarmed failure, handed over and won (h1 stored)
                _judged(False, 5, "f2"),  # alarmed failure, the hand-over lost (nothing stored)
                _judged(True, 5, "s1"),  # false alarm, the hand-over lost: a success given away
                _judged(True, None, "s2"), _judged(False, None, "f3"), saved]
    unjudged = dataclasses.replace(_judged(True, None, "s3"), extra={})  # before calibration: not counted
    report = loop_handovers([*episodes, unjudged], "critic")
    c = report.comparison
    assert (c.n, c.reference_successes, c.arm_successes) == (5, 2, 2)
    assert (c.only_reference, c.only_arm) == (1, 1)
    assert (report.handovers, report.handovers_of_successes, report.handovers_won) == (3, 1, 1)
    with pytest.raises(ValueError, match="no episode a calibrated live alarm judged"):
        loop_handovers([unjudged], "critic")


def test_the_success_with_handovers_reaches_tensorboard(tmp_path):
    metrics = LoopMetrics(tmp_path / "tb")

    def summary(success: bool, handover: bool | None) -> EpisodeSummary:
        return EpisodeSummary("PullCube-v1", success, 50, 0, 0, max_failure_score=0.7, alarm_threshold=0.5,
                              alarm_step=None if handover is None else 10, handover_success=handover)

    # as run 2/5; with hand-overs: two failures saved, one false alarm lost -> 3/5
    episodes = [summary(True, None), summary(True, False), summary(False, True), summary(False, True),
                summary(False, None)]
    metrics.rollout(RolloutReport(worker=0, seconds=10.0, env_steps=100, version=0, latest_version=0,
                                  episodes=episodes, handover=True, handover_s=2.5))
    metrics.close()
    assert metrics.summary()["handover"] == {"episodes": 5, "handovers": 3, "won": 2, "of_successes": 1,
                                             "success_as_run_rolling": 0.4, "success_with_rolling": 0.6}
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    value = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]
             if tag.startswith("detect/handover/")}
    assert value == pytest.approx({"detect/handover/success_as_run_rolling": 0.4,
                                   "detect/handover/success_with_rolling": 0.6,
                                   "detect/handover/per_episode": 0.6, "detect/handover/won": 2 / 3,
                                   "detect/handover/time_share": 0.25})


def test_a_loop_without_handovers_writes_no_handover_scalars(tmp_path):
    metrics = LoopMetrics(tmp_path / "tb")
    metrics.rollout(RolloutReport(worker=0, seconds=1.0, env_steps=10, version=0, latest_version=0,
                                  episodes=[EpisodeSummary("PullCube-v1", True, 50, 0, 0)]))
    metrics.close()
    assert metrics.summary()["handover"] is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["loop.handover=true"], r"loop\.handover=true needs loop\.monitor"),
    (["loop.handover=true", "loop.monitor=critic", "env.snapshot_every=0"], r"needs env\.snapshot_every > 0"),
])
def test_a_handover_without_an_alarm_or_snapshots_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)
