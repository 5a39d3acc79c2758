"""Why an episode failed, per task: the cause taxonomy and the explanations written for each cause, in one file.

Each task names where its privileged quantities sit in the state-mode observation (ManiSkill flattens its state
dict in order: agent qpos and qvel, then the task's extras; a test checks these layouts against the simulator),
and one rule turns an episode's trajectory of those quantities into a cause and the numbers that make it specific
(the step the cube slipped, how far from the goal it ended). Rules run in order and the first that holds is the
cause, so the earlier rules are the earlier mistakes: a gripper that never reached the cube did not also drop it.

Every cause has several phrasings of its explanation. The last ``HELDOUT_PHRASINGS`` of each are never used for
training (ARMOR evaluates on held-out phrasings too): a model that only memorised the training strings scores
worse on them than one that learned the cause. ``afil_ray/detect/labels.py`` picks a phrasing per episode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

HELDOUT_PHRASINGS = 1  # per cause: the last phrasing(s), for evaluation only
SUCCESS = "success"  # the cause of an episode that succeeded (the explainer says so in words too)


@dataclass(frozen=True)
class Cause:
    name: str
    phrasings: tuple[str, ...]  # str.format templates over the rule's facts

    @property
    def training(self) -> tuple[str, ...]:
        return self.phrasings[:-HELDOUT_PHRASINGS]

    @property
    def heldout(self) -> tuple[str, ...]:
        return self.phrasings[-HELDOUT_PHRASINGS:]


@dataclass(frozen=True)
class Diagnosis:
    """A rule's finding: the cause, the step it shows (None when it is the whole episode), the template facts."""

    cause: str
    step: int | None = None
    facts: dict[str, float | int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskCauses:
    layout: dict[str, slice]  # privileged quantity -> its columns in the state-mode observation
    causes: tuple[Cause, ...]  # the failure causes, in the order the rule tries them
    rule: Callable[[dict[str, np.ndarray]], Diagnosis]  # trajectory of quantities [T+1, ...] -> the failure's cause

    def cause(self, name: str) -> Cause:
        if name == SUCCESS:
            return SUCCESS_CAUSE
        return next(c for c in self.causes if c.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        return (SUCCESS, *(c.name for c in self.causes))


SUCCESS_CAUSE = Cause(SUCCESS, (
    "the task was completed successfully",
    "the robot succeeded at the task",
    "nothing went wrong: the goal was reached",
    "the episode ended in success",
))

# ---------------------------------------------------------------------------------------------------------- geometry

_AGENT = {"qpos": slice(0, 9), "qvel": slice(9, 18)}
_GRIPPER_OPEN = 0.07  # finger gap (m) above which the Panda's gripper counts as open


def _cm(metres: float) -> float:
    return round(100.0 * float(metres), 1)


def _xy_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a[..., :2] - b[..., :2], axis=-1)


def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a[..., :3] - b[..., :3], axis=-1)


def tilt_from_upright(pose: np.ndarray) -> np.ndarray:
    """Angle (degrees) between a body's local x axis (a ManiSkill peg's length) and the vertical, from raw poses
    [..., 7] (position, quaternion w x y z)."""
    w, x, y, z = (pose[..., 3 + i] for i in range(4))
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    axis_z = 2.0 * (x * z - w * y) / np.maximum(norm * norm, 1e-12)  # rotation matrix R[2, 0]
    return np.degrees(np.arccos(np.clip(np.abs(axis_z), 0.0, 1.0)))


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _lift_and_drop(height: np.ndarray, lift: float = 0.015) -> tuple[int | None, int | None, float]:
    """(step first lifted ``lift`` above its start, step it came back down after that or None, highest lift m)."""
    above = height - height[0]
    lifted = _first(above > lift)
    if lifted is None:
        return None, None, float(above.max())
    dropped = _first(above[lifted:] < 0.5 * lift)
    return lifted, None if dropped is None else lifted + dropped, float(above.max())


# ------------------------------------------------------------------------------------------------ push and pull

_REACH = 0.05  # the TCP came within this of the object: it reached it
_MOVED = 0.01  # the object moved at least this: the robot moved it


