"""The project's out-of-domain ManiSkill variants: same observation layout, the changed scene, seeded resets."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from afil_ray.envs.maniskill import _import_maniskill
from afil_ray.envs.tasks import get_task
from afil_ray.envs.variants import DISTRACTOR_HALF_SIZE, LiftThickPegUprightEnv


@pytest.fixture(scope="module", autouse=True)
def registered():
    _import_maniskill()


def _make(task: str) -> gym.Env:
    return gym.make(task, obs_mode="state", sim_backend="cpu", control_mode="pd_joint_delta_pos")


@pytest.mark.parametrize("base, variant", [("LiftPegUpright-v1", "LiftThickPegUpright-v1"),
                                           ("StackCube-v1", "StackCubeDistractors-v1"),
                                           ("PullCube-v1", "PullCubeDistractors-v1")])
def test_variant_keeps_the_observation_layout_and_instruction(base, variant):
    shapes = []
    for task in (base, variant):
        env = _make(task)
        obs, _ = env.reset(seed=1)
        shapes.append(tuple(obs.shape))
        env.close()
    assert shapes[0] == shapes[1]
    assert get_task(variant).instruction == get_task(base).instruction


@pytest.mark.parametrize("task", ["StackCubeDistractors-v1", "PullCubeDistractors-v1"])
def test_distractors_are_seeded_clear_of_the_task_objects_and_on_the_table(task):
    env = _make(task)
    u = env.unwrapped
    placements = []
    for seed in (3, 3, 4):
        env.reset(seed=seed)
        xyz = np.stack([d.pose.p[0].numpy() for d in u.distractors])
        placements.append(xyz)
        objects = [o.pose.p[0, :2].numpy() for o in u._task_objects()]
        assert len(xyz) == 3 and np.allclose(xyz[:, 2], DISTRACTOR_HALF_SIZE)
        everything = [*objects, *xyz[:, :2]]
        for i in range(len(everything)):
            for j in range(i + 1, len(everything)):
                if i >= len(objects) or j >= len(objects):
                    assert np.linalg.norm(everything[i] - everything[j]) > u.clearance - 1e-6
    env.close()
    np.testing.assert_array_equal(placements[0], placements[1])
    assert not np.allclose(placements[0], placements[2])


def test_thick_peg_is_shorter_thicker_and_success_uses_its_own_length():
    env = _make("LiftThickPegUpright-v1")
    env.reset(seed=0)
    u = env.unwrapped
    assert isinstance(u, LiftThickPegUprightEnv)
    assert (u.peg_half_length, u.peg_half_width) == (0.10, 0.03)
    assert u.peg.pose.p[0, 2].item() == pytest.approx(0.03, abs=1e-3)  # lying flat: its half-width
    assert not bool(u.evaluate()["success"][0])
    env.close()
