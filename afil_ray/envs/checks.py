"""Task names checked before anything starts (workers, process pools, Ray, actors).

A task is usable when afil-ray registers it (:mod:`afil_ray.envs.tasks`: instruction, episode limit, planner)
and, to be simulated, when its simulator has it and has its assets. A name that fails becomes one line naming
the key that held it (``env.task``, ``--task``, ``data.tasks``, ``reproduce.ood_tasks``) instead of a worker
that dies or an actor that raises half a minute into a run. A benchmark suite's name (``libero_object``) stands for
all of its tasks and is expanded as a command loads its config (:func:`with_suites_expanded`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import NamedTuple

from afil_ray.config import Config, ConfigError, EnvConfig
from afil_ray.envs.tasks import TASKS, TaskSpec, expand_suites, find_task


def _maniskill_has(env_id: str) -> bool:
    """Whether ManiSkill registers ``env_id`` (imports the simulator; only asked on the error path)."""
    try:
        from afil_ray.envs.maniskill import _import_maniskill

        _import_maniskill()
        from mani_skill.utils.registration import REGISTERED_ENVS
    except Exception:  # the hint is a courtesy: without the simulator the plain message stands
        return False
    return env_id in REGISTERED_ENVS


def check_task(key: str, task: str) -> TaskSpec:
    """The task's spec, or a :class:`ConfigError` naming ``key`` and the registered tasks (or, for a benchmark
    suite's task such as ``libero_object/3``, its valid suites and indices or the package it needs)."""
    try:
        spec = find_task(task)
    except (KeyError, ImportError) as e:
        raise ConfigError(f"{key}: {e.args[0] if e.args else e}") from None
    if spec is not None:
        return spec
    hint = ""
    if _maniskill_has(task):
        hint = (f" (ManiSkill has {task}, but afil-ray also needs its instruction and episode limit: add it with "
                "afil_ray.envs.tasks.register_task)")
    raise ConfigError(f"{key}: unknown task {task!r}{hint}; registered tasks: {', '.join(sorted(TASKS))}")


def expand_suites_at(key: str, tasks: list[str]) -> list[str]:
    """:func:`afil_ray.envs.tasks.expand_suites` of the tasks ``key`` holds; an unknown suite is a
    :class:`ConfigError` naming ``key`` and the valid suites."""
    try:
        return expand_suites(tasks)
    except KeyError as e:
        raise ConfigError(f"{key}: {e.args[0] if e.args else e}") from None


def with_suites_expanded(cfg: Config) -> Config:
    """``cfg`` with each whole benchmark suite in ``env.task``, ``data.tasks`` and ``reproduce.ood_tasks``
    (``libero_object``) replaced by its tasks in order (``libero_object/0`` .. ``/9``): what every command runs,
    trains on and records in its resolved config. The CLI applies it when it loads a config; a config without suite
    names comes back as it is."""
    tasks = expand_suites_at("env.task", cfg.env.tasks)
    data = expand_suites_at("data.tasks", list(cfg.data.tasks))
    ood = expand_suites_at("reproduce.ood_tasks", list(cfg.reproduce.ood_tasks))
    if tasks == cfg.env.tasks and data == list(cfg.data.tasks) and ood == list(cfg.reproduce.ood_tasks):
        return cfg
    env = cfg.env if tasks == cfg.env.tasks else dataclasses.replace(cfg.env, task=tasks)
    return dataclasses.replace(cfg, env=env, data=dataclasses.replace(cfg.data, tasks=data),
                               reproduce=dataclasses.replace(cfg.reproduce, ood_tasks=ood))


def check_runnable(key: str, task: str, *, planner: bool = False) -> TaskSpec:
    """:func:`check_task`, plus what simulating it needs: the simulator's assets on this machine (an
    ``AssetsMissingError`` line) and, with ``planner``, a demonstrator (demos, corrections): a motion planner, or
    for LIBERO tasks whose goal is placing objects, the scripted controller."""
    spec = check_task(key, task)
    if planner and spec.planner is None:
        with_planner = sorted(t for t, s in TASKS.items() if s.planner is not None)
        raise ConfigError(f"{key}: task {task} has no motion planner or scripted demonstrator (demos and corrections "
                          f"need one; LIBERO's script places objects); tasks with one: {', '.join(with_planner)}")
    if spec.simulator == "maniskill":
        from afil_ray.envs.maniskill import AssetsMissingError, check_assets

        try:
            check_assets(spec.env_id)
        except AssetsMissingError as e:
            raise AssetsMissingError(f"{key}: {e}") from None
        except KeyError:  # registered with afil-ray under a name ManiSkill does not have
            raise ConfigError(f"{key}: task {task} is registered with afil-ray but ManiSkill has no task "
                              f"{spec.env_id!r}") from None
    return spec


