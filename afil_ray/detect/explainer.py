"""ARMOR's detector-explainer (arXiv, ``../shared/papers/armor-failure-detection.txt``) on the policy's backbone.

An episode is seen as ``frames`` evenly spaced observations, each encoded by the policy's frozen backbone and
pooled to one vector (``frame_features``): the detector-explainer shares the policy's representation of the scene
and instruction, as ARMOR shares its VLM's. On top:

- an episode encoder (a small transformer) reads a learned [CLS] token, the previous round's detection (none,
  success, failure), the frames and the previous round's explanation (ARMOR's state s_t = [x, l_{t-1}, e_{t-1}]);
- a detection head (an MLP on [CLS]) gives the failure logit, trained with BCE on every episode;
- an explanation decoder (a transformers GPT-2 configuration with cross-attention to the encoder, trained here from
  scratch; the MiniLM WordPiece tokenizer's vocabulary) writes the explanation, trained with next-token prediction
  only on episodes that have one (``heterogeneous_loss``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NO_DETECTION, SAID_SUCCESS, SAID_FAILURE = 0, 1, 2  # the previous round's detection, as the encoder reads it
IGNORE = -100  # target id that next-token prediction skips


@dataclass(frozen=True)
class ExplainerShape:
    feature_dim: int  # the backbone's pooled frame feature
    frames: int = 16
    width: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    max_tokens: int = 40  # explanation tokens, [CLS] and [SEP] included


def explanation_corpus() -> list[str]:
    """Every phrasing of every cause in the taxonomy and the numbers its slots take: what explanations are made of."""
    from afil_ray.detect.causes import SUCCESS_CAUSE, TAXONOMY

    texts = [p for spec in TAXONOMY.values() for c in spec.causes for p in c.phrasings]
    texts += list(SUCCESS_CAUSE.phrasings)
    return [re.sub(r"\{[a-z_]+\}", " ", t) for t in texts] + [str(i) for i in range(1000)] + ["0.5"]


class ExplanationTokenizer:
    """The MiniLM WordPiece tokenizer on a compact vocabulary: the word pieces of ``corpus`` (default: the
    taxonomy's explanations, ``explanation_corpus``) and the special tokens. A decoder trained from scratch then
    spreads no probability over 30,000 pieces it never sees; [CLS] begins and [SEP] ends an explanation."""

    def __init__(self, max_tokens: int, corpus: Sequence[str] | None = None) -> None:
        from transformers import AutoTokenizer

        from afil_ray.policy.encoders import minilm_path

        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        self.max_tokens = max_tokens
        t = self.tokenizer
        specials = [t.pad_token_id, t.unk_token_id, t.cls_token_id, t.sep_token_id]
        pieces = {i for ids in t(list(corpus if corpus is not None else explanation_corpus()))["input_ids"]
                  for i in ids}
        self.pieces = np.array(specials + sorted(pieces - set(specials)), np.int64)  # compact id -> WordPiece id
        self.compact = np.full(t.vocab_size, 1, np.int64)  # WordPiece id -> compact id ([UNK] where absent)
        self.compact[self.pieces] = np.arange(len(self.pieces))
        self.pad, self.unk, self.bos, self.eos = 0, 1, 2, 3
        self.vocab_size = len(self.pieces)

    def encode(self, texts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, max_tokens], mask); a None text is the empty explanation [CLS] [SEP]."""
        out = self.tokenizer([t or "" for t in texts], padding="max_length", truncation=True,
                             max_length=self.max_tokens, return_tensors="np")
        return torch.from_numpy(self.compact[out["input_ids"]]), torch.from_numpy(out["attention_mask"] > 0)

    def decode(self, ids: Sequence[int]) -> str:
        text = self.tokenizer.decode(self.pieces[np.asarray(ids, np.int64)].tolist(), skip_special_tokens=True)
        return re.sub(r"(\d)\s*\.\s*(\d)", r"\1.\2", text)  # WordPiece splits "8.0" into "8 . 0"


def frame_steps(length: int, frames: int) -> np.ndarray:
    """``frames`` evenly spaced indices into an episode's T + 1 observations (the last one included)."""
    return np.linspace(0, length, frames).round().astype(np.int64)


class DetectorExplainer(nn.Module):
    def __init__(self, shape: ExplainerShape, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.shape, self.pad_id = shape, pad_id
        w = shape.width
        self.frame_in = nn.Sequential(nn.LayerNorm(shape.feature_dim), nn.Linear(shape.feature_dim, w))
        self.frame_pos = nn.Parameter(torch.zeros(shape.frames, w))
        self.cls = nn.Parameter(torch.zeros(w))
        self.detection_in = nn.Embedding(3, w)
        self.text_pos = nn.Parameter(torch.zeros(shape.max_tokens, w))
        self.segment = nn.Embedding(4, w)  # cls, detection, frames, previous explanation
        layer = nn.TransformerEncoderLayer(w, shape.heads, 4 * w, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, shape.encoder_layers, enable_nested_tensor=False)
        self.detect = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, w), nn.GELU(), nn.Linear(w, 1))
        self.decoder = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_positions=shape.max_tokens, n_embd=w, n_layer=shape.decoder_layers,
            n_head=shape.heads, add_cross_attention=True, bos_token_id=None, eos_token_id=None))
        nn.init.normal_(self.frame_pos, std=0.02)
        nn.init.normal_(self.text_pos, std=0.02)

    def encode(self, frames: torch.Tensor, prev_detection: torch.Tensor, prev_ids: torch.Tensor,
               prev_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states [B, L, w] and their mask for frame features [B, F, feature_dim], the previous detection
        [B] (NO_DETECTION, SAID_SUCCESS, SAID_FAILURE) and explanation ids [B, T] with mask (all False: none)."""
        batch = frames.shape[0]
        seg = self.segment.weight
        parts = [
            (self.cls + seg[0]).expand(batch, 1, -1),
            self.detection_in(prev_detection)[:, None] + seg[1],
            self.frame_in(frames) + self.frame_pos + seg[2],
            self.decoder.transformer.wte(prev_ids) + self.text_pos[: prev_ids.shape[1]] + seg[3],
        ]
        mask = torch.cat([torch.ones(batch, 2 + frames.shape[1], dtype=torch.bool, device=frames.device),
                          prev_mask], dim=1)
        hidden = self.encoder(torch.cat(parts, dim=1), src_key_padding_mask=~mask)
        return hidden, mask

    def forward(self, frames: torch.Tensor, prev_detection: torch.Tensor, prev_ids: torch.Tensor,
                prev_mask: torch.Tensor, target_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor]]:
        """(failure logits [B], per-row mean next-token loss [B] when ``target_ids`` are given, the encoder's
        states). Targets are explanation ids [B, T] with padding ``pad_id`` (not predicted)."""
        memory, mask = self.encode(frames, prev_detection, prev_ids, prev_mask)
        logit = self.detect(memory[:, 0]).squeeze(-1)
        if target_ids is None:
            return logit, None, (memory, mask)
        logits = self.token_logits(target_ids[:, :-1], memory, mask)
        targets = target_ids[:, 1:].masked_fill(target_ids[:, 1:] == self.pad_id, IGNORE)
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        counted = (targets != IGNORE).sum(dim=1).clamp_min(1)
        return logit, per_token.sum(dim=1) / counted, (memory, mask)

    def token_logits(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        out = self.decoder(input_ids=ids, attention_mask=(ids != self.pad_id).long(),
                           encoder_hidden_states=memory, encoder_attention_mask=memory_mask.long())
        return out.logits

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, memory_mask: torch.Tensor, bos: int, eos: int,
                 temperature: float = 0.0, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Explanation ids [B, max_tokens] (padded after [SEP]) and each row's mean token entropy [B]: greedy at
        temperature 0, else sampled."""
        batch, limit = memory.shape[0], self.shape.max_tokens
        ids = torch.full((batch, 1), bos, dtype=torch.long, device=memory.device)
        done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        entropy = torch.zeros(batch, device=memory.device)
        steps = torch.zeros(batch, device=memory.device)
        past = None  # the decoder's key/value cache: each step runs the newest token only
        for _ in range(limit - 1):
            out = self.decoder(input_ids=ids[:, -1:], cache=past, use_cache=True,
                               encoder_hidden_states=memory, encoder_attention_mask=memory_mask.long())
            past = out.cache
            log_p = out.logits[:, -1].float().log_softmax(-1)
            entropy += torch.where(done, 0.0, -(log_p.exp() * log_p).sum(-1))
            steps += (~done).float()
            if temperature > 0:
                nxt = torch.multinomial((log_p / temperature).softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = log_p.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        pad = torch.full((batch, limit - ids.shape[1]), self.pad_id, dtype=torch.long, device=memory.device)
        return torch.cat([ids, pad], dim=1), entropy / steps.clamp_min(1)


def heterogeneous_loss(failure_logit: torch.Tensor, failed: torch.Tensor, token_loss: torch.Tensor | None,
                       dense: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """ARMOR's loss for one round: BCE of the detection on every episode, plus next-token prediction only where
    an explanation exists (``dense``); sparse episodes put nothing into the explanation loss, not even an empty
    target, which would teach the decoder that saying nothing is usually right."""
    detection = F.binary_cross_entropy_with_logits(failure_logit, failed.float())
    metrics = {"detection_loss": float(detection.detach())}
    if token_loss is None or not bool(dense.any()):
        return detection, metrics
    explanation = token_loss[dense].mean()
    metrics["explanation_loss"] = float(explanation.detach())
    return detection + explanation, metrics


SPEC_FILE, WEIGHTS_FILE = "explainer.json", "explainer.safetensors"


def save_explainer(model: DetectorExplainer, directory: str | Path, **facts: object) -> Path:
    """The weights (safetensors) and what rebuilds the module (its shape, vocabulary size) plus ``facts``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"shape": dataclasses.asdict(model.shape), "vocab_size": model.decoder.config.vocab_size,
            "pad_id": model.pad_id, **facts}
    save_model(model, str(directory / WEIGHTS_FILE))  # the decoder's tied embeddings stored once
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
    return directory


def load_explainer(directory: str | Path) -> tuple[DetectorExplainer, dict]:
    """A saved detector-explainer (eval mode) and its spec; a missing one is a one-line error."""
    from safetensors.torch import load_model

    directory = Path(directory)
    if not (directory / SPEC_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no trained detector-explainer at {directory} (needs {SPEC_FILE} and "
                                f"{WEIGHTS_FILE}; `afil-ray explain` trains one)")
    spec = json.loads((directory / SPEC_FILE).read_text())
    model = DetectorExplainer(ExplainerShape(**spec["shape"]), spec["vocab_size"], spec["pad_id"])
    load_model(model, str(directory / WEIGHTS_FILE))
    return model.eval(), spec
