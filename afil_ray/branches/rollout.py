"""Rolling out branches: a state restored into an env slot, the policy run from it with the branch's own noise.

Jobs (a state and a branch index) go to the env's slots as slots free up, so all slots stay busy however many
branches a state has; a slot whose job ended idles (stepped with zero actions, its steps discarded) only once
no job is left. A branch runs, re-planning every ``sampler.execute_steps`` as :class:`afil_ray.rollout.ChunkedRollout`
does, until its episode ends: success or fail (unless ``env.ignore_terminations``) or the task's step limit, counted
from the parent's step, so a branch has the parent's remaining step budget.

A branch's sampling noise comes from its own generator, seeded from (``branches.seed``, parent id, step, branch
index): branches of one state differ only by their noise, and a re-run draws the same noise for the same branch
whichever slot it runs in and whatever ran before. (Chunks are then equal up to float rounding of the batch a
chunk was sampled in; the same jobs on the same slots, as a re-run of the same store has, are equal bit for bit.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from afil_ray.branches.states import BranchPoint, id_entropy
from afil_ray.config import SamplerConfig
from afil_ray.envs.base import Obs, VecEnv
from afil_ray.envs.collector import StepBuffer
from afil_ray.replay.episode import Episode
from afil_ray.rollout import ChunkPolicy, draw_noise

SOURCE = "branch"


def branch_noise_seed(parent_id: str, step: int, index: int, seed: int = 0) -> int:
    """The noise seed of branch ``index`` from ``parent_id`` at ``step`` under ``branches.seed`` (63 bits)."""
    entropy = [int(seed) % 2**64, id_entropy(parent_id), int(step) % 2**64, int(index) % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


@dataclass(frozen=True)
class BranchJob:
    """Branch ``index`` of the state ``point``. ``first_noise_seed``: the noise of its first chunk, shared by the
    branches that continue one chunk (``decides.py``); None: drawn from the branch's own noise like the rest."""

    point: BranchPoint
    index: int
    first_noise_seed: int | None = None


@dataclass
class _Branch:
    """A job in flight in one slot: its noise, its current observation and the steps it has taken."""

    job: BranchJob
    noise_seed: int
    generator: torch.Generator
    obs: Obs  # the slot's current observation, unbatched
    steps: StepBuffer
    queue: list[np.ndarray] = field(default_factory=list)
    first: torch.Generator | None = None  # the first chunk's own noise, when the job fixes it


class BranchRunner:
    """Runs branch jobs on ``env``'s slots with ``policy``; :meth:`run` yields each branch as it ends.

    The policy needs ``noise_shape`` and ``sample(noise=...)`` (as ``DAGPolicy`` has): per-branch noise is the
    point of a branch. ``extra`` is added to every branch's ``extra`` (e.g. the checkpoint it was sampled with).
    """

    def __init__(self, env: VecEnv, policy: ChunkPolicy, sampler: SamplerConfig, *, seed: int = 0,
                 policy_version: int = -1, extra: dict[str, Any] | None = None) -> None:
        if getattr(policy, "noise_shape", None) is None:
            raise TypeError("branches need a policy with noise_shape and sample(noise=...): per-branch noise")
        if isinstance(policy, torch.nn.Module):
            policy.eval()  # acting, not training (as the eval workers and the loop's actors)
        self.env, self.policy, self.sampler, self.seed = env, policy, sampler, seed
        self.policy_version = policy_version
        self.extra = dict(extra or {})
        self.env_steps = 0

    def _start(self, slot: int, job: BranchJob) -> _Branch:
        point = job.point
        parent = point.parent
        if (parent.obs_mode, parent.control_mode) != (self.env.obs_mode, self.env.control_mode):
            raise ValueError(f"episode {parent.episode_id} was recorded with obs_mode={parent.obs_mode}, control_mode="
                             f"{parent.control_mode}; this env has {self.env.obs_mode}, {self.env.control_mode}")
        if parent.task != self.env.slot_tasks[slot].env_id:
            raise ValueError(f"episode {parent.episode_id} is a {parent.task} episode; env slot {slot} runs "
                             f"{self.env.slot_tasks[slot].env_id}")
        obs = self.env.restore(slot, point.snapshot, point.step)
        seed = branch_noise_seed(parent.episode_id, point.step, job.index, self.seed)
        first = None if job.first_noise_seed is None else torch.Generator().manual_seed(job.first_noise_seed)
        return _Branch(job, seed, torch.Generator().manual_seed(seed), {k: np.asarray(v) for k, v in obs.items()},
                       StepBuffer(seed=parent.seed), first=first)

    def _replan(self, branches: list[_Branch]) -> None:
        obs = {k: np.stack([b.obs[k] for b in branches]) for k in branches[0].obs}
        instructions = [b.job.point.parent.instruction for b in branches]
        shape = tuple(self.policy.noise_shape)  # type: ignore[attr-defined]
        noise = torch.stack([draw_noise(shape, self.sampler, b.generator if b.first is None else b.first)
                             for b in branches])
        for b in branches:
            b.first = None  # later chunks draw from the branch's own noise
        actions, diag = self.policy.sample(obs, instructions, self.sampler, noise=noise)  # type: ignore[call-arg]
        w, cos = diag.get("w"), diag.get("cos")
        for j, b in enumerate(branches):
            b.queue = list(actions[j, : self.sampler.execute_steps])
            b.steps.add_chunk(actions[j], None if w is None else w[j], None if cos is None else cos[j])

    def run(self, jobs: Iterable[BranchJob]) -> Iterator[Episode]:
        """Every job's branch, in the order they end (jobs are pulled lazily, as slots free up)."""
        n = self.env.num_envs
        todo = iter(jobs)
        slots: list[_Branch | None] = [None] * n
        self.env.reset([0] * n)  # every slot in a defined state before it idles or is restored

        def fill() -> None:
            for i in range(n):
                if slots[i] is None and (job := next(todo, None)) is not None:
                    slots[i] = self._start(i, job)

        fill()
        while any(b is not None for b in slots):
            empty = [b for b in slots if b is not None and not b.queue]
            if empty:
                self._replan(empty)
            actions = np.zeros((n, self.env.action_dim), np.float32)
            for i, b in enumerate(slots):
                if b is not None:
                    actions[i] = b.queue.pop(0)
            res = self.env.step(actions)
            self.env_steps += n
            for i, b in enumerate(slots):
                if b is None:
                    continue
                b.steps.add_step(b.obs, self.env.cameras, actions[i], res, i)
                b.obs = {k: np.asarray(v[i]) for k, v in res.obs.items()}
                if res.done[i]:
                    slots[i] = None
                    yield self._episode(b)
            fill()

    def _episode(self, b: _Branch) -> Episode:
        point, parent = b.job.point, b.job.point.parent
        extra = {**self.extra, "noise_seed": b.noise_seed, "parent_outcome": parent.outcome,
                 **({} if b.job.first_noise_seed is None else {"first_noise_seed": b.job.first_noise_seed}),
                 **b.steps.outcome_extras()}
        if point.estimate is not None:
            extra["estimate"] = point.estimate
        return Episode(
            task=parent.task, outcome="branch", instruction=parent.instruction, seed=parent.seed, source=SOURCE,
            policy_version=self.policy_version, sampler=self.sampler.kind, sampler_params=self.sampler.params(),
            control_mode=self.env.control_mode, obs_mode=self.env.obs_mode,
            parent_episode_id=parent.episode_id, branch_step=point.step, branch_index=b.job.index, extra=extra,
            **b.steps.episode_arrays(b.obs["state"]),  # no snapshots: a branch is not restored again
        )
