"""ARMOR's training recipe and inference for the detector-explainer (``afil_ray/detect/explainer.py``).

Training, per recipe (ARMOR's ablation rows):
- warm-up (every recipe): round 0, from an empty history, on every episode;
- ``conditioned`` (offline imitation): also rounds conditioned on the ground truth, one of its two parts masked at
  random (the true detection without the explanation, or the true explanation without the detection), so the model
  learns to use what it is given and the frames rather than copy;
- ``online`` (online refinement): after the warm-up, rollouts of ``rounds`` rounds from an empty history, each
  round conditioned on the model's own previous detection and (sampled) explanation, with the loss of every round.
Every round's loss is ``heterogeneous_loss``: detection on all episodes, explanation only where one exists.

Inference with ``refine``: ``trajectories`` refinement trajectories (the first greedy, the others sampled), at most
``max_rounds`` rounds each; each output scored by its self-certainty C = H_det + ``lam`` H_reason (binary entropy of
the detection, mean token entropy of the explanation); an episode stops refining when a round's best C does not
improve on the best so far by more than ``tol``, and keeps its lowest-C output. Without ``refine``: one greedy round.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from afil_ray.detect.explainer import (
    NO_DETECTION,
    SAID_FAILURE,
    SAID_SUCCESS,
    DetectorExplainer,
    ExplanationTokenizer,
    heterogeneous_loss,
)


@dataclass(frozen=True)
class Recipe:
    conditioned: bool  # offline imitation on ground-truth-conditioned rounds (masked)
    online: bool  # online refinement on the model's own rollouts
    refine: bool  # multi-round, multi-trajectory inference


# ARMOR's ablation table, row by row (its Table: detection / reasoning on RLBench)
RECIPES = {
    "multitask": Recipe(conditioned=False, online=False, refine=False),
    "refine_only": Recipe(conditioned=False, online=False, refine=True),
    "offline": Recipe(conditioned=True, online=False, refine=True),
    "online": Recipe(conditioned=False, online=True, refine=True),
    "armor": Recipe(conditioned=True, online=True, refine=True),
}


@dataclass(frozen=True)
class ArmorSettings:
    warmup_epochs: int = 40  # from scratch here (ARMOR fine-tunes a pretrained VLM for 3)
    online_epochs: int = 10
    rounds: int = 3  # refinement horizon in training (ARMOR's T)
    max_rounds: int = 4  # in inference (ARMOR's T_refine)
    trajectories: int = 3  # ARMOR's M
    lam: float = 0.1  # C = H_det + lam * H_reason
    tol: float = 0.01
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    temperature: float = 0.7  # sampling temperature of online rollouts and of trajectories after the first


@dataclass
class ExplainerBatch:
    frames: torch.Tensor  # [B, F, feature_dim]
    failed: torch.Tensor  # [B] bool
    dense: torch.Tensor  # [B] bool: the episode has an explanation
    target_ids: torch.Tensor  # [B, T]: the explanation's ids (an empty one where there is none)
    target_mask: torch.Tensor  # [B, T]

    def __len__(self) -> int:
        return len(self.failed)

    def rows(self, index: torch.Tensor) -> ExplainerBatch:
        return ExplainerBatch(self.frames[index], self.failed[index], self.dense[index], self.target_ids[index],
                              self.target_mask[index])


def _empty_history(model: DetectorExplainer, batch: int, tokens: int) -> tuple[torch.Tensor, ...]:
    ids = torch.full((batch, tokens), model.pad_id, dtype=torch.long)
    return torch.full((batch,), NO_DETECTION, dtype=torch.long), ids, torch.zeros(batch, tokens, dtype=torch.bool)


def _said(failure_logit: torch.Tensor) -> torch.Tensor:
    return torch.where(failure_logit > 0, SAID_FAILURE, SAID_SUCCESS).long()


def _round_loss(model: DetectorExplainer, data: ExplainerBatch, history: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    logit, token_loss, memory = model(data.frames, *history, data.target_ids)
    loss, metrics = heterogeneous_loss(logit, data.failed, token_loss, data.dense)
    return loss, metrics, (logit, memory)


def _masked_truth(data: ExplainerBatch, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Ground-truth history with one part masked: dense episodes keep the detection or the explanation (half
    each); sparse ones have only their detection to give."""
    truth = torch.where(data.failed, SAID_FAILURE, SAID_SUCCESS).long()
    keep_text = data.dense & (torch.rand(len(data), generator=generator) < 0.5)
    detection = torch.where(keep_text, NO_DETECTION, truth).long()
    mask = data.target_mask & keep_text[:, None]
    ids = torch.where(mask, data.target_ids, torch.zeros_like(data.target_ids))
    return detection, ids, mask


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, size):
        yield order[start:start + size]