def _slide_rule(radius: float) -> Callable[[dict[str, np.ndarray]], Diagnosis]:
    """PushCube and PullCube: slide the cube into a goal disc of ``radius``."""

    def rule(q: dict[str, np.ndarray]) -> Diagnosis:
        obj, goal, tcp = q["obj_pose"], q["goal_pos"][0], q["tcp_pose"]
        start_gap, gaps = float(_xy_dist(obj[0], goal)), _xy_dist(obj, goal)
        reach = _dist(tcp, obj)
        moved = _xy_dist(obj, obj[0])
        if obj[-1, 2] < -0.05:
            return Diagnosis("off_table", _first(obj[:, 2] < -0.05))
        if moved.max() < _MOVED:
            if reach.min() > _REACH:
                return Diagnosis("never_reached", int(reach.argmin()), {"cm": _cm(reach.min())})
            return Diagnosis("not_moved", int(reach.argmin()))
        end_gap = float(gaps[-1])
        if end_gap > start_gap + _MOVED:
            return Diagnosis("wrong_direction", _first(gaps > start_gap + _MOVED),
                             {"cm": _cm(end_gap), "farther_cm": _cm(end_gap - start_gap)})
        axis = (goal[:2] - obj[0, :2]) / max(start_gap, 1e-9)
        offset = obj[-1, :2] - goal[:2]
        lateral = abs(float(offset[0] * axis[1] - offset[1] * axis[0]))
        if lateral > radius:
            return Diagnosis("sideways", int(np.argmin(gaps)), {"cm": _cm(lateral)})
        last_move = _first(moved >= moved[-1] - 0.002)
        return Diagnosis("stopped_short", last_move, {"cm": _cm(end_gap - radius)})

    return rule


_SLIDE_CAUSES = (
    Cause("off_table", (
        "the cube fell off the table at step {step}",
        "at step {step} the cube dropped off the edge of the table",
        "the cube was knocked off the table (step {step})",
    )),
    Cause("never_reached", (
        "the gripper never reached the cube; it came no closer than {cm} cm",
        "the arm stayed {cm} cm away from the cube and never touched it",
        "the robot never got to the cube: its closest approach was {cm} cm",
    )),
    Cause("not_moved", (
        "the gripper reached the cube but never moved it",
        "the robot touched the cube without displacing it",
        "the cube did not move although the gripper got to it",
    )),
    Cause("wrong_direction", (
        "the cube was moved away from the goal and ended {cm} cm from it",
        "the robot pushed the cube the wrong way: {farther_cm} cm farther from the goal than at the start",
        "instead of approaching the goal the cube moved {farther_cm} cm away from it",
    )),
    Cause("sideways", (
        "the cube slid past the goal region, {cm} cm off to the side",
        "the cube went off course and ended {cm} cm to the side of the goal",
        "the cube missed the goal laterally by {cm} cm",
    )),
    Cause("stopped_short", (
        "the cube stopped {cm} cm short of the goal region",
        "time ran out with the cube {cm} cm before the goal region",
        "the cube was moved toward the goal but halted {cm} cm short of it",
    )),
)

# --------------------------------------------------------------------------------------------------- stack cube

_CUBE_STACK_Z = 0.04  # cube A's centre above cube B's when stacked (two half sizes of 0.02)
_CUBE_STACK_XY = float(np.hypot(0.02, 0.02) + 0.005)  # StackCube's xy tolerance


def _stack_rule(q: dict[str, np.ndarray]) -> Diagnosis:
    a, b, tcp, qpos = q["cubeA_pose"], q["cubeB_pose"], q["tcp_pose"], q["qpos"]
    reach = _dist(tcp, a)
    lifted, dropped, height = _lift_and_drop(a[:, 2])
    b_moved = _xy_dist(b, b[0])
    offset = a[-1, :3] - b[-1, :3]
    on_b = np.hypot(offset[0], offset[1]) <= _CUBE_STACK_XY and abs(offset[2] - _CUBE_STACK_Z) <= 0.005
    if lifted is None:
        if reach.min() > _REACH:
            return Diagnosis("never_reached", int(reach.argmin()), {"cm": _cm(reach.min())})
        return Diagnosis("missed_grasp", int(reach.argmin()))
    if b_moved.max() > 0.02:
        return Diagnosis("knocked_base", _first(b_moved > 0.02), {"cm": _cm(b_moved[-1])})
    if on_b:
        gap = float(qpos[-1, 7] + qpos[-1, 8])
        return Diagnosis("not_released" if gap < _GRIPPER_OPEN else "not_settled", len(a) - 1)
    if dropped is not None:
        return Diagnosis("dropped", dropped, {"cm": _cm(height)})
    if a[-1, 2] - a[0, 2] > 0.015:
        return Diagnosis("held_in_air", len(a) - 1,
                         {"cm": _cm(a[-1, 2] - a[0, 2]), "away_cm": _cm(np.hypot(offset[0], offset[1]))})
    return Diagnosis("misplaced", len(a) - 1, {"cm": _cm(np.hypot(offset[0], offset[1]))})


