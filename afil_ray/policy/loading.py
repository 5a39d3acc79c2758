"""Which checkpoint a run directory means, how a stage starts from one, and the device it runs on.

Every consumer (training, the loop's actors, evaluation, the pipeline, the CLI) needs these, so they live beside
the checkpoint format (``checkpoint.py``) rather than in the trainer, which only writes the ``latest`` pointer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from afil_ray.config import PolicyConfig
from afil_ray.policy import checkpoint as ckpt
from afil_ray.policy.checkpoint import CheckpointError
from afil_ray.policy.heads import same_shape
from afil_ray.policy.model import DAGPolicy

LATEST = "latest"  # checkpoints/latest names a run's newest complete checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``checkpoints/latest`` names it), or None."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory standing for its newest checkpoint."""
    path = Path(path)
    if (path / "spec.json").is_file():
        return path
    if (path / "checkpoints" / LATEST).is_file():
        return latest_checkpoint(path)
    raise CheckpointError(f"no checkpoint at {path} (neither a checkpoint directory nor a run directory with "
                          f"checkpoints/{LATEST})")


def load_start_policy(path: str | Path, device: str | torch.device = "cpu", *,
                      failure_head_init: str | None = None, seed: int = 0,
                      critic: PolicyConfig | None = None) -> DAGPolicy:
    """A checkpoint as the starting point of further training or of the online loop.

    A success-only checkpoint's failure head is still the untrained copy made when the policy was built; with
    ``policy.failure_head_init=success`` it is replaced by the trained success head, so the failure head starts
    from a generator that models the task (and guidance is a no-op, v_f = v_s, until it learns failures); with
    ``random`` it is freshly initialised (seeded), so it models failures alone. ``failure_head_init`` overrides
    the checkpoint's own setting (the config that starts the next stage decides).

    ``critic``: the starting stage's policy config; with ``critic=true`` a checkpoint without a critic gets a fresh
    one (``critic_width``, ``critic_depth``, seeded by ``seed``), so a critic trained later (train.mode=critic, or
    versions the loop's learner ships) has a place to go; with ``outcome_conditioning=true`` one without outcome
    tokens gets zero ones.
    """
    path = resolve_checkpoint(path)
    policy = ckpt.load_policy(path, device=device)
    trainer_file = path / "trainer.json"
    mode = json.loads(trainer_file.read_text()).get("mode") if trainer_file.is_file() else None
    init = failure_head_init or policy.config.failure_head_init
    if mode == "success_only":
        if init == "success" and same_shape(policy.success_head, policy.failure_head):
            policy.init_failure_head_from_success()
        elif init == "random":
            policy.reset_failure_head(seed)
    if critic is not None and critic.critic and policy.critic is None:
        policy.add_critic(critic.critic_width, critic.critic_depth, seed)
    if critic is not None and critic.outcome_conditioning and policy.outcome is None:
        policy.add_outcome()  # zero tokens: the policy acts as before until train.mode=outcome trains them
    return policy
