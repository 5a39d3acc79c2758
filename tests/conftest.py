"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest

from afil_ray.replay.episode import Episode


def build_episode(
    task: str = "PullCube-v1",
    outcome: str = "demo",
    length: int = 12,
    state_dim: int = 5,
    action_dim: int = 3,
    cameras: tuple[str, ...] = (),
    image_shape: tuple[int, int, int] = (8, 6, 3),
    snapshots: int = 2,
    seed: int = 0,
) -> Episode:
    """A small episode whose every value is distinct, so a wrong index cannot pass an equality check."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float32)[:, None]
    return Episode(
        task=task,
        outcome=outcome,
        state=(1000 * seed + 10 * t + np.arange(state_dim, dtype=np.float32) / 10).astype(np.float32),
        action=(-1000 * seed - 10 * t - np.arange(action_dim, dtype=np.float32) / 10).astype(np.float32),
        reward=rng.standard_normal(length).astype(np.float32),
        step_success=np.arange(length) == length - 1,
        terminated=np.zeros(length, bool),
        truncated=np.arange(length) == length - 1,
        final_state=rng.standard_normal(state_dim).astype(np.float32),
        instruction=f"do {task}",
        seed=seed,
        source="test",
        policy_version=3,
        sampler="flow",
        sampler_params={"steps": 10, "temperature": 0.5},
        control_mode="pd_joint_delta_pos",
        obs_mode="rgb" if cameras else "state",
        images={c: rng.integers(0, 256, (length, *image_shape), dtype=np.uint8) for c in cameras},
        snapshot_steps=list(range(0, length, max(1, length // max(1, snapshots))))[:snapshots],
        snapshots=[rng.bytes(64) for _ in range(min(snapshots, length))],
        extra={"note": "x"},
    )


@pytest.fixture
def make_episode() -> Callable[..., Episode]:
    return build_episode


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_outside_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Training with a frozen vision encoder keeps frame features under ``$XDG_CACHE_HOME`` by default
    (``train.feature_cache_dir``); the suite's stay in its own temporary directory."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
