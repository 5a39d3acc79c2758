"""The action generator ("action expert"): a small transformer that maps a noisy chunk to a velocity or noise.

Each block attends over the H action tokens, then cross-attends to the backbone's prefix. The prefix's keys
and values do not change while one chunk is denoised, so they are projected once per chunk
(:class:`PrefixMemory`, the analogue of pi0's KV cache) and every integration step runs only the
action-token path.

Two heads of the same shape run as one call of one module whose weights are both heads' weights stacked on a
leading axis (``sampler.HeadPair``). :class:`Linear` and :class:`LayerNorm` are the torch modules plus a path
for such stacked weights (one ``baddbmm`` for both heads), and every other op keeps arbitrary leading axes, so
this file is the only implementation of the head, for one head and for two. ``torch.vmap`` over
``functional_call`` was measured 1.5-2x slower than two separate calls on CPU (``bmm`` plus separate bias adds
and copies, and no batching rule for CPU flash attention), so it is not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

OUTCOME_TOKENS = {"none": 0, "success": 1, "failure": 2}


class Linear(nn.Linear):
    """``nn.Linear``; with weights stacked over M heads ([M, out, in]) it maps [M, ..., in] -> [M, ..., out]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        members, out = self.weight.shape[:2]
        flat = x.reshape(members, -1, x.shape[-1])
        return torch.baddbmm(self.bias[:, None, :], flat, self.weight.transpose(1, 2)).view(*x.shape[:-1], out)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm``; with weights stacked over M heads ([M, width]) it normalises [M, ..., width]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 1:
            return super().forward(x)
        shape = (self.weight.shape[0],) + (1,) * (x.dim() - 2) + (self.weight.shape[1],)
        normed = F.layer_norm(x, self.normalized_shape, eps=self.eps)
        return torch.addcmul(self.bias.view(shape), normed, self.weight.view(shape))


