"""AFIL on a 2-D toy with a number: adaptive guidance at the paper's lam = 1 must at least halve how often
samples land in the failure mode, compared with success-only sampling of the same model.

Success demos come from a mixture with 70% of the mass at mode A = (-1.5, 0) and 30% at a nearby mode
B = (1.5, 0); failures all sit at B. A success-only model reproduces the mixture, so about 30% of its samples
land in the failure region (within 0.5 of B). The failure head, started from the success head as in the online
loop, learns B alone. Guidance v = v_s + w (v_s - v_f) repels samples from where the failure head pulls them.

Measured with this seed (4000 samples; shares within 0.5 of B / within 0.5 of A / within 1.0 of A):
success-only 0.266 / 0.725 / 0.727, lam = 1 0.101 / 0.764 / 0.898, lam = 2 0.058 / 0.655 / 0.940. The mass
leaving B goes to A's side, but part of it is pushed past A (0.5-1.0 beyond it, mostly in the last step, where
the heads' velocities grow like 1/tau and w jumps): guidance trades failures for a displaced success mode, more
so for larger lam. The exact velocity fields of this mixture give 0.29 -> 0.11 (lam = 1), 0.06 (lam = 2); with
the modes at +-1 instead, lam = 1 reaches only the factor 2 (0.29 -> 0.14, exact fields too).
"""

from __future__ import annotations

import numpy as np
import torch

from afil_ray.config import PolicyConfig, SamplerConfig
from afil_ray.policy import DAGPolicy

MODE_A, MODE_B, SPREAD, RADIUS = np.array([-1.5, 0.0]), np.array([1.5, 0.0]), 0.08, 0.5


def mixture(n: int, share_b: float, rng: np.random.Generator) -> np.ndarray:
    at_b = rng.random(n) < share_b
    points = np.where(at_b[:, None], MODE_B, MODE_A) + SPREAD * rng.standard_normal((n, 2))
    return points.astype(np.float32)[:, None, :]  # chunks of one 2-D action


def batch(actions: np.ndarray) -> dict:
    n = len(actions)
    return {"state": np.zeros((n, 1), np.float32), "action": actions, "action_is_pad": np.zeros((n, 1), bool),
            "instruction": [""] * n}


def train(policy: DAGPolicy, mode: str, head: str, data: np.ndarray, rng: np.random.Generator,
          steps: int = 200, batch_size: int = 512, lr: float = 3e-3) -> None:
    optimizer = torch.optim.Adam(policy.set_trainable(mode), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss, _ = policy.loss(batch(data[rng.integers(0, len(data), batch_size)]), head, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def shares(policy: DAGPolicy, sampler: SamplerConfig, n: int = 4000) -> tuple[float, float, float]:
    """Shares of samples within RADIUS of B (failure), within RADIUS of A, and within 2 * RADIUS of A."""
    actions, _ = policy.sample({"state": np.zeros((n, 1), np.float32)}, "", sampler, torch.Generator().manual_seed(1))
    to_a, to_b = np.linalg.norm(actions[:, 0] - MODE_A, axis=1), np.linalg.norm(actions[:, 0] - MODE_B, axis=1)
    return float((to_b < RADIUS).mean()), float((to_a < RADIUS).mean()), float((to_a < 2 * RADIUS).mean())


def test_adaptive_guidance_halves_samples_in_the_failure_mode():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=2, horizon=1, head_width=64,
                       head_depth=2, action_clip=None)  # identity normaliser: the modes stay where they are
    policy = DAGPolicy.from_config(cfg, state_dim=1, action_dim=2)
    train(policy, "success_only", "success", mixture(20000, 0.3, rng), rng)
    policy.init_failure_head_from_success()
    train(policy, "failure_head", "failure", mixture(20000, 1.0, rng), rng)

    plain = shares(policy, SamplerConfig(kind="success_only"))
    lam1 = shares(policy, SamplerConfig(kind="adaptive", lam=1.0))
    lam2 = shares(policy, SamplerConfig(kind="adaptive", lam=2.0))
    report = "failure / near A / A side: " + ", ".join(
        f"{name} {' / '.join(f'{v:.3f}' for v in r)}" for name, r in [("success-only", plain), ("lam=1", lam1),
                                                                       ("lam=2", lam2)])

    assert 0.2 <= plain[0] <= 0.4, report  # the success-only model does cover the failure mode
    assert lam1[0] <= 0.5 * plain[0], report
    assert lam1[2] >= plain[2] + 0.5 * (plain[0] - lam1[0]), report  # what leaves B goes to A's side
    assert lam2[0] <= lam1[0], report  # a larger scale repels more