def trained_tasks(cfg: Config) -> list[tuple[str, str]]:
    """(key, task) of what training reads: ``data.tasks``, or ``env.task`` when that is empty."""
    if cfg.data.tasks:
        return [("data.tasks", t) for t in cfg.data.tasks]
    return env_tasks(cfg.env)


def check_tasks(pairs: Iterable[tuple[str, str]], *, simulate: bool = True, planner: bool = False) -> None:
    """Every (key, task): registered, and with ``simulate`` runnable here (see :func:`check_runnable`)."""
    for key, task in pairs:
        if simulate:
            check_runnable(key, task, planner=planner)
        else:
            check_task(key, task)


def check_cameras(env: EnvConfig) -> None:
    """``env.cameras`` names cameras every task has, and the tasks of a list show one policy the same cameras
    (rgb mode), checked by building one env of each task: only when cameras are named or there are several tasks,
    since it costs a simulator start each (a couple of seconds)."""
    if env.obs_mode == "state" or not (env.cameras or len(env.tasks) > 1):
        return
    seen = {task: observed(env, task).cameras for task in env.tasks}  # ConfigError if a named camera is missing
    first, cameras = next(iter(seen.items()))
    for task, other in seen.items():
        if other != cameras:
            shared = [c for c in cameras if c in other]
            raise ConfigError(f"env.task: {first} has cameras {', '.join(cameras)} and {task} has "
                              f"{', '.join(other)}; one policy needs the same cameras: set env.cameras to ones "
                              f"they share ({', '.join(shared) or 'none'})")


class Observed(NamedTuple):
    state_dim: int
    action_dim: int
    cameras: tuple[str, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]


def observed(env: EnvConfig, task: str) -> Observed:
    """What one env of ``task`` gives and takes as ``env`` configures it, from a simulator built for the question;
    remembered per setting, so the checks of one command build each task's env once."""
    key = (task, env.obs_mode, env.control_mode, env.camera_size, tuple(env.cameras))
    if key not in _OBSERVED:
        from afil_ray.envs.factory import make_vec_env

        one = dataclasses.replace(env.for_task(task), num_envs=1, cpu_vectorization="loop")
        with make_vec_env(one) as sim:
            _OBSERVED[key] = Observed(sim.state_dim, sim.action_dim, tuple(sim.cameras),
                                      tuple(sim.action_low.tolist()), tuple(sim.action_high.tolist()))
    return _OBSERVED[key]


_OBSERVED: dict[tuple, Observed] = {}


def env_tasks(env: EnvConfig) -> list[tuple[str, str]]:
    """(key, task) of every task in ``env.task``."""
    return [("env.task", t) for t in env.tasks]


def check_one_action_space(env: EnvConfig) -> None:
    """The tasks of a task list share one action space (one policy acts in all of them): a one-line error naming
    the first two that differ. Asks each task's simulator (:func:`observed`, shared with the camera and
    policy checks); a single task needs nothing."""
    if len(env.tasks) < 2:
        return
    spaces = {task: observed(env, task) for task in env.tasks}
    first, one = next(iter(spaces.items()))
    for task, other in spaces.items():
        if (other.action_dim, other.action_low, other.action_high) != (one.action_dim, one.action_low,
                                                                         one.action_high):
            raise ConfigError(f"env.task mixes action spaces: {first} acts with {one.action_dim} dims in "
                              f"[{min(one.action_low):g}, {max(one.action_high):g}], {task} with "
                              f"{other.action_dim} dims in [{min(other.action_low):g}, {max(other.action_high):g}] "
                              f"({env.control_mode}); one policy needs one robot and action space")


def check_policy_fits(policy: object, env: EnvConfig, where: str) -> None:
    """The policy at ``where`` (a checkpoint) can act in every task of ``env``: the state size it was trained on,
    its action size, and its cameras among the env's (an image policy evaluated on state observations would
    otherwise run blind). Builds one env of each task (a second or two each)."""
    cameras = tuple(getattr(policy, "cameras", ()))
    for task in env.tasks:
        have = observed(env, task)
        missing = [c for c in cameras if c not in have.cameras]
        if missing or have.state_dim != policy.state_dim or have.action_dim != policy.action_dim:
            raise ConfigError(
                f"{where}: the policy acts on state {policy.state_dim}, action {policy.action_dim}, cameras "
                f"{', '.join(cameras) or 'none'}; {task} with env.obs_mode={env.obs_mode} gives state "
                f"{have.state_dim}, action {have.action_dim}, cameras {', '.join(have.cameras) or 'none'} (evaluate "
                "it as it was trained: env.obs_mode, env.cameras and env.control_mode of its config.yaml)")
