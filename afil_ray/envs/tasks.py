"""Task registry: the language instruction, episode limit and demonstration source of each task.

ManiSkill's registered limit for these tasks is 50 steps, far below what motion-planner demos (60-230 steps) and
trained policies (first success at a median of 60-175 steps in a probe) need, so every task carries its own limit.
Adding a task, a project-side variant or another simulator's task is one ``register_task`` call.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    env_id: str
    instruction: str
    max_episode_steps: int
    simulator: str = "maniskill"
    planner: str | None = None  # motion-planner solution id for demonstrations, if one exists
    env_kwargs: tuple[tuple[str, object], ...] = ()  # extra keyword arguments for the simulator's make


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    if spec.env_id in TASKS and not overwrite:
        raise ValueError(f"task {spec.env_id} is already registered")
    TASKS[spec.env_id] = spec
    return spec


def get_task(env_id: str) -> TaskSpec:
    try:
        return TASKS[env_id]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise KeyError(f"unknown task {env_id!r}; registered tasks: {known} "
                       "(add one with afil_ray.envs.tasks.register_task)") from None


for _spec in (
    TaskSpec("PushCube-v1", "push the cube to the goal region", 150, planner="PushCube-v1"),
    TaskSpec("PullCube-v1", "pull the cube to the goal region", 150, planner="PullCube-v1"),
    TaskSpec("PickCube-v1", "pick up the cube and move it to the goal position", 200, planner="PickCube-v1"),
    TaskSpec("StackCube-v1", "stack the red cube on top of the green cube", 250, planner="StackCube-v1"),
    TaskSpec("LiftPegUpright-v1", "lift the peg upright", 350, planner="LiftPegUpright-v1"),
    TaskSpec("StackPyramid-v1",
             "place the red cube next to the green cube, then stack the blue cube on top of both", 600,
             planner="StackPyramid-v1"),
    TaskSpec("PegInsertionSide-v1", "insert the peg into the side hole of the box", 400,
             planner="PegInsertionSide-v1"),
    # out-of-domain variants (afil_ray/envs/variants.py), for evaluation; no planners of their own
    TaskSpec("LiftThickPegUpright-v1", "lift the peg upright", 350),
    TaskSpec("StackCubeDistractors-v1", "stack the red cube on top of the green cube", 250),
    TaskSpec("PullCubeDistractors-v1", "pull the cube to the goal region", 150),
):
    register_task(_spec)
