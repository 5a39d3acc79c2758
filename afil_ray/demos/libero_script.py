"""A scripted pick-and-place controller for LIBERO tasks, on privileged simulator state.

LIBERO ships no motion planner, so its demonstrations and corrections come from this waypoint controller. It reads
what the policy never sees (object poses and shapes from the MuJoCo model and state) and the task's goal from the
parsed BDDL problem (``On``/``In`` of a movable object: :func:`afil_ray.envs.libero.place_goals`), so one controller
covers every task of that form rather than a script per task (LIBERO-Object: an object into the basket;
LIBERO-Spatial: the black bowl onto the plate; a conjunction is done goal by goal).

For each goal: rise with the gripper open, move above the grasp point, descend, close, lift, carry over the target,
lower, release, retreat, and check the goal (a missed grasp, a drop or a misplaced object is tried again, at most
three times). Actions are LIBERO's OSC_POSE (7 numbers in [-1, 1]): an end-effector position step toward the
current waypoint, and a rotation about the vertical only, so that the fingers close across the object's narrowest
side (the butter, cream cheese and pudding boxes are longer than the hand opens); the hand may lean up to 20
degrees, which lets the arm reach the far table and the cabinet's top, and is straightened beyond that. The
gripper is -1 open, +1 closed. Objects wider than the hand (the bowl) are pinched by the rim, at the spot nearest
the robot where the open hand comes down clear of everything else (a drawer's walls, a ramekin beside the bowl).
Every decision is re-read from the simulator each step, so the controller can take over from any state (a restored
failure): what is in the hand is carried on, anything else is grasped again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from afil_ray.envs.libero import PlaceGoal, place_goals

OPEN, CLOSE = -1.0, 1.0
HAND_OPENING = 0.07  # m: objects narrower than this across are grasped whole, wider ones by the rim
TIP_CLEARANCE = 0.015  # m: the grasp point (robosuite's grip site) above an object's bottom; the fingertips reach
# about 1.2 cm below it
GRASP_DEPTH = 0.035  # m: how far below an object's top the fingertips close (at most half its height)
RIM_INSET = 0.012  # m: from a wide object's outer edge to where the fingers pinch its wall
RIM_DEPTH = 0.025  # m: fingertips below a wide object's rim
HALF_OPEN = 0.04  # m: each finger from the hand's centre line when open (robosuite's Panda)
FINGER = 0.01  # m: a finger's thickness
TIP_BELOW = 0.012  # m: the fingertips below the grasp point (robosuite's grip site)
PALM = 0.09  # m: the hand's half length along the fingers' closing direction
PLANE = 0  # MuJoCo's plane geom type (the floor): not an obstacle, nothing goes through it
HOVER = 0.06  # m: fingertips above an object's top before descending onto it
CLEARANCE = 0.05  # m: a carried object's bottom above everything else on the way
RELEASE_GAP = 0.015  # m: a carried object's bottom above its support when the hand opens
MOVE_GAIN = 1.0  # position step = gain * error, as a fraction of the controller's largest step
TURN_GAIN = 1.0
TILT_FREE = 0.35  # rad: the hand may lean this far from vertical before the controller straightens it
REACHED = 0.008  # m: a waypoint counts as reached within this distance
STALL_STEPS, STALL_MOVE = 6, 0.002  # no more than STALL_MOVE m in STALL_STEPS steps: blocked, count as reached
CLOSE_STEPS, RELEASE_STEPS, SETTLE_STEPS = 10, 8, 25
LIFTED = 0.02  # m: a grasp holds if the object rose this much with the hand
SLIP = 0.03  # m: a carried object that moved this far in the hand is dropped
GRASP_TRIES = 3
# steps each phase may take before the controller moves on (a blocked move) or gives up (a grasp)
BUDGET = {"rise": 40, "above": 90, "descend": 45, "lift": 45, "carry": 110, "lower": 50, "retreat": 20}


@dataclass
class _Waypoint:
    pos: np.ndarray
    yaw: float
    gripper: float


class _Shape:
    """An object's collision geometry (its body and the bodies under it), read in world coordinates."""

    def __init__(self, sim: Any, root_body: str) -> None:
        self.model, self.data = sim.model._model, sim.data._data
        root = sim.model.body_name2id(root_body)
        self.body = root
        self.bodies = bodies = _subtree(self.model, root)
        self.geoms = np.array([g for g in range(self.model.ngeom) if self.model.geom_bodyid[g] in bodies
                               and (self.model.geom_contype[g] or self.model.geom_conaffinity[g])], np.int64)
        if not len(self.geoms):
            raise ValueError(f"LIBERO object {root_body}: no collision geometry to grasp")
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64)
        self._corners = signs  # corners of each geom's bounding box, in box half-sizes

    @property
    def pos(self) -> np.ndarray:
        return self.data.xpos[self.body].copy()

    def points(self) -> np.ndarray:
        """The corners of every collision geom's bounding box, in the world frame [8 * geoms, 3]."""
        aabb = self.model.geom_aabb[self.geoms]  # centre and half-size in the geom's frame
        rot = self.data.geom_xmat[self.geoms].reshape(-1, 3, 3)
        local = aabb[:, None, :3] + self._corners[None] * aabb[:, None, 3:]
        return (np.einsum("gij,gkj->gki", rot, local) + self.data.geom_xpos[self.geoms][:, None]).reshape(-1, 3)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        p = self.points()
        return p.min(0), p.max(0)


