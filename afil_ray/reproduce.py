"""``afil-ray reproduce``: the paper's ManiSkill pipeline for one task as resumable, cached stages.

    demos -> success_only -> harvest -> correct -> corrected -> dag -> [online] -> eval

- ``demos``: motion-planner demonstrations into the store (``demos.num``).
- ``success_only``: backbone + success head on the demos alone (``train.*``).
- ``harvest``: the success-only policy rolled out on ``reproduce.harvest_seeds`` fresh initial states x
  ``harvest_runs`` noise draws; every episode goes to the store (failures with their simulator snapshots).
- ``correct``: the motion planner finishes the harvested failures (``afil-ray correct``).
- ``corrected``: "success + failure correction", the success-only policy fine-tuned on demos + corrections.
- ``dag``: DAG-VLA, a failure head trained on the raw failures next to the corrected policy's success head.
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

Each stage writes ``run_dir/stages/<stage>.json`` when it completes (its wall time and outputs) and is skipped
on the next call. A stage that was completed under different settings is an error naming the keys, since its
outputs no longer match the config; training stages resume from their last checkpoint after a kill, harvest and
correction from what is already in the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from afil_ray.config import Config, ConfigError, save_resolved, with_overrides
from afil_ray.eval_report import ArmResult, EpisodeOutcome, build_report, format_p, markdown_table, write_report

log = logging.getLogger(__name__)

STAGES = ("demos", "success_only", "harvest", "correct", "corrected", "dag", "online", "eval")
HARVEST_SOURCE = "harvest"
CORRECTED_ARM = "+ failure correction"

# The paper's success rates (%) on the same protocol (../shared/afil-method.md), for the table beside ours.
PAPER: dict[str, dict[str, float]] = {
    "StackCube-v1": {"success only": 71.3, "+ failure correction": 76.7, "static FIL w=0.05": 80.0,
                     "adaptive FIL λ=1": 84.7, "adaptive FIL λ=0.5": 84.0, "adaptive FIL λ=2": 79.3,
                     "adaptive FIL λ=5": 76.0},
    "LiftPegUpright-v1": {"success only": 70.7, "+ failure correction": 80.0, "static FIL w=0.05": 86.7,
                          "adaptive FIL λ=1": 90.7},
    "PullCube-v1": {"success only": 60.0, "+ failure correction": 92.0, "static FIL w=0.05": 94.7,
                    "adaptive FIL λ=1": 98.0},
}

# The config sections each stage's outputs depend on (a change there after the stage completed is an error).
_DEPENDS: dict[str, tuple[str, ...]] = {
    "demos": ("env", "demos"),
    "success_only": ("env", "demos", "policy", "train", "seed"),
    "harvest": ("env", "demos", "policy", "train", "seed", "sampler", "reproduce.harvest_seed_start",
                "reproduce.harvest_seeds", "reproduce.harvest_runs"),
}
_DEPENDS["correct"] = (*_DEPENDS["harvest"], "correct")
_DEPENDS["corrected"] = (*_DEPENDS["correct"], "reproduce.correction_steps")
_DEPENDS["dag"] = (*_DEPENDS["corrected"], "reproduce.failure_head_steps", "reproduce.failure_outcomes")
_DEPENDS["online"] = (*_DEPENDS["dag"], "loop", "reproduce.online_s")
_DEPENDS["eval"] = (*_DEPENDS["online"], "eval", "reproduce.static_w", "reproduce.lams")
# what a failure-head variant may override (anything else would change the arms it is compared with)
VARIANT_KEYS = ("policy.failure_head_init", "train.", "data.", "reproduce.failure_head_steps",
                "reproduce.failure_outcomes")


def arm_title(spec: str) -> str:
    """``static:w=0.05`` -> ``static FIL w=0.05``, ``adaptive:lam=1`` -> ``adaptive FIL λ=1`` (the tables' names)."""
    kind, _, params = spec.partition(":")
    if kind == "success_only" and not params:
        return "success only"
    parts = []
    for item in filter(None, params.split(",")):
        key, _, value = item.partition("=")
        with contextlib.suppress(ValueError):
            value = _fmt(float(value))  # lam=1.0 and lam=1 name the same arm
        parts.append(f"{'λ' if key == 'lam' else key}={value}")
    return " ".join([f"{kind} FIL", *parts])


def _fmt(x: float) -> str:
    return f"{x:g}"


def _select(cfg: Config, keys: tuple[str, ...]) -> dict[str, Any]:
    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def with_updates(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with keys of some sections replaced (``train={"steps": 10}``); ``run_dir=...`` too."""
    out = cfg
    for name, value in sections.items():
        if isinstance(value, dict):
            out = dataclasses.replace(out, **{name: dataclasses.replace(getattr(out, name), **value)})
        else:
            out = dataclasses.replace(out, **{name: value})
    return out


class Pipeline:
    """The stages of one reproduction; ``run()`` runs every stage not completed yet and writes the results."""

    def __init__(self, cfg: Config, progress: bool = True) -> None:
        from afil_ray.replay.store import ReplayStore

        self.cfg, self.progress = cfg, progress
        self.root = Path(cfg.run_dir)
        self.store = ReplayStore.from_config(cfg.replay)
        self.records: dict[str, dict[str, Any]] = {}
        self.results: list[ArmResult] = []
        self.mean_w: dict[str, float | None] = {}  # arm label -> mean guidance weight applied
        self.arm_specs: dict[str, str] = {}  # arm label -> sampler arm spec ("adaptive:lam=1")
        self.variant_results: dict[str, ArmResult] = {}  # "<variant>: <arm>" -> episodes (main seed)
        self.seed_results: dict[int, dict[str, ArmResult]] = {}  # training seed -> arm -> episodes

    # ---------------------------------------------------------------- stage bookkeeping

    def _marker(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def _stage(self, stage: str, fn: Callable[[], dict[str, Any]],
               settings: dict[str, Any] | None = None) -> dict[str, Any]:
        settings = _select(self.cfg, _DEPENDS[stage]) if settings is None else settings
        marker = self._marker(stage)
        if marker.is_file():
            record = json.loads(marker.read_text())
            changed = _diff(record["settings"], json.loads(json.dumps(settings)))
            if changed:
                raise ConfigError(
                    f"stage {stage!r} of {self.root} was completed with other settings ({', '.join(changed[:8])}); "
                    f"its outputs do not match this config. Use another run_dir, or delete {marker} (and the "
                    f"stage's outputs) to redo it.")
            print(f"[{stage}] cached ({record['seconds']:.0f} s when it ran): {_brief(record['outputs'])}")
            self.records[stage] = record
            return record["outputs"]
        print(f"[{stage}] running")
        t0 = time.time()
        outputs = fn()
        record = {"stage": stage, "seconds": time.time() - t0, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "settings": settings, "outputs": outputs}
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
        tmp.replace(marker)
        print(f"[{stage}] done in {record['seconds']:.0f} s: {_brief(outputs)}")
        self.records[stage] = record
        return outputs

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
        save_resolved(self.cfg, self.root)
        self._stage("demos", self.demos)
        success_ckpt = self._stage("success_only", self.success_only)["checkpoint"]
        self._stage("harvest", lambda: self.harvest(success_ckpt))
        self._stage("correct", self.correct)
        corrected_ckpt = self._stage("corrected", lambda: self.corrected(success_ckpt))["checkpoint"]
        dag_ckpt = self._stage("dag", lambda: self.dag(corrected_ckpt))["checkpoint"]
        # before the online loop adds failures, so every seed's failure head sees what the main one saw
        seed_ckpts = {seed: self.seed_stages(seed, success_ckpt) for seed in seeds}
        online_ckpt = None
        if self.cfg.reproduce.online_s > 0:
            online_ckpt = self._stage("online", lambda: self.online(corrected_ckpt))["checkpoint"]
        self._stage("eval", lambda: self.evaluate(success_ckpt, dag_ckpt, online_ckpt))
        variant_ckpts = {name: self.variant_stage(name, corrected_ckpt) for name in rc.variants}
        seed_variant_ckpts = {(seed, name): self.variant_stage(name, seed_ckpts[seed][0], seed)
                              for seed in seeds for name in rc.seed_variants}
        # the tables are rebuilt on every call from the stored evaluation episodes (nothing is re-run), so they
        # carry every stage's wall time and follow the current report format
        summary = self.evaluate(success_ckpt, dag_ckpt, online_ckpt)
        if variant_ckpts:
            summary["variants"] = self.evaluate_variants(variant_ckpts)
        if self.cfg.reproduce.ood_tasks:
            summary["ood"] = self.evaluate_ood(success_ckpt, dag_ckpt, online_ckpt)
        if seed_ckpts:
            summary["seeds"] = self.evaluate_seeds({seed: dag for seed, (_, dag) in seed_ckpts.items()})
        if seed_variant_ckpts:
            summary["seed_variants"] = self.evaluate_seed_variants(seed_variant_ckpts)
        return summary

    def seed_stages(self, seed: int, success_ckpt: str) -> tuple[str, str]:
        """``corrected`` and ``dag`` re-trained with training seed ``seed``; returns both checkpoints."""
        scfg = with_updates(self.cfg, seed=seed)
        sub = f"seeds/{seed}"
        corrected = self._stage(f"seed{seed}_corrected",
                                lambda: self.corrected(success_ckpt, scfg, f"{sub}/corrected"),
                                _select(scfg, _DEPENDS["corrected"]))["checkpoint"]
        return corrected, self._stage(f"seed{seed}_dag", lambda: self.dag(corrected, scfg, f"{sub}/dag"),
                                      _select(scfg, _DEPENDS["dag"]))["checkpoint"]

    def variant_stage(self, name: str, corrected_ckpt: str, seed: int | None = None) -> str:
        """Study variant ``name``'s failure head next to ``corrected_ckpt``'s success head, trained with the main
        seed or (``seed``) a training seed's; returns its checkpoint."""
        vcfg = self.variant_config(name)
        stage, sub = f"variant_{name}", f"variants/{name}"
        if seed is not None:
            vcfg = with_updates(vcfg, seed=seed)
            stage, sub = f"seed{seed}_{stage}", f"seeds/{seed}/{sub}"
        settings = {**_select(vcfg, _DEPENDS["dag"]), "overrides": list(self.cfg.reproduce.variants[name])}
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

    def demos(self) -> dict[str, Any]:
        from afil_ray.demos.generate import generate_demos

        report = generate_demos(self.cfg, self.store, progress=self.progress)
        print(report.summary())
        return {"demos": report.total, "added": report.added, "dropped": dict(report.failures)}

    def _train(self, stage_cfg: Config) -> dict[str, Any]:
        from afil_ray.train import Trainer

        trainer = Trainer(stage_cfg, progress=self.progress)
        final = trainer.run()
        windows = {f"{name}_windows": s.num_steps for name, s in trainer.samplers.items()}
        return {"checkpoint": str(final), "steps": trainer.step, "run_dir": stage_cfg.run_dir, **windows}

    def success_only(self) -> dict[str, Any]:
        cfg = with_updates(self.cfg, run_dir=str(self.root / "success_only"),
                           train={"mode": "success_only", "init_from": None},
                           data={"store": self.cfg.replay.root, "success_outcomes": ["demo"]})
        return self._train(cfg)

    def harvest(self, checkpoint: str) -> dict[str, Any]:
        """Roll the success-only policy out; each (run) unit is written as soon as it finishes, so a killed
        harvest resumes at the first unit not recorded in ``harvest/units.json``."""
        from afil_ray.eval_workers import run_units
        from afil_ray.train import load_start_policy

        rc = self.cfg.reproduce
        cfg = with_updates(self.cfg, eval={"seed_start": rc.harvest_seed_start, "episodes": rc.harvest_seeds,
                                           "runs": rc.harvest_runs},
                           sampler={"kind": "success_only"})
        ledger = self.root / "harvest" / "units.json"
        done: dict[str, dict[str, int]] = json.loads(ledger.read_text()) if ledger.is_file() else {}
        units = [(0, r) for r in range(rc.harvest_runs) if str(r) not in done]
        policy = load_start_policy(checkpoint)
        bar = tqdm(total=len(units) * rc.harvest_seeds, desc=f"harvest {cfg.env.task}", unit="ep",
                   disable=not self.progress, dynamic_ncols=True)  # advances a run (unit) at a time, as eval's
        for (_, run), episodes in run_units(cfg, policy, [cfg.sampler], units, keep_snapshots=True):
            for ep in episodes:
                ep.source = HARVEST_SOURCE
                if ep.outcome != "failure":
                    ep.snapshot_steps, ep.snapshots = [], []  # only failures are corrected
            self.store.write_episodes(episodes)
            done[str(run)] = {"episodes": len(episodes), "failures": sum(e.outcome == "failure" for e in episodes)}
            ledger.parent.mkdir(parents=True, exist_ok=True)
            ledger.write_text(json.dumps(done, indent=1) + "\n")
            bar.update(len(episodes))
            bar.set_postfix(failures=sum(d["failures"] for d in done.values()))
            print(f"  harvest run {run}: {done[str(run)]['failures']} failures of {len(episodes)}")
        bar.close()
        total = sum(d["episodes"] for d in done.values())
        failures = sum(d["failures"] for d in done.values())
        return {"episodes": total, "failures": failures, "success_rate": 1 - failures / total if total else None,
                "seeds": f"{rc.harvest_seed_start}..{rc.harvest_seed_start + rc.harvest_seeds - 1} x "
                         f"{rc.harvest_runs} runs"}

    def correct(self) -> dict[str, Any]:
        from afil_ray.correction import correct_failures

        report = correct_failures(self.cfg, self.store, progress=self.progress)
        print(report.summary())
        stats = self.store.stats()
        corrected = sum(s.episodes for s in stats if s.task == self.cfg.env.task and s.outcome == "corrected")
        return {"tried": report.tried, "corrected_now": report.corrected, "dropped": dict(report.dropped),
                "corrected_in_store": corrected}

    def corrected(self, success_ckpt: str, cfg: Config | None = None, sub: str = "corrected") -> dict[str, Any]:
        """"Success + failure correction": the success-only policy fine-tuned on demos + corrections (``cfg``:
        a training seed's)."""
        cfg = cfg or self.cfg
        cfg = with_updates(cfg, run_dir=str(self.root / sub),
                           train={"mode": "success_only", "init_from": success_ckpt,
                                  "steps": cfg.reproduce.correction_steps},
                           data={"store": self.cfg.replay.root, "success_outcomes": ["demo", "corrected"]})
        return self._train(cfg)

    def dag(self, corrected_ckpt: str, cfg: Config | None = None, sub: str = "dag") -> dict[str, Any]:
        """The failure head on raw failures next to the corrected success head (``cfg``: a study variant's)."""
        cfg = cfg or self.cfg
        cfg = with_updates(cfg, run_dir=str(self.root / sub),
                           train={"mode": "failure_head", "init_from": corrected_ckpt,
                                  "steps": cfg.reproduce.failure_head_steps},
                           data={"store": self.cfg.replay.root,
                                 "failure_outcomes": list(cfg.reproduce.failure_outcomes)})
        return self._train(cfg)

    def online(self, corrected_ckpt: str) -> dict[str, Any]:
        from afil_ray.loop.driver import LoopDriver

        cfg = with_updates(self.cfg, run_dir=str(self.root / "online"),
                           loop={"init_from": corrected_ckpt, "duration_s": self.cfg.reproduce.online_s},
                           data={"store": self.cfg.replay.root,
                                 "failure_outcomes": list(self.cfg.reproduce.failure_outcomes)})
        summary = LoopDriver(cfg).run()
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

    def arm_plan(self, success_ckpt: str, dag_ckpt: str, online_ckpt: str | None) -> list[tuple[str, str, str]]:
        """(label, checkpoint, sampler arm spec) for every arm, the reference first."""
        rc = self.cfg.reproduce
        plan = [("success only", success_ckpt, "success_only"),
                (CORRECTED_ARM, dag_ckpt, "success_only")]  # the DAG's success head is the corrected one
        plan += [(arm_title(spec), dag_ckpt, spec) for spec in [f"static:w={w}" for w in rc.static_w]]
        plan += [(arm_title(spec), dag_ckpt, spec) for spec in [f"adaptive:lam={lam}" for lam in rc.lams]]
        if online_ckpt is not None:
            lam = rc.lams[0] if rc.lams else 1.0
            plan.append((f"online loop, adaptive λ={_fmt(lam)}", online_ckpt, f"adaptive:lam={lam}"))
        return plan

    def evaluate(self, success_ckpt: str, dag_ckpt: str, online_ckpt: str | None) -> dict[str, Any]:
        self.results = self._evaluate_plan(self.arm_plan(success_ckpt, dag_ckpt, online_ckpt))
        return self.write_results(self.results)

    def evaluate_variants(self, ckpts: dict[str, str]) -> dict[str, Any]:
        """``results/variants/``: each variant's arms and the paper-rule failure head's (``dag``, trained before
        the online stage) paired against "+ failure correction", whose success head they all share."""
        specs = list(self.cfg.reproduce.variant_arms)
        results = [r for r in self.results if r.arm == CORRECTED_ARM]
        main = {r.arm: r for r in self.results}
        for spec in specs:
            if (r := main.get(arm_title(spec))) is not None:
                results.append(ArmResult(f"dag: {r.arm}", r.task, r.episodes))
                self.mean_w[f"dag: {r.arm}"] = self.mean_w.get(r.arm)
        results += self._evaluate_plan([(f"{name}: {arm_title(s)}", ckpt, s)
                                        for name, ckpt in ckpts.items() for s in specs])
        self.variant_results = {r.arm: r for r in results}
        task, metric = self.cfg.env.task, self.cfg.eval.metric
        report = build_report(results, metric=metric, reference_arm=CORRECTED_ARM, seed=self.cfg.seed)
        report["mean_w"] = {r.arm: self.mean_w.get(r.arm) for r in results}
        lines = [markdown_table(report), "", _mean_w_sentence("per arm", report["mean_w"]),
                 "", "The variants (overrides of the failure-head stage) and what each trained on:", "",
                 "| variant | overrides | failure windows | steps | train s |", "|---|---|---|---|---|"]
        for name in ["dag", *ckpts]:
            rec = self.records.get(name if name == "dag" else f"variant_{name}", {})
            out = rec.get("outputs", {})
            overrides = "(the paper's rule, before the online stage)" if name == "dag" else \
                " ".join(f"`{o}`" for o in self.cfg.reproduce.variants[name]) or "(none)"
            windows = out.get("failure_windows")
            if windows is None:  # a dag stage from before the count was recorded: its failures, not windows
                failures = self.records.get("harvest", {}).get("outputs", {}).get("failures", "?")
                windows = f"{failures} harvest failures' chunks"
            lines.append(f"| {name} | {overrides} | {windows} | {out.get('steps', '?')} | "
                         f"{rec.get('seconds', float('nan')):.0f} |")
        paths = write_report(report, self.root / "results" / "variants", "\n".join(lines) + "\n")
        return {"report": str(paths["md"]),
                "rates": {e["arm"]: e["rate"] for e in report["tasks"][task]["arms"]}}

    def evaluate_ood(self, success_ckpt: str, dag_ckpt: str, online_ckpt: str | None) -> dict[str, Any]:
        """``results/ood/<task>/``: the trained arms on each ``reproduce.ood_tasks`` task (same seeds and noise
        draws as in domain), every arm against success only and the FIL arms against + failure correction."""
        from afil_ray.envs.tasks import get_task

        rc, metric = self.cfg.reproduce, self.cfg.eval.metric
        keep = {"success only", CORRECTED_ARM}
        keep |= {arm_title(f"static:w={rc.static_w[0]}")} if rc.static_w else set()
        keep |= {arm_title(f"adaptive:lam={rc.lams[0]}")} if rc.lams else set()
        plan = [p for p in self.arm_plan(success_ckpt, dag_ckpt, online_ckpt)
                if p[0] in keep or p[0].startswith("online loop")]
        out: dict[str, Any] = {}
        for task in rc.ood_tasks:
            get_task(task)  # an unknown task fails here, naming the registered ones
            results = self._evaluate_plan(plan, task=task)
            report = build_report(results, metric=metric, reference_arm="success only", seed=self.cfg.seed)
            fil = build_report(results[1:], metric=metric, reference_arm=CORRECTED_ARM, seed=self.cfg.seed)
            paths = write_report(report, self.root / "results" / "ood" / task, "\n".join([
                markdown_table(report), "", f"Against `{CORRECTED_ARM}` (the failure head's own effect):", "",
                markdown_table(fil, legend=False)]) + "\n")
            (paths["md"].parent / "summary.md").write_text(summary_table(report, fil))
            out[task] = {"report": str(paths["md"]),
                         "rates": {e["arm"]: e["rate"] for e in report["tasks"][task]["arms"]}}
        return out

    def evaluate_seeds(self, ckpts: dict[int, str]) -> dict[str, Any]:
        """``results/seeds/``: per training seed (the main stages' first), "+ failure correction" against success
        only, and the first static and adaptive arms against that seed's "+ failure correction"; then the mean
        and spread over seeds of each rate and paired difference."""
        rc = self.cfg.reproduce
        fil = ([f"static:w={rc.static_w[0]}"] if rc.static_w else []) + \
            ([f"adaptive:lam={rc.lams[0]}"] if rc.lams else [])
        arms = [CORRECTED_ARM, *map(arm_title, fil)]
        main = {r.arm: r for r in self.results}
        by_seed = {self.cfg.seed: {a: main[a] for a in arms}}
        plan = [(f"seed {seed}: {title}", ckpt, spec) for seed, ckpt in ckpts.items()
                for title, spec in zip(arms, ["success_only", *fil], strict=True)]
        self._evaluate_by_seed(plan, by_seed)
        self.seed_results = by_seed
        return self._write_spread(by_seed, arms, self.root / "results" / "seeds",
                                  f"`{CORRECTED_ARM}` and its failure head re-trained with each seed from the same "
                                  "success-only policy and store.")

    def evaluate_seed_variants(self, ckpts: dict[tuple[int, str], str]) -> dict[str, Any]:
        """``results/seed_variants/``: the ``reproduce.seed_variants`` failure heads re-trained with each training
        seed, every ``variant_arms`` arm against its own seed's "+ failure correction" (whose success head it
        shares), so a variant's gain comes with the spread that re-training both heads gives."""
        specs = list(self.cfg.reproduce.variant_arms)
        names = list(dict.fromkeys(name for _, name in ckpts))
        arms = [CORRECTED_ARM, *(f"{name}: {arm_title(spec)}" for name in names for spec in specs)]
        by_seed = {seed: {CORRECTED_ARM: group[CORRECTED_ARM]} for seed, group in self.seed_results.items()}
        by_seed[self.cfg.seed].update({a: self.variant_results[a] for a in arms[1:]})
        self._evaluate_by_seed([(f"seed {seed}: {name}: {arm_title(spec)}", ckpt, spec)
                                for (seed, name), ckpt in ckpts.items() for spec in specs], by_seed)
        return self._write_spread(by_seed, arms, self.root / "results" / "seed_variants",
                                  f"the failure-head variants {', '.join(names)} re-trained with each seed next to "
                                  f"that seed's `{CORRECTED_ARM}` success head.")

    def _evaluate_by_seed(self, plan: list[tuple[str, str, str]], by_seed: dict[int, dict[str, ArmResult]]) -> None:
        """Evaluate a plan labelled ``seed <s>: <arm>`` into ``by_seed[s][arm]``."""
        for result in self._evaluate_plan(plan):
            seed, _, arm = result.arm.partition(": ")
            by_seed.setdefault(int(seed.removeprefix("seed ")), {})[arm] = result

    def _write_spread(self, by_seed: dict[int, dict[str, ArmResult]], arms: list[str], out: Path,
                      what: str) -> dict[str, Any]:
        """Per training seed, "+ failure correction" paired against success only and every other arm against
        that seed's "+ failure correction"; the mean ± sd over seeds; ``report.{md,json,png}``, ``spread.{json,png}``
        under ``out``."""
        metric = self.cfg.eval.metric
        reference = next(r for r in self.results if r.arm == "success only")
        flat = [reference] + [ArmResult(f"seed {s}: {a}", r.task, r.episodes)
                              for s, group in by_seed.items() for a, r in group.items()]
        report = build_report(flat, metric=metric, reference_arm="success only", seed=self.cfg.seed)

        def paired(ref: ArmResult, arm: ArmResult) -> dict[str, Any]:
            two = [ArmResult("ref", ref.task, ref.episodes), ArmResult("arm", arm.task, arm.episodes)]
            return build_report(two, metric=metric, reference_arm="ref", seed=self.cfg.seed)[
                "tasks"][ref.task]["arms"][1]

        rows = {seed: {a: paired(reference if a == CORRECTED_ARM else group[CORRECTED_ARM], group[a])
                       for a in arms} for seed, group in by_seed.items()}
        head = ["training seed"] + [h for a in arms
                                    for h in (a, f"Δ vs {'success only' if a == CORRECTED_ARM else CORRECTED_ARM}")]
        lines = [f"Training-seed spread on {self.cfg.env.task} (`{metric}`, {len(reference.episodes)} paired "
                 f"episodes per arm): {what} Δ: paired on the same episodes, [95% bootstrap], exact McNemar p.",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for seed, row in rows.items():
            cells = [f"{seed}{' (main stages)' if seed == self.cfg.seed else ''}"]
            for a in arms:
                c = row[a]["comparison"]
                cells += [f"{row[a]['rate']:.3f}", f"{c['difference']:+.3f} [{c['diff_low']:+.3f}, "
                          f"{c['diff_high']:+.3f}] p{_p(c['mcnemar_p'])}"]
            lines.append("| " + " | ".join(cells) + " |")
        spread = {a: {"rate": _mean_sd([r[a]["rate"] for r in rows.values()]),
                      "difference": _mean_sd([r[a]["comparison"]["difference"] for r in rows.values()])}
                  for a in arms}
        lines.append("| mean ± sd | " + " | ".join(
            f"{spread[a]['rate'][0]:.3f} ± {spread[a]['rate'][1]:.3f} | "
            f"{spread[a]['difference'][0]:+.3f} ± {spread[a]['difference'][1]:.3f}" for a in arms) + " |")
        lines += ["", "Every arm against success only:", "", markdown_table(report, legend=False)]
        paths = write_report(report, out, "\n".join(lines) + "\n")
        summary = {"report": str(paths["md"]), "spread": spread,
                   "per_seed": {s: {a: r[a]["rate"] for a in arms} for s, r in rows.items()}}
        (out / "spread.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot_seed_spread(report, out / "spread.png", main_seed=self.cfg.seed)
        return summary

    def _evaluate_plan(self, plan: list[tuple[str, str, str]], task: str | None = None) -> list[ArmResult]:
        """Evaluate (label, checkpoint, arm spec) triples, one evaluation per checkpoint, on ``task`` (default:
        the reproduction's own); stored episodes are reused, episode for episode."""
        from afil_ray.evaluate import evaluate_arms, output_dir, resolve_arms, write_evaluation
        from afil_ray.train import load_start_policy

        results: list[ArmResult] = []
        for ckpt in dict.fromkeys(p[1] for p in plan):  # one evaluation per checkpoint, in plan order
            mine = [p for p in plan if p[1] == ckpt]
            # the evaluation lands in the checkpoint's own run directory (run_dir/<stage>/eval/...)
            cfg = with_updates(self.cfg, run_dir=str(Path(ckpt).parent.parent), eval={"arms": [p[2] for p in mine]},
                               env={"task": task or self.cfg.env.task})
            arms = resolve_arms(cfg)
            done = output_dir(cfg, ckpt, arms) / "episodes.json"
            if done.is_file():  # evaluated before this stage was killed: reuse, episode for episode
                outcomes = load_outcomes(done)
                print(f"  reusing {done}")
            else:
                evals = evaluate_arms(cfg, load_start_policy(ckpt), progress=self.progress, arms=arms)
                write_evaluation(cfg, evals, arms, ckpt)
                outcomes = {ev.arm: ev.outcomes() for ev in evals}
            w = _mean_w(done)
            for (label, _, spec), arm in zip(mine, arms, strict=True):
                results.append(ArmResult(label, cfg.env.task, outcomes[arm.name]))
                self.arm_specs[label] = spec
                if task is None:
                    self.mean_w[label] = w.get(arm.name)
        return results

    def write_results(self, results: list[ArmResult]) -> dict[str, Any]:
        """``results/report.{json,md,png}``: every arm against success only; the FIL arms and the online arm
        also against "+ failure correction", whose success head they share (the failure head's own effect)."""
        task, metric = self.cfg.env.task, self.cfg.eval.metric
        report = build_report(results, metric=metric, reference_arm="success only", seed=self.cfg.seed)
        # how hard the adaptive rule actually steered: a FIL arm level with "+ correction" reads differently at
        # w = 0.001 (the heads agree) than at w = 0.1
        report["mean_w"] = {r.arm: self.mean_w[r.arm] for r in results if self.mean_w.get(r.arm) is not None}
        out = self.root / "results"
        out.mkdir(parents=True, exist_ok=True)
        lines = [markdown_table(report)]
        adaptive = {arm: w for arm, w in report["mean_w"].items()
                    if self.arm_specs[arm].partition(":")[0] == "adaptive"}
        if adaptive:
            lines += ["", _mean_w_sentence("by the adaptive arms", adaptive)]
        guided, fil = [r for r in results if r.arm != "success only"], None
        if len(guided) > 1:
            fil = build_report(guided, metric=metric, reference_arm=CORRECTED_ARM, seed=self.cfg.seed)
            (out / "report_vs_correction.json").write_text(json.dumps(fil, indent=1) + "\n")
            lines += ["", f"The failure head's own effect: the same arms against `{CORRECTED_ARM}` (same success "
                      "head and backbone; with w = 0 the guided sampler reproduces it episode by episode).", "",
                      markdown_table(fil, legend=False)]
        paper = PAPER.get(task, {})
        (out / "summary.md").write_text(summary_table(report, fil, report["mean_w"], paper))
        lines += ["", f"The paper's numbers for {task} (%, 1500 demos, 1500 failures and 1000 corrections per task; "
                  "../shared/afil-method.md):", "", "| arm | ours (%) | paper (%) |", "|---|---|---|"]
        for entry in report["tasks"][task]["arms"]:
            ref = paper.get(entry["arm"])
            lines.append(f"| {entry['arm']} | {100 * entry['rate']:.1f} | {'—' if ref is None else ref} |")
        lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in self.records.items())]
        paths = write_report(report, out, "\n".join(lines) + "\n")
        rates = {e["arm"]: e["rate"] for e in report["tasks"][task]["arms"]}
        return {"report": str(paths["md"]), "rates": rates}


def summary_table(vs_success: dict[str, Any], vs_correction: dict[str, Any] | None,
                  mean_w: dict[str, float | None] | None = None, paper: dict[str, float] | None = None) -> str:
    """One row per arm with both paired comparisons side by side (``summary.md``): the table a reader wants,
    where the full report needs two tables and a third for the paper. Bold: the paired interval excludes 0.
    The mean-w and paper columns appear when given (out of domain there is neither)."""
    [(task, body)] = vs_success["tasks"].items()
    against = {} if vs_correction is None else {e["arm"]: e for e in vs_correction["tasks"][task]["arms"]}
    pct = f"{100 * vs_success['confidence']:g}"
    head = ["arm", "success (k/n)", f"rate [{pct}% Wilson]", f"Δ vs success only [{pct}% paired bootstrap]",
            f"Δ vs {CORRECTED_ARM}"] + (["mean w applied"] if mean_w is not None else []) + \
        (["paper's rate"] if paper is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in body["arms"]:
        cells = [entry["arm"], f"{entry['successes']}/{entry['episodes']}",
                 f"{entry['rate']:.3f} [{entry['wilson_low']:.3f}, {entry['wilson_high']:.3f}]",
                 _paired_cell(entry["comparison"]), _paired_cell(against.get(entry["arm"], {}).get("comparison"))]
        if mean_w is not None:
            w = mean_w.get(entry["arm"])
            cells.append("—" if not w else _w(w))
        if paper is not None:
            ref = paper.get(entry["arm"])
            cells.append("—" if ref is None else f"{ref / 100:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _paired_cell(comparison: dict[str, Any] | None) -> str:
    """Δ [interval], p; bold when the interval excludes 0."""
    if comparison is None:
        return "—"
    low, high = comparison["diff_low"], comparison["diff_high"]
    text = f"{comparison['difference']:+.3f} [{low:+.3f}, {high:+.3f}], p{_p(comparison['mcnemar_p'])}"
    return f"**{text}**" if low > 0 or high < 0 else text


def _p(p: float) -> str:
    """``=0.031`` or ``<0.001``: the p-value after a ``p``."""
    shown = format_p(p)
    return shown if shown.startswith("<") else f"={shown}"


def plot_seed_spread(report: dict[str, Any], path: str | Path, main_seed: int = 0) -> Path:
    """``results/seeds/spread.png``: per arm, one point per training seed (Wilson interval) beside the success-only
    rate, so the spread across re-trainings reads against the distance between arms at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    [(task, body)] = report["tasks"].items()
    entries = body["arms"]
    reference = entries[0]
    by_arm: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for entry in entries[1:]:
        seed, _, arm = entry["arm"].partition(": ")
        by_arm.setdefault(arm, []).append((int(seed.removeprefix("seed ")), entry))
    figure = Figure(figsize=(2.0 + 1.6 * len(by_arm), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.axhspan(reference["wilson_low"], reference["wilson_high"], color="0.9")
    axes.axhline(reference["rate"], color="0.4", linestyle="--", label=f"{reference['arm']} (one checkpoint)")
    seeds = sorted({s for points in by_arm.values() for s, _ in points})
    for a, points in enumerate(by_arm.values()):
        for s, entry in points:
            x = a + 0.5 * (seeds.index(s) - (len(seeds) - 1) / 2) / max(len(seeds), 1)
            axes.errorbar([x], [entry["rate"]], yerr=[[entry["rate"] - entry["wilson_low"]],
                                                      [entry["wilson_high"] - entry["rate"]]],
                          fmt="o" if s != main_seed else "s", color=f"C{seeds.index(s) % 10}", capsize=2,
                          label=f"seed {s}{' (main stages)' if s == main_seed else ''}" if a == 0 else None)
    axes.set_xticks(range(len(by_arm)), [a.replace(": ", ":\n") for a in by_arm], fontsize="small")
    axes.set_ylabel(f"success rate ({report['metric']})")
    axes.set_title(f"{task}: training-seed spread, 95% Wilson intervals", fontsize="medium")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, format="png", dpi=120)
    return Path(path)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, var ** 0.5


def _brief(outputs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in outputs.items() if not isinstance(v, dict) or k == "dropped")[:300]


def _mean_w_sentence(which: str, mean_w: dict[str, float | None]) -> str:
    """The reports' line of applied guidance weights (arms without one are left out)."""
    return f"Mean guidance weight applied {which}: " + ", ".join(
        f"{arm} {_w(w)}" for arm, w in mean_w.items() if w is not None) + "."


def _w(w: float) -> str:
    """A guidance weight to 4 places without trailing zeros: a static arm's ``0.05`` as given, an adaptive arm's
    measured mean as ``0.0133``."""
    return f"{w:.4f}".rstrip("0").rstrip(".")


def _mean_w(path: Path) -> dict[str, float | None]:
    """Per-arm mean guidance weight actually applied (None for unguided arms) from ``episodes.json``."""
    if not path.is_file():
        return {}
    per_arm: dict[str, list[float]] = {}
    for r in json.loads(path.read_text())["episodes"]:
        if r.get("w_mean") is not None:
            per_arm.setdefault(r["arm"], []).append(r["w_mean"])
    return {arm: sum(ws) / len(ws) for arm, ws in per_arm.items()}


def load_outcomes(path: str | Path) -> dict[str, list[EpisodeOutcome]]:
    """Per-arm outcomes from an evaluation's ``episodes.json`` (tables are rebuilt without re-running episodes)."""
    out: dict[str, list[EpisodeOutcome]] = {}
    for r in json.loads(Path(path).read_text())["episodes"]:
        out.setdefault(r["arm"], []).append(EpisodeOutcome(r["seed"], r["run"], r["success_once"],
                                                           r["success_at_end"]))
    return out
