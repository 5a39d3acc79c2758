"""The one place that turns ``env`` (one task or a list of them) into a VecEnv."""

from __future__ import annotations

from afil_ray.config import EnvConfig
from afil_ray.envs.base import VecEnv
from afil_ray.envs.maniskill import ManiSkillVecEnv
from afil_ray.envs.multitask import MultiTaskVecEnv
from afil_ray.envs.tasks import get_task


def _single(cfg: EnvConfig) -> VecEnv:
    """One task's env, from the simulator its TaskSpec names (LIBERO imported only for LIBERO tasks)."""
    if get_task(cfg.task).simulator == "libero":
        from afil_ray.envs.libero import LiberoVecEnv

        return LiberoVecEnv(cfg)
    return ManiSkillVecEnv(cfg)


def make_vec_env(cfg: EnvConfig) -> VecEnv:
    """``env.num_envs`` slots of each task in ``env.task``: the simulator's own env for one task, a
    :class:`MultiTaskVecEnv` of one per task for several."""
    if len(cfg.tasks) == 1:
        return _single(cfg.for_task(cfg.tasks[0]))
    envs: list[VecEnv] = []
    try:
        for task in cfg.tasks:
            envs.append(_single(cfg.for_task(task)))
    except BaseException:
        for env in envs:
            env.close()
        raise
    return MultiTaskVecEnv(envs)