def _subtree(model: Any, root: int) -> set[int]:
    return {b for b in range(model.nbody) if _descends(model.body_parentid, b, root)}


def _descends(parents: np.ndarray, body: int, root: int) -> bool:
    while body != root and body != 0:
        body = parents[body]
    return body == root


def _hand_points(point: np.ndarray, yaw: float) -> np.ndarray:
    """Where the open hand is with its fingertips' centre at ``point``: both fingers (from the tips up) and the
    palm above them, as points [K, 3] to test against obstacles."""
    u, v = np.array([np.cos(yaw), np.sin(yaw), 0.0]), np.array([-np.sin(yaw), np.cos(yaw), 0.0])
    up = np.array([0.0, 0.0, 1.0])
    out = [point + side * u * (HALF_OPEN + a) + v * b + up * z
           for side in (-1, 1) for a in (0.0, FINGER) for b in (-0.01, 0.01) for z in (-TIP_BELOW, 0.0, 0.025, 0.05)]
    out += [point + u * a + v * b + up * z for a in np.linspace(-PALM, PALM, 5) for b in (-0.03, 0.03)
            for z in (0.07, 0.1)]
    return np.array(out)


class _Obstacles:
    """Every collision geom but an object's own and the robot's, as boxes, for testing where the hand would go."""

    def __init__(self, sim: Any, skip_bodies: set[int]) -> None:
        self.model, self.data = sim.model._model, sim.data._data
        m = self.model
        self.geoms = np.array([g for g in range(m.ngeom) if (m.geom_contype[g] or m.geom_conaffinity[g])
                               and m.geom_type[g] != PLANE and m.geom_bodyid[g] not in skip_bodies], np.int64)

    def hit(self, points: np.ndarray, margin: float = 0.005) -> bool:
        """Whether any of ``points`` is inside (or within ``margin`` of) an obstacle's bounding box."""
        aabb = self.model.geom_aabb[self.geoms]
        rot = self.data.geom_xmat[self.geoms].reshape(-1, 3, 3)
        local = np.einsum("gji,gpj->gpi", rot, points[None] - self.data.geom_xpos[self.geoms][:, None])
        inside = np.abs(local - aabb[:, None, :3]) <= aabb[:, None, 3:] + margin
        return bool(inside.all(-1).any())