_STACK_CAUSES = (
    Cause("never_reached", (
        "the gripper never reached the red cube; it came no closer than {cm} cm",
        "the arm never got to the red cube (closest approach {cm} cm)",
        "the robot stayed {cm} cm away from the red cube and never grasped it",
    )),
    Cause("missed_grasp", (
        "the grasp closed on nothing: the red cube was never lifted",
        "the gripper reached the red cube but failed to pick it up",
        "the robot missed its grasp and the red cube stayed on the table",
    )),
    Cause("knocked_base", (
        "the green cube was knocked {cm} cm out of place at step {step}",
        "at step {step} the robot bumped the green cube and moved it {cm} cm",
        "the green base cube was pushed {cm} cm away (step {step})",
    )),
    Cause("not_released", (
        "the red cube reached the top of the green cube but was never released",
        "the gripper kept holding the red cube on top of the green one",
        "the red cube sat on the green cube while still gripped",
    )),
    Cause("not_settled", (
        "the red cube was released on the green cube but had not come to rest",
        "the red cube was still moving on top of the green cube when time ran out",
        "the stack was there but the red cube never settled",
    )),
    Cause("dropped", (
        "the red cube slipped out of the gripper at step {step} after being lifted {cm} cm",
        "the robot dropped the red cube at step {step} (it had been raised {cm} cm)",
        "at step {step} the red cube fell from the gripper, having been lifted {cm} cm",
    )),
    Cause("held_in_air", (
        "time ran out with the red cube held {cm} cm up, {away_cm} cm from the green cube",
        "the red cube was still in the air, {away_cm} cm off the green cube, when the episode ended",
        "the robot carried the red cube but never set it down; it ended {away_cm} cm from the target",
    )),
    Cause("misplaced", (
        "the red cube was put down {cm} cm away from the green cube instead of on it",
        "the red cube landed beside the green cube, {cm} cm off",
        "the red cube ended on the table {cm} cm from the green cube",
    )),
)

# ---------------------------------------------------------------------------------------------- lift peg upright

_PEG_HALF_LENGTH = 0.12
_UPRIGHT_DEG = float(np.degrees(0.08))  # LiftPegUpright's tolerance (0.08 rad)


def _peg_rule(q: dict[str, np.ndarray]) -> Diagnosis:
    peg, tcp = q["obj_pose"], q["tcp_pose"]
    tilt = tilt_from_upright(peg)
    reach = _dist(tcp, peg)
    turned = float(tilt[0] - tilt.min())
    lifted, dropped, _ = _lift_and_drop(peg[:, 2], lift=0.02)
    if lifted is None and turned < 10.0:
        if reach.min() > 0.08:
            return Diagnosis("never_reached", int(reach.argmin()), {"cm": _cm(reach.min())})
        return Diagnosis("missed_grasp", int(reach.argmin()))
    if tilt[-1] <= _UPRIGHT_DEG:
        return Diagnosis("not_on_table", len(peg) - 1, {"cm": _cm(peg[-1, 2] - _PEG_HALF_LENGTH)})
    if dropped is not None and tilt[-1] > 45.0:
        return Diagnosis("dropped", dropped, {"deg": round(float(tilt[-1]))})
    return Diagnosis("tilted", len(peg) - 1, {"deg": round(float(tilt[-1]))})


_PEG_CAUSES = (
    Cause("never_reached", (
        "the gripper never reached the peg; it came no closer than {cm} cm",
        "the arm stayed {cm} cm away from the peg",
        "the robot never got to the peg (closest approach {cm} cm)",
    )),
    Cause("missed_grasp", (
        "the gripper reached the peg but neither lifted nor turned it",
        "the grasp on the peg failed and it stayed lying on the table",
        "the robot touched the peg without moving it",
    )),
    Cause("not_on_table", (
        "the peg was upright but held {cm} cm above the table",
        "the robot turned the peg upright without putting it down ({cm} cm up)",
        "the peg stood upright in the air, {cm} cm above the table, when time ran out",
    )),
    Cause("dropped", (
        "the peg fell from the gripper at step {step} and ended {deg} degrees from upright",
        "the robot dropped the peg at step {step}; it lay {deg} degrees from vertical",
        "at step {step} the peg slipped out and ended up {deg} degrees off upright",
    )),
    Cause("tilted", (
        "time ran out with the peg {deg} degrees from upright",
        "the peg was only partly raised: it ended {deg} degrees from vertical",
        "the robot did not turn the peg far enough; it was left {deg} degrees from upright",
    )),
)

