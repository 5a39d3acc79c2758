"""ManiSkill3 behind the VecEnv interface.

Two back-ends with one interface:
- ``gpu``: one ManiSkill env with ``num_envs`` parallel scenes in GPU physics (``physx_cuda``).
- ``cpu``: ``num_envs`` single-scene CPU envs, stepped in a plain loop in this process or by gymnasium's
  ``AsyncVectorEnv`` (one process each). docs/benchmarks.md has the measurement behind the ``auto`` choice:
  on 2 cores the loop is as fast for state observations and processes win once cameras render.

Episode limits, step counting and snapshots are ours, not ManiSkill's: ManiSkill's registered 50-step limit is
far too short for these tasks, and ``set_state_dict`` does not restore its elapsed-step counter.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from afil_ray.config import OBS_MODES, ConfigError, EnvConfig
from afil_ray.envs import snapshot as snap
from afil_ray.envs.base import Obs, SimulatorError, StepResult, describe_spaces
from afil_ray.envs.loop_batch import LoopBatch
from afil_ray.envs.tasks import TaskSpec, get_task
from afil_ray.replay.episode import IMAGE_PREFIX

log = logging.getLogger(__name__)

_NO_LIMIT = 10**9  # ManiSkill's own TimeLimit is disabled; the adapter applies the task's limit


class AssetsMissingError(RuntimeError):
    """The task needs downloaded assets (YCB objects, scenes) that are not on this machine."""


def _import_maniskill() -> None:
    os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "0")
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    import afil_ray.envs.variants  # noqa: F401  (registers the project's out-of-domain variants)

    quiet_simulator_logs()  # every process that builds an env (the CLI's, workers', actors') keeps its console clean


def check_assets(env_id: str) -> None:
    """Fail fast with a clear message instead of ManiSkill's interactive download prompt (which would hang)."""
    _import_maniskill()
    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    if env_id not in REGISTERED_ENVS:
        raise KeyError(f"ManiSkill has no task {env_id!r}")
    missing = []
    for asset_id in REGISTERED_ENVS[env_id].asset_download_ids or []:
        ids = (assets.expand_data_group_into_individual_data_source_ids(asset_id)
               if asset_id in assets.DATA_GROUPS else [asset_id])
        missing += [i for i in ids if not assets.is_data_source_downloaded(i)]
    if missing:
        shown = ", ".join(sorted(set(missing))[:5]) + (" ..." if len(set(missing)) > 5 else "")
        raise AssetsMissingError(
            f"task {env_id} needs ManiSkill assets that are not downloaded ({shown}). Download them on a machine "
            f"with network access (python -m mani_skill.utils.download_asset {env_id}) and copy "
            f"~/.maniskill/data (or $MS_ASSET_DIR) here; tasks built from primitives need no assets."
        )


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


# rgb mode: the slots of task extras a camera cannot show (TaskSpec.hidden_extras), every task's state has all of
# them (zeros where its task has none) so that one policy reads every task's state in one layout
HIDDEN_EXTRA_SIZES = {"goal_pos": 3}


def rgb_state(raw: Any, spec: TaskSpec) -> np.ndarray:
    """Proprioception (joint positions and velocities, TCP pose) and the task's hidden extras in their slots:
    [N, 18 + 7 + 3] for the Panda. Object poses and visible goals are left to the cameras."""
    from mani_skill.utils.common import flatten_state_dict

    agent = _to_numpy(flatten_state_dict(raw["agent"], use_torch=True)).astype(np.float32, copy=False)
    extra = raw.get("extra", {})
    parts = [agent, _to_numpy(extra["tcp_pose"]).reshape(len(agent), -1)]
    for name, size in HIDDEN_EXTRA_SIZES.items():
        if name in spec.hidden_extras:
            parts.append(_to_numpy(extra[name]).reshape(len(agent), size))
        else:
            parts.append(np.zeros((len(agent), size), np.float32))
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)


