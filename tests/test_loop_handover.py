"""Acting on the live alarm in the loop (``loop.handover``): an episode the alarm fired on is handed to the planner
from the last snapshot before the alarm, the episode it became is stored linked to the policy's own, and the
success with hand-overs reaches TensorBoard's ``detect/handover/``."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from afil_ray.config import ConfigError, load_config
from afil_ray.correction import HANDOVER_SOURCE
from afil_ray.detect.live import AlarmVerdict
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