def time_embedding(t: torch.Tensor, width: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sine-cosine embedding of t in [0, 1] (openpi's periods: fine enough to tell the K steps apart)."""
    if width % 2:
        raise ValueError(f"time embedding width must be even, got {width}")
    fraction = torch.linspace(0.0, 1.0, width // 2, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.float()[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., n, d] -> [..., heads, n, d / heads]."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over any leading axes (flattened to one batch axis for the fused CPU/GPU kernels)."""
    lead, (heads, n, dh) = q.shape[:-3], q.shape[-3:]
    if mask is not None:  # [B, L] key padding mask -> [prod(lead), 1, 1, L]
        mask = mask[:, None, None, :].expand(*lead, 1, 1, mask.shape[-1]).reshape(-1, 1, 1, mask.shape[-1])
    out = F.scaled_dot_product_attention(q.reshape(-1, heads, n, dh), k.reshape(-1, *k.shape[-3:]),
                                         v.reshape(-1, *v.shape[-3:]), attn_mask=mask)
    return out.view(*lead, heads, n, dh).transpose(-3, -2).flatten(-2)  # [..., n, d]


class PrefixMemory(nn.Module):
    """Per-block cross-attention keys and values of the prefix, computed once per chunk."""

    def __init__(self, prefix_dim: int, width: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key = nn.ModuleList(Linear(prefix_dim, width) for _ in range(depth))
        self.value = nn.ModuleList(Linear(prefix_dim, width) for _ in range(depth))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[..., L, d] -> (k_0, v_0, k_1, v_1, ...), each [..., heads, L, head_dim]."""
        out = []
        for key, value in zip(self.key, self.value, strict=True):
            out += [_split_heads(key(hidden), self.num_heads), _split_heads(value(hidden), self.num_heads)]
        return tuple(out)


class Block(nn.Module):
    """Self-attention over the action tokens, cross-attention to the prefix, MLP (pre-norm residuals)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm_self, self.norm_cross, self.norm_mlp = LayerNorm(width), LayerNorm(width), LayerNorm(width)
        self.qkv = Linear(width, 3 * width)
        self.self_out = Linear(width, width)
        self.cross_query = Linear(width, width)
        self.cross_out = Linear(width, width)
        self.mlp = nn.Sequential(Linear(width, 4 * width), nn.GELU(), Linear(4 * width, width))

    def forward(self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                prefix_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(p, self.num_heads) for p in self.qkv(self.norm_self(x)).chunk(3, dim=-1))
        x = x + self.self_out(_attend(q, k, v))
        q = _split_heads(self.cross_query(self.norm_cross(x)), self.num_heads)
        x = x + self.cross_out(_attend(q, key, value, prefix_mask))
        return x + self.mlp(self.norm_mlp(x))


class ActionHead(nn.Module):
    """G(x, t, h): noisy chunk [B, H, A] and time t [B] in [0, 1] (1 = pure noise) -> prediction [B, H, A].

    With weights stacked over M heads (``sampler.HeadPair``), the same forward returns [M, B, H, A].
    """

    def __init__(self, action_dim: int, horizon: int, prefix_dim: int, width: int = 128, depth: int = 3,
                 num_heads: int = 4) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"head width {width} is not divisible by num_heads {num_heads}")
        self.action_dim, self.horizon, self.width, self.depth = action_dim, horizon, width, depth
        self.prefix_dim, self.num_heads = prefix_dim, num_heads
        self.action_in = Linear(action_dim, width)
        self.time_mlp = nn.Sequential(Linear(width, width), nn.SiLU(), Linear(width, width))
        self.position = nn.Parameter(torch.randn(horizon, width) * 0.02)
        self.memory = PrefixMemory(prefix_dim, width, depth, num_heads)
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm_out = LayerNorm(width)
        self.action_out = Linear(width, action_dim)

    def _members(self) -> tuple[int, ...]:
        """() for one head, (M,) when the weights are stacked over M heads."""
        weight = self.action_in.weight
        return tuple(weight.shape[:1]) if weight.dim() == 3 else ()

    def prefix_memory(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.memory(hidden.expand(*self._members(), *hidden.shape))

    def forward(self, x: torch.Tensor, t: torch.Tensor, memory: tuple[torch.Tensor, ...],
                prefix_mask: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``memory`` is ``self.prefix_memory(prefix.hidden)``, reused across the steps of one chunk;
        ``condition`` [B, width] (an outcome token, ``OutcomeToken``) is added to the time embedding."""
        members = self._members()
        time = self.time_mlp(time_embedding(t, self.width).expand(*members, -1, -1))
        if condition is not None:
            time = time + condition
        tokens = self.action_in(x.expand(*members, *x.shape)) + self.position.unsqueeze(-3) + time.unsqueeze(-2)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, memory[2 * i], memory[2 * i + 1], prefix_mask)
        return self.action_out(self.norm_out(tokens))

    def predict(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
                prefix_mask: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """One-shot call (training): project the prefix and run the head."""
        return self(x, t, self.prefix_memory(hidden), prefix_mask, condition)


class OutcomeToken(nn.Module):
    """The outcome a chunk is conditioned on, c in {none, success, failure} (``OUTCOME_TOKENS``), as a vector added
    to the head's time embedding. ``none`` is fixed at zero and the others start there, so a head given tokens
    acts exactly as it did until it is trained with them (``train.mode=outcome``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.table = nn.Embedding(len(OUTCOME_TOKENS), width, padding_idx=OUTCOME_TOKENS["none"])
        nn.init.zeros_(self.table.weight)

    def forward(self, outcome: torch.Tensor) -> torch.Tensor:
        """[B] token ids -> [B, width]."""
        return self.table(outcome)


def empty_like(head: ActionHead) -> ActionHead:
    """A head of the same architecture with no storage (meta tensors), to receive other weights."""
    with torch.device("meta"):
        return ActionHead(head.action_dim, head.horizon, head.prefix_dim, head.width, head.depth, head.num_heads)


def same_shape(a: nn.Module, b: nn.Module) -> bool:
    """True when the two heads' weights can be stacked for one call."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