def convert_obs(raw: Any, cfg: EnvConfig) -> Obs:
    """ManiSkill batched obs -> {"state": [N, D] float32, "rgb_<cam>": [N, H, W, 3] uint8} for the cameras
    ``env.cameras`` names (all of the task's when empty); in rgb mode ``state`` is :func:`rgb_state`."""
    if cfg.obs_mode == "state":
        return {"state": _to_numpy(raw).astype(np.float32, copy=False)}
    out: Obs = {"state": rgb_state(raw, get_task(cfg.task))}
    sensors = raw["sensor_data"]
    missing = [cam for cam in cfg.cameras if cam not in sensors]
    if missing:
        raise ConfigError(f"env.cameras: task {cfg.task} has no camera {missing[0]!r}; its cameras are "
                          f"{', '.join(sorted(sensors))}")
    for cam in cfg.cameras or sensors:
        out[f"{IMAGE_PREFIX}{cam}"] = _to_numpy(sensors[cam]["rgb"])
    return out


def _make_maniskill(spec: TaskSpec, cfg: EnvConfig, num_envs: int, sim_backend: str) -> gym.Env:
    if cfg.obs_mode not in OBS_MODES:
        raise ValueError(f"env.obs_mode must be one of {OBS_MODES}, got {cfg.obs_mode!r}")
    check_assets(spec.env_id)
    kwargs: dict[str, Any] = dict(spec.env_kwargs)
    if cfg.robot is not None:
        kwargs["robot_uids"] = cfg.robot
    if cfg.obs_mode == "rgb":
        kwargs["sensor_configs"] = dict(width=cfg.camera_size, height=cfg.camera_size)
    try:
        return gym.make(
            spec.env_id, num_envs=num_envs, sim_backend=sim_backend, obs_mode=cfg.obs_mode,
            control_mode=cfg.control_mode, max_episode_steps=_NO_LIMIT, **kwargs,
        )
    except Exception as e:
        missing = _missing_gpu_physx() if sim_backend == "physx_cuda" else None
        if missing is not None:
            raise SimulatorError(missing) from e
        raise SimulatorError(f"cannot create ManiSkill task {spec.env_id} ({sim_backend}, obs_mode={cfg.obs_mode}, "
                             f"control_mode={cfg.control_mode}): {e}") from e


def _missing_gpu_physx() -> str | None:
    """The error when SAPIEN's GPU PhysX library is absent (None when it is there). SAPIEN downloads it from GitHub on
    first use, which an offline cluster node cannot (seen on the GPU check's machine): say which file and from where."""
    import sapien.physx

    version = sapien.physx.version()
    library = Path.home() / ".sapien" / "physx" / version / "libPhysXGpu_64.so"
    if library.exists():
        return None
    url = f"https://github.com/sapien-sim/physx-precompiled/releases/download/{version}/linux-so.zip"
    return (f"GPU physics (physx_cuda) needs SAPIEN's {library}, which is missing and could not be downloaded: "
            f"unzip {url} there (fetched on a machine with internet), or use env.backend=cpu")


def refresh_contacts(base: Any) -> None:
    """Make contact-derived features (``is_grasped``) current for the scene's present state.

    After a reset or ``set_state_dict`` PhysX still reports the contacts of the last simulated step, so a
    reset right after a grasp observes ``is_grasped=1``. One physics step computes the contacts of the new
    configuration, and restoring the state undoes the step's motion.
    """
    state = base.get_state_dict()
    base.scene.px.step()
    base.set_state_dict(state)


def restore_state(base: Any, blob: bytes) -> None:
    """Put an unwrapped CPU ManiSkill env into a stored snapshot (see afil_ray.envs.snapshot)."""
    from mani_skill.utils import common

    base.set_state_dict(common.to_tensor(snap.loads(blob)))
    refresh_contacts(base)


def _limit(spec: TaskSpec, cfg: EnvConfig) -> int:
    return cfg.max_episode_steps or spec.max_episode_steps


