"""docs/figures/ood_tasks.png: each task beside its out-of-domain variant (afil_ray/envs/variants.py), seed 3.

    python scripts/plot_ood_tasks.py
"""

from __future__ import annotations

import gymnasium as gym
import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from afil_ray.envs.maniskill import _import_maniskill

PAIRS = [("LiftPegUpright-v1", "LiftThickPegUpright-v1"), ("StackCube-v1", "StackCubeDistractors-v1"),
         ("PullCube-v1", "PullCubeDistractors-v1")]


def main(path: str = "docs/figures/ood_tasks.png", seed: int = 3) -> None:
    _import_maniskill()
    fig, axes = plt.subplots(2, len(PAIRS), figsize=(4 * len(PAIRS), 8))
    for col, pair in enumerate(PAIRS):
        for row, task in enumerate(pair):
            env = gym.make(task, obs_mode="state", render_mode="rgb_array", sim_backend="cpu")
            env.reset(seed=seed)
            image = env.render()
            image = image[0].cpu().numpy() if torch.is_tensor(image) else image
            axes[row][col].imshow(image)
            axes[row][col].set_title(task)
            axes[row][col].axis("off")
            env.close()
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    print(path)


if __name__ == "__main__":
    main()
