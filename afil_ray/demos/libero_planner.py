"""LIBERO's demonstrator: the scripted pick-and-place controller (afil_ray/demos/libero_script.py) run in a
camera-less twin of the policy's scene.

The counterpart of ManiSkill's :class:`afil_ray.demos.planner.TaskPlanner`: ``plan`` runs the controller closed-loop
from an episode's start (or a failure's snapshot) until the task's own check succeeds, and the actions it took are
the plan. The policy acts in the same OSC_POSE mode and LIBERO restores and resets exactly, so replaying them in the
policy's env (with cameras) repeats the twin's episode step for step: the images cost nothing for seeds the script
cannot solve, and a replay that did not succeed would be a reason to drop the demo, as on ManiSkill.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from afil_ray.config import EnvConfig
from afil_ray.demos.libero_script import PickPlaceScript
from afil_ray.demos.plan import Plan
from afil_ray.envs.base import VecEnv
from afil_ray.envs.libero import LiberoEnv

SOURCE = "scripted"


class ScriptPlanner:
    """:class:`PickPlaceScript` in a state-mode LIBERO env of ``env_cfg``'s task, at most ``max_steps`` a plan."""

    source = SOURCE

    def __init__(self, env_cfg: EnvConfig, max_steps: int) -> None:
        twin = dataclasses.replace(env_cfg, obs_mode="state", cameras=[], num_envs=1, backend="cpu",
                                   cpu_vectorization="loop", snapshot_every=0, max_episode_steps=max_steps,
                                   ignore_terminations=False)
        self.env = LiberoEnv(twin)
        self.spec = self.env.spec_
        self.max_steps = max_steps

    def plan(self, seed: int, start_state: bytes | None = None) -> Plan:
        self.env.reset(seed=seed)
        if start_state is not None:
            self.env.restore_from({0: (start_state, 0)})
        script = PickPlaceScript(self.env.libero_env.env)
        actions: list[np.ndarray] = []
        while len(actions) < self.max_steps:
            action = script.act()
            if script.gave_up:
                return Plan(actions, 0, f"script_{script.gave_up}")
            actions.append(action)
            *_, info = self.env.step(action)
            if info["success"]:
                return Plan(actions, len(actions), "ok")
        return Plan(actions, 0, "script_no_success")

    def action(self, env: VecEnv, target: np.ndarray) -> np.ndarray:
        """The plan's actions are already OSC_POSE actions, the policy's (LIBERO has no other control mode)."""
        return np.asarray(target, np.float32)

    def close(self) -> None:
        self.env.close()
