"""Turns a stream of vectorized steps into finished Episode records.

Each env keeps its own buffer; when an env's episode ends the buffer becomes an Episode (outcome ``success`` or
``failure``) and the env is reset with the next seed, so rollout code only chooses actions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from afil_ray.envs.base import Obs, StepResult, VecEnv
from afil_ray.envs.tasks import Instruct, canonical_instruction
from afil_ray.replay.episode import IMAGE_PREFIX, Episode

FAILURE_SCORES_KEY = "failure_scores"  # extra key: the runtime failure monitor's [step, score] pairs


@dataclass
class StepBuffer:
    """One episode's steps as they come (the rollout collector's and a branch's): what becomes its Episode arrays."""

    seed: int
    states: list[np.ndarray] = field(default_factory=list)
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    actions: list[np.ndarray] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    success: list[bool] = field(default_factory=list)
    fail: list[bool] = field(default_factory=list)
    terminated: list[bool] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    snapshot_steps: list[int] = field(default_factory=list)
    snapshots: list[bytes] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    chunk_steps: list[int] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)
    chunk_w: list[np.ndarray] = field(default_factory=list)
    chunk_cos: list[np.ndarray] = field(default_factory=list)

    def add_snapshot(self, step: int, blob: bytes | None) -> None:
        if blob is not None:
            self.snapshot_steps.append(step)
            self.snapshots.append(blob)

    def add_chunk(self, chunk: np.ndarray, w: np.ndarray | None = None, cos: np.ndarray | None = None) -> None:
        """The chunk sampled at the current step (with the sampler's diagnostics)."""
        self.chunk_steps.append(len(self.actions))
        self.chunks.append(np.asarray(chunk, np.float32))
        if w is not None:
            self.chunk_w.append(np.asarray(w, np.float32))
        if cos is not None:
            self.chunk_cos.append(np.asarray(cos, np.float32))

    def add_step(self, obs: Obs, cameras: tuple[str, ...] | list[str], action: np.ndarray, res: StepResult,
                 i: int) -> None:
        """Env ``i``'s step: the observation it acted on (unbatched), its action, and row ``i`` of the result."""
        self.states.append(np.array(obs["state"], copy=True))
        for cam in cameras:
            self.images.setdefault(cam, []).append(np.array(obs[IMAGE_PREFIX + cam], copy=True))
        self.actions.append(np.array(action, np.float32, copy=True))
        self.rewards.append(float(res.reward[i]))
        self.success.append(bool(res.success[i]))
        self.fail.append(bool(res.fail[i]))
        self.terminated.append(bool(res.terminated[i]))
        self.truncated.append(bool(res.truncated[i]))

    def outcome_extras(self) -> dict[str, bool]:
        """What an Episode's ``extra`` records of how it ended: ``fail_once`` and ``success_at_end``."""
        return {"fail_once": any(self.fail), "success_at_end": self.success[-1]}

    def episode_arrays(self, final_state: np.ndarray) -> dict[str, Any]:
        """The Episode fields these steps give (the producer adds task, outcome and metadata)."""
        whole = len(self.chunk_w) == len(self.chunks) and self.chunk_w  # diagnostics only when every chunk has them
        return dict(
            state=np.stack(self.states), action=np.stack(self.actions),
            reward=np.asarray(self.rewards, np.float32), step_success=np.asarray(self.success, bool),
            terminated=np.asarray(self.terminated, bool), truncated=np.asarray(self.truncated, bool),
            final_state=np.asarray(final_state, np.float32).copy(),
            images={cam: np.stack(v) for cam, v in self.images.items()},
            snapshot_steps=self.snapshot_steps, snapshots=self.snapshots, chunk_steps=self.chunk_steps,
            chunks=np.stack(self.chunks) if self.chunks else None,
            chunk_w=np.stack(self.chunk_w) if whole else None,
            chunk_cos=np.stack(self.chunk_cos) if len(self.chunk_cos) == len(self.chunks) and self.chunk_cos else None,
        )