class ManiSkillCpuEnv(gym.Env):
    """One CPU ManiSkill scene with our episode limit, step counter and periodic state snapshots.

    Unbatched gymnasium env so that gymnasium's vector envs (loop or processes) can batch it.
    """

    metadata: ClassVar[dict] = {"render_modes": []}

    def __init__(self, cfg: EnvConfig, index: int = 0) -> None:
        _import_maniskill()
        self.spec_ = get_task(cfg.task)
        self.cfg = cfg
        self.index = index
        self.max_episode_steps = _limit(self.spec_, cfg)
        self._env = _make_maniskill(self.spec_, cfg, 1, "physx_cpu")
        self._base = self._env.unwrapped
        self._t = 0
        self.render_next = True  # whether the next step's observation renders the cameras (then back to True)
        raw, _ = self._env.reset(seed=0)
        first = self._unbatch(convert_obs(raw, cfg))
        self._black = {k: np.zeros_like(v) for k, v in first.items() if k.startswith(IMAGE_PREFIX)}
        self.observation_space = gym.spaces.Dict({
            k: gym.spaces.Box(0, 255, v.shape, np.uint8) if v.dtype == np.uint8
            else gym.spaces.Box(-np.inf, np.inf, v.shape, np.float32)
            for k, v in first.items()
        })
        low, high = self._env.action_space.low, self._env.action_space.high
        self.action_space = gym.spaces.Box(low.reshape(-1), high.reshape(-1), dtype=np.float32)

    @property
    def base(self) -> Any:
        """The unwrapped ManiSkill env (agent, controllers, scene)."""
        return self._base

    @staticmethod
    def _unbatch(obs: Obs) -> Obs:
        return {k: v[0] for k, v in obs.items()}

    def _obs(self, raw: Any) -> Obs:
        if self._black and "sensor_data" not in raw:  # a step that skipped rendering: black images
            return {"state": rgb_state(raw, self.spec_)[0], **self._black}
        return self._unbatch(convert_obs(raw, self.cfg))

    @contextlib.contextmanager
    def _sensors(self, render: bool) -> Iterator[None]:
        """Without ``render``, the step's observation reads the state only (ManiSkill's ``state_dict`` path) and
        renders no camera: rendering is most of an rgb step's cost on the CPU."""
        mode = self._base._obs_mode
        if not render and self._black:
            self._base._obs_mode = "state_dict"
        try:
            yield
        finally:
            self._base._obs_mode = mode

    def _snapshot(self) -> bytes | None:
        every = self.cfg.snapshot_every
        return snap.dumps(self._base.get_state_dict()) if every and self._t % every == 0 else None

    def _refresh_contacts(self) -> Any:
        refresh_contacts(self._base)
        return self._base.get_obs()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Obs, dict]:
        try:
            self._base.reset(seed=seed)
            raw = self._refresh_contacts()
        except Exception as e:
            raise SimulatorError(f"{self.spec_.env_id} env {self.index}: reset(seed={seed}) failed: {e}") from e
        self._t = 0
        return self._obs(raw), {"snapshot": self._snapshot()}

    def step(self, action: np.ndarray) -> tuple[Obs, float, bool, bool, dict]:
        """gymnasium's step; its observation renders the cameras unless ``render_next`` was set False for it."""
        render, self.render_next = self.render_next, True
        try:
            # the unwrapped env: the adapter owns the time limit, so gym.make's wrappers are only overhead
            with self._sensors(render):
                raw, reward, _, _, info = self._base.step(np.asarray(action, np.float32)[None])
        except Exception as e:
            raise SimulatorError(f"{self.spec_.env_id} env {self.index}: step {self._t} failed: {e}") from e
        self._t += 1
        success = bool(_to_numpy(info["success"]).reshape(-1)[0])
        fail = bool(_to_numpy(info["fail"]).reshape(-1)[0]) if "fail" in info else False
        terminated = (success or fail) and not self.cfg.ignore_terminations
        truncated = self._t >= self.max_episode_steps and not terminated
        out = {"success": success, "fail": fail, "elapsed_steps": self._t,
               "snapshot": None if (terminated or truncated) else self._snapshot()}
        return self._obs(raw), float(_to_numpy(reward).reshape(-1)[0]), terminated, truncated, out

    def restore_from(self, requests: dict[int, tuple[bytes, int]]) -> Obs | None:
        """Restore this env if ``requests`` names its index (vector envs broadcast calls to every env)."""
        if self.index not in requests:
            return None
        blob, step = requests[self.index]
        restore_state(self._base, blob)
        self._t = step
        return self._obs(self._base.get_obs())

    def close(self) -> None:
        self._env.close()


