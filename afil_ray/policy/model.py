"""DAG-VLA: one shared backbone, a success head and a failure head (and optionally a success critic), with the
normaliser that maps env units.

Everything numpy-shaped (replay batches, env observations) is converted and normalised here, so trainers and
rollout actors never see normalised values. Which parameters train in which mode is decided here too, so the
trainer's ``train.mode`` has one place that gives it meaning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from afil_ray.config import TRAIN_MODES, PolicyConfig, SamplerConfig
from afil_ray.policy.backbone import Backbone, Prefix, load_vlm
from afil_ray.policy.critic import Critic, weighted_bce
from afil_ray.policy.encoders import language_encoder, vision_encoder
from afil_ray.policy.heads import OUTCOME_TOKENS, ActionHead, OutcomeToken, same_shape
from afil_ray.policy.normalize import Normalizer
from afil_ray.policy.objectives import make_objective, masked_mse
from afil_ray.policy.sampler import HeadPair, rank_chunks, sample_chunk
from afil_ray.policy.tokenizer import BYTE_VOCAB_SIZE, Tokenizer, make_tokenizer
from afil_ray.replay.episode import IMAGE_PREFIX

HEADS = ("success", "failure")
COMPONENTS = ("backbone", "success_head", "failure_head")  # every policy has these
OPTIONAL_COMPONENTS = ("critic", "outcome")  # only policies built with them (policy.critic, .outcome_conditioning)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Noise drawn where the generator lives, so one CPU seed gives the same noise on any device."""
    draw = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw).to(device)


