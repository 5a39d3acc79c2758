"""How good a detector-explainer's answers are: detection accuracy, the cause its text names, how close the text
is to the reference in meaning, and whether detection and explanation agree.

- cause accuracy: the generated text is read as the cause whose phrasings (numbers masked, training and held-out)
  it is closest to in MiniLM sentence-embedding space, among the task's causes and success; right when that is
  the labeller's cause;
- similarity: cosine of the MiniLM sentence embeddings of the text and of the reference explanation, in the
  training phrasing and in the held-out one (a model that learned causes, not strings, loses little on the second);
- consistency: the detection says failure exactly when the text names a failure cause.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from afil_ray.detect.causes import SUCCESS, task_causes

if TYPE_CHECKING:  # imported where used: it loads torch models
    from sentence_transformers import SentenceTransformer


@cache
def sentence_encoder() -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    from afil_ray.policy.encoders import minilm_path

    return SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True)


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm MiniLM sentence embeddings [N, 384]."""
    return sentence_encoder().encode(list(texts), normalize_embeddings=True, batch_size=64,
                                     show_progress_bar=False)


def _masked(text: str) -> str:
    return re.sub(r"\{[a-z_]+\}|\d+(\.\d+)?", "some", text)


class CauseReader:
    """Reads which cause of a task a text names: the nearest phrasing's cause."""

    def __init__(self, task: str) -> None:
        spec = task_causes(task)
        self.labels = [name for name in spec.names for _ in spec.cause(name).phrasings]
        self.phrasings = embed([_masked(p) for name in spec.names for p in spec.cause(name).phrasings])

    def __call__(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        nearest = (embed([_masked(t) for t in texts]) @ self.phrasings.T).argmax(axis=1)
        return [self.labels[i] for i in nearest]


@dataclass
class Quality:
    episodes: int
    detection_accuracy: float
    cause_accuracy: float
    failure_cause_accuracy: float | None  # on failed episodes only (the part a success detector cannot fake)
    similarity: float  # to the reference in a training phrasing
    heldout_similarity: float  # to the reference in a held-out phrasing
    consistency: float


def quality(tasks: Sequence[str], failed: Sequence[bool], causes: Sequence[str], references: Sequence[str],
            heldout_references: Sequence[str], failure_probability: Sequence[float],
            texts: Sequence[str]) -> Quality:
    """Measures one set of answers against the labeller's truth (one row per episode)."""
    said_cause = [""] * len(texts)
    for task in sorted(set(tasks)):
        rows = [i for i, t in enumerate(tasks) if t == task]
        for i, cause in zip(rows, CauseReader(task)([texts[i] for i in rows]), strict=True):
            said_cause[i] = cause
    failed_arr = np.asarray(failed, bool)
    detected = np.asarray(failure_probability) > 0.5
    right_cause = np.array([s == c for s, c in zip(said_cause, causes, strict=True)])
    generated = embed(texts)
    similarity = (generated * embed(references)).sum(axis=1)
    heldout = (generated * embed(heldout_references)).sum(axis=1)
    says_failure = np.array([c != SUCCESS for c in said_cause])
    return Quality(
        len(texts), float((detected == failed_arr).mean()), float(right_cause.mean()),
        float(right_cause[failed_arr].mean()) if failed_arr.any() else None,
        float(similarity.mean()), float(heldout.mean()), float((says_failure == detected).mean()))
