"""The success critic: Q(s, chunk) = P(success | s, chunk) and V(s) = P(success | s), on the backbone's prefix.

It reads the same prefix tokens the action heads cross-attend to, pooled into one vector by a learned query (it
starts as the masked mean over real tokens, and learns which tokens carry the outcome), so a critic costs one
small MLP per estimate on top of an encode that sampling does anyway. Q also reads the normalised chunk, flattened
(H x A). Its purposes: picking undecided states to branch at (V: ``afil-ray branch`` scores states with it,
afil_ray/branches/states.py ``critic_scorer``) and ranking chunks sampled for one state (Q takes K chunks of B
states in one call, the prefix pooled once per state: the `rank` sampler, ``sampler.rank_chunks``).

Both are logits here; :class:`~afil_ray.policy.model.DAGPolicy` turns them into probabilities and trains them
with binary cross-entropy on branch and Monte-Carlo outcomes (train.mode=critic).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(inputs: int, width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width), nn.GELU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class Critic(nn.Module):
    """Attention-pooled prefix -> V logit; pooled prefix + flattened normalised chunk -> Q logit."""

    def __init__(self, prefix_dim: int, horizon: int, action_dim: int, width: int = 256, depth: int = 2) -> None:
        super().__init__()
        self.prefix_dim, self.horizon, self.action_dim = prefix_dim, horizon, action_dim
        self.width, self.depth = width, depth
        self.query = nn.Parameter(torch.zeros(prefix_dim))  # zero: uniform attention, the masked mean
        self.key = nn.Linear(prefix_dim, prefix_dim, bias=False)
        self.norm = nn.LayerNorm(prefix_dim)  # prefix scales differ between backbones; the MLPs see unit scale
        self.q_net = _mlp(prefix_dim + horizon * action_dim, width, depth)
        self.v_net = _mlp(prefix_dim, width, depth)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, d] prefix tokens, [B, L] bool real-token mask -> [B, d] features."""
        hidden = hidden.float()
        scores = self.key(hidden) @ self.query / math.sqrt(self.prefix_dim)
        weights = scores.masked_fill(~mask.bool(), float("-inf")).softmax(dim=-1)
        return self.norm((weights.unsqueeze(-1) * hidden).sum(dim=1))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor,
                chunk: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(Q logits, V logits [B]). ``chunk``: normalised [B, H, A] (Q [B]) or K per state [B, K, H, A] (Q [B, K]);
        None: V alone."""
        features = self.pool(hidden, mask)
        v = self.v_net(features).squeeze(-1)
        if chunk is None:
            return None, v
        if chunk.dim() not in (3, 4) or tuple(chunk.shape[-2:]) != (self.horizon, self.action_dim):
            raise ValueError(f"chunk has shape {tuple(chunk.shape)}, the critic expects [B, {self.horizon}, "
                             f"{self.action_dim}] or [B, K, {self.horizon}, {self.action_dim}]")
        flat = chunk.float().flatten(-2)
        if flat.dim() == 3:  # K chunks per state: the state's features repeat, the prefix is pooled once
            features = features.unsqueeze(1).expand(-1, flat.shape[1], -1)
        q = self.q_net(torch.cat([features, flat], dim=-1)).squeeze(-1)
        return q, v


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * BCE) / sum(w): each row counts by its weight (Monte-Carlo rows less than branch rows)."""
    per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (per_row * weights).sum() / weights.sum().clamp_min(1e-12)
