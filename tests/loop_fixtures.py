"""A small start checkpoint and loop config shared by the loop tests (real env dims, untrained weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from afil_ray.config import Config
from afil_ray.envs.maniskill import ManiSkillVecEnv
from afil_ray.policy.checkpoint import save_policy
from afil_ray.policy.model import DAGPolicy

TASK = "PullCube-v1"


def loop_config(tmp: Path, **loop) -> Config:
    cfg = Config(run_dir=str(tmp / "run"))
    cfg.env.task, cfg.env.num_envs, cfg.env.max_episode_steps = TASK, 2, 12
    cfg.env.backend, cfg.env.cpu_vectorization = "cpu", "loop"
    cfg.replay.root = str(tmp / "replay")
    cfg.replay.episodes_per_shard = 4
    cfg.policy.hidden_size, cfg.policy.head_width, cfg.policy.horizon = 32, 32, 8
    cfg.policy.num_layers, cfg.policy.head_depth = 1, 1
    cfg.sampler.kind, cfg.sampler.steps, cfg.sampler.execute_steps = "adaptive", 3, 4
    cfg.train.mode, cfg.train.batch_size, cfg.train.warmup_steps, cfg.train.device = "failure_head", 16, 1, "cpu"
    cfg.loop.init_from = str(tmp / "start")
    cfg.loop.min_failures, cfg.loop.publish_every, cfg.loop.checkpoint_every = 2, 3, 6
    cfg.loop.refresh_every, cfg.loop.weight_poll_s, cfg.loop.round_s = 3, 0.0, 2.0
    cfg.loop.eval_episodes, cfg.loop.torch_threads = 2, 1
    for k, v in loop.items():
        setattr(cfg.loop, k, v)
    return cfg


def make_start_checkpoint(cfg: Config) -> Path:
    """What ``afil-ray train`` in success_only mode leaves behind, with untrained weights."""
    with ManiSkillVecEnv(cfg.env) as env:
        state_dim, action_dim = env.state_dim, env.action_dim
    policy = DAGPolicy.from_config(cfg.policy, state_dim, action_dim)
    rng = np.random.default_rng(0)
    policy.fit_normalizer(rng.standard_normal((256, state_dim)).astype(np.float32),
                          rng.uniform(-1, 1, (256, action_dim)).astype(np.float32))
    path = Path(cfg.loop.init_from)
    save_policy(policy, path)
    (path / "trainer.json").write_text(json.dumps({"step": 0, "mode": "success_only"}))
    return path
