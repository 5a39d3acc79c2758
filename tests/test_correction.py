"""Failure correction: a policy that drops the cube mid-task fails, and the planner finishes its episode."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from afil_ray.config import Config, CorrectConfig, DemoConfig, EnvConfig
from afil_ray.correction import Corrector, correct_failures, handled_failures, restore_candidates
from afil_ray.demos.planner import DemoMaker, retarget
from afil_ray.envs.collector import EpisodeCollector
from afil_ray.replay.episode import Episode
from afil_ray.replay.store import ReplayStore

TASK = "PickCube-v1"
OPEN_GRIPPER = 1.0  # the pd_joint_delta_pos gripper command that opens the hand


def dropping_rollout(maker: DemoMaker, seed: int) -> Episode:
    """Follow the planner's targets but open the gripper from two thirds of the plan on (the cube is in the
    hand by then), then hold the last target until the episode limit: a failure with snapshots."""
    plan = maker.planner.plan(seed)
    assert plan.reason == "ok", plan.reason
    env = maker.replay_env
    collector = EpisodeCollector(env, itertools.repeat(seed), source="dropping_policy", auto_reset=False)
    collector.reset()
    base = env.local_env(0).base
    drop_from = 2 * len(plan.targets) // 3
    for t in itertools.count():
        action = retarget(env.control_mode, base, plan.targets[min(t, len(plan.targets) - 1)])
        if t >= drop_from:
            action[-1] = OPEN_GRIPPER
        _, finished = collector.step(action[None])
        if finished:
            finished[0].extra["drop_from"] = drop_from
            return finished[0]
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def failure() -> Episode:
    maker = DemoMaker(EnvConfig(task=TASK), DemoConfig())
    try:
        ep = dropping_rollout(maker, seed=3)
    finally:
        maker.close()
    assert ep.outcome == "failure" and not ep.success and ep.truncated[-1]
    assert ep.length == maker.limit and ep.snapshot_steps[-1] == maker.limit - 10
    return ep


def test_planner_corrects_a_dropped_cube(failure):
    corrector = Corrector(EnvConfig(task=TASK), CorrectConfig(), DemoConfig())
    try:
        result = corrector.correct(failure)
    finally:
        corrector.close()
    ep = result.episode
    assert result.reason == "ok" and ep is not None, result.reason
    assert ep.outcome == "corrected" and ep.source == "correction" and ep.parent_episode_id == failure.episode_id
    assert ep.success and ep.step_success[-1] and ep.terminated[-1] and ep.extra["success_at_end"]
    assert ep.seed == failure.seed and ep.length <= corrector.limit
    k = result.restore_step
    assert 0 < k < failure.length and ep.extra["restore_step"] == k and k in failure.snapshot_steps
    assert k > failure.extra["drop_from"]  # the planner picks the dropped cube up again, not a pre-drop state
    # the failure's own prefix is kept verbatim, the planner's suffix follows from the restored state
    np.testing.assert_array_equal(ep.state[:k], failure.state[:k])
    np.testing.assert_array_equal(ep.action[:k], failure.action[:k])
    restored = failure.state[k]
    np.testing.assert_allclose(ep.state[k], restored, atol=1e-5)
    assert np.abs(ep.action).max() <= 1.0 + 1e-6
    assert all(s <= k for s in ep.snapshot_steps[:failure.snapshot_steps.index(k) + 1])
    # the restore point is the latest one the search found, and every later one it tried failed
    assert 1 <= result.attempts <= CorrectConfig().max_attempts


def test_uncorrectable_failures_are_counted_dropped_and_not_retried(failure, tmp_path):
    cfg = Config(env=EnvConfig(task=TASK), correct=CorrectConfig(max_attempts=1, workers=1))
    cfg.replay.root = str(tmp_path / "store")
    store = ReplayStore.from_config(cfg.replay)
    store.write_episodes([failure])
    # one attempt from the last snapshot leaves 10 steps, too few for any plan: dropped as over_limit
    report = correct_failures(cfg, store, progress=False)
    assert (report.tried, report.corrected, dict(report.dropped)) == (1, 0, {"over_limit": 1})
    assert handled_failures(store, TASK) == {failure.episode_id}
    again = correct_failures(cfg, store, progress=False)
    assert (again.tried, again.skipped_before) == (0, 1)
    assert not store.list_shards(task=TASK, outcome="corrected")


def test_corrections_are_stored_linked_and_resumable(failure, tmp_path):
    """Two failures through two spawned correction workers (the process pool's path)."""
    cfg = Config(env=EnvConfig(task=TASK), correct=CorrectConfig(workers=2))
    cfg.replay.root = str(tmp_path / "store")
    store = ReplayStore.from_config(cfg.replay)
    twin = Episode(**{**failure.__dict__, "episode_id": failure.episode_id + "-twin"})
    store.write_episodes([failure, twin])
    report = correct_failures(cfg, store, progress=False)
    assert (report.tried, report.corrected) == (2, 2), report.summary()
    stored = store.read_episodes(task=TASK, outcome="corrected")
    assert sorted(e.parent_episode_id for e in stored) == sorted([failure.episode_id, twin.episode_id])
    assert all(e.success for e in stored)
    # both workers ran the same deterministic search on the same failure
    assert stored[0].extra["restore_step"] == stored[1].extra["restore_step"]
    assert correct_failures(cfg, store, progress=False).tried == 0  # nothing left to correct


def test_restore_candidates_follow_the_strategy(failure):
    steps = [s for s, _ in restore_candidates(failure, CorrectConfig())]
    assert steps == sorted(failure.snapshot_steps, reverse=True)
    half = [s for s, _ in restore_candidates(failure, CorrectConfig(strategy="fraction", fraction=0.5, stride=2))]
    assert half[0] <= 0.5 * failure.length and half == sorted(half, reverse=True) and half[-1] >= 0
    assert all(a - b == 2 * failure.snapshot_steps[1] for a, b in itertools.pairwise(half))
    with pytest.raises(ValueError, match=r"correct\.strategy"):
        restore_candidates(failure, CorrectConfig(strategy="random"))


def test_failure_without_snapshots_is_dropped_with_its_reason(failure):
    bare = Episode(**{**failure.__dict__, "snapshot_steps": [], "snapshots": [], "episode_id": "bare"})
    corrector = Corrector(EnvConfig(task=TASK), CorrectConfig(), DemoConfig())
    try:
        assert corrector.correct(bare).reason == "no_snapshots"
    finally:
        corrector.close()


def test_a_correction_from_the_first_step_keeps_no_chunks_and_stores(failure, tmp_path):
    """Restored at step 0, the correction keeps none of the policy's sampled chunks (it used to crash the
    store writer with an empty [0, H, A] array)."""
    steps = list(range(0, failure.length, 8))
    rng = np.random.default_rng(0)
    with_chunks = Episode(**{**failure.__dict__, "episode_id": "chunked", "chunk_steps": steps,
                             "chunks": rng.uniform(-1, 1, (len(steps), 16, failure.action.shape[1])).astype(np.float32),
                             "chunk_w": np.zeros((len(steps), 10), np.float32),
                             "chunk_cos": np.ones((len(steps), 10), np.float32)})
    corrector = Corrector(EnvConfig(task=TASK), CorrectConfig(strategy="fraction", fraction=0.0), DemoConfig())
    try:
        result = corrector.correct(with_chunks)
    finally:
        corrector.close()
    assert result.reason == "ok" and result.restore_step == 0
    ep = result.episode
    assert ep.chunk_steps == [] and ep.chunks is None and ep.chunk_w is None
    store = ReplayStore(str(tmp_path / "store"))
    store.write_episodes([ep])
    [back] = store.read_episodes(outcome="corrected")
    assert back.parent_episode_id == "chunked" and back.chunks is None and back.success


def test_pending_failures_index_narrowly_and_read_one_shard_at_a_time(tmp_path):
    """Correction holds the failures in flight, not the store: ids first, then shard by shard on demand."""
    from afil_ray.correction import pending_failures

    from conftest import build_episode

    store = ReplayStore(tmp_path / "store", episodes_per_shard=2)
    eps = [build_episode(task=TASK, outcome="failure", length=10 + i, seed=i) for i in range(6)]
    store.write_episodes(eps)
    reads = []
    original = store.read_checked
    store.read_checked = lambda rel, columns=None, **k: reads.append(columns) or original(rel, columns, **k)
    skipped, todo, episodes = pending_failures(store, TASK, handled={eps[0].episode_id}, limit=3)
    assert skipped == 1 and todo == {e.episode_id: e.length for e in eps[1:4]}
    assert reads == [["episode_id", "length"]] * 3  # the index reads two narrow columns, no snapshots
    first = next(episodes)
    assert first.episode_id == eps[1].episode_id and len(reads) == 4  # one whole shard read so far
    # the rest of the second shard; the third holds nothing to do and is never read
    assert [e.episode_id for e in episodes] == [e.episode_id for e in eps[2:4]] and len(reads) == 5