class EpisodeCollector:
    """Steps ``env`` with given actions and returns episodes as they finish.

    ``seeds`` yields the seed of every new episode, so a run's episodes are reproducible from its seed stream.
    With ``auto_reset=False`` a finished env is left as it is and the caller decides what comes next.
    With ``keep_images=False`` episodes come without camera frames (an evaluation that keeps outcomes only), and
    :meth:`step` may be told which envs' next observations the caller reads images from (``render``).
    Producer metadata (``source``, ``policy_version``, ``sampler``...) is read when an episode starts, and so is
    its instruction: ``instruct(slot task, seed)`` (``env.paraphrase``'s choice, or an evaluation probe's).
    """

    def __init__(self, env: VecEnv, seeds: Iterator[int], *, source: str, policy_version: int = -1,
                 sampler: str = "", sampler_params: dict | None = None, auto_reset: bool = True,
                 instruct: Instruct = canonical_instruction, keep_images: bool = True) -> None:
        self.env = env
        self.keep_images = keep_images
        self.instruct = instruct
        self.auto_reset = auto_reset
        self.seeds = seeds
        self.source = source
        self.policy_version = policy_version
        self.sampler = sampler
        self.sampler_params = sampler_params or {}
        self._buffers: list[StepBuffer] = []
        self._meta: list[dict[str, Any]] = []
        self.obs: Obs = {}
        self.last_done = np.zeros(env.num_envs, bool)

    def _start(self, i: int, seed: int, snapshot: bytes | None) -> None:
        buf = StepBuffer(seed=seed)
        buf.add_snapshot(0, snapshot)
        self._buffers[i] = buf
        self._meta[i] = {"policy_version": self.policy_version, "sampler": self.sampler,
                         "sampler_params": dict(self.sampler_params),
                         "instruction": self.instruct(self.env.slot_tasks[i], seed)}

    def instruction(self, i: int) -> str:
        """What env ``i``'s current episode reads."""
        return self._meta[i]["instruction"]

    def episode_seed(self, i: int) -> int:
        """The seed of env ``i``'s current episode."""
        return self._buffers[i].seed

    def add_chunk(self, i: int, chunk: np.ndarray, w: np.ndarray | None = None,
                  cos: np.ndarray | None = None) -> None:
        """Record the chunk sampled for env ``i`` at its current step (with the sampler's diagnostics)."""
        self._buffers[i].add_chunk(chunk, w, cos)

    def add_failure_score(self, i: int, score: float) -> None:
        """A runtime failure score for env ``i`` at its current step (``afil_ray/detect/monitor.py``), kept in
        its episode's ``extra["failure_scores"]`` as [step, score] pairs."""
        buf = self._buffers[i]
        buf.extra.setdefault(FAILURE_SCORES_KEY, []).append([len(buf.actions), float(score)])

    def reset(self) -> Obs:
        n = self.env.num_envs
        seeds = [next(self.seeds) for _ in range(n)]
        self._buffers = [StepBuffer(seed=s) for s in seeds]
        self._meta = [{} for _ in range(n)]
        self.obs, snaps = self.env.reset(seeds)
        for i in range(n):
            self._start(i, seeds[i], snaps[i])
        return self.obs

    def step(self, actions: np.ndarray, render: np.ndarray | None = None) -> tuple[Obs, list[Episode]]:
        """Step every env; ``render`` ([N] bool, only without ``keep_images``): the envs whose next observation the
        caller reads images from (the env may leave the others' black, :meth:`VecEnv.step`)."""
        if render is not None and self.keep_images:
            raise ValueError("render: a collector that keeps images needs every frame rendered")
        before = self.obs
        res = self.env.step(actions) if render is None else self.env.step(actions, render=render)
        finished: list[Episode] = []
        self.last_done = res.done.copy()  # finished episodes are in ascending env order of this mask
        cameras = self.env.cameras if self.keep_images else ()
        for i, buf in enumerate(self._buffers):
            buf.add_step({k: v[i] for k, v in before.items()}, cameras, actions[i], res, i)
            if res.done[i]:
                finished.append(self._finish(i, res.obs["state"][i]))
            else:
                buf.add_snapshot(int(res.elapsed_steps[i]), res.snapshots[i])
        self.obs = res.obs
        done = res.done
        if done.any() and self.auto_reset:
            seeds = [next(self.seeds) if d else 0 for d in done]
            new_obs, snaps = self.env.reset(seeds, mask=done)
            self.obs = {k: np.where(_bcast(done, v), new_obs[k], v) for k, v in self.obs.items()}
            for i in np.flatnonzero(done):
                self._start(int(i), seeds[i], snaps[i])
        return self.obs, finished

    def _finish(self, i: int, final_state: np.ndarray) -> Episode:
        buf, meta = self._buffers[i], self._meta[i]
        success_once = any(buf.success)
        outcome = "success" if success_once and not any(buf.fail) else "failure"
        return Episode(
            task=self.env.slot_tasks[i].env_id, outcome=outcome, seed=buf.seed,
            source=self.source, control_mode=self.env.control_mode, obs_mode=self.env.obs_mode,
            extra={**buf.extra, **buf.outcome_extras()},
            **buf.episode_arrays(final_state), **meta,
        )


def _bcast(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    return mask.reshape((-1,) + (1,) * (like.ndim - 1))