def _down(yaw: float) -> np.ndarray:
    """The hand pointing down with its fingers closing along ``yaw`` (robosuite's Panda: along the hand's x axis;
    LIBERO's reset pose has yaw pi/2)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def _rotvec(rot: np.ndarray) -> np.ndarray:
    """Axis-angle of a rotation matrix (angles below pi)."""
    angle = np.arccos(np.clip((np.trace(rot) - 1.0) / 2.0, -1.0, 1.0))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([rot[2, 1] - rot[1, 2], rot[0, 2] - rot[2, 0], rot[1, 0] - rot[0, 1]]) / (2.0 * np.sin(angle))
    return axis * angle


class PickPlaceScript:
    """Closed-loop pick-and-place of a LIBERO task's goals; :meth:`act` gives the next action for the current state.

    ``base`` is the LIBERO problem env (``LiberoEnv.libero_env.env``). ``gave_up`` says why the controller stopped
    without the goal (then :meth:`act` holds still); it never declares success itself: the task's check does.
    """

    def __init__(self, base: Any) -> None:
        goals = place_goals(base.parsed_problem)
        if goals is None:
            raise ValueError(f"LIBERO problem {base.parsed_problem['problem_name']}: the script places objects "
                             f"(On/In goals), not {base.parsed_problem['goal_state']}")
        self.base, self.sim = base, base.sim
        self.goals = goals
        robot = base.robots[0]
        self.gripper = robot.gripper
        self.eef_site = robot.eef_site_id
        out = np.asarray(robot.controller.output_max, np.float64)
        self.pos_scale, self.rot_scale = out[:3], out[3:6]
        self.shapes = {name: _Shape(self.sim, obj.root_body) for name, obj in base.objects_dict.items()}
        robot_root = self.sim.model.body_name2id(robot.robot_model.root_body)
        robot_bodies = _subtree(self.sim.model._model, robot_root)
        self._robot_xy = self.sim.data.xpos[robot_root][:2].copy()
        self.obstacles = {name: _Obstacles(self.sim, robot_bodies | shape.bodies)
                          for name, shape in self.shapes.items()}
        self.gave_up: str | None = None
        self._goal = 0
        self._tries = 0
        self._phase, self._t, self._trail = "", 0, []
        self._grasp = (self.eef, self._hand_yaw())  # fingertip point and hand yaw of the next grasp
        self._hold = np.zeros(3)  # carried object's body from the fingertips
        self._hang = 0.0  # fingertips above the carried object's bottom
        self._lift_xy, self._lift_from, self._release_z = self.eef[:2], 0.0, 0.0
        self._start("rise")

    # -- what the simulator says ------------------------------------------------------------------------------------

    @property
    def eef(self) -> np.ndarray:
        return self.sim.data.site_xpos[self.eef_site].copy()

    @property
    def hand(self) -> np.ndarray:
        return self.sim.data.site_xmat[self.eef_site].reshape(3, 3).copy()

    def _hand_yaw(self) -> float:
        axis = self.hand[:, 0]
        return float(np.arctan2(axis[1], axis[0]))

    def _held(self, name: str) -> bool:
        """Both fingers touch the object (anywhere: a bowl's rim rests on a finger, not its pad)."""
        fingers = [self.gripper.important_geoms["left_finger"], self.gripper.important_geoms["right_finger"]]
        return bool(self.base._check_grasp(gripper=fingers, object_geoms=self.base.objects_dict[name]))

    def _carried(self, goal: PlaceGoal) -> bool:
        """The object still moves with the hand (where it sat in the hand after the lift, within 3 cm)."""
        return bool(np.linalg.norm(self.shapes[goal.obj].pos - self.eef - self._hold) < SLIP)

    def _done(self, goal: PlaceGoal) -> bool:
        return bool(self.base._eval_predicate([goal.predicate, goal.obj, goal.target]))

    def _others_top(self, goal: PlaceGoal) -> float:
        """The highest point of every object but the carried one (the target included)."""
        return max(s.bounds()[1][2] for n, s in self.shapes.items() if n != goal.obj)

    def _target(self, goal: PlaceGoal) -> tuple[np.ndarray, float]:
        """Where the carried object's body goes (x, y) and the height its bottom is released at."""
        if goal.target in self.shapes:  # onto an object: body over body (LIBERO's On wants them within 3 cm)
            shape = self.shapes[goal.target]
            return shape.pos[:2], shape.bounds()[1][2] + RELEASE_GAP
        site = self.base.object_sites_dict[goal.target]
        pos = self.sim.data.get_site_xpos(goal.target).copy()
        half = np.abs(self.sim.data.get_site_xmat(goal.target) @ np.asarray(site.size, np.float64))
        if goal.predicate == "in":  # into a region: low in its box, blocked by the container's floor if need be
            return pos[:2], pos[2] - half[2] + RELEASE_GAP
        return pos[:2], pos[2] + abs(float(site.size[2])) + RELEASE_GAP  # onto a region's surface

    def _grasps(self, goal: PlaceGoal) -> list[tuple[np.ndarray, float]]:
        """Candidate grasps of the object of ``goal`` from its current pose, best first: (fingertip point, hand yaw).
        Whole grasps across the narrowest side (the hand turning least among equals), or for
        an object wider than the hand, rim grasps around it, nearest the robot first."""
        shape = self.shapes[goal.obj]
        points = shape.points()
        lo, hi = points.min(0), points.max(0)
        height = hi[2] - lo[2]
        prefer = self._hand_yaw()
        whole, rim = [], []
        for yaw in prefer + np.deg2rad(np.arange(-90, 90, 15)):
            u = np.array([np.cos(yaw), np.sin(yaw)])
            v = np.array([-u[1], u[0]])
            across, along = points[:, :2] @ u, points[:, :2] @ v
            width = across.max() - across.min()
            mid = u * (across.max() + across.min()) / 2 + v * (along.max() + along.min()) / 2
            if width <= HAND_OPENING:
                z = max(hi[2] - min(GRASP_DEPTH, height / 2), lo[2] + TIP_CLEARANCE)
                score = width + 0.005 * abs(yaw - prefer)
                whole.append((score, np.array([*mid, z]), yaw))
                continue
            z = hi[2] - min(RIM_DEPTH, height / 2)
            for side in (u, -u):  # the fingers straddle the wall: one outside, one inside
                point = mid + side * ((across.max() - across.min()) / 2 - RIM_INSET)
                score = float(np.linalg.norm(point - self._robot_xy)) + 0.005 * abs(yaw - prefer)
                rim.append((score, np.array([*point, z]), yaw))
        ordered = sorted(whole, key=lambda c: c[0]) or sorted(rim, key=lambda c: c[0])
        return [c[1:] for c in ordered]

    def _plan_grasp(self, goal: PlaceGoal) -> tuple[np.ndarray, float]:
        """The best candidate grasp whose fingers and hand come down clear of everything but the object."""
        candidates = self._grasps(goal)
        for point, yaw in candidates:
            if not self.obstacles[goal.obj].hit(_hand_points(point, yaw)):
                return point, yaw
        return candidates[0][0], candidates[0][1]

    # -- the phases ---------------------------------------------------------------------------------------------------

    def _start(self, phase: str) -> None:
        self._phase, self._t, self._trail = phase, 0, []

    def _next_goal(self) -> PlaceGoal | None:
        while self._goal < len(self.goals) and self._done(self.goals[self._goal]) and self._phase == "rise":
            self._goal += 1
        return self.goals[self._goal] if self._goal < len(self.goals) else None

    def _waypoint(self, goal: PlaceGoal) -> _Waypoint:
        """The waypoint of the current phase (re-read every step: objects move)."""
        eef, phase = self.eef, self._phase
        grasp, yaw = self._grasp
        shape = self.shapes[goal.obj]
        if phase == "rise":  # straight up, hand open, to above every object before moving across
            z = max(eef[2], self._others_top(goal) + HOVER, shape.bounds()[1][2] + HOVER)
            return _Waypoint(np.array([eef[0], eef[1], z]), yaw, OPEN)
        if phase == "above":
            return _Waypoint(np.array([grasp[0], grasp[1], max(grasp[2], shape.bounds()[1][2]) + HOVER]), yaw, OPEN)
        if phase == "descend":
            return _Waypoint(grasp, yaw, OPEN)
        if phase == "close":
            return _Waypoint(grasp, yaw, CLOSE)
        hang = self._hang
        target_xy, release = self._target(goal)
        carry = max(self._others_top(goal), release, self._lift_from) + CLEARANCE + hang
        lo, hi = shape.bounds()
        over = eef[:2] + target_xy - (lo[:2] + hi[:2]) / 2  # servo the object's middle (a bowl held by its rim
        # hangs tilted, and its body frame with it) over the target
        if phase == "lift":
            return _Waypoint(np.array([self._lift_xy[0], self._lift_xy[1], carry]), yaw, CLOSE)
        if phase == "carry":
            return _Waypoint(np.array([over[0], over[1], carry]), yaw, CLOSE)
        if phase == "lower":
            return _Waypoint(np.array([over[0], over[1], release + hang]), yaw, CLOSE)
        if phase == "release":
            return _Waypoint(eef, yaw, OPEN)
        # retreat and settle: up and away from the placed object, hand open
        return _Waypoint(np.array([eef[0], eef[1], max(eef[2], self._release_z + HOVER)]), yaw, OPEN)

    def _advance(self, goal: PlaceGoal, reached: bool) -> None:
        """Move to the next phase when this one is over (``reached``: the waypoint is reached or blocked)."""
        phase, t = self._phase, self._t
        over_budget = t >= BUDGET.get(phase, 1 << 30)
        if phase == "rise" and (reached or over_budget):
            self._grasp = self._plan_grasp(goal)
            self._start("above")
        elif phase == "above" and (reached or over_budget):
            self._grasp = self._plan_grasp(goal)  # refined right above the object
            self._start("descend")
        elif phase == "descend" and (reached or over_budget):
            self._start("close")
        elif phase == "close" and t >= CLOSE_STEPS:
            self._lift_xy = self.eef[:2]
            self._lift_from = self.shapes[goal.obj].bounds()[0][2]
            self._hang = self.eef[2] - self._lift_from
            self._start("lift")
        elif phase == "lift" and (reached or over_budget):
            if self.shapes[goal.obj].bounds()[0][2] - self._lift_from < LIFTED:
                self._retry(goal, "grasp_missed")
            else:
                self._hold = self.shapes[goal.obj].pos - self.eef
                self._hang = self.eef[2] - self.shapes[goal.obj].bounds()[0][2]
                self._start("carry")
        elif phase in ("carry", "lower") and not self._carried(goal):
            self._retry(goal, "dropped")
        elif phase == "carry" and (reached or over_budget):
            self._start("lower")
        elif phase == "lower" and (reached or over_budget):
            self._release_z = self.eef[2]
            self._start("release")
        elif phase == "release" and t >= RELEASE_STEPS:
            self._start("retreat")
        elif phase == "retreat" and (reached or over_budget):
            self._start("settle")
        elif phase == "settle" and t >= SETTLE_STEPS:
            if self._done(goal):
                self._goal += 1
                self._tries = 0
                self._start("rise")
            else:
                self._retry(goal, "not_placed")

    def _retry(self, goal: PlaceGoal, why: str) -> None:
        self._tries += 1
        if self._tries >= GRASP_TRIES:
            self.gave_up = f"{why}: {goal.predicate} {goal.obj} {goal.target} after {self._tries} tries"
        self._start("rise")

    def _resume(self, goal: PlaceGoal) -> None:
        """Taking over with the object already in the hand: carry it on (the first call only)."""
        if self._held(goal.obj) and self._phase == "rise" and self._t == 0 and self._tries == 0:
            self._grasp = (self.eef, self._hand_yaw())
            self._lift_xy = self.eef[:2]
            self._lift_from = -np.inf
            self._hang = self.eef[2] - self.shapes[goal.obj].bounds()[0][2]
            self._start("lift")

    def act(self) -> np.ndarray:
        """The action for the current simulator state."""
        goal = self._next_goal()
        if goal is None or self.gave_up:
            return np.array([0, 0, 0, 0, 0, 0, OPEN], np.float32)
        if self._t == 0 and self._phase == "rise":
            self._resume(goal)
        for _ in range(len(BUDGET) + 4):  # phases that are over at once hand on within the same step
            way = self._waypoint(goal)
            err = way.pos - self.eef
            self._trail.append(self.eef)
            stalled = len(self._trail) > STALL_STEPS and np.linalg.norm(
                self._trail[-1] - self._trail[-1 - STALL_STEPS]) < STALL_MOVE and self._t > STALL_STEPS
            phase = self._phase
            self._advance(goal, bool(np.linalg.norm(err) < REACHED or stalled))
            if self.gave_up:
                return np.array([0, 0, 0, 0, 0, 0, OPEN], np.float32)
            if self._phase == phase:
                break
            self._trail = []
        self._t += 1
        return self._action(way)

    def _action(self, way: _Waypoint) -> np.ndarray:
        move = np.clip(MOVE_GAIN * (way.pos - self.eef) / self.pos_scale, -1.0, 1.0)
        turn = _rotvec(_down(way.yaw) @ self.hand.T)
        if self.hand[2, 2] < -np.cos(TILT_FREE):  # tilted less than TILT_FREE: turn about the vertical only, so
            turn[:2] = 0.0  # the arm may lean the hand to reach far (a straight elbow cannot move the hand)
        turn = np.clip(TURN_GAIN * turn / self.rot_scale, -1.0, 1.0)
        return np.concatenate([move, turn, [way.gripper]]).astype(np.float32)
