"""Task names checked before anything starts (workers, process pools, Ray, actors).

A task is usable when afil-ray registers it (:mod:`afil_ray.envs.tasks`: instruction, episode limit, planner)
and, to be simulated, when its simulator has it and has its assets. A name that fails becomes one line naming
the key that held it (``env.task``, ``--task``, ``data.tasks``, ``reproduce.ood_tasks``) instead of a worker
that dies or an actor that raises half a minute into a run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from afil_ray.config import Config, ConfigError, EnvConfig
from afil_ray.envs.tasks import TASKS, TaskSpec


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
    """The task's spec, or a :class:`ConfigError` naming ``key`` and the registered tasks."""
    spec = TASKS.get(task)
    if spec is not None:
        return spec
    hint = ""
    if _maniskill_has(task):
        hint = (f" (ManiSkill has {task}, but afil-ray also needs its instruction and episode limit: add it with "
                "afil_ray.envs.tasks.register_task)")
    raise ConfigError(f"{key}: unknown task {task!r}{hint}; registered tasks: {', '.join(sorted(TASKS))}")


def check_runnable(key: str, task: str, *, planner: bool = False) -> TaskSpec:
    """:func:`check_task`, plus what simulating it needs: the simulator's assets on this machine (an
    ``AssetsMissingError`` line) and, with ``planner``, a motion planner (demos, corrections)."""
    spec = check_task(key, task)
    if planner and spec.planner is None:
        with_planner = sorted(t for t, s in TASKS.items() if s.planner is not None)
        raise ConfigError(f"{key}: task {task} has no motion planner (demos and corrections need one); tasks "
                          f"with one: {', '.join(with_planner)}")
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
    return [("env.task", cfg.env.task)]


def check_tasks(pairs: Iterable[tuple[str, str]], *, simulate: bool = True, planner: bool = False) -> None:
    """Every (key, task): registered, and with ``simulate`` runnable here (see :func:`check_runnable`)."""
    for key, task in pairs:
        if simulate:
            check_runnable(key, task, planner=planner)
        else:
            check_task(key, task)


def check_cameras(env: EnvConfig) -> None:
    """``env.cameras`` names cameras the task has (rgb mode), checked by building one env of the task: only when
    cameras are named, since it costs a simulator start (a couple of seconds)."""
    if env.obs_mode == "state" or not env.cameras:
        return
    from afil_ray.envs.maniskill import ManiSkillVecEnv

    ManiSkillVecEnv(dataclasses.replace(env, num_envs=1, cpu_vectorization="loop")).close()  # ConfigError if not
