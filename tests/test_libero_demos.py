"""LIBERO's scripted demonstrator through the demo, correction and evaluation paths ManiSkill's planners use."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is an optional extra: pip install -e '.[libero]'")

from afil_ray.config import Config, ConfigError, CorrectConfig, DemoConfig, EnvConfig, EvalConfig, SamplerConfig
from afil_ray.correction import Corrector
from afil_ray.demos.generate import _FAILURES_KIND, existing_demo_seeds, generate_demos
from afil_ray.demos.libero_planner import ScriptPlanner
from afil_ray.demos.plan import Plan
from afil_ray.envs.checks import check_cameras, check_policy_fits, check_runnable
from afil_ray.envs.collector import EpisodeCollector
from afil_ray.envs.libero import SCRIPTED_PICK_PLACE
from afil_ray.envs.tasks import get_task
from afil_ray.eval.protocol import evaluate
from afil_ray.replay.episode import Episode
from afil_ray.replay.ledger import AttemptLedger
from afil_ray.replay.store import ReplayStore

OBJECT, SPATIAL = "libero_object/0", "libero_spatial/0"
OPEN = -1.0


def _env(task: str = OBJECT, **kw) -> EnvConfig:
    return EnvConfig(**{"task": task, "control_mode": "osc_pose", "cpu_vectorization": "loop", "num_envs": 1, **kw})


def test_placing_tasks_have_the_script_and_other_goals_none():
    assert get_task(OBJECT).planner == get_task(SPATIAL).planner == SCRIPTED_PICK_PLACE
    check_runnable("env.task", OBJECT, planner=True)
    with pytest.raises(ConfigError, match=r"^env\.task: task libero_goal/0 has no motion planner or scripted") as e:
        check_runnable("env.task", "libero_goal/0", planner=True)  # "open the middle drawer": not a placement
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("task", "seed"), [(OBJECT, 0), (SPATIAL, 100000)])
def test_the_script_solves_an_object_task_and_a_spatial_one(task, seed):
    """The basket from a seeded placement, the bowl (too wide for the hand: grasped by its rim) from a shipped
    start; the task's own check says success, within the suite's limit."""
    planner = ScriptPlanner(_env(task), get_task(task).max_episode_steps)
    try:
        plan = planner.plan(seed)
    finally:
        planner.close()
    assert plan.reason == "ok" and 0 < plan.first_success == len(plan.targets) <= get_task(task).max_episode_steps
    actions = np.stack(plan.targets)
    assert actions.shape[1] == 7 and np.abs(actions).max() <= 1.0
    assert (actions[:, 6] == 1.0).any() and (actions[:, 6] == OPEN).any()  # it grasped


def test_demos_are_scripted_rendered_stored_and_resumable(tmp_path, monkeypatch):
    """``afil-ray demos`` on a LIBERO task: a seed the script fails is dropped into the ledger with its reason and
    never tried again, a solved one is replayed with both cameras and stored with the script's exact actions."""
    plans: dict[int, Plan] = {}
    real = ScriptPlanner.plan

    def plan(self, seed, start_state=None):
        assert seed not in plans, f"seed {seed} tried twice"
        plans[seed] = Plan([], 0, "script_grasp_missed: forced") if seed == 0 else real(self, seed, start_state)
        return plans[seed]

    monkeypatch.setattr(ScriptPlanner, "plan", plan)
    cfg = Config(env=_env(obs_mode="rgb", camera_size=64, cameras=["agentview", "eye_in_hand"], snapshot_every=25),
                 demos=DemoConfig(num=1, workers=1, flush_every=1))
    cfg.replay.root = str(tmp_path / "store")
    store = ReplayStore.from_config(cfg.replay)
    report = generate_demos(cfg, store, progress=False)
    assert report.added == 1 and report.failures == {"script_grasp_missed": 1}
    assert AttemptLedger(store, _FAILURES_KIND, OBJECT, key="seed").known()[0]["reason"].startswith("script_grasp")

    [ep] = store.read_episodes(task=OBJECT, outcome="demo")
    assert ep.seed == 1 and ep.source == "scripted" and existing_demo_seeds(store, OBJECT) == {1}
    assert ep.instruction == get_task(OBJECT).instruction == "pick up the alphabet soup and place it in the basket"
    np.testing.assert_array_equal(ep.action, np.stack(plans[1].targets))  # the replay is the script's episode
    assert ep.success and ep.step_success[-1] and ep.terminated[-1] and ep.length == plans[1].first_success
    assert ep.control_mode == "osc_pose" and ep.obs_mode == "rgb" and ep.state.shape == (ep.length, 39)
    assert set(ep.images) == {"agentview", "eye_in_hand"}
    for images in ep.images.values():
        assert images.shape == (ep.length, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 10
        assert not np.array_equal(images[0], images[-1])  # the scene moved
    assert ep.snapshot_steps == list(range(0, ep.length, 25))

    again = generate_demos(cfg, store, progress=False)  # nothing missing: no seed tried
    assert again.added == 0 and again.total == 1
    cfg.demos.num = 2
    more = generate_demos(cfg, store, progress=False)  # seeds 0 (dropped) and 1 (kept) are not tried again
    assert more.added == 1 and existing_demo_seeds(store, OBJECT) == {1, 2}


def _dropping_rollout(corrector: Corrector, seed: int) -> Episode:
    """The script's own actions until just after it lifted the object, then the hand opens and stays still until
    the episode limit: a failure with snapshots."""
    plan = corrector.planner.plan(seed)
    assert plan.reason == "ok", plan.reason
    env = corrector.env
    collector = EpisodeCollector(env, itertools.repeat(seed), source="dropping_policy", auto_reset=False)
    collector.reset()
    actions = np.stack(plan.targets)
    drop_from = int(np.flatnonzero(actions[:, 6] == 1.0)[0]) + 25  # closed, then lifting for a while
    for t in itertools.count():
        action = actions[t] if t < drop_from else np.array([0, 0, 0, 0, 0, 0, OPEN], np.float32)
        _, finished = collector.step(action[None])
        if finished:
            finished[0].extra["drop_from"] = drop_from
            return finished[0]
    raise AssertionError("unreachable")


def test_a_dropped_object_is_corrected_by_restore_and_scripted_finish():
    env_cfg = _env(max_episode_steps=200, snapshot_every=20)
    corrector = Corrector(env_cfg, CorrectConfig(), DemoConfig())
    try:
        failure = _dropping_rollout(corrector, seed=3)
        assert failure.outcome == "failure" and not failure.success and failure.truncated[-1]
        assert failure.length == 200 and failure.snapshot_steps[-1] == 180
        result = corrector.correct(failure)
        ep = result.episode
        assert result.reason == "ok" and ep is not None, result.reason
        assert ep.outcome == "corrected" and ep.source == "correction" and ep.parent_episode_id == failure.episode_id
        assert ep.success and ep.step_success[-1] and ep.terminated[-1] and ep.length <= 200
        k = result.restore_step
        assert 0 < k < failure.length and k in failure.snapshot_steps and ep.extra["restore_step"] == k
        assert k > failure.extra["drop_from"]  # the script picks the dropped object up again
        np.testing.assert_array_equal(ep.action[:k], failure.action[:k])  # the failure's prefix, verbatim
        np.testing.assert_array_equal(ep.state[:k + 1], failure.state[:k + 1])  # exact restore
        assert not np.array_equal(ep.action[k:], failure.action[k:len(ep.action)])
        # the stored actions, replayed open loop from the episode's start, succeed at the same step
        env = corrector.env
        env.reset([failure.seed])
        for a in ep.action:
            res = env.step(a[None])
            if res.done[0]:
                break
        assert res.success[0] and res.elapsed_steps[0] == ep.length
    finally:
        corrector.close()


class _ReplayPolicy:
    """Acts the script's plan of an episode whose first observation it recognises, zeros otherwise."""

    noise_shape = (8, 7)

    def __init__(self, starts: dict[bytes, np.ndarray]) -> None:
        self.starts, self.plan, self.t = starts, np.zeros((0, 7), np.float32), 0
        self.state_dim, self.action_dim, self.cameras = 137, 7, ()

    def sample(self, obs, instructions, sampler, generator=None, noise=None):
        key = obs["state"][0].tobytes()
        if key in self.starts:
            self.plan, self.t = self.starts[key], 0
        chunk = np.zeros((8, 7), np.float32)
        part = self.plan[self.t:self.t + 8]
        chunk[:len(part)] = part
        self.t += 8
        return chunk[None], {}


def test_evaluation_runs_on_a_libero_task_from_its_shipped_starts():
    """``evaluate`` builds its env through the factory: the script's plan for the first shipped start succeeds,
    zeros on the second fail; the checks that build envs (policy fit, cameras) work on LIBERO too."""
    cfg = Config(env=_env(obs_mode="state", max_episode_steps=150), eval=EvalConfig(episodes=2, seed_start=100000),
                 sampler=SamplerConfig(kind="success_only", execute_steps=8))
    planner = ScriptPlanner(cfg.env, 150)
    try:
        plan = planner.plan(100000)
        start = planner.env.reset(seed=100000)[0]["state"]
    finally:
        planner.close()
    assert plan.reason == "ok"
    policy = _ReplayPolicy({start.tobytes(): np.stack(plan.targets)})
    result = evaluate(cfg, policy, progress=False)
    assert [e.seed for e in result.episodes] == [100000, 100001]
    assert [e.success for e in result.episodes] == [True, False]
    assert result.episodes[0].length == plan.first_success and result.episodes[1].length == 150
    np.testing.assert_array_equal(result.episodes[0].state[0], start)

    check_policy_fits(policy, cfg.env, "checkpoint x")  # 39 proprioception + 7 objects x 14
    policy.state_dim = 39
    with pytest.raises(ConfigError, match=r"libero_object/0 with env\.obs_mode=state gives state 137"):
        check_policy_fits(policy, cfg.env, "checkpoint x")
    with pytest.raises(ConfigError, match="no camera 'wrist'"):
        check_cameras(dataclasses.replace(cfg.env, obs_mode="rgb", cameras=["wrist"]))
