"""``afil-ray reproduce``: the paper's ManiSkill pipeline for one task as resumable, cached stages.

    demos -> success_only -> harvest -> correct -> corrected -> dag -> [outcome_head] -> [branch -> critic,
          branch_heads] -> [online] -> eval

- ``demos``: motion-planner demonstrations into the store (``demos.num``).
- ``success_only``: backbone + success head on the demos alone (``train.*``).
- ``harvest``: the success-only policy rolled out on ``reproduce.harvest_seeds`` fresh initial states x
  ``harvest_runs`` noise draws; every episode goes to the store (failures with their simulator snapshots).
- ``correct``: the motion planner finishes the harvested failures (``afil-ray correct``).
- ``corrected``: "success + failure correction", the success-only policy fine-tuned on demos + corrections.
- ``dag``: DAG-VLA, a failure head trained on the raw failures next to the corrected policy's success head.
- ``outcome_head`` (``reproduce.outcome_arms`` not empty; issue 22): the corrected success head trained with
  outcome tokens on its successes and failures (CFGRL), evaluated as rows ``outcome head: <arm>``.
- ``branch``, ``critic``, ``branch_heads`` (issue 22): matched-state branches from the harvested rollouts by the
  corrected policy; a success critic trained on them beside that policy's heads, whose arms (``rank`` and its
  random-pick control, ``reproduce.critic_arms``) join the evaluation; and the paper's two heads trained on the
  branches' two outcomes (``reproduce.branch_rule_arms``, rows ``branch heads: <arm>``). Empty lists leave them out.
- ``online`` (``reproduce.online_s`` > 0): the distributed loop run for that long from the corrected policy.
- ``eval``: the paired protocol (``eval.*``) on every arm: success only, + failure correction, static FIL for
  each ``reproduce.static_w``, adaptive FIL for each ``reproduce.lams`` (the paper's λ ablation), the online arm.
- ``variant_<name>`` (the failure-head study, ``reproduce.variants``): a failure head trained like ``dag`` with
  some keys overridden (init, targets, windows, steps), after the online stage so on every failure in the
  store, and evaluated with ``reproduce.variant_arms`` against "+ failure correction" (``results/variants/``).
- ``seed<s>_corrected``, ``seed<s>_dag`` (``reproduce.train_seeds``): the same two stages re-trained with
  training seed ``s`` from the same success-only policy and store (before the online stage, so on the same
  failures as ``dag``). Success only is compared with each seed's "+ failure correction", and the first static
  and adaptive arms with it (``results/seeds/``), so checkpoint-vs-checkpoint gains come with the spread that
  re-training alone gives.
- ``seed<s>_variant_<name>`` (``reproduce.seed_variants``): a study variant re-trained with each training seed
  from that seed's "+ failure correction", after the online stage like the variants, and evaluated with
  ``reproduce.variant_arms`` against that seed's "+ failure correction" (``results/seed_variants/``).

Each stage is cached under ``run_dir/stages/`` (``stages.py``); training stages resume from their last
checkpoint after a kill, harvest and correction from what is already in the store. Which rows the tables hold is
``plan.py``; the tables themselves are ``reports.py``. Ray reaches this module only as two callables the CLI hands
it (``run_loop`` for the online stage, ``runner`` for evaluation units), so the pipeline itself is Ray-free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from afil_ray.branches import branch_task
from afil_ray.config import Config, ConfigError, check_writable, save_resolved, with_overrides
from afil_ray.correction import correct_failures
from afil_ray.demos.generate import generate_demos
from afil_ray.envs.checks import check_one_action_space, check_tasks, env_tasks, trained_tasks
from afil_ray.eval.arms import sampler_arm
from afil_ray.eval.protocol import (
    as_run,
    evaluate_arms,
    load_mean_w,
    load_outcomes,
    output_dir,
    pooled,
    write_evaluation,
)
from afil_ray.eval.report import ArmResult, build_report, markdown_table, write_report
from afil_ray.eval.workers import UnitRunner, run_units, task_units
from afil_ray.pipeline import plan as planning
from afil_ray.pipeline.plan import CORRECTED_ARM, SUCCESS_ONLY, PlannedArm
from afil_ray.pipeline.reports import main_report, mean_w_sentence, seed_spread, summary_table
from afil_ray.pipeline.stages import (
    BRANCH_RULE_EVAL_DEPENDS,
    CRITIC_EVAL_DEPENDS,
    DEPENDS,
    OUTCOME_EVAL_DEPENDS,
    StageCache,
    select,
    with_updates,
)
from afil_ray.policy.loading import load_start_policy
from afil_ray.replay.store import ReplayStore
from afil_ray.run_id import with_run_id
from afil_ray.train import Trainer

HARVEST_SOURCE = "harvest"
# what a failure-head variant may override (anything else would change the arms it is compared with)
VARIANT_KEYS = ("policy.failure_head_init", "train.", "data.", "reproduce.failure_head_steps",
                "reproduce.failure_outcomes")


class Pipeline:
    """The stages of one reproduction; ``run()`` runs every stage not completed yet and writes the results.

    ``runner`` places evaluation units (harvest and every evaluation; processes when None) and ``run_loop`` runs
    the online loop; the CLI passes the composition root's (``afil_ray/driver.py``)."""

    def __init__(self, cfg: Config, progress: bool = True, runner: UnitRunner | None = None,
                 run_loop: Callable[[Config], dict[str, Any]] | None = None) -> None:
        self.cfg, self.progress = with_run_id(cfg, "reproduce"), progress
        self.run_id: str = self.cfg.run_id  # on every episode the stages store (demos, harvest, corrections)
        self.runner, self.run_loop = runner, run_loop
        self.root = Path(cfg.run_dir)
        self.store = ReplayStore.from_config(cfg.replay)
        self.stages = StageCache(self.root)
        self.results: list[ArmResult] = []  # the main table's rows
        self.mean_w: dict[str, float | None] = {}  # row label -> mean guidance weight applied
        self.variant_results: dict[str, ArmResult] = {}  # "<variant>: <arm>" -> episodes (main seed)
        self.seed_results: dict[int, dict[str, ArmResult]] = {}  # training seed -> row role -> episodes

    def _stage(self, stage: str, fn: Callable[[], dict[str, Any]],
               settings: dict[str, Any] | None = None) -> dict[str, Any]:
        settings = select(self.cfg, DEPENDS[stage]) if settings is None else settings
        keys = tuple(k for k in settings if k != "overrides")  # a study variant's record adds its overrides
        return self.stages.run(stage, fn, settings, defaults=select(Config(), keys))

    def _stopped(self) -> dict[str, Any]:
        """What ``run`` returns when ``reproduce.until`` stops it: the stages that ran, no report."""
        return {"stopped_after": self.cfg.reproduce.until, "report": None,
                "stages": {stage: record["outputs"] for stage, record in self.stages.records.items()}}

    # ---------------------------------------------------------------- stages

    def run(self) -> dict[str, Any]:
        rc = self.cfg.reproduce
        seeds = list(rc.train_seeds)
        if self.cfg.seed in seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"reproduce.train_seeds={seeds}: the extra training seeds must differ from each "
                              f"other and from seed={self.cfg.seed}, which the main stages train with")
        unknown = [name for name in rc.seed_variants if name not in rc.variants]
        if unknown or (rc.seed_variants and not seeds):
            raise ConfigError(f"reproduce.seed_variants={list(rc.seed_variants)}: each must name one of "
                              f"reproduce.variants ({', '.join(rc.variants) or 'none'}; unknown: "
                              f"{', '.join(unknown) or 'none'}), and reproduce.train_seeds must not be empty "
                              "(reproduce.seed_variants=[] skips the seed treatment)")
        # every task and path before the first stage: an out-of-domain typo must not wait for hours of training
        for arms in (planning.critic_arms, planning.branch_rule_arms, planning.outcome_arms):
            arms(self.cfg)  # a mistyped arm, too
        check_tasks(env_tasks(self.cfg.env), planner=True)  # demos and corrections plan them
        check_one_action_space(self.cfg.env)
        studies = [k for k in ("variants", "ood_tasks", "train_seeds", "seed_variants") if getattr(rc, k)]
        if len(self.cfg.env.tasks) > 1 and studies:
            raise ConfigError(f"reproduce.{studies[0]}: the studies run on one task; a task list "
                              f"({', '.join(self.cfg.env.tasks)}) reproduces the main arms per task and pooled")
        check_tasks(trained_tasks(self.cfg), simulate=False)
        check_tasks([("reproduce.ood_tasks", t) for t in rc.ood_tasks])
        check_writable("run_dir", self.cfg.run_dir)
        check_writable("replay.root", self.cfg.replay.root)
        save_resolved(self.cfg, self.root)
        self._stage("demos", self.demos)
        if rc.until == "demos":
            return self._stopped()
        success_ckpt = self._stage("success_only", self.success_only)["checkpoint"]
        if rc.until == "success_only":
            return self._stopped()
        self._stage("harvest", lambda: self.harvest(success_ckpt))
        if rc.until == "harvest":
            return self._stopped()
        self._stage("correct", self.correct)
        if rc.until == "correct":
            return self._stopped()
        corrected_ckpt = self._stage("corrected", lambda: self.corrected(success_ckpt))["checkpoint"]
        if rc.until == "corrected":
            return self._stopped()
        dag_ckpt = self._stage("dag", lambda: self.dag(corrected_ckpt))["checkpoint"]
        if rc.until == "dag":
            return self._stopped()
        # before the online loop adds failures, so every seed's failure head sees what the main one saw
        seed_ckpts = {seed: self.seed_stages(seed, success_ckpt) for seed in seeds}
        if rc.critic_arms or rc.branch_rule_arms:  # issue 22's failure signal: branches from the harvest
            self._stage("branch", lambda: self.branch(corrected_ckpt))
        signal = self.signal_stages(corrected_ckpt)
        if rc.until == "signal":
            return self._stopped()
        # each training seed's, on the same branches (made by the main corrected policy)
        seed_signal = {seed: self.signal_stages(seed_ckpts[seed][0], seed) for seed in seeds}
        online_ckpt = None
        if self.cfg.reproduce.online_s > 0:
            online_ckpt = self._stage("online", lambda: self.online(corrected_ckpt))["checkpoint"]
        main = planning.main_plan(self.cfg, success_ckpt, dag_ckpt, online_ckpt, signal)
        eval_keys = (*DEPENDS["eval"], *(CRITIC_EVAL_DEPENDS if rc.critic_arms else ()),
                     *(BRANCH_RULE_EVAL_DEPENDS if rc.branch_rule_arms else ()),
                     *(OUTCOME_EVAL_DEPENDS if rc.outcome_arms else ()))
        self._stage("eval", lambda: self.evaluate(main), select(self.cfg, tuple(dict.fromkeys(eval_keys))))
        variant_ckpts = {name: self.variant_stage(name, corrected_ckpt) for name in rc.variants}
        seed_variant_ckpts = {(seed, name): self.variant_stage(name, seed_ckpts[seed][0], seed)
                              for seed in seeds for name in rc.seed_variants}
        # the tables are rebuilt on every call from the stored evaluation episodes (nothing is re-run), so they
        # carry every stage's wall time and follow the current report format
        summary = self.evaluate(main)
        if variant_ckpts:
            summary["variants"] = self.evaluate_variants(variant_ckpts)
        if self.cfg.reproduce.ood_tasks:
            summary["ood"] = self.evaluate_ood(main)
        if seed_ckpts:
            summary["seeds"] = self.evaluate_seeds({seed: dag for seed, (_, dag) in seed_ckpts.items()}, seed_signal)
        if seed_variant_ckpts:
            summary["seed_variants"] = self.evaluate_seed_variants(seed_variant_ckpts)
        return summary

    def seed_stages(self, seed: int, success_ckpt: str) -> tuple[str, str]:
        """``corrected`` and ``dag`` re-trained with training seed ``seed``; returns both checkpoints."""
        scfg = with_updates(self.cfg, seed=seed)
        sub = f"seeds/{seed}"
        corrected = self._stage(f"seed{seed}_corrected",
                                lambda: self.corrected(success_ckpt, scfg, f"{sub}/corrected"),
                                select(scfg, DEPENDS["corrected"]))["checkpoint"]
        return corrected, self._stage(f"seed{seed}_dag", lambda: self.dag(corrected, scfg, f"{sub}/dag"),
                                      select(scfg, DEPENDS["dag"]))["checkpoint"]

    def signal_stages(self, corrected_ckpt: str, seed: int | None = None) -> dict[str, str]:
        """Issue 22's trained stages from ``corrected_ckpt`` (the main one, or training seed ``seed``'s): the
        outcome-conditioned head, the critic and the branch-trained heads, those whose arms are configured;
        returns their checkpoints by ``signal_rows`` key."""
        rc = self.cfg.reproduce
        cfg = self.cfg if seed is None else with_updates(self.cfg, seed=seed)
        prefix, sub = ("", "") if seed is None else (f"seed{seed}_", f"seeds/{seed}/")
        stages = {"outcome": ("outcome_head", self.outcome_head, rc.outcome_arms),
                  "critic": ("critic", self.critic, rc.critic_arms),
                  "branch_heads": ("branch_heads", self.branch_heads, rc.branch_rule_arms)}
        out = {}
        for key, (stage, train, arms) in stages.items():
            if arms:
                out[key] = self._stage(prefix + stage, lambda t=train, s=stage: t(corrected_ckpt, cfg, sub + s),
                                       select(cfg, DEPENDS[stage]))["checkpoint"]
        return out

    def variant_stage(self, name: str, corrected_ckpt: str, seed: int | None = None) -> str:
        """Study variant ``name``'s failure head next to ``corrected_ckpt``'s success head, trained with the main
        seed or (``seed``) a training seed's; returns its checkpoint."""
        vcfg = self.variant_config(name)
        stage, sub = f"variant_{name}", f"variants/{name}"
        if seed is not None:
            vcfg = with_updates(vcfg, seed=seed)
            stage, sub = f"seed{seed}_{stage}", f"seeds/{seed}/{sub}"
        settings = {**select(vcfg, DEPENDS["dag"]), "overrides": list(self.cfg.reproduce.variants[name])}
        return self._stage(stage, lambda: self.dag(corrected_ckpt, vcfg, sub), settings)["checkpoint"]

    def variant_config(self, name: str) -> Config:
        """The config of one failure-head variant: ``reproduce.variants[name]`` applied over this config."""
        overrides = list(self.cfg.reproduce.variants[name])
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in VARIANT_KEYS):
                raise ConfigError(f"reproduce.variants.{name}: '{key}' cannot vary in the failure-head study "
                                  f"(allowed: {', '.join(k + '*' if k.endswith('.') else k for k in VARIANT_KEYS)})")
        return with_overrides(self.cfg, overrides, f"reproduce.variants.{name}")

    def for_task(self, task: str, cfg: Config | None = None) -> Config:
        """``cfg`` (this reproduction's) for one of its tasks: what demos, harvests and corrections run on."""
        cfg = cfg or self.cfg
        return dataclasses.replace(cfg, env=cfg.env.for_task(task))

    def demos(self) -> dict[str, Any]:
        reports = [generate_demos(self.for_task(t), self.store, progress=self.progress) for t in self.cfg.env.tasks]
        for report in reports:
            print(report.summary())
        return {"demos": sum(r.total for r in reports), "added": sum(r.added for r in reports),
                "dropped": dict(sum((r.failures for r in reports), Counter()))}

    def _train(self, stage_cfg: Config) -> dict[str, Any]:
        trainer = Trainer(stage_cfg, progress=self.progress)
        final = trainer.run()
        windows = {f"{name}_windows": s.num_steps for name, s in trainer.samplers.items()}
        return {"checkpoint": str(final), "steps": trainer.step, "run_dir": stage_cfg.run_dir, **windows}

    def success_only(self) -> dict[str, Any]:
        cfg = with_updates(self.cfg, run_dir=str(self.root / "success_only"),
                           train={"mode": "success_only", "init_from": None}, data={"success_outcomes": ["demo"]})
        return self._train(cfg)

    def harvest(self, checkpoint: str) -> dict[str, Any]:
        """Roll the success-only policy out; each (task, run) unit is written as soon as it finishes, so a killed
        harvest resumes at the first unit not recorded in ``harvest/units.json``. The units of all tasks share the
        eval workers at once; they are written in (task, run) order whichever worker is faster."""
        rc = self.cfg.reproduce
        cfg = with_updates(self.cfg, eval={"seed_start": rc.harvest_seed_start, "episodes": rc.harvest_seeds,
                                           "runs": rc.harvest_runs},
                           sampler={"kind": "success_only"})
        ledger = self.root / "harvest" / "units.json"
        done: dict[str, dict[str, int]] = json.loads(ledger.read_text()) if ledger.is_file() else {}
        policy = load_start_policy(checkpoint)
        tasks = cfg.env.tasks

        def key(task: str, run: int) -> str:  # a task list's ledger names the task too
            return f"{task}/{run}" if len(tasks) > 1 else str(run)

        def writer(task: str, run: int) -> str:  # one per unit and run dir: a stopped unit's shards are found again
            return f"harvest:{self.root.resolve()}:{key(task, run)}"

        units = [u for u in task_units(tasks, 1, rc.harvest_runs) if key(u[0], u[2]) not in done]
        for task, _, run in units:  # stored by a harvest stopped before its ledger line: rolled out again
            self.store.discard_writer(writer(task, run))
        desc = f"harvest {tasks[0]}" if len(tasks) == 1 else f"harvest {len(tasks)} tasks"
        bar = tqdm(total=len(units) * rc.harvest_seeds, desc=desc, unit="ep", disable=not self.progress,
                   dynamic_ncols=True)  # advances a run (unit) at a time, as eval's
        for (task, _, run), episodes in run_units(cfg, policy, [sampler_arm(cfg.sampler)], units,
                                                  keep_snapshots=True, runner=self.runner):
            for ep in episodes:
                ep.source = HARVEST_SOURCE
                if ep.outcome != "failure" and not (rc.critic_arms or rc.branch_rule_arms):
                    ep.snapshot_steps, ep.snapshots = [], []  # only failures are corrected (successes: branched)
            self.store.write_episodes(episodes, writer(task, run), run_id=self.run_id)
            done[key(task, run)] = {"episodes": len(episodes),
                                    "failures": sum(e.outcome == "failure" for e in episodes)}
            ledger.parent.mkdir(parents=True, exist_ok=True)
            ledger.write_text(json.dumps(done, indent=1) + "\n")
            bar.update(len(episodes))
            bar.set_postfix(failures=sum(d["failures"] for d in done.values()))
            print(f"  harvest {task} run {run}: {done[key(task, run)]['failures']} failures of {len(episodes)}")
        bar.close()
        total = sum(d["episodes"] for d in done.values())
        failures = sum(d["failures"] for d in done.values())
        return {"episodes": total, "failures": failures, "success_rate": 1 - failures / total if total else None,
                "seeds": f"{rc.harvest_seed_start}..{rc.harvest_seed_start + rc.harvest_seeds - 1} x "
                         f"{rc.harvest_runs} runs"}

    def correct(self) -> dict[str, Any]:
        reports = [correct_failures(self.for_task(t), self.store, progress=self.progress) for t in self.cfg.env.tasks]
        for report in reports:
            print(report.summary())
        stats = self.store.stats()
        corrected = sum(s.episodes for s in stats if s.task in self.cfg.env.tasks and s.outcome == "corrected")
        return {"tried": sum(r.tried for r in reports), "corrected_now": sum(r.corrected for r in reports),
                "dropped": dict(sum((Counter(r.dropped) for r in reports), Counter())),
                "corrected_in_store": corrected}

    def corrected(self, success_ckpt: str, cfg: Config | None = None, sub: str = "corrected") -> dict[str, Any]:
        """"Success + failure correction": the success-only policy fine-tuned on demos + corrections (``cfg``:
        a training seed's)."""
        cfg = cfg or self.cfg
        cfg = with_updates(cfg, run_dir=str(self.root / sub),
                           train={"mode": "success_only", "init_from": success_ckpt,
                                  "steps": cfg.reproduce.correction_steps},
                           data={"success_outcomes": ["demo", "corrected"]})
        return self._train(cfg)

    def dag(self, corrected_ckpt: str, cfg: Config | None = None, sub: str = "dag") -> dict[str, Any]:
        """The failure head on raw failures next to the corrected success head (``cfg``: a study variant's)."""
        cfg = cfg or self.cfg
        cfg = with_updates(cfg, run_dir=str(self.root / sub),
                           train={"mode": "failure_head", "init_from": corrected_ckpt,
                                  "steps": cfg.reproduce.failure_head_steps},
                           data={"failure_outcomes": list(cfg.reproduce.failure_outcomes)})
        return self._train(cfg)

    def branch(self, corrected_ckpt: str) -> dict[str, Any]:
        """Matched-state branches (``branches.*``) from the harvested rollouts, rolled out by the corrected policy's
        success head, the one the critic's arms sample from: the critic's contrast data. Resumable per branch."""
        cfg = with_updates(self.cfg, sampler={"kind": "success_only"})
        policy = load_start_policy(corrected_ckpt)
        reports = [branch_task(self.for_task(t, cfg), policy, self.store, progress=self.progress,
                               extra={"checkpoint": corrected_ckpt}) for t in self.cfg.env.tasks]
        for report in reports:
            print(report.summary())
        branches = sum(r.branches for r in reports)
        return {"states": sum(r.states for r in reports), "branches": branches,
                "success_rate": sum(r.successes for r in reports) / branches if branches else None,
                "mixed_groups": sum(r.mixed for r in reports), "groups_before": sum(r.done_before for r in reports)}

    def critic(self, corrected_ckpt: str, cfg: Config | None = None, sub: str = "critic") -> dict[str, Any]:
        """The success critic trained alone on the branches (and Monte-Carlo rows) on top of the corrected policy,
        whose backbone and heads it keeps; its held-out AUROCs go into the stage's record."""
        cfg = cfg or self.cfg
        cfg = with_updates(cfg, run_dir=str(self.root / sub), policy={"critic": True},
                           train={"mode": "critic", "init_from": corrected_ckpt,
                                  "steps": cfg.reproduce.critic_steps})
        trainer = Trainer(cfg, progress=self.progress)
        final = trainer.run()
        report = trainer.evaluate_critic(final)
        for line in report.lines():
            print(line)
        o = report.overall if len(report.tasks) > 1 else report.tasks[0]
        return {"checkpoint": str(final), "steps": trainer.step, "run_dir": cfg.run_dir,
                "critic_rows": trainer.samplers["critic"].num_steps, "auroc_q": o.auroc_q,
                "auroc_q_within_group": o.auroc_q_within_group, "auroc_v": o.auroc_v,
                "held_out_branches": o.branches, "mixed_groups": o.mixed_groups}

    def outcome_head(self, corrected_ckpt: str, cfg: Config | None = None, sub: str = "outcome_head") -> dict[str, Any]:
        """CFGRL: the corrected policy's success head (backbone frozen) trained with outcome tokens on its demos and
        corrections ("success") and the raw failures ("failure"), so v_none + w (v_success - v_none) steers by
        what succeeded, from one head."""
        cfg = cfg or self.cfg
        rc = cfg.reproduce
        return self._train(with_updates(
            cfg, run_dir=str(self.root / sub), policy={"outcome_conditioning": True},
            train={"mode": "outcome", "init_from": corrected_ckpt, "steps": rc.failure_head_steps},
            data={"success_outcomes": ["demo", "corrected"], "failure_outcomes": list(rc.failure_outcomes)}))

    def branch_heads(self, corrected_ckpt: str, cfg: Config | None = None, sub: str = "branch_heads") -> dict[str, Any]:
        """The paper's two heads on the two outcomes of the same states: the corrected policy's success head
        fine-tuned with the branches that succeeded (beside its demos and corrections), then a failure head on
        the branches that failed, so v_s - v_f contrasts chunks from the same states."""
        cfg = cfg or self.cfg
        rc, root = cfg.reproduce, self.root / sub
        success = self._train(with_updates(
            cfg, run_dir=str(root / "success"),
            train={"mode": "success_only", "init_from": corrected_ckpt, "steps": rc.correction_steps},
            data={"success_outcomes": ["demo", "corrected", "branch_success"]}))
        failure = self._train(with_updates(
            cfg, run_dir=str(root / "failure"),
            train={"mode": "failure_head", "init_from": success["checkpoint"], "steps": rc.failure_head_steps},
            data={"failure_outcomes": ["branch_failure"]}))
        return {"checkpoint": failure["checkpoint"], "success_checkpoint": success["checkpoint"],
                "success_windows": success["success_windows"], "failure_windows": failure["failure_windows"]}

    def online(self, corrected_ckpt: str) -> dict[str, Any]:
        cfg = with_updates(self.cfg, run_dir=str(self.root / "online"),
                           loop={"init_from": corrected_ckpt, "duration_s": self.cfg.reproduce.online_s},
                           data={"failure_outcomes": list(self.cfg.reproduce.failure_outcomes)})
        if self.run_loop is None:
            raise ConfigError("reproduce.online_s > 0 needs the loop on Ray, which the afil-ray command starts; "
                              "called as a library, pass run_loop=afil_ray.driver.run_loop")
        summary = self.run_loop(cfg)
        if not summary.get("final_checkpoint"):
            raise RuntimeError(f"the online loop in {cfg.run_dir} ended without a checkpoint: {summary}")
        # the driver hands Ray absolute paths; record the checkpoint the way every other stage does (under
        # run_dir as given), so a run directory copied to another machine or clone still finds it
        ckpt = Path(summary["final_checkpoint"])
        online_dir = Path(cfg.run_dir)
        with contextlib.suppress(ValueError):  # outside the stage's directory: keep the loop's own path
            ckpt = online_dir / ckpt.resolve().relative_to(online_dir.resolve())
        return {"checkpoint": str(ckpt), "summary": summary}

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, main: list[PlannedArm]) -> dict[str, Any]:
        """``results/``: every row of the main plan (``main_report``)."""
        self.results = self._evaluate_plan(main)
        adaptive = {p.label for p in main if p.arm.kind == "adaptive"}
        seconds = {stage: record["seconds"] for stage, record in self.stages.records.items()}
        return main_report(self.results, self.mean_w, adaptive, self.cfg.env.tasks, self.cfg.eval.metric,
                           self.cfg.seed, seconds, self.root / "results")

    def evaluate_variants(self, ckpts: dict[str, str]) -> dict[str, Any]:
        """``results/variants/``: each variant's arms and the paper-rule failure head's (``dag``, trained before
        the online stage) paired against "+ failure correction", whose success head they all share."""
        rows = planning.variant_plan(self.cfg, ckpts)
        results = [r for r in self.results if r.arm == CORRECTED_ARM]
        main = {r.arm: r for r in self.results}
        for title in dict.fromkeys(p.arm.title for p in rows):
            if (r := main.get(title)) is not None:
                results.append(ArmResult(f"dag: {r.arm}", r.task, r.episodes))
                self.mean_w[f"dag: {r.arm}"] = self.mean_w.get(r.arm)
        results += self._evaluate_plan(rows)
        self.variant_results = {r.arm: r for r in results}
        task, metric = self.cfg.env.task, self.cfg.eval.metric
        report = build_report(results, metric=metric, reference_arm=CORRECTED_ARM, seed=self.cfg.seed)
        report["mean_w"] = {r.arm: self.mean_w.get(r.arm) for r in results}
        lines = [markdown_table(report), "", mean_w_sentence("per arm", report["mean_w"]),
                 "", "The variants (overrides of the failure-head stage) and what each trained on:", "",
                 "| variant | overrides | failure windows | steps | train s |", "|---|---|---|---|---|"]
        for name in ["dag", *ckpts]:
            rec = self.stages.records.get(name if name == "dag" else f"variant_{name}", {})
            out = rec.get("outputs", {})
            overrides = "(the paper's rule, before the online stage)" if name == "dag" else \
                " ".join(f"`{o}`" for o in self.cfg.reproduce.variants[name]) or "(none)"
            windows = out.get("failure_windows")
            if windows is None:  # a dag stage from before the count was recorded: its failures, not windows
                failures = self.stages.outputs("harvest").get("failures", "?")
                windows = f"{failures} harvest failures' chunks"
            lines.append(f"| {name} | {overrides} | {windows} | {out.get('steps', '?')} | "
                         f"{rec.get('seconds', float('nan')):.0f} |")
        paths = write_report(report, self.root / "results" / "variants", "\n".join(lines) + "\n")
        return {"report": str(paths["md"]),
                "rates": {e["arm"]: e["rate"] for e in report["tasks"][task]["arms"]}}

    def evaluate_ood(self, main: list[PlannedArm]) -> dict[str, Any]:
        """``results/ood/<task>/``: the trained arms on each ``reproduce.ood_tasks`` task (same seeds and noise
        draws as in domain), every arm against success only and the FIL arms against + failure correction."""
        metric = self.cfg.eval.metric
        rows = planning.ood_plan(self.cfg, main)
        out: dict[str, Any] = {}
        for task in self.cfg.reproduce.ood_tasks:
            results = self._evaluate_plan(rows, task=task)
            report = build_report(results, metric=metric, reference_arm=SUCCESS_ONLY, seed=self.cfg.seed)
            fil = build_report(results[1:], metric=metric, reference_arm=CORRECTED_ARM, seed=self.cfg.seed)
            paths = write_report(report, self.root / "results" / "ood" / task, "\n".join([
                markdown_table(report), "", f"Against `{CORRECTED_ARM}` (the failure head's own effect):", "",
                markdown_table(fil, legend=False)]) + "\n")
            (paths["md"].parent / "summary.md").write_text(summary_table(report, fil))
            out[task] = {"report": str(paths["md"]),
                         "rates": {e["arm"]: e["rate"] for e in report["tasks"][task]["arms"]}}
        return out

    def evaluate_seeds(self, ckpts: dict[int, str], signal: dict[int, dict[str, str]] | None = None
                       ) -> dict[str, Any]:
        """``results/seeds/``: per training seed (the main stages' first), "+ failure correction" against success
        only, and the first static and adaptive arms and issue 22's rows against that seed's "+ failure
        correction"; then the mean and spread over seeds of each rate and paired difference."""
        first = next(iter(signal.values()), {}) if signal else {}
        roles = [CORRECTED_ARM, *(a.title for a in planning.paper_fil_arms(self.cfg)),
                 *(title for title, _, _ in planning.signal_rows(self.cfg, first))]
        main = {r.arm: r for r in self.results}
        by_seed = {self.cfg.seed: {a: main[a] for a in roles}}
        self._evaluate_by_seed(planning.seed_plan(self.cfg, ckpts, signal), by_seed)
        self.seed_results = by_seed
        paper_rule = planning.adaptive_arms(self.cfg)[0].title if planning.adaptive_arms(self.cfg) else None
        return self._spread(by_seed, roles, "seeds", f"`{CORRECTED_ARM}` and its failure head re-trained with each "
                            "seed from the same success-only policy and store.", paper_rule)

    def evaluate_seed_variants(self, ckpts: dict[tuple[int, str], str]) -> dict[str, Any]:
        """``results/seed_variants/``: the ``reproduce.seed_variants`` failure heads re-trained with each training
        seed, every ``variant_arms`` arm against its own seed's "+ failure correction" (whose success head it
        shares), so a variant's gain comes with the spread that re-training both heads gives."""
        names = list(dict.fromkeys(name for _, name in ckpts))
        roles = [CORRECTED_ARM, *(planning.variant_label(name, arm) for name in names
                                   for arm in planning.variant_arms(self.cfg))]
        by_seed = {seed: {CORRECTED_ARM: group[CORRECTED_ARM]} for seed, group in self.seed_results.items()}
        by_seed[self.cfg.seed].update({a: self.variant_results[a] for a in roles[1:]})
        rows = [p for (seed, name), ckpt in ckpts.items() for p in planning.variant_plan(self.cfg, {name: ckpt}, seed)]
        self._evaluate_by_seed(rows, by_seed)
        return self._spread(by_seed, roles, "seed_variants", f"the failure-head variants {', '.join(names)} "
                            f"re-trained with each seed next to that seed's `{CORRECTED_ARM}` success head.")

    def _evaluate_by_seed(self, rows: list[PlannedArm], by_seed: dict[int, dict[str, ArmResult]]) -> None:
        """Evaluate seed rows into ``by_seed[seed][role]``."""
        for row, result in zip(rows, self._evaluate_plan(rows), strict=True):
            by_seed.setdefault(row.seed, {})[row.role] = result

    def _spread(self, by_seed: dict[int, dict[str, ArmResult]], roles: list[str], name: str,
                what: str, paper_rule: str | None = None) -> dict[str, Any]:
        reference = next(r for r in self.results if r.arm == SUCCESS_ONLY)
        return seed_spread(by_seed, roles, reference, self.cfg.env.task, self.cfg.eval.metric, self.cfg.seed,
                           self.root / "results" / name, what, paper_rule)

    def _evaluate_plan(self, rows: list[PlannedArm], task: str | None = None) -> list[ArmResult]:
        """Evaluate rows (in order), one evaluation per checkpoint, on ``task`` (default: the reproduction's own);
        stored episodes are reused, episode for episode. A task list gives each row's result on every task, then
        every row's pooled over the tasks."""
        tasks = [task] if task else self.cfg.env.tasks
        results: dict[tuple[str, int], ArmResult] = {}
        for ckpt in dict.fromkeys(p.checkpoint for p in rows):  # one evaluation per checkpoint, in plan order
            mine = [(i, p) for i, p in enumerate(rows) if p.checkpoint == ckpt]
            # the evaluation lands in the checkpoint's own run directory (run_dir/<stage>/eval/...)
            cfg = with_updates(self.cfg, run_dir=str(Path(ckpt).parent.parent),
                               env={"task": task or self.cfg.env.task})
            arms = as_run([p.arm for _, p in mine], cfg)
            done = output_dir(cfg, ckpt, arms) / "episodes.json"
            if done.is_file():  # evaluated before this stage was killed: reuse, episode for episode
                outcomes = {(t, arm): eps for t in tasks for arm, eps in load_outcomes(done, t).items()}
                print(f"  reusing {done}")
            else:
                evals = evaluate_arms(cfg, load_start_policy(ckpt), progress=self.progress, arms=arms,
                                      runner=self.runner)
                write_evaluation(cfg, evals, arms, ckpt)
                outcomes = {(ev.task, ev.arm.name): ev.outcomes() for ev in evals}
            w = load_mean_w(done)
            for (i, row), arm in zip(mine, arms, strict=True):
                for t in tasks:
                    results[(t, i)] = ArmResult(row.label, t, outcomes[(t, arm.name)])
                if task is None:
                    self.mean_w[row.label] = w.get(arm.name)
        per_task = [results[(t, i)] for t in tasks for i in range(len(rows))]
        return per_task + pooled(per_task)
