"""Task registry: the language instructions, episode limit, demonstration source and camera-hidden extras of
each task.

A task can have several phrasings of its instruction: the training phrasings (``instruction`` first, then
``paraphrases``), one of which each collected episode reads when ``env.paraphrase`` is on (chosen by its seed, so
demos, rollouts and the evaluation arms agree on it), and ``heldout`` phrasings that no collector ever uses, kept for
the evaluation arm that asks whether the policy understands the instruction or memorised its strings
(``afil_ray/eval/probes.py``).

ManiSkill's registered limit for these tasks is 50 steps, far below what motion-planner demos (60-230 steps) and
trained policies (first success at a median of 60-175 steps in a probe) need, so every task carries its own limit.
Adding a task, a project-side variant or another simulator's task is one ``register_task`` call; a benchmark's
suites of numbered tasks (LIBERO's ``libero_object/3``) are registered on first use by name (``find_task``), and a
suite's name alone stands for all of its tasks (``expand_suites``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    env_id: str
    instruction: str
    max_episode_steps: int
    simulator: str = "maniskill"
    # the demonstrator of demos and corrections, if one exists: a ManiSkill motion-planner solution id, or LIBERO's
    # scripted pick-and-place (afil_ray/envs/libero.py SCRIPTED_PICK_PLACE)
    planner: str | None = None
    env_kwargs: tuple[tuple[str, object], ...] = ()  # extra keyword arguments for the simulator's make
    paraphrases: tuple[str, ...] = ()  # more training phrasings of ``instruction``
    heldout: tuple[str, ...] = ()  # phrasings kept out of every collected episode, for evaluation only
    # rgb mode: the task's extras that its cameras cannot show (PickCube's goal is an invisible marker), by name
    # (afil_ray/envs/maniskill.py: HIDDEN_EXTRA_SIZES); everything else the policy must see
    hidden_extras: tuple[str, ...] = ()

    @property
    def phrasings(self) -> tuple[str, ...]:
        """The training phrasings, ``instruction`` first."""
        return (self.instruction, *self.paraphrases)

    def phrasing(self, seed: int) -> str:
        """The training phrasing an episode with ``seed`` reads."""
        return self.phrasings[int(seed) % len(self.phrasings)]

    def heldout_phrasing(self, seed: int) -> str:
        """A held-out phrasing for the episode with ``seed`` (``instruction`` if the task has none)."""
        return self.heldout[int(seed) % len(self.heldout)] if self.heldout else self.instruction


# What an episode of ``task`` started with ``seed`` reads (collectors call it when an episode starts).
Instruct = Callable[[TaskSpec, int], str]


def canonical_instruction(task: TaskSpec, seed: int) -> str:
    return task.instruction


def episode_instruction(paraphrase: bool) -> Instruct:
    """``env.paraphrase``: a training phrasing chosen by seed, or the task's first instruction."""
    return TaskSpec.phrasing if paraphrase else canonical_instruction


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    if spec.env_id in TASKS and not overwrite:
        raise ValueError(f"task {spec.env_id} is already registered")
    TASKS[spec.env_id] = spec
    return spec


# Benchmark suites whose tasks are named ``<suite>/<index>`` (``libero_object/3``) and registered on first use by
# their simulator's module, so that only code naming such a task imports that simulator's package:
# first word of the suite name -> module with ``register_suite_task(name)`` and ``suite_tasks(suite)``
SUITE_TASK_MODULES = {"libero": "afil_ray.envs.libero"}


def _suite_module(name: str) -> str | None:
    """The module that knows the benchmark a suite or suite task name (``libero_object``, ``libero_object/3``)
    belongs to, by the name's first word; None for other names."""
    return SUITE_TASK_MODULES.get(name.split("/")[0].split("_")[0])


def suite_of(task: str) -> str | None:
    """The benchmark suite of a suite task (``libero_object/3`` -> ``libero_object``), None for other tasks: what
    an evaluation report pools by."""
    suite, slash, _ = task.partition("/")
    return suite if slash and _suite_module(suite) else None


def expand_suites(tasks: list[str]) -> list[str]:
    """``tasks`` with each whole benchmark suite (``libero_object``) replaced by its tasks in the suite's order
    (``libero_object/0`` .. ``/9``), so that one word in a config names a suite; an unknown suite of a known
    benchmark is a KeyError naming the valid ones. Other names pass unchanged (they are checked where used)."""
    out: list[str] = []
    for task in tasks:
        module = None if "/" in task or task in TASKS else _suite_module(task)
        out += importlib.import_module(module).suite_tasks(task) if module else [task]
    return out


def suite_size(suite: str) -> int:
    """How many tasks a benchmark suite has (``libero_object``: 10)."""
    return len(expand_suites([suite]))


def find_task(env_id: str) -> TaskSpec | None:
    """The spec of ``env_id``, or None if it is unknown. A suite task (``libero_object/3``) is registered on first
    use; an unknown suite or task index of a known benchmark is a KeyError naming the valid ones, and so is a whole
    suite (``libero_object``: one task is asked for, and configs expand suites before they get here)."""
    spec = TASKS.get(env_id)
    module = None if spec is not None else _suite_module(env_id)
    if module is None:
        return spec
    if "/" in env_id:
        return importlib.import_module(module).register_suite_task(env_id)
    tasks = importlib.import_module(module).suite_tasks(env_id)  # a KeyError for an unknown suite
    raise KeyError(f"{env_id!r} is a whole suite, not one task ({tasks[0]} .. {tasks[-1]}); a command expands it "
                   "when it loads its config, code with afil_ray.envs.tasks.expand_suites")


def get_task(env_id: str) -> TaskSpec:
    spec = find_task(env_id)
    if spec is None:
        known = ", ".join(sorted(TASKS))
        raise KeyError(f"unknown task {env_id!r}; registered tasks: {known} "
                       "(add one with afil_ray.envs.tasks.register_task)")
    return spec


_MULTITASK_PHRASINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # task: (more training phrasings, held-out phrasings); the five tasks one multi-task policy learns
    "PushCube-v1": (("move the cube forward onto the target", "slide the block ahead to the goal"),
                    ("shove the cube forward until it reaches the target",)),
    "PullCube-v1": (("drag the cube back onto the target", "bring the block toward the robot to the goal"),
                    ("draw the cube backward until it reaches the target",)),
    "PickCube-v1": (("grasp the cube and lift it to the goal", "take the block and carry it up to the target"),
                    ("raise the cube up to the goal point",)),
    "StackCube-v1": (("put the red cube onto the green cube", "place the red block on the green block"),
                     ("set the red cube down on top of the green one",)),
    "LiftPegUpright-v1": (("stand the peg up", "turn the lying peg so it stands vertically"),
                          ("rotate the peg until it is standing",)),
}


def _phrased(spec: TaskSpec) -> TaskSpec:
    more, heldout = _MULTITASK_PHRASINGS.get(spec.env_id, ((), ()))
    return TaskSpec(**{**spec.__dict__, "paraphrases": more, "heldout": heldout})


for _spec in (
    TaskSpec("PushCube-v1", "push the cube to the goal region", 150, planner="PushCube-v1"),
    TaskSpec("PullCube-v1", "pull the cube to the goal region", 150, planner="PullCube-v1"),
    TaskSpec("PickCube-v1", "pick up the cube and move it to the goal position", 200, planner="PickCube-v1",
             hidden_extras=("goal_pos",)),
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
    register_task(_phrased(_spec))
