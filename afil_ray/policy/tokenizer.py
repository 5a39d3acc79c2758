"""Instruction tokenizers: UTF-8 bytes for the tiny backbone, the checkpoint's own tokenizer for a pretrained one.

Both return fixed-length ``(ids [B, T] int64, mask [B, T] bool)`` so the prefix has a static shape and the
backbone never sees ragged batches. Tokenizing is cached per string: a rollout batch repeats one instruction.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

PAD_ID = 0
BOS_ID = 1
BYTE_OFFSET = 2  # byte b is token b + BYTE_OFFSET
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


class Tokenizer(Protocol):
    vocab_size: int
    max_length: int

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def _batch(encode: Callable[[str], tuple[int, ...]], texts: list[str],
           max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad each distinct text once (a training batch repeats a few instructions), then gather the rows."""
    position = {text: i for i, text in enumerate(dict.fromkeys(texts))}
    distinct = list(position)
    ids = np.full((len(distinct), max_length), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(distinct), max_length), dtype=bool)
    for i, text in enumerate(distinct):
        row = encode(text)
        ids[i, : len(row)] = row
        mask[i, : len(row)] = True
    index = np.fromiter((position[t] for t in texts), np.int64, len(texts))
    return torch.from_numpy(ids[index]), torch.from_numpy(mask[index])


class _EncodeCache:
    """A per-instance memo of ``_encode_one``; rebuilt after unpickling (a policy travels to eval workers)."""

    def _encode_one(self, text: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _build_cache(self) -> None:
        self._encode = lru_cache(maxsize=1024)(self._encode_one)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_encode"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build_cache()


class ByteTokenizer(_EncodeCache):
    """BOS + UTF-8 bytes, truncated to ``max_length``: no vocabulary file, so a tiny model needs no download."""

    vocab_size = BYTE_VOCAB_SIZE
    pad_id = PAD_ID

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_length}")
        self.max_length = max_length
        self._build_cache()

    def _encode_one(self, text: str) -> tuple[int, ...]:
        return (BOS_ID, *(b + BYTE_OFFSET for b in text.encode("utf-8")))[: self.max_length]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch(self._encode, texts, self.max_length)


class PretrainedTokenizer(_EncodeCache):
    """A Hugging Face tokenizer behind the same call, padded/truncated to ``max_length``."""

    def __init__(self, path: str | Path, max_length: int) -> None:
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"policy.pretrained_path: no such directory {str(path)!r}")
        try:
            self.hf = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"policy.pretrained_path: no usable tokenizer in {path}: {e}") from None
        self.max_length = max_length
        self.vocab_size = len(self.hf)
        self._build_cache()

    def _encode_one(self, text: str) -> tuple[int, ...]:
        return tuple(self.hf(text, truncation=True, max_length=self.max_length)["input_ids"])

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch(self._encode, texts, self.max_length)

    def save_pretrained(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))


def make_tokenizer(backbone: str, max_length: int, path: str | Path | None = None,
                   language_encoder: str = "vlm") -> Tokenizer:
    """The tokenizer of whatever embeds the instruction: MiniLM's WordPiece for ``language_encoder=minilm``,
    else the backbone's (bytes for tiny, the checkpoint's own for pretrained)."""
    if language_encoder == "minilm":
        from afil_ray.policy.encoders import minilm_path

        return PretrainedTokenizer(minilm_path(), max_length)
    if backbone == "tiny":
        return ByteTokenizer(max_length)
    if backbone == "pretrained":
        if path is None:
            raise ValueError("policy.backbone=pretrained needs policy.pretrained_path")
        return PretrainedTokenizer(path, max_length)
    raise ValueError(f"unknown policy.backbone {backbone!r} (tiny | pretrained)")