def train(model: DetectorExplainer, data: ExplainerBatch, tokenizer: ExplanationTokenizer, recipe: Recipe,
          settings: ArmorSettings, seed: int = 0, progress: bool = False) -> list[dict[str, float]]:
    """Train ``model`` in place with ``recipe``; returns per-epoch mean metrics."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    epochs = settings.warmup_epochs + (settings.online_epochs if recipe.online else 0)
    steps = epochs * math.ceil(len(data) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=steps, pct_start=0.03)
    history_log: list[dict[str, float]] = []
    model.train()
    for epoch in tqdm(range(epochs), desc="train explainer", unit="epoch", disable=not progress):
        online = epoch >= settings.warmup_epochs
        sums: dict[str, list[float]] = {}
        for index in _batches(len(data), settings.batch_size, generator):
            part = data.rows(index)
            history = _empty_history(model, len(part), part.target_ids.shape[1])
            loss, metrics, (logit, memory) = _round_loss(model, part, history)
            if recipe.conditioned and not online:
                extra, conditioned, _ = _round_loss(model, part, _masked_truth(part, generator))
                loss = loss + extra
                metrics.update({f"conditioned_{k}": v for k, v in conditioned.items()})
            if online:
                for _ in range(settings.rounds - 1):
                    with torch.no_grad():
                        ids, _ = model.generate(memory[0].detach(), memory[1], tokenizer.bos, tokenizer.eos,
                                                settings.temperature, generator)
                    history = (_said(logit.detach()), ids, ids != model.pad_id)
                    more, _, (logit, memory) = _round_loss(model, part, history)
                    loss = loss + more
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            for k, v in {**metrics, "loss": float(loss.detach())}.items():
                sums.setdefault(k, []).append(v)
        history_log.append({k: float(np.mean(v)) for k, v in sums.items()})
    model.eval()
    return history_log


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@dataclass
class Explanation:
    failure_probability: float
    text: str
    certainty_score: float  # C = H_det + lam H_reason of the chosen output (lower: more certain)
    rounds: int  # refinement rounds the episode ran


@torch.no_grad()
def infer(model: DetectorExplainer, frames: torch.Tensor, tokenizer: ExplanationTokenizer, recipe: Recipe,
          settings: ArmorSettings, seed: int = 0) -> list[Explanation]:
    """Detection and explanation for each episode's frames [N, F, feature_dim]."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    out: list[Explanation] = []
    for start in range(0, len(frames), settings.batch_size):
        out += _infer_batch(model, frames[start:start + settings.batch_size], tokenizer, recipe, settings,
                            generator)
    return out


def _infer_batch(model: DetectorExplainer, frames: torch.Tensor, tokenizer: ExplanationTokenizer, recipe: Recipe,
                 settings: ArmorSettings, generator: torch.Generator) -> list[Explanation]:
    batch = len(frames)
    trajectories = settings.trajectories if recipe.refine else 1
    rounds = settings.max_rounds if recipe.refine else 1
    histories = [_empty_history(model, batch, tokenizer.max_tokens) for _ in range(trajectories)]
    best_c = torch.full((batch,), math.inf)
    best_p, best_ids = torch.zeros(batch), torch.zeros(batch, tokenizer.max_tokens, dtype=torch.long)
    active = torch.ones(batch, dtype=torch.bool)
    ran = torch.zeros(batch, dtype=torch.long)
    for _ in range(rounds):
        round_c = torch.full((batch,), math.inf)
        round_p, round_ids = torch.zeros(batch), torch.zeros_like(best_ids)
        for m in range(trajectories):
            logit, _, memory = model(frames, *histories[m])
            temperature = 0.0 if m == 0 else settings.temperature
            ids, token_entropy = model.generate(*memory, tokenizer.bos, tokenizer.eos, temperature, generator)
            p = torch.sigmoid(logit)
            c = _binary_entropy(p) + settings.lam * token_entropy
            better = c < round_c
            round_c = torch.where(better, c, round_c)
            round_p = torch.where(better, p, round_p)
            round_ids = torch.where(better[:, None], ids, round_ids)
            histories[m] = (_said(logit), ids, ids != model.pad_id)
        improved = active & (round_c < best_c - settings.tol)
        take = active & (round_c < best_c)
        best_c = torch.where(take, round_c, best_c)
        best_p = torch.where(take, round_p, best_p)
        best_ids = torch.where(take[:, None], round_ids, best_ids)
        ran += active.long()
        active = improved
        if not bool(active.any()):
            break
    return [Explanation(float(best_p[i]), tokenizer.decode(best_ids[i].tolist()), float(best_c[i]), int(ran[i]))
            for i in range(batch)]
