"""Held-out evaluation of the success critic: can Q tell the chunk that succeeds from the one that fails at the *same*
state?

Overall AUROC of Q on held-out branch rows mixes two signals: which states are easy (V's job) and which chunks are
good at a state. The within-group AUROC isolates the second: a branch group is K chunks for one observation, so
over its branches only the chunk differs; it is averaged over the groups with both outcomes (the others have no
pair to rank). Near 0.5 the critic finds no action-level signal at those states: ranking the chunks sampled there
by Q cannot help, and, as far as this critic has learned what the chunks carry, neither can other action-level
guidance (the outcome is decided by the state or by what comes after the chunk). V is scored on held-out
Monte-Carlo rows (every stored chunk step of an episode, labelled with the episode's outcome). Held out means an
initial state the critic never trained on (``replay/outcomes.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from afil_ray.policy.model import DAGPolicy
from afil_ray.replay.outcomes import OutcomeSampler
from afil_ray.replay.store import ReplayStore

NO_SIGNAL = 0.05  # within-group AUROC this close to 0.5: no action-level signal
REPORT_FILE = "critic_eval.json"


def auroc(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve: P(a random positive scores above a random negative), ties counting half (the
    Mann-Whitney U over n+ n-, from average ranks). None when one class is absent (the area is undefined)."""
    labels = np.asarray(labels, bool).reshape(-1)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} scores")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # ties get their average rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def within_group_auroc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float | None, int]:
    """(mean AUROC over the groups with both outcomes, how many such groups); (None, 0) when there are none."""
    values = []
    for g in np.unique(groups):
        value = auroc(labels[groups == g], scores[groups == g])
        if value is not None:
            values.append(value)
    return (float(np.mean(values)) if values else None), len(values)


@dataclass
class CriticTaskReport:
    """One task's held-out numbers (``task="all"``: every task's rows pooled)."""

    task: str
    branches: int = 0  # held-out branch rows
    groups: int = 0  # their groups (states)
    mixed_groups: int = 0  # groups with both outcomes: those the within-group AUROC averages over
    auroc_q: float | None = None
    auroc_q_within_group: float | None = None
    mc_rows: int = 0  # held-out Monte-Carlo rows
    auroc_v: float | None = None

    @property
    def no_action_signal(self) -> bool:
        """Q ranks the chunks of one state no better than chance."""
        within = self.auroc_q_within_group
        return within is not None and abs(within - 0.5) <= NO_SIGNAL

    def summary(self) -> str:
        def show(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        line = (f"{self.task}: held-out critic: Q AUROC {show(self.auroc_q)} on {self.branches} branches of "
                f"{self.groups} states, within-state {show(self.auroc_q_within_group)} over {self.mixed_groups} "
                f"mixed groups; V AUROC {show(self.auroc_v)} on {self.mc_rows} Monte-Carlo steps")
        if self.no_action_signal:
            line += " -- no action-level signal at this state: guidance cannot help here"
        return line


@dataclass
class CriticReport:
    holdout: float
    tasks: list[CriticTaskReport] = field(default_factory=list)
    overall: CriticTaskReport = field(default_factory=lambda: CriticTaskReport("all"))
    checkpoint: str = ""

    def lines(self) -> list[str]:
        """One line per task (and the pooled line when there are several tasks)."""
        return [t.summary() for t in self.tasks] + ([self.overall.summary()] if len(self.tasks) > 1 else [])

    def scalars(self) -> dict[str, float]:
        """The pooled numbers as TensorBoard scalars (undefined ones left out)."""
        o = self.overall
        values = {"critic/auroc_q": o.auroc_q, "critic/auroc_q_within_group": o.auroc_q_within_group,
                  "critic/auroc_v": o.auroc_v, "critic/mixed_groups": float(o.mixed_groups)}
        return {k: float(v) for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for entry, report in zip([*out["tasks"], out["overall"]], [*self.tasks, self.overall], strict=True):
            entry["no_action_signal"] = report.no_action_signal
        return out

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def _report(task: str, branch: dict[str, np.ndarray], mc: dict[str, np.ndarray]) -> CriticTaskReport:
    within, mixed = within_group_auroc(branch["label"], branch["q"], branch["group"])
    return CriticTaskReport(task=task, branches=len(branch["label"]), groups=len(np.unique(branch["group"])),
                            mixed_groups=mixed, auroc_q=auroc(branch["label"], branch["q"]),
                            auroc_q_within_group=within, mc_rows=len(mc["label"]), auroc_v=auroc(mc["label"], mc["v"]))


@torch.no_grad()
def _score(policy: DAGPolicy, sampler: OutcomeSampler, kind: str, batch_size: int,
           instructions: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Labels, groups, tasks and Q/V probabilities of every ``kind`` row of the sampler."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("label", "group", "task", "q", "v")}
    for batch in sampler.batches(kind, batch_size):
        batch["instruction"] = [said or instructions.get(task, "")
                                for said, task in zip(batch["instruction"], batch["task"], strict=True)]
        q, v = policy.critic_logits(batch)
        parts["q"].append(torch.sigmoid(q).cpu().numpy())
        parts["v"].append(torch.sigmoid(v).cpu().numpy())
        for k in ("label", "group", "task"):
            parts[k].append(np.asarray(batch[k]))
    empty = {"label": np.zeros(0, np.float32), "group": np.zeros(0, object), "task": np.zeros(0, object),
             "q": np.zeros(0, np.float32), "v": np.zeros(0, np.float32)}
    return {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}


def evaluate_critic(policy: DAGPolicy, store: ReplayStore, tasks: Sequence[str], *, mc_outcomes: Sequence[str],
                    holdout: float, instructions: Mapping[str, str] | None = None,
                    batch_size: int = 256) -> CriticReport:
    """The critic's AUROCs on the held-out rows of ``tasks`` (the split ``data.critic_holdout`` trains without).

    ``instructions``: each task's instruction for rows whose episode recorded none.
    """
    if policy.critic is None:
        raise ValueError("this policy has no critic to evaluate (policy.critic=false)")
    sampler = OutcomeSampler(store, policy.horizon, tasks=tasks, mc_outcomes=mc_outcomes, mc_weight=1.0,
                             holdout=holdout, split="test", cameras=policy.cameras)
    was_training = policy.training
    policy.eval()
    try:
        branch = _score(policy, sampler, "branch", batch_size, instructions or {})
        mc = _score(policy, sampler, "mc", batch_size, instructions or {})
    finally:
        policy.train(was_training)
    report = CriticReport(holdout=holdout)
    for task in tasks:
        report.tasks.append(_report(task, {k: v[branch["task"] == task] for k, v in branch.items()},
                                    {k: v[mc["task"] == task] for k, v in mc.items()}))
    report.overall = _report("all", branch, mc)
    return report
