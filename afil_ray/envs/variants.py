"""Out-of-domain variants of the ManiSkill tasks, built from primitives (no downloads), for evaluating policies
trained on the originals.

- ``LiftThickPegUpright-v1``: LiftPegUpright with a peg of unseen shape and colour: shorter and thicker
  (0.20 x 0.06 m instead of 0.24 x 0.05 m), green and yellow instead of red and blue.
- ``StackCubeDistractors-v1`` / ``PullCubeDistractors-v1``: the task among distractor cubes (yellow, purple,
  white: none of them a task cube's colour) dropped near the task's objects, which the arm can knock into.

Observations keep the original's layout (the distractors are not in the state vector), so a policy trained on the
original runs unchanged; in ``state`` mode a distractor is felt only through contact, in ``rgb`` mode it is seen.
Importing this module registers the variants with ManiSkill (``afil_ray.envs.maniskill`` does it before making
an env); ``afil_ray.envs.tasks`` lists them as tasks.
"""

from __future__ import annotations

import numpy as np
import sapien
import torch
from mani_skill.envs.tasks.tabletop.lift_peg_upright import LiftPegUprightEnv
from mani_skill.envs.tasks.tabletop.pull_cube import PullCubeEnv
from mani_skill.envs.tasks.tabletop.stack_cube import StackCubeEnv
from mani_skill.utils.building import actors
from mani_skill.utils.registration import register_env
from mani_skill.utils.scene_builder.table import TableSceneBuilder
from mani_skill.utils.structs.pose import Pose

DISTRACTOR_COLORS = ((0.95, 0.85, 0.1, 1.0), (0.6, 0.1, 0.7, 1.0), (0.92, 0.92, 0.92, 1.0))
DISTRACTOR_HALF_SIZE = 0.02


@register_env("LiftThickPegUpright-v1", max_episode_steps=50)
class LiftThickPegUprightEnv(LiftPegUprightEnv):
    """LiftPegUpright with a shorter, thicker, differently coloured peg (success uses its own half-length)."""

    peg_half_width = 0.03
    peg_half_length = 0.10

    def _load_scene(self, options: dict) -> None:
        self.table_scene = TableSceneBuilder(env=self, robot_init_qpos_noise=self.robot_init_qpos_noise)
        self.table_scene.build()
        self.peg = actors.build_twocolor_peg(
            self.scene, length=self.peg_half_length, width=self.peg_half_width,
            color_1=np.array([20, 150, 40, 255]) / 255, color_2=np.array([230, 200, 20, 255]) / 255,
            name="thick_peg", body_type="dynamic", initial_pose=sapien.Pose(p=[0, 0, 0.1]))


class _Distractors:
    """Mixin: ``num_distractors`` cubes placed after the task's own objects, clear of them and of each other."""

    num_distractors = 3
    region = 0.15  # distractors land in [-region, region]^2 around the table centre
    clearance = 0.07  # centre-to-centre distance to the task's objects and to each other

    def _load_scene(self, options: dict) -> None:
        super()._load_scene(options)  # type: ignore[misc]
        self.distractors = [
            actors.build_cube(self.scene, half_size=DISTRACTOR_HALF_SIZE, color=list(color),  # type: ignore[attr-defined]
                              name=f"distractor_{i}", initial_pose=sapien.Pose(p=[1 + i, 1, 0.1]))
            for i, color in enumerate(DISTRACTOR_COLORS[: self.num_distractors])]

    def _task_objects(self) -> list:
        raise NotImplementedError

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict) -> None:
        super()._initialize_episode(env_idx, options)  # type: ignore[misc]
        with torch.device(self.device):  # type: ignore[attr-defined]
            b = len(env_idx)
            taken = [obj.pose.p[env_idx, :2] for obj in self._task_objects()]
            for cube in self.distractors:
                xy = torch.zeros((b, 2))
                free = torch.ones(b, dtype=torch.bool)
                for _ in range(200):  # rejection sampling per environment (ManiSkill seeds torch per episode)
                    candidate = (torch.rand((b, 2)) * 2 - 1) * self.region
                    ok = torch.stack([torch.linalg.norm(candidate - t, dim=1) > self.clearance
                                      for t in taken]).all(dim=0)
                    xy[free & ok] = candidate[free & ok]
                    free &= ~ok
                    if not free.any():
                        break
                xy[free] = torch.tensor([0.2, 0.25])  # no room found: park it out of the way
                xyz = torch.cat([xy, torch.full((b, 1), DISTRACTOR_HALF_SIZE)], dim=1)
                q = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(b, 4)
                cube.set_pose(Pose.create_from_pq(p=xyz, q=q))
                taken.append(xy)


@register_env("StackCubeDistractors-v1", max_episode_steps=50)
class StackCubeDistractorsEnv(_Distractors, StackCubeEnv):
    """StackCube (red on green) among yellow, purple and white cubes."""

    def _task_objects(self) -> list:
        return [self.cubeA, self.cubeB]


@register_env("PullCubeDistractors-v1", max_episode_steps=50)
class PullCubeDistractorsEnv(_Distractors, PullCubeEnv):
    """PullCube among distractor cubes (kept clear of the cube and of its goal region)."""

    def _task_objects(self) -> list:
        return [self.obj, self.goal_region]