# --------------------------------------------------------------------------------------------------- pick cube

_PICK_THRESH = 0.025


def _pick_rule(q: dict[str, np.ndarray]) -> Diagnosis:
    obj, goal, tcp = q["obj_pose"], q["goal_pos"][0], q["tcp_pose"]
    reach = _dist(tcp, obj)
    lifted, dropped, height = _lift_and_drop(obj[:, 2])
    gap = _dist(obj, goal)
    if lifted is None:
        if reach.min() > _REACH:
            return Diagnosis("never_reached", int(reach.argmin()), {"cm": _cm(reach.min())})
        return Diagnosis("missed_grasp", int(reach.argmin()))
    if dropped is not None and gap[-1] > _PICK_THRESH:
        return Diagnosis("dropped", dropped, {"cm": _cm(height)})
    if gap[-1] > _PICK_THRESH:
        return Diagnosis("short_of_goal", len(obj) - 1, {"cm": _cm(gap[-1])})
    return Diagnosis("not_static", len(obj) - 1)


_PICK_CAUSES = (
    Cause("never_reached", (
        "the gripper never reached the cube; it came no closer than {cm} cm",
        "the arm never got to the cube (closest approach {cm} cm)",
        "the robot stayed {cm} cm away from the cube",
    )),
    Cause("missed_grasp", (
        "the grasp closed on nothing: the cube was never lifted",
        "the gripper reached the cube but failed to pick it up",
        "the robot missed its grasp and the cube stayed on the table",
    )),
    Cause("dropped", (
        "the cube slipped out of the gripper at step {step} after being lifted {cm} cm",
        "the robot dropped the cube at step {step} (it had been raised {cm} cm)",
        "at step {step} the cube fell from the gripper, having been lifted {cm} cm",
    )),
    Cause("short_of_goal", (
        "the cube was carried but ended {cm} cm from the goal position",
        "time ran out with the cube {cm} cm away from the goal",
        "the robot held the cube {cm} cm short of the goal point",
    )),
    Cause("not_static", (
        "the cube reached the goal but the arm never came to rest",
        "the robot got the cube to the goal yet kept moving",
        "the cube was at the goal while the arm was still in motion",
    )),
)

# ------------------------------------------------------------------------------------------------------ registry

_SLIDE_LAYOUT = {**_AGENT, "tcp_pose": slice(18, 25), "goal_pos": slice(25, 28), "obj_pose": slice(28, 35)}

TAXONOMY: dict[str, TaskCauses] = {
    "PushCube-v1": TaskCauses(_SLIDE_LAYOUT, _SLIDE_CAUSES, _slide_rule(0.1)),
    "PullCube-v1": TaskCauses(_SLIDE_LAYOUT, _SLIDE_CAUSES, _slide_rule(0.1)),
    "StackCube-v1": TaskCauses(
        {**_AGENT, "tcp_pose": slice(18, 25), "cubeA_pose": slice(25, 32), "cubeB_pose": slice(32, 39)},
        _STACK_CAUSES, _stack_rule),
    "LiftPegUpright-v1": TaskCauses(
        {**_AGENT, "tcp_pose": slice(18, 25), "obj_pose": slice(25, 32)}, _PEG_CAUSES, _peg_rule),
    "PickCube-v1": TaskCauses(
        {**_AGENT, "tcp_pose": slice(19, 26), "goal_pos": slice(26, 29), "obj_pose": slice(29, 36)},
        _PICK_CAUSES, _pick_rule),
}


def task_causes(task: str) -> TaskCauses:
    if task not in TAXONOMY:
        raise KeyError(f"no failure-cause taxonomy for task {task!r}; tasks with one: {', '.join(sorted(TAXONOMY))} "
                       "(afil_ray/detect/causes.py)")
    return TAXONOMY[task]
