"""Failure-informed guidance, the AFIL rule: v̂ = v_s + w·(v_s − v_f), with w = λ·(1 − cos(v_s, v_f))/2.

Negative prompting with the success head as the conditional model and the failure head as the negative one.
The adaptive weight is per sample and per step, over the whole flattened chunk (H × DoF): where both heads agree
(cos ≈ 1) sampling is left alone, where they point apart the repulsion grows up to λ. The same rule applies to
ε predictions (DDPM). ``classifier_free`` is the outcome-conditioned rule beside it (sampler ``outcome``).
"""

from __future__ import annotations

import torch


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """cos(a, b) = <a, b> / (‖a‖·‖b‖ + eps) per sample, over everything but the batch axis: [B, ...] -> [B].

    Clamped to [-1, 1] so float rounding cannot make w leave [0, λ].
    """
    a, b = a.flatten(1), b.flatten(1)
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)).clamp(-1.0, 1.0)


def adaptive_weight(v_s: torch.Tensor, v_f: torch.Tensor, lam: float) -> torch.Tensor:
    """w = λ·(1 − cos(v_s, v_f))/2 in [0, λ], per sample."""
    return lam * (1 - cosine(v_s, v_f)) / 2


def static_weight(v_s: torch.Tensor, w: float) -> torch.Tensor:
    return torch.full(v_s.shape[:1], w, dtype=v_s.dtype, device=v_s.device)


def guide(v_s: torch.Tensor, v_f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """v̂ = v_s + w·(v_s − v_f), w [B] broadcast over the chunk."""
    return v_s + w[:, None, None] * (v_s - v_f)


def classifier_free(v_none: torch.Tensor, v_success: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Outcome-conditioned guidance (CFGRL, arXiv 2505.23458): v̂ = v_∅ + w·(v_success − v_∅), w [B].

    One head conditioned on the outcome token: w = 0 is the unconditioned head (success only), 1 the
    success-conditioned one, above 1 pushes further from what the unconditioned head would do.
    """
    return v_none + w[:, None, None] * (v_success - v_none)
