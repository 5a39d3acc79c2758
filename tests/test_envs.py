"""The ManiSkill adapter on a primitive task, in state and rgb modes, on the CPU back-end."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from afil_ray.config import EnvConfig
from afil_ray.envs.base import SimulatorError
from afil_ray.envs.collector import EpisodeCollector
from afil_ray.envs.maniskill import AssetsMissingError, ManiSkillVecEnv, check_assets
from afil_ray.envs.tasks import get_task

TASK = "PushCube-v1"


@pytest.fixture(scope="module")
def state_env():
    env = ManiSkillVecEnv(EnvConfig(task=TASK, obs_mode="state", num_envs=2, snapshot_every=4,
                                    max_episode_steps=9, backend="cpu", cpu_vectorization="loop"))
    yield env
    env.close()


@pytest.fixture(scope="module")
def rgb_env():
    # Shares one renderer for the module: the first rendering env compiles shaders for several seconds.
    env = ManiSkillVecEnv(EnvConfig(task=TASK, obs_mode="rgb", num_envs=2, snapshot_every=3, camera_size=64,
                                    max_episode_steps=20, backend="cpu", cpu_vectorization="loop"))
    yield env
    env.close()


def _actions(env, steps, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (steps, env.num_envs, env.action_dim)).astype(np.float32)


def test_state_mode_shapes_and_seeding(state_env):
    obs, snaps = state_env.reset([3, 4])
    assert set(obs) == {"state"}
    assert obs["state"].shape == (2, state_env.state_dim) and obs["state"].dtype == np.float32
    assert state_env.action_dim == 8 and state_env.cameras == ()
    assert all(isinstance(s, bytes) for s in snaps)  # step 0 is always snapshotted
    again, _ = state_env.reset([3, 5])
    np.testing.assert_array_equal(again["state"][0], obs["state"][0])  # same seed, same initial state
    assert not np.array_equal(again["state"][1], obs["state"][1])  # different seed, different state


def test_time_limit_and_snapshot_cadence(state_env):
    state_env.reset([0, 1])
    seen = []
    for t, a in enumerate(_actions(state_env, 9), start=1):
        res = state_env.step(a)
        np.testing.assert_array_equal(res.elapsed_steps, [t, t])
        seen.append([s is not None for s in res.snapshots])
        if t < 9:
            assert not res.truncated.any()
    assert res.truncated.all() and not res.terminated.any()
    assert [t for t, s in enumerate(seen, start=1) if s[0]] == [4, 8]  # every 4 steps, none at the end


def test_partial_reset_touches_only_masked_envs(state_env):
    obs, _ = state_env.reset([0, 1])
    res = state_env.step(np.zeros((2, state_env.action_dim), np.float32))
    new, snaps = state_env.reset([7, 99], mask=np.array([True, False]))
    fresh, _ = state_env.reset([7, 1])
    np.testing.assert_array_equal(new["state"][0], fresh["state"][0])
    assert snaps[1] is None and snaps[0] is not None
    assert not np.array_equal(new["state"][1], obs["state"][1]) or np.array_equal(res.obs["state"][1],
                                                                                   new["state"][1])


def test_snapshot_restore_reproduces_the_trajectory(state_env):
    """Restoring a step-4 snapshot and replaying the same actions gives the same observations (to float32
    rounding), and the
    adapter's step counter (which ManiSkill's set_state_dict does not restore) is set to the snapshot step."""
    state_env.reset([11, 12])
    acts = _actions(state_env, 8, seed=1)
    states, snap4 = [], None
    for t, a in enumerate(acts, start=1):
        res = state_env.step(a)
        states.append(res.obs["state"].copy())
        if t == 4:
            snap4 = res.snapshots
    obs = state_env.restore(0, snap4[0], 4)
    state_env.restore(1, snap4[1], 4)
    # float32 rounding: link poses are recomputed after the contact refresh (see ManiSkillCpuEnv)
    np.testing.assert_allclose(obs["state"], states[3][0], atol=1e-6)
    for t in range(4, 8):
        res = state_env.step(acts[t])
        np.testing.assert_allclose(res.obs["state"][0], states[t][0], atol=1e-5)
        assert res.elapsed_steps[0] == t + 1


def test_rgb_mode_images_and_restore(rgb_env):
    obs, snaps = rgb_env.reset([0, 1])
    cam = f"rgb_{rgb_env.cameras[0]}"
    assert obs[cam].shape == (2, 64, 64, 3) and obs[cam].dtype == np.uint8
    assert obs["state"].dtype == np.float32 and obs["state"].shape[0] == 2
    assert obs[cam].std() > 1  # a rendered scene, not a blank buffer
    for a in _actions(rgb_env, 3):
        rgb_env.step(a)
    restored = rgb_env.restore(0, snaps[0], 0)
    np.testing.assert_allclose(restored["state"], obs["state"][0], atol=1e-6)
    assert np.abs(restored[cam].astype(int) - obs[cam][0].astype(int)).mean() < 1.0


def test_a_step_told_not_to_render_skips_only_its_images(rgb_env):
    """render=[True, False] on every other step: env 1's images are black on those steps and the same as a fully
    rendered run's on the others, and neither env's simulation changes."""
    cam = f"rgb_{rgb_env.cameras[0]}"
    actions = _actions(rgb_env, 4, seed=3)
    runs = []
    for lazy in (False, True):
        rgb_env.reset([5, 6])
        runs.append([rgb_env.step(a, render=np.array([True, not (lazy and t % 2 == 0)])).obs
                     for t, a in enumerate(actions)])
    for t, (full, lazy) in enumerate(zip(*runs, strict=True)):
        np.testing.assert_array_equal(lazy["state"], full["state"])
        np.testing.assert_array_equal(lazy[cam][0], full[cam][0])
        if t % 2 == 0:
            assert not lazy[cam][1].any() and full[cam][1].std() > 1
        else:
            np.testing.assert_array_equal(lazy[cam][1], full[cam][1])


def test_collector_builds_episodes(state_env):
    seeds = itertools.count(100)
    col = EpisodeCollector(state_env, seeds, source="test", policy_version=7, sampler="random")
    col.reset()
    episodes = []
    for a in _actions(state_env, 20, seed=2):
        _, done = col.step(a)
        episodes += done
    assert len(episodes) == 4  # two envs, 9-step limit, 20 steps
    ep = episodes[0]
    assert ep.length == 9 and ep.outcome == "failure" and ep.truncated[-1] and not ep.success
    assert ep.task == TASK and ep.instruction == get_task(TASK).instruction and ep.policy_version == 7
    assert ep.snapshot_steps == [0, 4, 8] and len(ep.snapshots) == 3
    assert sorted(e.seed for e in episodes) == [100, 101, 102, 103]
    assert ep.state.shape == (9, state_env.state_dim) and ep.action.shape == (9, 8)


def test_async_vectorization_matches_loop():
    cfg = EnvConfig(task=TASK, obs_mode="state", num_envs=2, max_episode_steps=50, backend="cpu")
    acts = np.random.default_rng(0).uniform(-1, 1, (5, 2, 8)).astype(np.float32)
    out = {}
    for mode in ("loop", "async"):
        cfg.cpu_vectorization = mode
        with ManiSkillVecEnv(cfg) as env:
            env.reset([5, 6])
            out[mode] = [env.step(a).obs["state"] for a in acts]
    np.testing.assert_allclose(np.stack(out["loop"]), np.stack(out["async"]), atol=1e-5)


def test_bad_inputs_give_clear_errors(state_env):
    with pytest.raises(KeyError, match="unknown task 'NoSuchTask-v1'"):
        ManiSkillVecEnv(EnvConfig(task="NoSuchTask-v1"))
    with pytest.raises(ValueError, match="obs_mode"):
        ManiSkillVecEnv(EnvConfig(task=TASK, obs_mode="pointcloud", backend="cpu", cpu_vectorization="loop"))
    with pytest.raises(ValueError, match="actions must have shape"):
        state_env.step(np.zeros((3, 8), np.float32))


@pytest.mark.skipif(os.path.isdir(os.path.expanduser("~/.maniskill/data/assets/mani_skill2_ycb")),
                    reason="YCB assets are present on this machine")
def test_asset_task_fails_fast_instead_of_prompting():
    with pytest.raises(AssetsMissingError, match="PickSingleYCB-v1 needs ManiSkill assets"):
        check_assets("PickSingleYCB-v1")


def test_simulator_error_type_is_exported():
    assert issubclass(SimulatorError, RuntimeError)


@pytest.mark.slow  # 30 s of process start-up; the loop back-end's test above covers the rendering itself
def test_worker_processes_skip_rendering_when_told():
    env = ManiSkillVecEnv(EnvConfig(task=TASK, obs_mode="rgb", num_envs=1, camera_size=64, backend="cpu",
                                    cpu_vectorization="async"))
    try:
        cam = f"rgb_{env.cameras[0]}"
        env.reset([0])
        zero = np.zeros((1, env.action_dim), np.float32)
        assert not env.step(zero, render=np.array([False])).obs[cam].any()
        assert env.step(zero).obs[cam].std() > 1  # the next step renders again without being told
    finally:
        env.close()


def test_the_wrist_camera_panda_adds_a_hand_camera_and_keeps_the_state_and_actions(rgb_env):
    cfg = EnvConfig(task=TASK, obs_mode="rgb", num_envs=1, camera_size=64, backend="cpu", cpu_vectorization="loop",
                    robot="panda_wristcam")
    with ManiSkillVecEnv(cfg) as wrist:  # rgb_env: the same task on the plain Panda
        assert rgb_env.cameras == ("base_camera",) and set(wrist.cameras) == {"base_camera", "hand_camera"}
        assert (wrist.state_dim, wrist.action_dim) == (rgb_env.state_dim, rgb_env.action_dim)
        obs, _ = wrist.reset([0])
        hand = obs["rgb_hand_camera"][0]
        assert hand.shape == (64, 64, 3) and hand.std() > 1
        assert not np.array_equal(hand, obs["rgb_base_camera"][0])
