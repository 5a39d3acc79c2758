"""What the detector-explainer learns from: rollouts of a reproduction's policies, their frames as the policy's
backbone sees them, and their labels at a sparse:dense ratio.

The reproduction's harvest holds one policy's rollouts; a failure detector trained on them learns one policy's few
ways of failing. ``collect`` rolls out several of the run's checkpoints (early success-only checkpoints fail more,
and differently) on fresh seeds into the detector's own store (``run_dir/detect/replay``, never the reproduction's,
whose stages train on every failure in theirs). Episodes are split into training and test sets by initial state
(``seed``), so no test episode shares its start with a training one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from afil_ray.config import Config
from afil_ray.detect.armor import ExplainerBatch
from afil_ray.detect.explainer import ExplanationTokenizer, frame_steps
from afil_ray.detect.labels import diagnose, explain, is_dense
from afil_ray.eval.arms import sampler_arm
from afil_ray.eval.workers import run_units, task_units
from afil_ray.pipeline.stages import with_updates
from afil_ray.policy.loading import load_start_policy
from afil_ray.policy.model import DAGPolicy
from afil_ray.replay.episode import Episode
from afil_ray.replay.store import ReplayStore

SOURCE_PREFIX = "detect:"


def collect(cfg: Config, checkpoints: dict[str, str], store: ReplayStore, seed_start: int, seeds: int,
            progress: bool = True) -> dict[str, int]:
    """Roll out each named checkpoint (success-only sampler) on ``seeds`` initial states from ``seed_start`` into
    ``store``, source ``detect:<name>``; a name already in the store is skipped (resumable). Returns episodes
    stored per name."""
    stored = {}
    have = {e.source for e in store.read_episodes(outcome=["success", "failure"])}
    for name, checkpoint in checkpoints.items():
        if SOURCE_PREFIX + name in have:
            continue
        run_cfg = with_updates(cfg, eval={"seed_start": seed_start, "episodes": seeds, "runs": 1},
                               sampler={"kind": "success_only"})
        policy = load_start_policy(checkpoint)
        bar = tqdm(total=seeds * len(run_cfg.env.tasks), desc=f"collect {name}", unit="ep", disable=not progress)
        count = 0
        for _, episodes in run_units(run_cfg, policy, [sampler_arm(run_cfg.sampler)],
                                     task_units(run_cfg.env.tasks, 1, 1)):
            for ep in episodes:
                ep.source, ep.snapshot_steps, ep.snapshots = SOURCE_PREFIX + name, [], []
            store.write_episodes(episodes)
            count += len(episodes)
            bar.update(len(episodes))
        bar.close()
        stored[name] = count
    return stored


def is_test(seed: int | None, test_share: float) -> bool:
    """Whether an initial state belongs to the test set (by a hash of its seed)."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < test_share


@torch.no_grad()
def frame_features(policy: DAGPolicy, episodes: Sequence[Episode], frames: int,
                   progress: bool = False) -> torch.Tensor:
    """[N, frames, d]: each episode's ``frames`` evenly spaced observations through the policy's backbone, the
    prefix tokens' masked mean (the frozen, shared representation the detector-explainer reads)."""
    out = []
    for ep in tqdm(episodes, desc="frame features", unit="ep", disable=not progress):
        steps = frame_steps(ep.length, frames)
        states = np.concatenate([ep.state, ep.final_state[None]])[steps]
        last = ep.length - 1  # the final observation has no stored image: its last frame stands in
        images = {cam: img[np.minimum(steps, last)] for cam, img in ep.images.items()}
        prefix = policy.encode(states, images, ep.instruction or "")
        mask = prefix.mask.float().unsqueeze(-1)
        out.append(((prefix.hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.stack(out)


@dataclass
class Labelled:
    """Episodes with their ground truth: cause, and the explanation in a training and a held-out phrasing."""

    episodes: list[Episode]
    causes: list[str]
    explanations: list[str]
    heldout_explanations: list[str]

    @classmethod
    def of(cls, episodes: Sequence[Episode]) -> Labelled:
        diagnoses = [diagnose(e) for e in episodes]
        return cls(list(episodes), [d.cause for d in diagnoses],
                   [explain(d, e.task, e.episode_id) for d, e in zip(diagnoses, episodes, strict=True)],
                   [explain(d, e.task, e.episode_id, heldout=True) for d, e in zip(diagnoses, episodes,
                                                                                    strict=True)])

    @property
    def failed(self) -> torch.Tensor:
        return torch.tensor([not e.success for e in self.episodes])

    def batch(self, features: torch.Tensor, tokenizer: ExplanationTokenizer,
              sparse_per_dense: float) -> ExplainerBatch:
        """Training rows: every episode's outcome, and its explanation where its id picks it as dense."""
        dense = torch.tensor([is_dense(e.episode_id, sparse_per_dense) for e in self.episodes])
        ids, mask = tokenizer.encode([x if d else None for x, d in zip(self.explanations, dense.tolist(),
                                                                        strict=True)])
        return ExplainerBatch(features, self.failed, dense, ids, mask)
