"""Matched-state branches: K continuations rolled out from one restored state, the contrast data of issue 22.

A stored rollout (a failure or a success with simulator snapshots) is restored at a state on one of its chunk
boundaries, and the policy rolls out K branches from it, each with its own sampling noise, to the end of the
episode's step budget. The branches of one state form a group; each branch's first chunk (sampled at the
restored state) gets the branch's outcome, so a group is K chunks for the same observation with their outcomes.

- ``states``: which states of a parent are eligible, open (a scorer's estimate in a window) and chosen.
- ``rollout``: restoring states into env slots and rolling out branches with per-branch noise.
- ``records``: what the store holds of branches (which are done; (group, branch, first chunk, outcome) rows).
- ``run``: ``afil-ray branch`` for one task: parents from the store, branches into it, resumable.
- ``decides``: K first chunks x M continuations per state, to measure how much the next chunk decides the outcome
  (``scripts/chunk_decides.py``).
"""

from afil_ray.branches.records import branch_outcomes, branch_rows, branched_keys, group_outcomes
from afil_ray.branches.rollout import BranchJob, BranchRunner, branch_noise_seed
from afil_ray.branches.run import BranchReport, branch_task
from afil_ray.branches.states import (
    BranchPoint,
    Scorer,
    choose_steps,
    critic_scorer,
    eligible_steps,
    open_points,
)

__all__ = [
    "BranchJob",
    "BranchPoint",
    "BranchReport",
    "BranchRunner",
    "Scorer",
    "branch_noise_seed",
    "branch_outcomes",
    "branch_rows",
    "branch_task",
    "branched_keys",
    "choose_steps",
    "critic_scorer",
    "eligible_steps",
    "group_outcomes",
    "open_points",
]
