"""One demonstration: run a task's demonstrator, then replay its targets in the policy's control mode.

A task's demonstrator (:func:`make_demonstrator`) is ManiSkill's motion planner for ManiSkill tasks (here) and a
scripted controller for LIBERO's (afil_ray/demos/libero_planner.py, whose actions replay as they are). The planners
drive ``pd_joint_pos`` and ignore truncation. A policy usually acts in ``pd_joint_delta_pos``
(bounded, normalised actions), so the planner's joint targets are replayed closed-loop in the policy's control
mode: at each step the action is the normalised difference between the next target and the arm's current joint
positions. The replay is what gets recorded, so every stored (observation, action) pair is one the policy's
controller really executed, and a demo is kept only if that replay succeeds within the task's episode limit.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
from dataclasses import dataclass, replace

import gymnasium as gym
import numpy as np

from afil_ray.config import DemoConfig, EnvConfig
from afil_ray.demos.plan import Demonstrator, Plan
from afil_ray.envs.base import VecEnv
from afil_ray.envs.collector import EpisodeCollector
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.maniskill import _import_maniskill, check_assets, restore_state
from afil_ray.envs.tasks import TaskSpec, episode_instruction, get_task
from afil_ray.replay.episode import Episode

log = logging.getLogger(__name__)

SUPPORTED_CONTROL_MODES = ("pd_joint_pos", "pd_joint_delta_pos", "pd_joint_target_delta_pos")
SOURCE = "motion_planner"
HOLD_STEPS = 10  # steps the last target is held after the plan ends, for tasks that succeed once settled


def planner_solutions() -> dict[str, object]:
    from mani_skill.examples.motionplanning.panda import solutions as s

    return {
        "PushCube-v1": s.solvePushCube, "PullCube-v1": s.solvePullCube, "PickCube-v1": s.solvePickCube,
        "StackCube-v1": s.solveStackCube, "LiftPegUpright-v1": s.solveLiftPegUpright,
        "StackPyramid-v1": s.solveStackPyramid, "PegInsertionSide-v1": s.solvePegInsertionSide,
    }


class _TargetRecorder(gym.Wrapper):
    """Records the joint-position targets the planner sends and whether the task reported success.

    With ``start_state`` set, every reset (the planners begin with one) lands in that snapshot instead of the
    seed's initial state, so the planner plans from wherever a failed rollout left the scene.
    """

    start_state: bytes | None = None

    def reset(self, **kwargs):
        self.targets: list[np.ndarray] = []
        self.success: list[bool] = []
        out = super().reset(**kwargs)
        if self.start_state is not None:
            restore_state(self.env.unwrapped, self.start_state)
        return out

    def step(self, action):
        self.targets.append(np.asarray(action, np.float32).reshape(-1).copy())
        obs, reward, terminated, truncated, info = super().step(action)
        self.success.append(bool(np.asarray(info["success"]).reshape(-1)[0]))
        return obs, reward, terminated, truncated, info


class TaskPlanner:
    """A task's ManiSkill motion planner in a ``pd_joint_pos`` twin of the policy's scene (no observations).

    ``plan(seed)`` plans from the seed's initial state, ``plan(seed, start_state=snapshot)`` from a stored state
    (the planner's own reset is redirected there). Its :class:`Plan` targets are ``pd_joint_pos`` targets.
    """

    source = SOURCE

    def __init__(self, task: str, planner_max_steps: int) -> None:
        self.spec = get_task(task)
        solutions = planner_solutions()
        if self.spec.planner not in solutions:
            raise ValueError(f"task {self.spec.env_id} has no motion planner; tasks with one: {sorted(solutions)}")
        self.solve = solutions[self.spec.planner]
        _import_maniskill()
        check_assets(self.spec.env_id)
        self.env = _TargetRecorder(gym.make(
            self.spec.env_id, num_envs=1, sim_backend="physx_cpu", obs_mode="none", control_mode="pd_joint_pos",
            max_episode_steps=planner_max_steps, **dict(self.spec.env_kwargs)))

    def plan(self, seed: int, start_state: bytes | None = None) -> Plan:
        self.env.start_state = start_state
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the planners print every failed screw plan
                res = self.solve(self.env, seed=seed, debug=False, vis=False)
        except Exception as e:  # planners raise on unreachable poses; count and move on
            return Plan([], 0, f"planner_error: {type(e).__name__}: {e}"[:200])
        finally:
            self.env.start_state = None
        targets, success = self.env.targets, self.env.success
        if isinstance(res, int) and res == -1:
            return Plan(targets, 0, "planner_failed")
        if not any(success):
            return Plan(targets, 0, "planner_no_success")
        return Plan(targets, success.index(True) + 1, "ok")

    def action(self, env: VecEnv, target: np.ndarray) -> np.ndarray:
        """``target`` retargeted to ``env``'s control mode from its env 0's joints."""
        return retarget(env.control_mode, env.local_env(0).base, target)

    def close(self) -> None:
        self.env.close()


def make_demonstrator(env_cfg: EnvConfig, demo_cfg: DemoConfig, what: str = "demonstrations") -> Demonstrator:
    """The demonstrator of ``env_cfg``'s task for its simulator: ManiSkill's motion planner (``what`` names the
    product in the error for a control mode its targets cannot be retargeted to) or LIBERO's scripted controller,
    which plans at most the task's episode limit."""
    spec = get_task(env_cfg.task)
    if spec.simulator == "libero":
        from afil_ray.demos.libero_planner import ScriptPlanner

        limit = env_cfg.max_episode_steps or spec.max_episode_steps
        return ScriptPlanner(env_cfg, min(demo_cfg.planner_max_steps, limit))
    if env_cfg.control_mode not in SUPPORTED_CONTROL_MODES:
        raise ValueError(f"{what} can be retargeted to {SUPPORTED_CONTROL_MODES}, not "
                         f"env.control_mode={env_cfg.control_mode!r}")
    return TaskPlanner(env_cfg.task, demo_cfg.planner_max_steps)


def demo_source(spec: TaskSpec) -> str:
    """What ``spec``'s demos are stored as (``Episode.source``): the kind of its demonstrator."""
    if spec.simulator == "libero":
        from afil_ray.demos.libero_planner import SOURCE as SCRIPTED

        return SCRIPTED
    return SOURCE


@dataclass
class DemoResult:
    seed: int
    episode: Episode | None
    reason: str  # "ok" or why the seed produced no demo
    planner_steps: int = 0


def single_cpu_env(env_cfg: EnvConfig, limit: int) -> EnvConfig:
    """One in-process CPU scene in the policy's control and observation modes (for replaying plans)."""
    return replace(env_cfg, backend="cpu", cpu_vectorization="loop", num_envs=1, max_episode_steps=limit)


def retarget(control_mode: str, base_env, target: np.ndarray) -> np.ndarray:
    """Action in ``control_mode`` that moves the arm towards the ``pd_joint_pos`` target from where it is now."""
    if control_mode == "pd_joint_pos":
        return target
    arm = base_env.agent.controller.controllers["arm"]
    cfg = arm.config
    n_arm = len(arm.joints)
    ref = arm._target_qpos if cfg.use_target else arm.qpos
    delta = target[:n_arm] - ref.detach().cpu().numpy().reshape(-1)
    low, high = np.broadcast_to(cfg.lower, delta.shape), np.broadcast_to(cfg.upper, delta.shape)
    arm_action = np.clip(delta, low, high)
    if cfg.normalize_action:
        arm_action = 2.0 * (arm_action - low) / (high - low) - 1.0
    return np.concatenate([arm_action, target[n_arm:]]).astype(np.float32)


class DemoMaker:
    """Owns a demonstrator and a replay env for one task; ``make(seed)`` returns one demonstration or a reason."""

    def __init__(self, env_cfg: EnvConfig, demo_cfg: DemoConfig) -> None:
        self.planner = make_demonstrator(env_cfg, demo_cfg)
        self.spec = self.planner.spec
        self.demo_cfg = demo_cfg
        self.limit = env_cfg.max_episode_steps or self.spec.max_episode_steps
        self.max_length = demo_cfg.max_length or self.limit
        try:
            self.replay_env = make_vec_env(single_cpu_env(env_cfg, self.limit))
        except BaseException:
            self.planner.close()
            raise
        self.control_mode = env_cfg.control_mode
        self.instruct = episode_instruction(env_cfg.paraphrase)

    def make(self, seed: int) -> DemoResult:
        plan = self.planner.plan(seed)
        if plan.reason != "ok":
            return DemoResult(seed, None, plan.reason, len(plan.targets))
        if plan.first_success > self.max_length:
            return DemoResult(seed, None, "too_long", len(plan.targets))
        episode = self._replay(seed, plan.targets)
        if episode is None or not episode.success:
            return DemoResult(seed, None, "replay_failed", len(plan.targets))
        episode.extra.update(planner_steps=len(plan.targets), planner_success_step=plan.first_success)
        return DemoResult(seed, episode, "ok", len(plan.targets))

    def _replay(self, seed: int, targets: list[np.ndarray]) -> Episode | None:
        collector = EpisodeCollector(self.replay_env, itertools.repeat(seed), source=self.planner.source,
                                     auto_reset=False, instruct=self.instruct)
        collector.reset()
        plan = targets + [targets[-1]] * HOLD_STEPS
        for target in plan:
            action = self.planner.action(self.replay_env, target)
            _, finished = collector.step(action[None])
            if finished:
                ep = finished[0]
                ep.outcome = "demo"
                return ep
        return None

    def close(self) -> None:
        self.planner.close()
        self.replay_env.close()
