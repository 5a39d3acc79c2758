"""The two generative objectives, each as training pairs plus the sampler's update rule.

Flow matching (pi0's convention): x_τ = τ·ε + (1 − τ)·A with ε ~ N(0, I), so τ = 1 is pure noise and τ = 0 the
action chunk; the head regresses the velocity u = ε − A. Training τ follows openpi: Beta(1.5, 1) (density
∝ √τ, more weight on the noisy end where the action distribution is decided), scaled to [0.001, 1];
``flow_time=uniform`` draws τ ~ U(0, 1). Sampling integrates dx/dτ = v from τ = 1 to 0 with K Euler steps,
x ← x + dt·v, dt = −1/K.

DDPM ε-prediction: x_k = √ᾱ_k·A + √(1 − ᾱ_k)·ε over ``diffusion_steps`` training steps (cosine ᾱ of Nichol &
Dhariwal, or linear betas scaled to the step count), the head regresses ε. Sampling is DDIM with η = 0 over K
of those steps; the guided ε enters DDIM exactly where the plain one would.

Both hand the head a time t in [0, 1] with 1 = pure noise, so one head architecture serves both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def masked_mse(pred: torch.Tensor, target: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """Mean squared error over real (unpadded) actions only: padded steps repeat the last action and would
    otherwise teach the head to stop."""
    per_step = (pred - target).pow(2).mean(dim=-1)  # [B, H]
    keep = (~is_pad).to(per_step.dtype)
    return (per_step * keep).sum() / keep.sum().clamp_min(1.0)


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Draw where the generator lives (a CPU generator gives the same numbers whatever device trains)."""
    return generator.device if generator is not None else device


@dataclass
class Step:
    """One sampler step: head time t_head [B] for the prediction, and the objective's own indices."""

    t_head: float
    index: float  # flow: τ; ddpm: timestep k
    next_index: float  # flow: τ after the step; ddpm: next k (-1: the clean end)


class FlowMatching:
    name = "flow"

    def __init__(self, time_dist: str = "beta") -> None:
        if time_dist not in ("beta", "uniform"):
            raise ValueError(f"policy.flow_time must be beta | uniform, got {time_dist!r}")
        self.time_dist = time_dist

    def sample_time(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        u = torch.rand(batch, generator=generator, device=_draw_device(generator, device)).to(device)
        if self.time_dist == "uniform":
            return u
        return u.pow(1.0 / 1.5) * 0.999 + 0.001  # inverse CDF of Beta(1.5, 1) (CDF τ^1.5)

    def training_pair(self, actions: torch.Tensor, noise: torch.Tensor,
                      tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_τ, head time, target u = ε − A)."""
        t = tau[:, None, None]
        return t * noise + (1 - t) * actions, tau, noise - actions

    def steps(self, k: int) -> list[Step]:
        return [Step(1.0 - i / k, 1.0 - i / k, 1.0 - (i + 1) / k) for i in range(k)]

    def update(self, x: torch.Tensor, v: torch.Tensor, step: Step, clip: float | None) -> torch.Tensor:
        dt = step.next_index - step.index  # = -1/K
        return x + dt * v


class DDPM:
    name = "ddpm"

    def __init__(self, diffusion_steps: int = 100, schedule: str = "cosine") -> None:
        if diffusion_steps < 1:
            raise ValueError(f"policy.diffusion_steps must be >= 1, got {diffusion_steps}")
        self.num_steps = diffusion_steps
        self.alpha_bar = self._alpha_bar(diffusion_steps, schedule)  # [T] float64, ᾱ_k for k = 0..T-1

    @staticmethod
    def _alpha_bar(n: int, schedule: str) -> torch.Tensor:
        if schedule == "linear":  # Ho et al.'s 1e-4 .. 0.02 for 1000 steps, scaled to n steps (improved DDPM)
            betas = torch.linspace(1e-4 * 1000 / n, 0.02 * 1000 / n, n, dtype=torch.float64).clamp(max=0.999)
        elif schedule == "cosine":
            s = 0.008
            f = torch.cos((torch.arange(n + 1, dtype=torch.float64) / n + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"policy.ddpm_schedule must be cosine | linear, got {schedule!r}")
        return torch.cumprod(1 - betas, dim=0)

    def head_time(self, k: torch.Tensor | float) -> torch.Tensor | float:
        return (k + 1) / self.num_steps

    def sample_time(self, batch: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (batch,), generator=generator,
                             device=_draw_device(generator, device)).to(device)

    def training_pair(self, actions: torch.Tensor, noise: torch.Tensor,
                      k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_k, head time, target ε)."""
        a = self.alpha_bar.to(actions.device)[k].to(actions.dtype)[:, None, None]
        return a.sqrt() * actions + (1 - a).sqrt() * noise, self.head_time(k.to(actions.dtype)), noise

    def steps(self, k: int) -> list[Step]:
        ks = torch.linspace(self.num_steps - 1, 0, min(k, self.num_steps)).round().long().unique_consecutive()
        ks = ks.tolist()
        return [Step(float(self.head_time(kk)), kk, ks[i + 1] if i + 1 < len(ks) else -1) for i, kk in enumerate(ks)]

    def update(self, x: torch.Tensor, eps: torch.Tensor, step: Step, clip: float | None) -> torch.Tensor:
        """DDIM (η = 0): estimate x0 from ε, optionally clip it, and move to the next timestep."""
        a = float(self.alpha_bar[int(step.index)])
        a_next = float(self.alpha_bar[int(step.next_index)]) if step.next_index >= 0 else 1.0
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps


Objective = FlowMatching | DDPM


def make_objective(name: str, diffusion_steps: int = 100, schedule: str = "cosine",
                   flow_time: str = "beta") -> Objective:
    if name == "flow":
        return FlowMatching(flow_time)
    if name == "ddpm":
        return DDPM(diffusion_steps, schedule)
    raise ValueError(f"policy.objective must be flow | ddpm, got {name!r}")