class ManiSkillVecEnv:
    """N ManiSkill scenes behind the VecEnv interface (see module docstring for the back-ends)."""

    def __init__(self, cfg: EnvConfig, num_envs: int | None = None) -> None:
        if not isinstance(cfg.task, str):
            raise ConfigError(f"env.task={cfg.task}: ManiSkillVecEnv runs one task; several run in "
                              "afil_ray.envs.factory.make_vec_env")
        self.cfg = cfg
        self.task = get_task(cfg.task)
        self.num_envs = num_envs or cfg.num_envs
        self.slot_tasks = (self.task,) * self.num_envs
        self.obs_mode = cfg.obs_mode
        self.control_mode = cfg.control_mode
        self.max_episode_steps = _limit(self.task, cfg)
        self.snapshot_every = cfg.snapshot_every
        self.backend = resolve_backend(cfg.backend)
        self._impl: _GpuBatch | _LoopBatch | _AsyncBatch
        if self.backend == "gpu":
            self._impl = _GpuBatch(cfg, self.num_envs, self.max_episode_steps)
        elif resolve_cpu_vectorization(cfg) == "async":
            self._impl = _AsyncBatch(cfg, self.num_envs)
        else:
            self._impl = _LoopBatch(cfg, self.num_envs)
        self.state_dim = self._impl.state_dim
        self.action_dim = self._impl.action_dim
        self.cameras = self._impl.cameras
        self.action_low, self.action_high = self._impl.action_low, self._impl.action_high
        self._pending: np.ndarray | None = None
        self._render: np.ndarray | None = None

    def reset(self, seeds: list[int], mask: np.ndarray | None = None) -> tuple[Obs, list[bytes | None]]:
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs one seed per env ({self.num_envs}), got {len(seeds)}")
        return self._impl.reset(seeds, mask)

    def step(self, actions: np.ndarray, render: np.ndarray | None = None) -> StepResult:
        """A step of every env; the CPU envs not in ``render`` (when given) skip rendering their cameras, whose
        images come back black (the GPU back-end renders every env's)."""
        self.step_async(actions, render)
        return self.step_wait()

    def step_async(self, actions: np.ndarray, render: np.ndarray | None = None) -> None:
        """Start a step and return: with the processes back-end the envs step while the caller goes on (a
        multi-task env starts every task's step before it waits for any); :meth:`step_wait` finishes it."""
        self._pending = self._checked(actions)
        self._render = None if render is None else np.asarray(render, bool)
        if isinstance(self._impl, _AsyncBatch):
            self._impl.step_async(self._pending, self._render)

    def step_wait(self) -> StepResult:
        actions, self._pending = self._pending, None
        if actions is None:
            raise RuntimeError("step_wait without step_async")
        if isinstance(self._impl, _AsyncBatch):
            return self._impl.step_wait()
        if isinstance(self._impl, _LoopBatch):
            return self._impl.step(actions, self._render)
        return self._impl.step(actions)

    def _checked(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, np.float32)
        if actions.shape != (self.num_envs, self.action_dim):
            raise ValueError(f"actions must have shape {(self.num_envs, self.action_dim)}, got {actions.shape}")
        return actions

    def restore(self, index: int, snapshot: bytes, step: int) -> Obs:
        return self._impl.restore(index, snapshot, step)

    def local_env(self, index: int) -> ManiSkillCpuEnv:
        """The in-process env ``index`` (CPU loop back-end only), for code that must read simulator internals."""
        if not isinstance(self._impl, _LoopBatch):
            raise RuntimeError("local_env needs backend=cpu with cpu_vectorization=loop")
        return self._impl.envs[index]

    def close(self) -> None:
        self._impl.close()

    def __enter__(self) -> ManiSkillVecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_backend(backend: str) -> str:
    if backend not in ("auto", "cpu", "gpu"):
        raise ValueError(f"env.backend must be auto, cpu or gpu, got {backend!r}")
    if backend != "auto":
        return backend
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def resolve_cpu_vectorization(cfg: EnvConfig) -> str:
    if cfg.cpu_vectorization not in ("auto", "loop", "async"):
        raise ValueError(f"env.cpu_vectorization must be auto, loop or async, got {cfg.cpu_vectorization!r}")
    if cfg.cpu_vectorization != "auto":
        return cfg.cpu_vectorization
    # Measured (docs/benchmarks.md): equal for state obs, processes faster once cameras render.
    return "async" if cfg.obs_mode == "rgb" and (os.cpu_count() or 1) > 1 else "loop"


