"""The shared vision-language backbone E(o, l): camera images, instruction and state -> prefix tokens.

Built on a real VLM class path (PaliGemma: a SigLIP vision tower, a linear projector and a Gemma decoder), as
pi0 does, so ``tiny`` (random init from a small config) and ``pretrained`` (``from_pretrained`` of a
PaliGemma-class checkpoint: ``get_image_features`` plus a ``language_model``) share every line. A state-only
tiny policy builds just the Gemma decoder: it has no camera tokens and carries no unused vision tower.

The prefix is [patch tokens per camera] [instruction tokens, padded] [one linear state token], and the decoder
runs with bidirectional attention over all of it (pi0's prefix is bidirectional too): every attention layer is
switched to non-causal and the padding mask is passed as a ready 4-D bidirectional mask, because Gemma's
``use_bidirectional_attention`` alone falls back to a causal mask as soon as a 2-D padding mask is given
(transformers 5.23).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    GemmaConfig,
    GemmaModel,
    PaliGemmaConfig,
    PaliGemmaModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
)
from transformers.masking_utils import create_bidirectional_mask

from afil_ray.config import PolicyConfig
from afil_ray.policy.encoders import EfficientNetLite0, MiniLM, to_pixels


@dataclass
class Prefix:
    """Prefix tokens h = E(o, l) that both action heads cross-attend to."""

    hidden: torch.Tensor  # [B, L, d]
    mask: torch.Tensor  # [B, L] bool, True for real tokens (False: instruction padding)


def tiny_vlm_config(cfg: PolicyConfig, vocab_size: int, with_vision: bool = True) -> PretrainedConfig:
    """A PaliGemma-shaped config small enough to train from scratch on CPU; without cameras only its Gemma
    decoder (a state-only policy carries no unused vision tower)."""
    d, heads = cfg.hidden_size, cfg.num_heads
    if d % heads:
        raise ValueError(f"policy.hidden_size {d} is not divisible by policy.num_heads {heads}")
    text = GemmaConfig(
        vocab_size=vocab_size, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=d // heads,
        max_position_embeddings=1024, pad_token_id=0, use_bidirectional_attention=True,
    )
    if not with_vision:
        return text
    vision = SiglipVisionConfig(
        hidden_size=d, intermediate_size=4 * d, num_hidden_layers=cfg.vision_layers, num_attention_heads=heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size,
    )
    return PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=d,
                           image_token_id=vocab_size - 1)


def load_vlm(cfg: PolicyConfig, vocab_size: int, with_vision: bool,
             vlm_config: PretrainedConfig | None = None) -> PreTrainedModel:
    """tiny: random init; pretrained: weights from ``cfg.pretrained_path``; ``vlm_config``: architecture only
    (a checkpoint brings its own weights)."""
    if vlm_config is not None:
        return AutoModel.from_config(vlm_config)
    if cfg.backbone == "tiny":
        config = tiny_vlm_config(cfg, vocab_size, with_vision)
        return PaliGemmaModel(config) if with_vision else GemmaModel(config)
    if cfg.backbone == "pretrained":
        path = Path(cfg.pretrained_path or "")
        if not cfg.pretrained_path or not (path / "config.json").is_file():
            raise FileNotFoundError(f"policy.pretrained_path: no model config.json in {cfg.pretrained_path!r}")
        return AutoModel.from_pretrained(str(path))
    raise ValueError(f"unknown policy.backbone {cfg.backbone!r} (tiny | pretrained)")


def vlm_config_of(path: str | Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(path))


class Backbone(nn.Module):
    """Camera patch tokens, instruction tokens and one state token, encoded together by the VLM's decoder."""

    def __init__(self, vlm: PreTrainedModel, state_dim: int, cameras: Sequence[str] = (),
                 vision: EfficientNetLite0 | None = None, language: MiniLM | None = None) -> None:
        """``vision``/``language``: pretrained encoders (afil_ray/policy/encoders.py) used instead of the VLM's own
        vision tower / input embeddings."""
        super().__init__()
        self.vlm = vlm
        self.cameras = tuple(cameras)
        self.vision, self.language = vision, language
        if self.cameras and vision is None and not hasattr(vlm, "get_image_features"):
            raise ValueError(f"{type(vlm).__name__} has no vision tower, but cameras {list(self.cameras)} were given")
        self.image_size = int(vlm.config.vision_config.image_size) if self.cameras and vision is None else 0
        width = self.language_model.config.hidden_size
        self.state_proj = nn.Linear(state_dim, width)
        for module in self.language_model.modules():  # prefix attention is bidirectional (see module docstring)
            if hasattr(module, "is_causal"):
                module.is_causal = False
        if hasattr(self.language_model.config, "use_bidirectional_attention"):
            self.language_model.config.use_bidirectional_attention = True

    @property
    def language_model(self) -> PreTrainedModel:
        return getattr(self.vlm, "language_model", self.vlm)

    @property
    def width(self) -> int:
        return int(self.language_model.config.hidden_size)

    def encode(self, state: torch.Tensor, images: Mapping[str, torch.Tensor], text_ids: torch.Tensor,
               text_mask: torch.Tensor, image_features: Mapping[str, torch.Tensor] | None = None) -> Prefix:
        """state [B, D] (normalised), images {camera: uint8 [B, H, W, 3]} for this backbone's cameras, or their
        frozen vision encoder's ``image_features`` {camera: [B, N, C]} computed beforehand (a feature cache)."""
        tokens, masks = [], []
        batch = state.shape[0]
        for cam in self.cameras:
            if image_features and cam in image_features:
                if self.vision is None or not self.vision.frozen:
                    raise ValueError("image features stand in for images only under a frozen vision encoder")
                features = self.vision.tokens(image_features[cam].float())
                tokens.append(features)
                masks.append(torch.ones(features.shape[:2], dtype=torch.bool, device=state.device))
                continue
            if cam not in images:
                raise KeyError(f"observation has no image for camera {cam!r}; this policy uses {list(self.cameras)}")
            if self.vision is not None:
                features = self.vision(images[cam])
            else:
                features = self.vlm.get_image_features(to_pixels(images[cam], self.image_size))
                features = getattr(features, "pooler_output", features)  # projected patch tokens
            tokens.append(features)
            masks.append(torch.ones(features.shape[:2], dtype=torch.bool, device=state.device))
        if self.language is not None:
            tokens.append(self.language(text_ids, text_mask))
        else:
            tokens.append(self.language_model.get_input_embeddings()(text_ids))
        masks.append(text_mask.bool())
        tokens.append(self.state_proj(state)[:, None, :])
        masks.append(torch.ones(batch, 1, dtype=torch.bool, device=state.device))
        embeds, mask = torch.cat(tokens, dim=1), torch.cat(masks, dim=1)
        attention = create_bidirectional_mask(self.language_model.config, embeds, mask)
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
        return Prefix(hidden, mask)
