"""The loop's live alarm: it stays silent until calibrated, judges each episode by the successes before it, holds
its false-alarm rate on a stream of successes, flags failures that score higher, and reaches TensorBoard's
``detect/``; a rollout worker with ``loop.monitor`` stores every episode's scores and reports the verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from afil_ray.detect.live import LiveAlarm, episode_scores
from afil_ray.loop.harvest import EpisodeSummary, RolloutReport
from afil_ray.loop.metrics import LoopMetrics
from afil_ray.replay.episode import Episode


def _scored(success: bool, scores: np.ndarray, every: int = 4) -> Episode:
    length = len(scores) * every
    return Episode(task="PullCube-v1", outcome="success" if success else "failure",
                   state=np.zeros((length, 3), np.float32), action=np.zeros((length, 2), np.float32),
                   reward=np.zeros(length, np.float32), step_success=np.full(length, success),
                   terminated=np.zeros(length, bool), truncated=np.zeros(length, bool),
                   final_state=np.zeros(3, np.float32), instruction="pull the cube",
                   extra={"failure_scores": [[i * every, float(s)] for i, s in enumerate(scores)]})


def test_the_alarm_is_silent_until_enough_successes_promise_alpha():
    alarm = LiveAlarm(alpha=0.1, window=100)
    rng = np.random.default_rng(0)
    verdicts = [alarm.observe(_scored(True, rng.normal(0, 1, 10))) for _ in range(12)]
    # ceil((n + 1)(1 - 0.1)) <= n first holds at n = 9: the nine first episodes are judged by no threshold
    assert all(math.isinf(v.threshold) and not v.fired for v in verdicts[:9])
    assert all(math.isfinite(v.threshold) for v in verdicts[9:])


def test_an_episode_is_judged_by_the_successes_before_it():
    alarm = LiveAlarm(alpha=0.5, window=3)
    for top in (1.0, 2.0, 3.0):
        alarm.observe(_scored(True, np.array([0.0, top])))
    assert alarm.threshold == 2.0  # ceil(4 * 0.5) = 2nd smallest of {1, 2, 3}
    verdict = alarm.observe(_scored(True, np.array([0.0, 9.0, 0.0])))
    assert verdict.threshold == 2.0 and verdict.alarm_step == 4 and verdict.lead == 8
    assert alarm.threshold == 3.0  # the window slid: {2, 3, 9}
    assert alarm.observe(_scored(False, np.array([10.0]))).threshold == 3.0
    assert alarm.threshold == 3.0  # failures do not calibrate


def test_false_alarms_stay_near_alpha_and_failures_that_score_higher_are_flagged():
    rng = np.random.default_rng(1)
    alarm = LiveAlarm(alpha=0.1, window=200)
    for _ in range(200):
        alarm.observe(_scored(True, rng.normal(0, 1, 20)))
    successes = [alarm.observe(_scored(True, rng.normal(0, 1, 20))).fired for _ in range(2000)]
    failures = [alarm.observe(_scored(False, rng.normal(1.5, 1, 20))).fired for _ in range(300)]
    assert 0.06 < np.mean(successes) < 0.14
    assert np.mean(failures) > 0.8


def test_an_episode_without_scores_gets_no_verdict():
    episode = _scored(True, np.zeros(3))
    episode.extra.clear()  # what a rollout without a monitor stores
    assert episode_scores(episode)[1].size == 0
    assert LiveAlarm(alpha=0.1, window=10).observe(episode) is None


def test_the_verdicts_reach_tensorboard(tmp_path):
    metrics = LoopMetrics(tmp_path / "tb")

    def summary(success: bool, alarm_step: int | None, threshold: float = 0.5) -> EpisodeSummary:
        return EpisodeSummary("PullCube-v1", success, 50, 0, 0, max_failure_score=0.7, alarm_threshold=threshold,
                              alarm_step=alarm_step)

    episodes = [summary(True, None), summary(True, 10), summary(False, 20), summary(False, None),
                summary(False, 30), summary(True, None, threshold=math.inf)]  # the last: not yet calibrated
    metrics.rollout(RolloutReport(worker=0, seconds=1.0, env_steps=100, version=0, latest_version=0,
                                  episodes=episodes))
    metrics.close()
    assert metrics.summary()["detect"] == {"failures_flagged_rolling": pytest.approx(0.667, abs=1e-3),
                                           "false_alarms_rolling": 0.5}
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    value = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("detect/")}
    assert value["detect/failures_flagged_rolling"] == pytest.approx(2 / 3)
    assert value["detect/false_alarms_rolling"] == pytest.approx(0.5)
    assert value["detect/lead_steps_median"] == pytest.approx(25.0)
    assert value["detect/max_score/failure"] == pytest.approx(0.7)
    assert "detect/threshold/worker0" not in value  # the newest verdict had no calibrated threshold


def test_a_rollout_worker_with_a_monitor_keeps_the_scores_and_reports_its_verdicts(tmp_path):
    from afil_ray.loop.board import LocalWeightSource, WeightBoard
    from afil_ray.loop.harvest import RolloutWorker
    from afil_ray.replay.store import ReplayStore
    from tests.loop_fixtures import loop_config, make_start_checkpoint

    cfg = loop_config(tmp_path, monitor="spread", monitor_window=50)
    cfg.detect.spread_k, cfg.detect.alpha = 2, 0.5
    make_start_checkpoint(cfg)
    worker = RolloutWorker(cfg, 0, LocalWeightSource(WeightBoard()), seed_start=8_000_000)
    finished = []
    for _ in range(20):  # a few seconds at a time until an episode finishes (slow when the machine is loaded)
        finished += worker.run(3.0).episodes
        if finished:
            break
    worker.close()
    assert finished
    stored = {e.seed: e for e in ReplayStore(cfg.replay.root).read_episodes()}
    for summary in finished:
        steps, scores = episode_scores(stored[summary.seed])
        assert list(steps) == list(stored[summary.seed].chunk_steps)  # a score at every re-planning step
        assert summary.max_failure_score == pytest.approx(scores.max())
        assert (summary.alarm_step is not None) == bool((scores > summary.alarm_threshold).any())


def test_a_critic_monitor_without_a_critic_is_a_one_line_error(tmp_path):
    from afil_ray.loop.board import LocalWeightSource, WeightBoard
    from afil_ray.loop.harvest import RolloutWorker
    from tests.loop_fixtures import loop_config, make_start_checkpoint

    cfg = loop_config(tmp_path, monitor="critic")
    make_start_checkpoint(cfg)
    with pytest.raises(ValueError, match=r"loop\.monitor=critic needs a critic"):
        RolloutWorker(cfg, 0, LocalWeightSource(WeightBoard()), seed_start=8_100_000)


def _doubtful_early(rng: np.random.Generator, success: bool, n: int = 20) -> np.ndarray:
    """A success's score starts high and fades (the critic's early doubt); a failure's stays at a middling level
    that is below every success's start and above every success's end."""
    t = np.arange(n)
    level = 3.0 * np.exp(-t / 4.0) if success else np.full(n, 1.2)
    return level + rng.normal(0, 0.2, n)


def test_a_time_aware_live_alarm_flags_failures_that_stay_below_the_early_doubt_of_successes():
    rng = np.random.default_rng(2)
    fixed, banded = LiveAlarm(alpha=0.1, window=200), LiveAlarm(alpha=0.1, window=200, time_aware=True)
    for _ in range(200):
        episode = _scored(True, _doubtful_early(rng, True))
        fixed.observe(episode)
        banded.observe(episode)
    verdicts: dict[str, dict[bool, list[bool]]] = {"fixed": {True: [], False: []}, "band": {True: [], False: []}}
    for i in range(1500):
        success = i % 5 != 0
        episode = _scored(success, _doubtful_early(rng, success))
        verdicts["fixed"][success].append(fixed.observe(episode).fired)
        verdicts["band"][success].append(banded.observe(episode).fired)
    assert np.mean(verdicts["fixed"][False]) < 0.2  # the fixed threshold sits above every success's start
    assert np.mean(verdicts["band"][False]) > 0.9  # the band sits low where successes have settled
    for name in ("fixed", "band"):
        assert 0.05 < np.mean(verdicts[name][True]) < 0.15, name  # both hold alpha on successes


def test_a_time_aware_live_alarm_is_silent_until_its_half_of_the_window_promises_alpha():
    alarm = LiveAlarm(alpha=0.1, window=100, time_aware=True)
    rng = np.random.default_rng(3)
    verdicts = [alarm.observe(_scored(True, rng.normal(0, 1, 10))) for _ in range(20)]
    # every other success sets the height: the ninth of them (the 18th success) is the first that can promise 0.1
    assert all(math.isinf(v.threshold) and not v.fired for v in verdicts[:18])
    assert all(math.isfinite(v.threshold) for v in verdicts[18:])
    assert alarm.observe(_scored(False, np.full(10, 50.0))).alarm_step == 0  # calibrated: far above, at once