def _stack_infos(infos: dict, key: str, n: int, default: Any) -> np.ndarray:
    if key not in infos:
        return np.full(n, default)
    values, mask = infos[key], infos.get(f"_{key}", np.ones(n, bool))
    return np.where(mask, values, default)


class _LoopBatch(LoopBatch):
    """N CPU envs stepped one after the other in this process (no per-step info merging: the cheapest path)."""

    def __init__(self, cfg: EnvConfig, num_envs: int) -> None:
        super().__init__(functools.partial(ManiSkillCpuEnv, cfg), num_envs)
        describe_spaces(self, self.envs[0].observation_space, self.envs[0].action_space)


class _AsyncBatch:
    """N CPU envs, one process each, through gymnasium's AsyncVectorEnv (shared-memory observations)."""

    mode = "async"

    def __init__(self, cfg: EnvConfig, num_envs: int) -> None:
        from gymnasium.vector import AsyncVectorEnv, AutoresetMode

        fns = [functools.partial(ManiSkillCpuEnv, cfg, i) for i in range(num_envs)]
        # forkserver: SAPIEN and torch state must not be forked from a parent that already uses them
        self.venv = AsyncVectorEnv(fns, context="forkserver", autoreset_mode=AutoresetMode.DISABLED,
                                   shared_memory=True, copy=True)
        self.n = num_envs
        describe_spaces(self, self.venv.single_observation_space, self.venv.single_action_space)

    def _snapshots(self, infos: dict) -> list[bytes | None]:
        if "snapshot" not in infos:
            return [None] * self.n
        mask = infos.get("_snapshot", np.ones(self.n, bool))
        return [s if m else None for s, m in zip(infos["snapshot"], mask, strict=True)]

    def reset(self, seeds: list[int], mask: np.ndarray | None) -> tuple[Obs, list[bytes | None]]:
        options = None if mask is None else {"reset_mask": np.asarray(mask, bool)}
        obs, infos = self.venv.reset(seed=[int(s) for s in seeds], options=options)
        snaps = self._snapshots(infos)
        if mask is not None:
            snaps = [s if m else None for s, m in zip(snaps, mask, strict=True)]
        return dict(obs), snaps

    def step(self, actions: np.ndarray, render: np.ndarray | None = None) -> StepResult:
        self.step_async(actions, render)
        return self.step_wait()

    def step_async(self, actions: np.ndarray, render: np.ndarray | None = None) -> None:
        if render is not None and not render.all():  # each env goes back to rendering after its step
            self.venv.set_attr("render_next", [bool(r) for r in render])
        self.venv.step_async(actions)

    def step_wait(self) -> StepResult:
        obs, reward, terminated, truncated, infos = self.venv.step_wait()
        return StepResult(
            obs=dict(obs), reward=np.asarray(reward, np.float32), terminated=np.asarray(terminated, bool),
            truncated=np.asarray(truncated, bool),
            success=_stack_infos(infos, "success", self.n, False).astype(bool),
            fail=_stack_infos(infos, "fail", self.n, False).astype(bool),
            elapsed_steps=_stack_infos(infos, "elapsed_steps", self.n, 0).astype(np.int64),
            snapshots=self._snapshots(infos),
        )

    def restore(self, index: int, snapshot: bytes, step: int) -> Obs:
        return self.venv.call("restore_from", {index: (snapshot, step)})[index]

    def close(self) -> None:
        self.venv.close()


