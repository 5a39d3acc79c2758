"""Failure labels from the simulator, at two densities (ARMOR's heterogeneous supervision).

Every episode gets the sparse label, its outcome. A chosen share also gets the dense label: the cause from the
task's rule (``afil_ray/detect/causes.py``) on the privileged state the simulator recorded, and an explanation in
words, one phrasing of the cause chosen by the episode's id so the same episode always reads the same. Which
episodes are dense is decided by a hash of the id too, at ``sparse_per_dense`` sparse episodes for each dense one
(ARMOR trains with ratios from 2 to 30), so the choice survives re-reading a store in another order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from afil_ray.detect.causes import SUCCESS, Diagnosis, task_causes
from afil_ray.replay.episode import Episode


@dataclass(frozen=True)
class FailureLabel:
    episode_id: str
    success: bool  # the sparse label every episode has
    cause: str | None = None  # dense only: a cause of the task's taxonomy, "success" for a success
    step: int | None = None  # dense only: the step the cause shows at, when it has one
    explanation: str | None = None  # dense only: the cause in words

    @property
    def dense(self) -> bool:
        return self.explanation is not None


def _unit(episode_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by the episode id (and what it is drawn for)."""
    digest = hashlib.blake2b(f"{salt}:{episode_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def is_dense(episode_id: str, sparse_per_dense: float) -> bool:
    """Whether the episode carries an explanation at ``sparse_per_dense`` sparse episodes per dense one
    (0: every episode is dense)."""
    if sparse_per_dense < 0:
        raise ValueError(f"sparse_per_dense must be >= 0, got {sparse_per_dense}")
    return _unit(episode_id, "dense") < 1.0 / (1.0 + sparse_per_dense)


def check_labelled_task(key: str, task: str) -> None:
    """A one-line config error before any work when ``task`` (named by config ``key``) has no cause taxonomy."""
    from afil_ray.config import ConfigError

    try:
        task_causes(task)
    except KeyError as e:
        raise ConfigError(f"{key}: {e.args[0]}") from None


def trajectory(episode: Episode) -> dict[str, np.ndarray]:
    """The task's privileged quantities over the episode, [T+1, n] each (the observations before every action
    and after the last), decoded from its state-mode observations."""
    layout = task_causes(episode.task).layout
    if episode.obs_mode not in ("state", ""):
        raise ValueError(f"episode {episode.episode_id} ({episode.task}) was recorded in obs_mode "
                         f"{episode.obs_mode!r}; failure causes are read from state-mode observations")
    states = np.concatenate([episode.state, episode.final_state[None]], axis=0).astype(np.float64)
    width = max(s.stop for s in layout.values())
    if states.shape[1] < width:
        raise ValueError(f"episode {episode.episode_id} ({episode.task}) has {states.shape[1]}-wide states; the "
                         f"task's cause layout reads {width} columns (afil_ray/detect/causes.py)")
    return {name: states[:, cols] for name, cols in layout.items()}


def diagnose(episode: Episode) -> Diagnosis:
    """The cause of the episode's outcome: "success" for a success, else the task rule's failure cause."""
    if episode.success:
        return Diagnosis(SUCCESS, int(np.argmax(episode.step_success)))
    return task_causes(episode.task).rule(trajectory(episode))


def explain(diagnosis: Diagnosis, task: str, episode_id: str, heldout: bool = False) -> str:
    """The diagnosis in words: a training phrasing of its cause (or a held-out one), picked by the episode id."""
    cause = task_causes(task).cause(diagnosis.cause)
    phrasings = cause.heldout if heldout else cause.training
    template = phrasings[int(_unit(episode_id, "phrasing") * len(phrasings))]
    return template.format(step=diagnosis.step, **diagnosis.facts)


def label(episode: Episode, sparse_per_dense: float, heldout: bool = False) -> FailureLabel:
    """The episode's sparse label, and its dense one when the hash of its id picks it at ``sparse_per_dense``."""
    if not is_dense(episode.episode_id, sparse_per_dense):
        return FailureLabel(episode.episode_id, episode.success)
    diagnosis = diagnose(episode)
    return FailureLabel(episode.episode_id, episode.success, diagnosis.cause, diagnosis.step,
                        explain(diagnosis, episode.task, episode.episode_id, heldout))
