"""The runtime alarm: scores of a policy depend on the state alone and batch like single calls; the early-AUROC,
point-of-no-return and lead-time measures on synthetic episodes; a combination catches failures that each single
signal misses half of; the measured false-alarm rate stays near alpha."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afil_ray.config import PolicyConfig, SamplerConfig
from afil_ray.detect.alarm import (
    COMBINED,
    FRACTIONS,
    STEP,
    Combination,
    ScoredEpisode,
    against_combination,
    early_score,
    evaluate_alarm,
    in_time_at,
    markdown_table,
)
from afil_ray.detect.signals import SIGNALS, FailureSignals, hold, score_episodes
from afil_ray.policy import DAGPolicy
from afil_ray.replay.episode import Episode

STATE_DIM, ACTION_DIM, H = 4, 2, 4


def _policy(state_dim: int = STATE_DIM) -> DAGPolicy:
    torch.manual_seed(0)
    cfg = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=10, horizon=H, head_width=32,
                       head_depth=1, critic=True, critic_width=32, critic_depth=2)
    policy = DAGPolicy.from_config(cfg, state_dim, ACTION_DIM)
    rng = np.random.default_rng(0)
    policy.fit_normalizer(rng.normal(1, 2, (64, state_dim)), rng.uniform(-2, 3, (64, ACTION_DIM)))
    policy.reset_failure_head(seed=1)  # heads that differ, so that their disagreement is not zero
    return policy.eval()


def _episode(length: int, seed: int, chunk_steps: list[int] | None = None) -> Episode:
    rng = np.random.default_rng(seed)
    return Episode(task="PullCube-v1", outcome="failure", state=rng.normal(0, 1, (length, STATE_DIM)).astype("f4"),
                   action=np.zeros((length, ACTION_DIM), np.float32), reward=np.zeros(length, np.float32),
                   step_success=np.zeros(length, bool), terminated=np.zeros(length, bool),
                   truncated=np.zeros(length, bool), final_state=np.zeros(STATE_DIM, np.float32),
                   instruction="pull the cube", chunk_steps=chunk_steps or [])


def test_signals_depend_on_the_state_alone_and_batch_like_single_calls():
    policy = _policy()
    signals = FailureSignals(policy, SamplerConfig(steps=4), k=6)
    rng = np.random.default_rng(2)
    obs = {"state": rng.normal(0, 1, (5, STATE_DIM)).astype(np.float32)}
    chunks = rng.uniform(-2, 3, (5, H, ACTION_DIM)).astype(np.float32)
    first, again = signals(obs, ["pull the cube"] * 5, chunks), signals(obs, ["pull the cube"] * 5, chunks)
    assert set(first) == set(SIGNALS)
    for name in SIGNALS:
        assert first[name].shape == (5,) and np.all(np.isfinite(first[name]))
        np.testing.assert_array_equal(first[name], again[name])
    np.testing.assert_allclose(first["critic"], 1.0 - policy.v(obs, "pull the cube"), rtol=1e-6)
    np.testing.assert_allclose(first["chosen"], 1.0 - policy.q(obs, "pull the cube", chunks), rtol=1e-6)
    assert np.all(first["spread"] > 0) and np.all(first["disagreement"] > 0)
    # the chosen signal judges the chunk, the others the state alone
    other = signals(obs, ["pull the cube"] * 5, chunks[::-1].copy())
    assert not np.allclose(other["chosen"], first["chosen"])
    for name in ("critic", "spread", "disagreement"):
        np.testing.assert_array_equal(other[name], first[name])
    with pytest.raises(ValueError, match="pass chunks"):
        signals(obs, ["pull the cube"] * 5)
    policy.init_failure_head_from_success()  # identical heads: cos = 1, no disagreement
    np.testing.assert_allclose(signals(obs, ["pull the cube"] * 5, chunks)["disagreement"], 0.0, atol=1e-5)


def test_episode_scores_hold_between_replans_and_batch_across_episodes():
    policy = _policy()
    signals = FailureSignals(policy, SamplerConfig(steps=4), k=4, signals=("critic", "spread"))
    episodes = [_episode(20, 0, [0, 8, 16]), _episode(13, 1)]
    together = score_episodes(signals, episodes, every=5, batch_size=3)
    alone = [score_episodes(signals, [e], every=5)[0] for e in episodes]
    for got, want, ep in zip(together, alone, episodes, strict=True):
        assert got["critic"].shape == (ep.length,)
        np.testing.assert_allclose(got["critic"], want["critic"], rtol=1e-5)
    critic = together[0]["critic"]
    assert len(np.unique(critic[0:8])) == 1 and len(np.unique(critic[8:16])) == 1 and critic[8] != critic[0]
    assert len(np.unique(together[1]["critic"][0:5])) == 1  # no recorded re-planning steps: every 5


def test_the_chosen_signal_reads_each_episode_s_recorded_chunk_at_its_replanning_step():
    policy = _policy()
    signals = FailureSignals(policy, SamplerConfig(steps=4), k=2, signals=("chosen",))
    rng = np.random.default_rng(4)
    episodes = [_episode(20, 0, [0, 8, 16]), _episode(9, 1, [0, 4, 8])]
    for ep in episodes:
        ep.chunks = rng.uniform(-2, 3, (len(ep.chunk_steps), H, ACTION_DIM)).astype(np.float32)
    scored = score_episodes(signals, episodes, every=5, batch_size=4)  # batches cut across the episodes
    for ep, got in zip(episodes, scored, strict=True):
        steps = np.asarray(ep.chunk_steps)
        want = 1.0 - policy.q({"state": ep.state[steps]}, ep.instruction, ep.chunks)
        np.testing.assert_allclose(got["chosen"][steps], want, rtol=1e-5)
    bare = _episode(10, 2)  # an episode that kept no chunks cannot be scored by its choices
    with pytest.raises(ValueError, match=f"episode {bare.episode_id} kept no sampled chunks"):
        score_episodes(signals, [bare], every=5)


def test_hold_fills_from_each_scored_step_to_the_next():
    np.testing.assert_array_equal(hold(np.array([1.0, 2.0]), np.array([0, 3]), 5), [1, 1, 1, 2, 2])


def test_signals_refuse_a_policy_without_critic_and_a_single_sample():
    policy = _policy()
    policy.critic = None
    for signal in ("critic", "chosen"):
        with pytest.raises(ValueError, match=f"the {signal} signal needs a policy with a trained critic"):
            FailureSignals(policy, SamplerConfig(), signals=(signal,))
    with pytest.raises(ValueError, match="k >= 2"):
        FailureSignals(_policy(), SamplerConfig(), k=1)


def _synthetic(n: int, rng: np.random.Generator, channel: int | None = None, success: bool = False,
               onset: int = 40, length: int = 100) -> ScoredEpisode:
    """Two noise signals; a failure raises ``channel``'s score by 3 from ``onset`` on (its point of no return is
    20 steps after the onset)."""
    scores = {name: rng.normal(0, 1, length) for name in ("a", "b")}
    if not success:
        scores["ab"[channel]][onset:] += 3.0
    return ScoredEpisode(f"ep{n}", success, scores, None if success else onset + 20)


def test_failures_that_announce_themselves_are_flagged_before_the_point_of_no_return():
    rng = np.random.default_rng(0)
    episodes = [_synthetic(i, rng, success=True) for i in range(300)]
    episodes += [_synthetic(300 + i, rng, channel=0) for i in range(200)]
    (report,) = evaluate_alarm(episodes, ["a"], alpha=0.05, combine=False)
    assert report.false_alarm_rate == pytest.approx(0.05, abs=0.03)
    assert report.flagged_in_time > 0.8 and report.with_point == 200
    assert 5 <= report.median_lead <= 20  # the alarm fires after the onset, before the point of no return
    assert report.auroc[0.25] == pytest.approx(0.5, abs=0.1)  # nothing to see before the onset (step 40)
    assert report.auroc[0.75] > 0.9


def test_the_combination_beats_each_signal_when_each_sees_half_the_failures():
    rng = np.random.default_rng(1)
    episodes = [_synthetic(i, rng, success=True, length=60, onset=20) for i in range(300)]
    episodes += [_synthetic(300 + i, rng, channel=i % 2, length=60, onset=20) for i in range(200)]
    reports = {r.signal: r for r in evaluate_alarm(episodes, ["a", "b"], alpha=0.05)}
    assert set(reports) == {"a", "b", COMBINED}
    for single in ("a", "b"):
        assert reports[single].flagged_in_time < 0.6
        assert reports[COMBINED].auroc[0.75] > reports[single].auroc[0.75] + 0.05
    assert reports[COMBINED].flagged_in_time > 0.6
    assert reports[COMBINED].false_alarm_rate < 0.1
    table = markdown_table(list(reports.values()), 0.05)
    assert table.count("\n") == 4 and "combined" in table
    # paired with the combination on the same episodes: the counts are the reports' own, and the gain is no noise
    paired = {p.signal: p for p in against_combination(list(reports.values()), episodes)}
    assert set(paired) == {"a", "b"}
    for single in ("a", "b"):
        in_time, false_alarms = paired[single].in_time, paired[single].false_alarms
        assert in_time.n == 200 and false_alarms.n == 300
        assert in_time.reference_successes == round(reports[single].flagged_in_time * 200)
        assert in_time.arm_successes == round(reports[COMBINED].flagged_in_time * 200)
        assert false_alarms.reference_successes == round(reports[single].false_alarm_rate * 300)
        assert false_alarms.arm_successes == round(reports[COMBINED].false_alarm_rate * 300)
        assert in_time.difference > 0.1 and in_time.mcnemar_p < 0.001
        by_state = paired[single].in_time_by_state  # one episode per initial state: the same difference
        assert (by_state.n, by_state.clusters) == (200, 200) and by_state.difference == in_time.difference
        assert by_state.p < 0.001 and paired[single].false_alarms_by_state.n == 300
        # at the combination's false-alarm count the single signal still misses the other half of the failures
        assert paired[single].in_time_at_matched_false_alarms < 0.6 * 200
    successes = [e for e in episodes if e.success]
    timed = [e for e in episodes if not e.success]
    budget = [in_time_at({e.episode_id: e.scores["a"] for e in episodes}, n, successes, timed)
              for n in (0, 15, 60, 300)]
    assert budget == sorted(budget) and budget[-1] == 200  # more false alarms, more flagged; all of them at 300
    assert against_combination([reports["a"]], episodes) == []  # nothing to pair without a combination


def _both_high(n: int, rng: np.random.Generator, success: bool, length: int = 60, onset: int = 20) -> ScoredEpisode:
    """A failure raises both signals by 2.5 from ``onset``; a success raises one of them (chosen by ``n``) by 4 over
    the same steps, so only "both high" tells them apart and no weighted sum of the two does."""
    scores = {name: rng.normal(0, 0.5, length) for name in ("a", "b")}
    if success:
        scores["ab"[n % 2]][onset:] += 4.0
    else:
        scores["a"][onset:] += 2.5
        scores["b"][onset:] += 2.5
    return ScoredEpisode(f"ep{n}", success, scores, None if success else onset + 20)


def test_boosted_combination_learns_an_interaction_that_a_weighted_sum_cannot():
    rng = np.random.default_rng(4)
    episodes = [_both_high(i, rng, success=True) for i in range(400)]
    episodes += [_both_high(400 + i, rng, success=False) for i in range(200)]
    linear, boosted = (next(r for r in evaluate_alarm(episodes, ["a", "b"], alpha=0.05, combiner=kind)
                            if r.signal == COMBINED) for kind in ("logistic", "boosted"))
    assert boosted.flagged_in_time > 0.9 and boosted.false_alarm_rate < 0.1
    assert linear.flagged_in_time < 0.5  # a + b is as high on a success's one signal at +4 as on +2.5 twice


def test_tied_top_scores_of_the_trees_do_not_silence_the_boosted_alarm():
    """Trees score whole regions alike: here more than alpha of the successes share the trees' top value, so the
    conformal threshold landed on it and nothing exceeded it (measured before the tie-break: 1 or 2 of the ~130
    failures flagged, false alarms 0.000 on five of six draws of the folds). Broken ties keep alpha and the alarm."""
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(900):
        success = bool(rng.random() > 0.15)
        scores = {"a": rng.normal(0, 1, 50), "b": rng.normal(0, 1, 50)}  # b says nothing
        if not success:
            scores["a"][20:] += rng.uniform(0.5, 3.0)
        episodes.append(ScoredEpisode(f"e{i}", success, scores, None if success else 35))
    for split in (0, 1):
        reports = {r.signal: r for r in evaluate_alarm(episodes, ["a", "b"], combiner="boosted", split=split)}
        assert reports[COMBINED].false_alarm_rate == pytest.approx(0.05, abs=0.025)
        assert reports[COMBINED].flagged_in_time > 0.6 * reports["a"].flagged_in_time


def _doubtful_start(n: int, rng: np.random.Generator, success: bool) -> ScoredEpisode:
    """Every episode's score starts high and decays over its first 20 steps (early doubt, as a critic reads before
    the outcome shows); a failure's rises by 1.5 from step 30, its point of no return at 40: below the early peak,
    so only a threshold that falls with the step sees it."""
    t = np.arange(60)
    score = 3.0 * np.exp(-t / 8.0) + rng.normal(0, 0.3, 60)
    if not success:
        score[30:] += 1.5
    return ScoredEpisode(f"ep{n}", success, {"a": score, "b": rng.normal(0, 1, 60)}, None if success else 40)


def test_a_time_aware_alarm_flags_what_sits_below_the_early_doubt_of_successes():
    rng = np.random.default_rng(5)
    episodes = [_doubtful_start(i, rng, True) for i in range(400)]
    episodes += [_doubtful_start(400 + i, rng, False) for i in range(200)]
    fixed = {r.signal: r for r in evaluate_alarm(episodes, ["a", "b"], combiner="boosted")}
    aware = {r.signal: r for r in evaluate_alarm(episodes, ["a", "b"], combiner="boosted", time_aware=True)}
    assert fixed["a"].flagged_in_time < 0.2  # a fixed threshold sits above the successes' first steps
    for signal in ("a", COMBINED):
        assert aware[signal].flagged_in_time > 0.8
        assert aware[signal].false_alarm_rate == pytest.approx(0.05, abs=0.03)
    assert list(aware) == [STEP, "a", "b", COMBINED]
    assert aware[STEP].flagged_in_time < 0.2 and aware["b"].flagged_in_time < 0.2  # the step alone tells nothing
    paired = {p.signal: p for p in against_combination(list(aware.values()), episodes)}
    assert paired["a"].in_time_at_matched_false_alarms > 0.8 * 200  # read on the time-aware scores, not the raw
    with pytest.raises(ValueError, match="needs each row's step"):
        Combination(["a"], "boosted", with_step=True).fit(episodes[::3]).rows({"a": np.zeros(3)})


def test_a_flexible_combination_is_calibrated_on_successes_it_was_not_fitted_on():
    """Each episode's signals sit at a level of its own and say nothing of its outcome: trees that can tell the
    episodes apart fit their training successes' scores low, so a threshold calibrated on those would false-alarm
    on about 0.13 of new successes at alpha 0.1 (measured); calibrated on the held-out half it keeps alpha."""
    rates = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        episodes = []
        for i in range(600):
            level = rng.normal(0, 1, 3)
            episodes.append(ScoredEpisode(f"s{seed}e{i}", bool(rng.random() > 1 / 3),
                                          {s: level[j] + rng.normal(0, 0.01, 30) for j, s in enumerate("abc")}))
        rates += [r.false_alarm_rate for r in evaluate_alarm(episodes, list("abc"), alpha=0.1, combiner="boosted")
                  if r.signal == COMBINED]
    assert np.mean(rates) < 0.11


def test_early_score_reads_only_the_first_fraction():
    scores = np.array([0.0, 1.0, 0.0, 9.0])
    assert [early_score(scores, f) for f in FRACTIONS] == [0.0, 1.0, 1.0]


def test_afil_ray_alarm_on_a_tiny_reproduction(tmp_path, capsys):
    """The command reads the harvest and the corrections' restore points from the store, each signal's policy
    from its stage's record, and writes the table and the failures' causes; a missing stage is one line."""
    import json

    from afil_ray.cli import main
    from afil_ray.detect.causes import TAXONOMY
    from afil_ray.policy.checkpoint import save_policy
    from afil_ray.replay import ReplayStore

    state_dim = max(s.stop for s in TAXONOMY["PullCube-v1"].layout.values())
    policy = _policy(state_dim)
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    save_policy(policy, run / "ckpt")
    (run / "stages").mkdir(parents=True)
    for stage in ("success_only", "critic"):  # no dag record yet
        (run / "stages" / f"{stage}.json").write_text(json.dumps({"outputs": {"checkpoint": str(run / "ckpt")}}))
    store = ReplayStore(run / "replay")
    episodes, corrected = [], []
    for i in range(40):
        won = i % 2 == 0
        length = 24 if won else 40
        ep = Episode(task="PullCube-v1", outcome="success" if won else "failure", source="harvest",
                     state=rng.normal(0, 0.1, (length, state_dim)).astype("f4"),
                     action=np.zeros((length, ACTION_DIM), np.float32), reward=np.zeros(length, np.float32),
                     step_success=np.arange(length) == length - 1 if won else np.zeros(length, bool),
                     terminated=np.zeros(length, bool), truncated=np.zeros(length, bool),
                     final_state=np.zeros(state_dim, np.float32), instruction="pull the cube", seed=i,
                     chunk_steps=list(range(0, length, 8)))  # re-planning every 8 steps, as rollouts record
        ep.chunks = rng.uniform(-2, 3, (len(ep.chunk_steps), H, ACTION_DIM)).astype(np.float32)
        episodes.append(ep)
        if not won and i % 4 == 1:
            corrected.append(Episode(**{**ep.__dict__, "episode_id": f"c{i}", "outcome": "corrected",
                                        "source": "correction", "parent_episode_id": ep.episode_id,
                                        "extra": {"restore_step": 16}}))
    store.write_episodes(episodes + corrected)
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {run}\nreplay:\n  root: {run / 'replay'}\nenv:\n  task: PullCube-v1\n"
                      "sampler:\n  steps: 2\n  execute_steps: 8\ndetect:\n  spread_k: 3\n  alarm_seeds: 0\n"
                      "  time_aware: false\n"
                      "data:\n  critic_holdout: 0.5\n")
    assert main(["alarm", "--config", str(config), "--quiet"]) == 2
    assert "stage 'dag' has not completed" in capsys.readouterr().err
    (run / "stages" / "dag.json").write_text(json.dumps({"outputs": {"checkpoint": str(run / "ckpt")}}))
    # 40 episodes: too few for a model of score and step on every quarter of them
    assert main(["alarm", "--config", str(config), "--quiet", "detect.time_aware=true"]) == 2
    assert "detect.time_aware: a time-aware alarm is fitted on each half" in capsys.readouterr().err
    assert main(["alarm", "--config", str(config), "--quiet"]) == 0
    result = json.loads((run / "detect" / "alarm.json").read_text())
    everything = result["all"]
    assert (everything["episodes"], everything["failures"], everything["failures_with_point_of_no_return"]) == \
        (40, 20, 10)
    assert [r["signal"] for r in everything["reports"]] == ["critic", "spread", "disagreement", "chosen", COMBINED]
    assert 0 < result["critic_unseen"]["episodes"] < 40  # the states the critic held out (data.critic_holdout)
    assert sum(row["failures"] for row in result["causes"]) == 20
    assert "| combined |" in (run / "detect" / "alarm.md").read_text()
    # no snapshots stored: no hand-over can take over, and the table says why
    for row in everything["handovers"]:
        assert set(row["reasons"]) <= {"no_snapshot"} and row["handovers_won"] == 0
    assert (run / "detect" / "scores_critic.npz").is_file()  # the scores are kept for the next call
    assert main(["alarm", "--config", str(config), "--quiet", "detect.alarm_splits=3"]) == 0
    result = json.loads((run / "detect" / "alarm.json").read_text())
    assert len(result["all"]["against_combination_splits"]) == 2  # splits 1 and 2 beside the main table's 0
    table = (run / "detect" / "alarm.md").read_text()  # a split whose halves lack an outcome is said so
    assert table.count("| mean of ") == len(SIGNALS) and table.count("| 1 | ") + table.count("| 2 | ") >= 2


def test_the_live_monitor_scores_with_the_fitted_combination():
    from afil_ray.detect.monitor import FailureMonitor

    rng = np.random.default_rng(3)
    fit_on = [ScoredEpisode(f"e{i}", i % 2 == 0, {"critic": rng.normal(i % 2, 1, 30),
                                                   "spread": rng.normal(0, 1, 30)}) for i in range(40)]
    combination = Combination(["critic", "spread"]).fit(fit_on)
    assert combination.coefficients["critic"] > abs(combination.coefficients["spread"])  # the informative one
    signals = FailureSignals(_policy(), SamplerConfig(steps=4), k=3, signals=("critic", "spread"))
    obs = {"state": rng.normal(0, 1, (4, STATE_DIM)).astype(np.float32)}
    monitor = FailureMonitor(signals, threshold=0.0, combination=combination)
    scores = monitor(obs, ["pull the cube"] * 4)
    np.testing.assert_allclose(scores, combination.rows(signals(obs, ["pull the cube"] * 4)))
    np.testing.assert_array_equal(monitor.alarms(scores), scores > 0.0)
    with pytest.raises(ValueError, match="needs their fitted combination"):
        FailureMonitor(signals, threshold=0.0)


def test_afil_ray_alarm_on_fresh_rollouts_of_the_success_only_policy(tmp_path, capsys):
    """By default the study rolls the success-only policy out on its own initial states (snapshots kept), has the
    planner correct the failures for their points of no return, and measures there; a second call reuses them."""
    import json

    from afil_ray.cli import main
    from afil_ray.detect.study import ALARM_REPLAY, ALARM_SOURCE
    from afil_ray.replay import ReplayStore
    from tests.loop_fixtures import loop_config, make_start_checkpoint

    cfg = loop_config(tmp_path)
    start = make_start_checkpoint(cfg)
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "success_only.json").write_text(json.dumps({"outputs": {"checkpoint": str(start)}}))
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {run}\nreplay:\n  root: {run / 'replay'}\nenv:\n  task: PullCube-v1\n"
                      "  max_episode_steps: 16\n  snapshot_every: 4\nsampler:\n  steps: 2\n  execute_steps: 4\n"
                      "eval:\n  workers: 1\ncorrect:\n  workers: 1\n  max_attempts: 1\n"
                      "detect:\n  signals: [spread]\n  spread_k: 2\n  alarm_seeds: 3\n  alarm_runs: 2\n"
                      "  time_aware: false\n")
    assert main(["alarm", "--config", str(config), "--quiet"]) == 0
    store = ReplayStore(run / "detect" / ALARM_REPLAY)
    rollouts = store.read_episodes("PullCube-v1", ["success", "failure"])
    assert len(rollouts) == 6 and {e.source for e in rollouts} == {ALARM_SOURCE}
    assert sorted({e.seed for e in rollouts}) == [300000, 300001, 300002]
    assert all(e.snapshots for e in rollouts)  # a hand-over restores them
    result = json.loads((run / "detect" / "alarm.json").read_text())
    assert set(result) >= {"fresh"} and "all" not in result and result["fresh"]["episodes"] == 6
    assert (run / "detect" / "scores_spread_fresh.npz").is_file()
    assert main(["alarm", "--config", str(config), "--quiet"]) == 0  # reads them back: no second rollout
    assert len(store.read_episodes("PullCube-v1", ["success", "failure"])) == 6
    capsys.readouterr()
    assert main(["alarm", "--config", str(config), "--quiet", "detect.alarm_seeds=4"]) == 2
    assert "holds rollouts of seeds 300000..300002, not 300000..300003" in capsys.readouterr().err


def test_hand_over_outcomes_are_planned_once_and_kept_for_the_next_study(tmp_path):
    """The planner runs once per (episode, snapshot at or before the alarm); a second study with the same
    demonstrator settings reads the kept outcomes, one with other settings plans again."""
    from afil_ray.detect.intervention import Handovers

    class Planner:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        def handover(self, episode: Episode, step: int) -> tuple[bool, int | None, str]:
            self.calls.append((episode.episode_id, step))
            return step < 20, None, "planner_no_success"

    episode = _episode(40, 0)
    episode.snapshot_steps = [0, 16, 32]
    keep = tmp_path / "handovers.json"
    first = Planner()
    planner = Handovers(first, keep, key="settings")
    report = planner.report("critic", [episode, episode], {episode.episode_id: 18})
    assert first.calls == [(episode.episode_id, 18)]  # the second alarm at the same snapshot is not planned again
    assert (report.handovers, report.handovers_won) == (2, 2)
    assert (report.comparison.n, report.by_state.n, report.by_state.clusters) == (2, 2, 1)  # one initial state
    again = Planner()
    assert Handovers(again, keep, key="settings").outcome(episode, 20) == (True, "planner_no_success")
    assert again.calls == []  # alarm 20 restores snapshot 16, as alarm 18 did
    other = Planner()
    Handovers(other, keep, key="other settings").outcome(episode, 20)
    assert other.calls == [(episode.episode_id, 20)]
    keep.write_text('{"key": "settings", "outcomes": [tru')  # a file cut short: only a cache, so planned again
    torn = Planner()
    assert Handovers(torn, keep, key="settings").outcome(episode, 20) == (False, "planner_no_success")
    assert torn.calls == [(episode.episode_id, 20)]