class DAGPolicy(nn.Module):
    """Backbone + success head + failure head + normaliser (+ critic); ``loss`` trains one head, ``sample`` acts,
    ``critic_loss`` trains the critic and ``q``/``v`` score with it.

    Build with :meth:`from_config`; save and load with ``afil_ray.policy.checkpoint``.
    """

    def __init__(self, cfg: PolicyConfig, backbone: Backbone, tokenizer: Tokenizer, state_dim: int,
                 action_dim: int) -> None:
        super().__init__()
        self.config = cfg
        self.state_dim, self.action_dim, self.horizon = state_dim, action_dim, cfg.horizon
        self.cameras = backbone.cameras
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.success_head = ActionHead(action_dim, cfg.horizon, backbone.width, cfg.head_width, cfg.head_depth,
                                       cfg.num_heads)
        self.failure_head = ActionHead(action_dim, cfg.horizon, backbone.width,
                                       cfg.failure_head_width or cfg.head_width,
                                       cfg.failure_head_depth or cfg.head_depth, cfg.num_heads)
        if cfg.failure_head_init == "success" and same_shape(self.success_head, self.failure_head):
            self.init_failure_head_from_success()
        self.normalizer = Normalizer(state_dim, action_dim, cfg.action_norm)
        self.objective = make_objective(cfg.objective, cfg.diffusion_steps, cfg.ddpm_schedule, cfg.flow_time)
        self.heads = HeadPair(self.success_head, self.failure_head)
        self.critic: Critic | None = None
        if cfg.critic:  # built last, so a policy without one draws the same initial weights as before critics
            self.critic = Critic(backbone.width, cfg.horizon, action_dim, cfg.critic_width, cfg.critic_depth)
        self.outcome: OutcomeToken | None = OutcomeToken(cfg.head_width) if cfg.outcome_conditioning else None

    @classmethod
    def from_config(cls, cfg: PolicyConfig, state_dim: int, action_dim: int, cameras: Sequence[str] = (), *,
                    vlm_config: PretrainedConfig | None = None, tokenizer_path: str | None = None) -> DAGPolicy:
        """A new policy (tiny: random init; pretrained: backbone weights from ``cfg.pretrained_path``).

        ``vlm_config``/``tokenizer_path`` build the architecture without loading weights (checkpoint loading).
        """
        tokenizer = make_tokenizer(cfg.backbone, cfg.max_text_tokens, tokenizer_path or cfg.pretrained_path,
                                   cfg.language_encoder)
        own_text = cfg.language_encoder == "vlm"  # else the VLM's embedding table is unused: keep it byte-sized
        vlm = load_vlm(cfg, tokenizer.vocab_size if own_text else BYTE_VOCAB_SIZE,
                       bool(cameras) and cfg.vision_encoder == "vlm", vlm_config)
        width = int(getattr(vlm, "language_model", vlm).config.hidden_size)
        backbone = Backbone(vlm, state_dim, cameras, vision_encoder(cfg, width) if cameras else None,
                            language_encoder(cfg, width))
        vocab = backbone.language_model.get_input_embeddings().num_embeddings
        if own_text and tokenizer.vocab_size > vocab:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the backbone embeds only {vocab}")
        return cls(cfg, backbone, tokenizer, state_dim, action_dim)

    @property
    def device(self) -> torch.device:
        return self.success_head.position.device

    def head(self, name: str) -> ActionHead:
        if name not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {name!r}")
        return self.success_head if name == "success" else self.failure_head

    @property
    def components(self) -> tuple[str, ...]:
        """The components this policy has: ``COMPONENTS``, then ``critic`` and ``outcome`` when it has them."""
        return COMPONENTS + tuple(name for name in OPTIONAL_COMPONENTS if getattr(self, name) is not None)

    def component(self, name: str) -> nn.Module:
        if name not in COMPONENTS + OPTIONAL_COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS + OPTIONAL_COMPONENTS}, got {name!r}")
        if name not in self.components:
            raise ValueError(f"this policy has no {name} (policy.{name}=false when it was built)")
        return getattr(self, name)

    def add_critic(self, width: int, depth: int, seed: int = 0) -> Critic:
        """A fresh critic (seeded) for a policy that has none, e.g. a checkpoint from before critics; the policy's
        config then records it, so the checkpoints it writes rebuild it."""
        if self.critic is not None:
            raise ValueError("this policy already has a critic")
        self.config = dataclasses.replace(self.config, critic=True, critic_width=width, critic_depth=depth)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            critic = Critic(self.backbone.width, self.horizon, self.action_dim, width, depth)
        self.critic = critic.to(self.device)
        return self.critic

    def add_outcome(self) -> OutcomeToken:
        """Outcome tokens (zero, so nothing changes until trained) for a policy built without them, e.g. the
        corrected policy an outcome-conditioned stage starts from; the config then records them."""
        if self.outcome is not None:
            raise ValueError("this policy already has outcome tokens")
        self.config = dataclasses.replace(self.config, outcome_conditioning=True)
        self.outcome = OutcomeToken(self.success_head.width).to(self.device)
        return self.outcome

    def outcome_condition(self, outcome: Any) -> torch.Tensor:
        """Token ids [B] (``OUTCOME_TOKENS``) -> the success head's condition [B, width]."""
        if self.outcome is None:
            raise ValueError("this policy has no outcome tokens (policy.outcome_conditioning=false when it was built)")
        return self.outcome(self._tensor(outcome, torch.long))

    def init_failure_head_from_success(self) -> None:
        """Start the failure head from the success head (same shape only): it then learns what to avoid
        from a generator that already models the task, instead of from scratch."""
        if not same_shape(self.success_head, self.failure_head):
            raise ValueError("failure head differs in shape from the success head; it cannot be copied")
        self.failure_head.load_state_dict(self.success_head.state_dict())

    def reset_failure_head(self, seed: int = 0) -> None:
        """Fresh random weights for the failure head (seeded), e.g. to learn failures without the success prior."""
        head = self.failure_head
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = ActionHead(head.action_dim, head.horizon, head.prefix_dim, head.width, head.depth, head.num_heads)
        head.load_state_dict(fresh.state_dict())

    def fit_normalizer(self, state: np.ndarray, action: np.ndarray) -> Normalizer:
        """Statistics from data (state [N, D], real actions [N, A]); call before training."""
        return self.normalizer.fit(state, action)

    # ------------------------------------------------------------------ training

    def parameters_for(self, mode: str) -> list[nn.Parameter]:
        """success_only: backbone + success head; failure_head: failure head alone; joint: backbone and both heads;
        critic: the critic alone (it learns on the frozen prefix the heads see)."""
        modules = {
            "success_only": [self.backbone, self.success_head],
            "failure_head": [self.failure_head],
            "joint": [self.backbone, self.success_head, self.failure_head],
            "critic": [self.critic],
            "outcome": [self.success_head, self.outcome],
        }
        if mode not in modules:
            raise ValueError(f"train.mode must be one of {TRAIN_MODES}, got {mode!r}")
        if mode == "critic" and self.critic is None:
            raise ValueError("train.mode=critic needs a policy with a critic (policy.critic=true)")
        if mode == "outcome" and self.outcome is None:
            raise ValueError("train.mode=outcome needs a policy with outcome tokens (policy.outcome_conditioning=true)")
        return [p for m in modules[mode] for p in m.parameters()]

    def set_trainable(self, mode: str) -> list[nn.Parameter]:
        """Freeze everything outside ``parameters_for(mode)`` (a frozen backbone then builds no graph)."""
        trainable = {id(p) for p in self.parameters_for(mode)}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        return self.parameters_for(mode)

    def _tensor(self, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.as_tensor(value, dtype=dtype, device=self.device)

    def encode(self, state: Any, images: Mapping[str, Any], instructions: Sequence[str] | str,
               image_features: Mapping[str, Any] | None = None) -> Prefix:
        """Raw (env-unit) state [B, D] and uint8 images (or a frozen vision encoder's cached ``image_features``)
        -> prefix; normalisation and tokenising happen here."""
        state = self._tensor(state, torch.float32)
        if state.dim() != 2 or state.shape[1] != self.state_dim:
            raise ValueError(f"state has shape {tuple(state.shape)}, this policy expects [B, {self.state_dim}]")
        if isinstance(instructions, str):
            instructions = [instructions] * state.shape[0]
        if len(instructions) != state.shape[0]:
            raise ValueError(f"{len(instructions)} instructions for a batch of {state.shape[0]}")
        ids, mask = self.tokenizer(list(instructions))
        pixels = {cam: self._tensor(images[cam]) for cam in self.cameras if cam in images}
        features = {cam: self._tensor(f) for cam, f in (image_features or {}).items()}
        return self.backbone.encode(self.normalizer.normalize_state(state), pixels, ids.to(self.device),
                                    mask.to(self.device), features)

    def frame_features(self) -> Callable[[str, np.ndarray], np.ndarray] | None:
        """``(camera, uint8 frames [S, H, W, 3]) -> features`` when the vision encoder is frozen (a replay sampler
        then stores features instead of pixels: ``WindowSampler.encode_frames``); None otherwise."""
        vision = self.backbone.vision
        if vision is None or not vision.frozen:
            return None
        return lambda _camera, frames: vision.frame_features(frames)

    def frame_features_id(self) -> str:
        """What ``frame_features`` computes, as a name (the frozen encoder's weights and settings): the directory
        of a feature cache on disk."""
        vision = self.backbone.vision
        if vision is None or not vision.frozen:
            raise ValueError("only a frozen vision encoder's frame features are cached")
        return vision.features_id()

    def loss(self, batch: Mapping[str, Any], head: str = "success",
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The generative loss of one head on a WindowSampler batch plus ``instruction`` (list of str).

        Padded chunk steps (``action_is_pad``) do not count. Metrics are plain floats.
        """
        if "instruction" not in batch:
            raise KeyError("policy batch needs 'instruction' (one string per window) besides the sampler's keys")
        action = self._tensor(batch["action"], torch.float32)
        if action.dim() != 3 or action.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"action has shape {tuple(action.shape)}, this policy expects "
                             f"[B, {self.horizon}, {self.action_dim}]")
        is_pad = self._tensor(batch["action_is_pad"], torch.bool)
        prefix = self.encode(batch["state"], batch.get("images") or {}, batch["instruction"],
                             batch.get("image_features"))
        actions = self.normalizer.normalize_action(action)
        noise = _randn(tuple(actions.shape), generator, self.device)
        t = self.objective.sample_time(actions.shape[0], generator, self.device)
        x_t, t_head, target = self.objective.training_pair(actions, noise, t)
        # outcome-conditioned training (train.mode=outcome): the success head reads each window's outcome token
        condition = None
        if "outcome" in batch:
            if head != "success":
                raise ValueError("outcome tokens condition the success head only")
            condition = self.outcome_condition(batch["outcome"])
        pred = self.head(head).predict(x_t, t_head, prefix.hidden, prefix.mask, condition)
        loss = masked_mse(pred, target, is_pad)
        return loss, {"loss": float(loss.detach()), "pad_fraction": float(is_pad.float().mean())}

    # ------------------------------------------------------------------ the critic

    def _critic(self) -> Critic:
        if self.critic is None:
            raise ValueError("this policy has no critic (policy.critic=false when it was built)")
        return self.critic

    def critic_logits(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, V) logits [B] for a critic batch: a chunk sampler's keys (``state``, ``action`` = the chunk [B, H, A]
        in env units, ``images`` or ``image_features``) plus ``instruction``."""
        critic = self._critic()
        chunk = self._tensor(batch["action"], torch.float32)
        if chunk.dim() != 3 or chunk.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"chunk has shape {tuple(chunk.shape)}, this policy expects "
                             f"[B, {self.horizon}, {self.action_dim}]")
        prefix = self.encode(batch["state"], batch.get("images") or {}, batch["instruction"],
                             batch.get("image_features"))
        q, v = critic(prefix.hidden, prefix.mask, self.normalizer.normalize_action(chunk))
        return q, v

    def critic_loss(self, batch: Mapping[str, Any], mc_targets: Sequence[str] = ("q", "v")
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """BCE of Q and of V against ``label`` (1: the row's episode succeeded), rows weighted by ``weight``;
        the loss is their sum, the metrics each alone (``critic_q``, ``critic_v``). ``mc_targets``: what the
        Monte-Carlo rows (``is_branch`` false) train (``data.critic_mc_targets``); the branch rows train both."""
        q, v = self.critic_logits(batch)
        labels = self._tensor(batch["label"], torch.float32)
        weights = self._tensor(batch["weight"], torch.float32) if "weight" in batch else torch.ones_like(labels)
        branch = (self._tensor(batch["is_branch"], torch.bool) if "is_branch" in batch
                  else torch.zeros_like(labels, dtype=torch.bool))
        weights_q = weights if "q" in mc_targets else weights * branch
        weights_v = weights if "v" in mc_targets else weights * branch
        loss_q, loss_v = weighted_bce(q, labels, weights_q), weighted_bce(v, labels, weights_v)
        return loss_q + loss_v, {"critic_q": float(loss_q.detach()), "critic_v": float(loss_v.detach()),
                                 "critic_success_rate": float(labels.mean())}

    def _prefix_of(self, obs: Mapping[str, Any], instructions: Sequence[str] | str) -> Prefix:
        images = {cam: obs[IMAGE_PREFIX + cam] for cam in self.cameras if IMAGE_PREFIX + cam in obs}
        return self.encode(obs["state"], images, instructions)

    @torch.no_grad()
    def q(self, obs: Mapping[str, Any], instructions: Sequence[str] | str, chunks: Any) -> np.ndarray:
        """P(success | s, chunk) for env observations (``state``, ``rgb_<camera>``) and chunks in env units:
        [B, H, A] (one per state) -> [B], or K per state [B, K, H, A] -> [B, K] (each state encoded once)."""
        critic = self._critic()
        chunks = self._tensor(chunks, torch.float32)
        prefix = self._prefix_of(obs, instructions)
        if chunks.shape[0] != prefix.hidden.shape[0]:
            raise ValueError(f"{chunks.shape[0]} chunk rows for {prefix.hidden.shape[0]} states")
        q, _ = critic(prefix.hidden, prefix.mask, self.normalizer.normalize_action(chunks))
        return torch.sigmoid(q).float().cpu().numpy()

    @torch.no_grad()
    def v(self, obs: Mapping[str, Any], instructions: Sequence[str] | str) -> np.ndarray:
        """P(success | s) [B] for env observations, under the policy that made the critic's data."""
        critic = self._critic()
        prefix = self._prefix_of(obs, instructions)
        _, v = critic(prefix.hidden, prefix.mask)
        return torch.sigmoid(v).float().cpu().numpy()

    # ------------------------------------------------------------------ acting

    @property
    def noise_shape(self) -> tuple[int, int]:
        """Shape (H, A) of one sample's initial noise, for callers that draw the noise themselves (``noise=``)."""
        return self.horizon, self.action_dim

    @torch.no_grad()
    def sample(self, obs: Mapping[str, Any], instructions: Sequence[str] | str, sampler: SamplerConfig,
               generator: torch.Generator | None = None, noise: Any = None) -> tuple[np.ndarray, dict[str, Any]]:
        """An action chunk [B, H, A] in env units for env observations (``state``, ``rgb_<camera>``).

        The initial noise is ``noise`` ([B, H, A], or [B, K, H, A] for ``rank``'s K candidates; tensor or array,
        standard normal; ``afil_ray.rollout.draw_noise`` draws one state's) when given, else drawn from
        ``generator`` (or torch's global RNG). Both samplers are deterministic after that draw (Euler steps for
        flow, DDIM with eta = 0 for ddpm), so the initial noise is all the sampling randomness: equal noise means
        equal chunks for equal observations and weights. Pass one of ``generator`` and ``noise``, not both.

        Diagnostics (see ``sampler.sample_chunk``): ``w``/``cos`` [B, K], ``w_mean``/``cos_mean`` [K], ``fused``;
        ``rank`` adds ``pick`` and ``q`` (``sampler.rank_chunks``).
        """
        prefix = self._prefix_of(obs, instructions)
        ranked = sampler.kind == "rank"
        shape = (prefix.hidden.shape[0], *((sampler.k,) if ranked else ()), self.horizon, self.action_dim)
        if noise is None:
            noise = _randn(shape, generator, self.device)
        else:
            if generator is not None:
                raise ValueError("pass either generator or noise to sample, not both")
            noise = torch.as_tensor(noise, dtype=torch.float32).to(self.device)
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, this batch needs {shape}")
        if ranked:
            score = None
            if sampler.pick == "critic" and sampler.k > 1:
                critic = self._critic()
                score = lambda chunks: torch.sigmoid(critic(prefix.hidden, prefix.mask, chunks)[0])  # noqa: E731
            chunk, diagnostics = rank_chunks(self.heads, self.objective, prefix, noise, sampler, score,
                                             clip=self.config.action_clip)
        else:
            # outcome-conditioned guidance reads the success head once more per step, with the token "success"
            condition = (self.outcome_condition(torch.full(shape[:1], OUTCOME_TOKENS["success"]))
                         if sampler.kind == "outcome" else None)
            chunk, diagnostics = sample_chunk(self.heads, self.objective, prefix, noise, sampler,
                                              clip=self.config.action_clip, condition=condition)
        actions = self.normalizer.unnormalize_action(chunk)
        return actions.float().cpu().numpy(), {"sampler": sampler.kind, **diagnostics}

    def num_parameters(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in self.component(name).parameters()) for name in self.components}
