"""Sampling one action chunk, top to bottom like the math (openpi's ``sample_actions``, plus the AFIL line).

The caller encodes the prefix once per chunk; each head projects its cross-attention keys/values once
(``prefix_memory``), and the loop then runs only the heads. ``success_only`` never touches the failure head.
The guided samplers evaluate both heads on the same noisy chunk in one stacked call where that is the faster path
(same-shape heads, and CUDA or a CPU batch of at most ``FUSE_CPU_MAX_BATCH``: on CPU the stacked call's batched
matmuls lose to two plain calls at large batches, docs/benchmarks.md), else in two calls; the diagnostics record
which. ``rank`` samples K chunks per state from the success head in one batched call and executes the one with the
highest critic Q (value-guided policy steering, arXiv 2410.13816; RoboMonkey, arXiv 2506.17811), or a random one
(the control that spends the same compute without the critic).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from afil_ray.config import SamplerConfig
from afil_ray.policy.backbone import Prefix
from afil_ray.policy.guidance import adaptive_weight, classifier_free, cosine, guide, static_weight
from afil_ray.policy.heads import ActionHead, empty_like, same_shape
from afil_ray.policy.objectives import Objective

FUSE_CPU_MAX_BATCH = 16  # largest CPU batch at which the stacked call beats two calls (docs/benchmarks.md)


class HeadPair:
    """Success and failure heads evaluated together: one call of one module whose weights are both heads'
    weights stacked on a leading axis of 2 (``torch.func.stack_module_state``'s layout).

    The stacked module is built once per weight version, not per call: it is rebuilt only when a head's weights
    change (optimizer steps and ``load_state_dict`` bump the tensors' version counters), so an actor pays for
    the copy once per weight update, and each step is a plain module call (``functional_call`` would swap ~100
    tensors in and out at every step, which cost more than the second head at batch 1).
    """

    def __init__(self, success: ActionHead, failure: ActionHead) -> None:
        self.success, self.failure = success, failure
        self.can_fuse = same_shape(success, failure)
        self._key: tuple | None = None
        self._stacked: ActionHead | None = None

    def stacked(self) -> ActionHead:
        success, failure = self.success.state_dict(), self.failure.state_dict()
        key = tuple((t.device, t.data_ptr(), t._version) for t in [*success.values(), *failure.values()])
        if key != self._key:
            head = empty_like(self.success)
            with torch.no_grad():
                for name, weight in success.items():
                    owner, attr = head.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
                    setattr(owner, attr, nn.Parameter(torch.stack([weight, failure[name]]), requires_grad=False))
            self._stacked, self._key = head, key
        return self._stacked

    def prefix_memory(self, hidden: torch.Tensor, fused: bool) -> Any:
        """Both heads' prefix keys/values; call once per chunk, before the steps (it refreshes the stack)."""
        if fused:
            return self.stacked().prefix_memory(hidden)
        return self.success.prefix_memory(hidden), self.failure.prefix_memory(hidden)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, memory: Any, prefix_mask: torch.Tensor,
                 fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_s, v_f) for the same noisy chunk x."""
        if fused:
            v = self._stacked(x, t, memory, prefix_mask)
            return v[0], v[1]
        return self.success(x, t, memory[0], prefix_mask), self.failure(x, t, memory[1], prefix_mask)


def fusing_pays(x: torch.Tensor) -> bool:
    """Whether one stacked call of both heads is faster than two calls for a batch like ``x``."""
    return x.is_cuda or x.shape[0] <= FUSE_CPU_MAX_BATCH


@torch.no_grad()
def sample_chunk(heads: HeadPair, objective: Objective, prefix: Prefix, noise: torch.Tensor,
                 cfg: SamplerConfig, clip: float | None = None,
                 condition: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Denoise ``noise`` [B, H, A] into a normalised action chunk.

    Diagnostics: ``w`` and ``cos`` [B, K] per sample and step (rollouts store them per chunk), their per-step
    means ``w_mean``/``cos_mean`` [K], ``fused`` and ``failure_head_evals``. ``success_only`` reports w = 0 and
    ``cos = None`` (the failure head is not evaluated, so there is no cosine). ``outcome`` (``condition``: the
    success token's [B, width]) reports its constant w and cos(v_success, v_none).
    """
    conditioned = cfg.kind == "outcome"  # v_none + w (v_success - v_none): the success head twice, no failure head
    if conditioned and condition is None:
        raise ValueError("sampler.kind=outcome needs the success token's condition (a policy with outcome tokens)")
    guided = cfg.kind in ("static", "adaptive")
    fused = guided and cfg.fused_heads and heads.can_fuse and fusing_pays(noise)
    memory = heads.prefix_memory(prefix.hidden, fused) if guided else heads.success.prefix_memory(prefix.hidden)
    batch = noise.shape[0]
    w_steps, cos_steps = [], []  # [B] per step, kept on the device until the end (no sync per step)

    x = noise
    for step in objective.steps(cfg.steps):
        t = torch.full((batch,), step.t_head, dtype=x.dtype, device=x.device)
        if conditioned:
            v_none = heads.success(x, t, memory, prefix.mask)
            v_success = heads.success(x, t, memory, prefix.mask, condition)
            w = static_weight(v_none, cfg.w)
            v = classifier_free(v_none, v_success, w)
            w_steps.append(w)
            cos_steps.append(cosine(v_success, v_none))
        elif not guided:
            v = heads.success(x, t, memory, prefix.mask)
        else:
            v_s, v_f = heads(x, t, memory, prefix.mask, fused)
            w = adaptive_weight(v_s, v_f, cfg.lam) if cfg.kind == "adaptive" else static_weight(v_s, cfg.w)
            v = guide(v_s, v_f, w)
            w_steps.append(w)
            cos_steps.append(cosine(v_s, v_f))
        x = objective.update(x, v, step, clip)

    if clip is not None:
        x = x.clamp(-clip, clip)
    steps = len(objective.steps(cfg.steps))
    if guided or conditioned:
        w_all, cos_all = torch.stack(w_steps, 1).cpu().numpy(), torch.stack(cos_steps, 1).cpu().numpy()
    else:
        w_all, cos_all = np.zeros((batch, steps), np.float32), None
    diagnostics = {
        "w": w_all, "cos": cos_all,
        "w_mean": w_all.mean(0), "cos_mean": None if cos_all is None else cos_all.mean(0),
        "fused": fused, "failure_head_evals": steps if guided else 0,
    }
    return x, diagnostics


@torch.no_grad()
def rank_chunks(heads: HeadPair, objective: Objective, prefix: Prefix, noise: torch.Tensor, cfg: SamplerConfig,
                score: Callable[[torch.Tensor], torch.Tensor] | None,
                clip: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """K candidates per state from the success head (one batched call over B x K), the one executed picked by
    ``score`` (normalised chunks [B, K, H, A] -> success probabilities [B, K]; highest wins) or, with ``score``
    None (``pick=random``), uniformly at random with a seed taken from the noise, so an episode's picks repeat with
    its noise. ``noise`` is [B, K, H, A]. K = 1 returns success only's chunk bit for bit.

    Diagnostics as ``sample_chunk``'s for success only (w = 0, no cosine), plus ``pick`` [B] (the candidate index)
    and ``q`` [B, K] (the scores; None for a random pick)."""
    batch, k = noise.shape[:2]
    wide = Prefix(prefix.hidden.repeat_interleave(k, 0), prefix.mask.repeat_interleave(k, 0))
    plain = dataclasses.replace(cfg, kind="success_only")
    chunks, diagnostics = sample_chunk(heads, objective, wide, noise.flatten(0, 1), plain, clip)
    chunks = chunks.view(batch, k, *chunks.shape[1:])
    q = None
    if k == 1:
        pick = torch.zeros(batch, dtype=torch.long, device=chunks.device)
    elif score is not None:
        q = score(chunks)
        pick = q.argmax(dim=1)
    else:
        seed = int.from_bytes(hashlib.blake2b(noise.cpu().numpy().tobytes(), digest_size=8).digest(), "little")
        pick = torch.randint(k, (batch,), generator=torch.Generator().manual_seed(seed >> 1)).to(chunks.device)
    chosen = chunks[torch.arange(batch, device=chunks.device), pick]
    w = diagnostics["w"].reshape(batch, k, -1)[:, 0]
    diagnostics = {**diagnostics, "w": w, "w_mean": w.mean(0), "pick": pick.cpu().numpy(),
                   "q": None if q is None else q.float().cpu().numpy()}
    return chosen, diagnostics