class _GpuBatch:
    """All scenes in one GPU-physics ManiSkill env; per-env bookkeeping is done here in numpy."""

    def __init__(self, cfg: EnvConfig, num_envs: int, limit: int) -> None:
        import torch

        _import_maniskill()
        self.cfg, self.n, self.limit = cfg, num_envs, limit
        self.env = _make_maniskill(get_task(cfg.task), cfg, num_envs, "physx_cuda")
        self.base = self.env.unwrapped
        self.device = self.base.device
        self.t = np.zeros(num_envs, np.int64)
        raw, _ = self.env.reset(seed=list(range(num_envs)))
        first = convert_obs(raw, cfg)
        self.state_dim = first["state"].shape[1]
        self.cameras = tuple(k[len(IMAGE_PREFIX):] for k in first if k.startswith(IMAGE_PREFIX))
        space = self.base.single_action_space
        self.action_dim = int(np.prod(space.shape))
        self.action_low, self.action_high = space.low.reshape(-1), space.high.reshape(-1)
        self._torch = torch

    def _snapshots(self, which: np.ndarray) -> list[bytes | None]:
        every = self.cfg.snapshot_every
        take = which & (self.t % every == 0) if every else np.zeros(self.n, bool)
        if not take.any():
            return [None] * self.n
        state = self.base.get_state_dict()

        def select(tree: Any, i: int) -> Any:
            return {k: select(v, i) for k, v in tree.items()} if isinstance(tree, dict) else tree[i:i + 1]

        return [snap.dumps(select(state, i)) if take[i] else None for i in range(self.n)]

    def reset(self, seeds: list[int], mask: np.ndarray | None) -> tuple[Obs, list[bytes | None]]:
        mask = np.ones(self.n, bool) if mask is None else np.asarray(mask, bool)
        idx = np.flatnonzero(mask)
        raw, _ = self.env.reset(seed=[int(seeds[i]) for i in idx],
                                options={"env_idx": self._torch.as_tensor(idx, device=self.device)})
        self.t[idx] = 0
        return convert_obs(raw, self.cfg), self._snapshots(mask)

    def step(self, actions: np.ndarray) -> StepResult:
        raw, reward, _, _, info = self.env.step(self._torch.as_tensor(actions, device=self.device))
        self.t += 1
        success = _to_numpy(info["success"]).astype(bool)
        fail = _to_numpy(info["fail"]).astype(bool) if "fail" in info else np.zeros(self.n, bool)
        terminated = (success | fail) & (not self.cfg.ignore_terminations)
        truncated = (self.t >= self.limit) & ~terminated
        return StepResult(convert_obs(raw, self.cfg), _to_numpy(reward).astype(np.float32), terminated,
                          truncated, success, fail, self.t.copy(), self._snapshots(~(terminated | truncated)))

    def restore(self, index: int, snapshot: bytes, step: int) -> Obs:
        from mani_skill.utils import common

        state = common.to_tensor(snap.loads(snapshot), device=self.device)
        self.base.set_state_dict(state, env_idx=self._torch.as_tensor([index], device=self.device))
        self.t[index] = step
        return {k: v[index] for k, v in convert_obs(self.base.get_obs(), self.cfg).items()}

    def close(self) -> None:
        self.env.close()


def quiet_simulator_logs() -> None:
    """ManiSkill's per-env notices (no CUDA renderer on a CPU machine, default poses of goal markers) at ERROR
    level, in this process: its logger is named ``"mani_skill "`` and set to INFO when mani_skill is imported, so
    it is imported first."""
    from mani_skill.utils.logging_utils import logger

    logger.setLevel(logging.ERROR)
