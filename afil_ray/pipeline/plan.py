"""Which arms a reproduction evaluates: each row of its tables as a typed :class:`PlannedArm`.

A row is a checkpoint with a sampler arm (``afil_ray.eval.arms``), plus what the reports group it by: the training
seed and the study variant it belongs to. Reports group rows by these fields, never by parsing labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from afil_ray.config import Config
from afil_ray.eval.arms import Arm, make_arm, parse_arm

SUCCESS_ONLY = "success only"
CORRECTED_ARM = "+ failure correction"


@dataclass(frozen=True)
class PlannedArm:
    """One row: ``label`` names it in the tables, ``arm`` runs on ``checkpoint``."""

    label: str
    checkpoint: str
    arm: Arm
    online: bool = False  # the online loop's row
    seed: int | None = None  # training seed of a seed-spread row (None: the main stages)
    variant: str | None = None  # failure-head study variant

    @property
    def role(self) -> str:
        """The row's name within its seed group: the label without the ``seed <s>: `` prefix."""
        return self.label.removeprefix(f"seed {self.seed}: ") if self.seed is not None else self.label


def static_arms(cfg: Config) -> list[Arm]:
    """Static FIL for each ``reproduce.static_w`` (the first is the paper's)."""
    return [make_arm(cfg.sampler, "static", w=float(w)) for w in cfg.reproduce.static_w]


def adaptive_arms(cfg: Config) -> list[Arm]:
    """Adaptive FIL for each ``reproduce.lams`` (the paper's λ ablation; the first is the paper's λ)."""
    return [make_arm(cfg.sampler, "adaptive", lam=float(lam)) for lam in cfg.reproduce.lams]


def paper_fil_arms(cfg: Config) -> list[Arm]:
    """The first static and the first adaptive arm: the paper's FIL settings."""
    return static_arms(cfg)[:1] + adaptive_arms(cfg)[:1]


def success_only_arm(cfg: Config) -> Arm:
    return make_arm(cfg.sampler, "success_only")


def critic_arms(cfg: Config) -> list[Arm]:
    """``reproduce.critic_arms``: the arms that read the success critic (and their controls)."""
    return [parse_arm(spec, cfg.sampler) for spec in cfg.reproduce.critic_arms]


BRANCH_RULE = "branch heads"
OUTCOME_HEAD = "outcome head"


def branch_rule_arms(cfg: Config) -> list[Arm]:
    """Success only, then ``reproduce.branch_rule_arms``: the rows of the heads trained on branch outcomes."""
    return [success_only_arm(cfg), *(parse_arm(spec, cfg.sampler) for spec in cfg.reproduce.branch_rule_arms)]


def outcome_arms(cfg: Config) -> list[Arm]:
    """Success only (the token "none"), then ``reproduce.outcome_arms``: the outcome-conditioned head's rows."""
    return [success_only_arm(cfg), *(parse_arm(spec, cfg.sampler) for spec in cfg.reproduce.outcome_arms)]


def signal_rows(cfg: Config, ckpts: dict[str, str]) -> list[tuple[str, str, Arm]]:
    """(title, checkpoint, arm) of issue 22's stages that ran: ``ckpts`` maps ``critic``, ``outcome`` and
    ``branch_heads`` to their checkpoints (the critic's arms share the corrected success head, so they carry no
    prefix; the other two heads' rows are named after them)."""
    rows: list[tuple[str, str, Arm]] = []
    if "critic" in ckpts:
        rows += [(arm.title, ckpts["critic"], arm) for arm in critic_arms(cfg)]
    if "outcome" in ckpts:
        rows += [(f"{OUTCOME_HEAD}: {arm.title}", ckpts["outcome"], arm) for arm in outcome_arms(cfg)]
    if "branch_heads" in ckpts:
        rows += [(f"{BRANCH_RULE}: {arm.title}", ckpts["branch_heads"], arm) for arm in branch_rule_arms(cfg)]
    return rows


def main_plan(cfg: Config, success_ckpt: str, dag_ckpt: str, online_ckpt: str | None,
              signal: dict[str, str] | None = None) -> list[PlannedArm]:
    """Every arm of the main table, success only first; issue 22's rows (``signal_rows``) after the paper's."""
    plan = [PlannedArm(SUCCESS_ONLY, success_ckpt, success_only_arm(cfg)),
            PlannedArm(CORRECTED_ARM, dag_ckpt, success_only_arm(cfg))]  # the DAG's success head is the corrected
    plan += [PlannedArm(arm.title, dag_ckpt, arm) for arm in static_arms(cfg) + adaptive_arms(cfg)]
    plan += [PlannedArm(title, ckpt, arm) for title, ckpt, arm in signal_rows(cfg, signal or {})]
    if online_ckpt is not None:
        lam = cfg.reproduce.lams[0] if cfg.reproduce.lams else 1.0
        arm = make_arm(cfg.sampler, "adaptive", lam=float(lam))
        plan.append(PlannedArm(f"online loop, adaptive λ={lam:g}", online_ckpt, arm, online=True))
    return plan


def ood_plan(cfg: Config, main: list[PlannedArm]) -> list[PlannedArm]:
    """The rows evaluated out of domain: success only, + correction, the paper's FIL arms and the online arm."""
    keep = {SUCCESS_ONLY, CORRECTED_ARM, *(a.title for a in paper_fil_arms(cfg))}
    return [p for p in main if p.label in keep or p.online]


def variant_arms(cfg: Config) -> list[Arm]:
    """The arms every study variant is evaluated with (``reproduce.variant_arms``)."""
    return [parse_arm(spec, cfg.sampler) for spec in cfg.reproduce.variant_arms]


def variant_label(name: str, arm: Arm) -> str:
    return f"{name}: {arm.title}"


def variant_plan(cfg: Config, ckpts: dict[str, str], seed: int | None = None) -> list[PlannedArm]:
    """Each study variant's failure head with each ``reproduce.variant_arms`` arm."""
    prefix = "" if seed is None else f"seed {seed}: "
    return [PlannedArm(prefix + variant_label(name, arm), ckpt, arm, seed=seed, variant=name)
            for name, ckpt in ckpts.items() for arm in variant_arms(cfg)]


def seed_plan(cfg: Config, ckpts: dict[int, str],
              signal: dict[int, dict[str, str]] | None = None) -> list[PlannedArm]:
    """Per training seed: that seed's "+ failure correction", its paper FIL arms and its issue-22 rows."""
    rows = [(CORRECTED_ARM, success_only_arm(cfg))] + [(a.title, a) for a in paper_fil_arms(cfg)]
    plan = []
    for seed, ckpt in ckpts.items():
        plan += [PlannedArm(f"seed {seed}: {title}", ckpt, arm, seed=seed) for title, arm in rows]
        plan += [PlannedArm(f"seed {seed}: {title}", c, arm, seed=seed)
                 for title, c, arm in signal_rows(cfg, (signal or {}).get(seed, {}))]
    return plan
