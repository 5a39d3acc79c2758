"""State and action normalisation statistics, computed from data and shipped inside every checkpoint.

States are standardised (mean/std). Actions go to [-1, 1] per dimension (``minmax``, the range a DDIM clip
and the final clip assume) or are standardised (``meanstd``). Dimensions that never vary (a gripper held
closed in every demo) keep a unit scale instead of dividing by zero. Unfitted statistics are the identity.
The statistics are buffers, so they move with ``.to(device)`` and travel in the state dict; on disk they are
JSON, whose float repr round-trips float32 exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

ACTION_MODES = ("minmax", "meanstd")
_STATS = ("state_mean", "state_std", "action_min", "action_max", "action_mean", "action_std")
_EPS = 1e-6


class Normalizer(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, action_mode: str = "minmax") -> None:
        super().__init__()
        if action_mode not in ACTION_MODES:
            raise ValueError(f"policy.action_norm must be one of {ACTION_MODES}, got {action_mode!r}")
        self.action_mode = action_mode
        self.register_buffer("state_mean", torch.zeros(state_dim))
        self.register_buffer("state_std", torch.ones(state_dim))
        self.register_buffer("action_min", -torch.ones(action_dim))
        self.register_buffer("action_max", torch.ones(action_dim))
        self.register_buffer("action_mean", torch.zeros(action_dim))
        self.register_buffer("action_std", torch.ones(action_dim))

    @property
    def state_dim(self) -> int:
        return self.state_mean.shape[0]

    @property
    def action_dim(self) -> int:
        return self.action_mean.shape[0]

    @torch.no_grad()
    def fit(self, state: np.ndarray, action: np.ndarray) -> Normalizer:
        """Statistics from data: state [N, D], action [N, A] (or [N, H, A]; exclude padded steps first)."""
        state = np.asarray(state, np.float64).reshape(-1, self.state_dim)
        action = np.asarray(action, np.float64).reshape(-1, self.action_dim)
        if not len(state) or not len(action):
            raise ValueError("cannot fit normalisation statistics on empty data")
        values = {
            "state_mean": state.mean(0), "state_std": state.std(0),
            "action_min": action.min(0), "action_max": action.max(0),
            "action_mean": action.mean(0), "action_std": action.std(0),
        }
        for name, value in values.items():
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))
        return self

    def _state_scale(self) -> torch.Tensor:
        return torch.where(self.state_std > _EPS, self.state_std, torch.ones_like(self.state_std))

    def _action_center_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.action_mode == "minmax":
            center, scale = (self.action_max + self.action_min) / 2, (self.action_max - self.action_min) / 2
        else:
            center, scale = self.action_mean, self.action_std
        return center, torch.where(scale > _EPS, scale, torch.ones_like(scale))

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        return (state - self.state_mean) / self._state_scale()

    def normalize_action(self, action: torch.Tensor) -> torch.Tensor:
        center, scale = self._action_center_scale()
        return (action - center) / scale

    def unnormalize_action(self, action: torch.Tensor) -> torch.Tensor:
        center, scale = self._action_center_scale()
        return action * scale + center

    def to_dict(self) -> dict:
        return {"action_mode": self.action_mode, **{k: getattr(self, k).tolist() for k in _STATS}}

    @classmethod
    def from_dict(cls, data: dict) -> Normalizer:
        norm = cls(len(data["state_mean"]), len(data["action_mean"]), data["action_mode"])
        for name in _STATS:
            value = torch.tensor(data[name], dtype=torch.float32)
            if value.shape != getattr(norm, name).shape:
                raise ValueError(f"normaliser {name} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(getattr(norm, name).shape)}")
            getattr(norm, name).copy_(value)
        return norm

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Normalizer:
        return cls.from_dict(json.loads(Path(path).read_text()))
