"""``afil-ray eval``: the paired evaluation protocol, every arm on the same episodes, and its files.

Every arm (``eval.arms``) runs the same ``eval.episodes`` initial states x ``eval.runs`` noise draws
(``afil_ray.eval.episodes`` says how an episode's noise is fixed); units of (task, arm, run), of all tasks at once,
are spread over workers (``afil_ray.eval.workers``) and the results are written as a paired report
(``afil_ray.eval.report``) plus one record per episode (``episodes.json``), from which later tables are rebuilt
without re-running anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from afil_ray.config import Config
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.tasks import suite_of, suite_size
from afil_ray.eval.arms import Arm, check_policy_fits, parse_arms, reference_arm, sampler_arm
from afil_ray.eval.episodes import EvalResult, run_episodes, success_at_end
from afil_ray.eval.report import ArmResult, EpisodeOutcome, build_report, markdown_table, write_report
from afil_ray.eval.workers import Unit, UnitRunner, describe, run_units, task_units
from afil_ray.provenance import machine_facts
from afil_ray.replay.episode import Episode
from afil_ray.rollout import ChunkPolicy

EPISODES_FILE = "episodes.json"


def resolve_arms(cfg: Config) -> list[Arm]:
    """The arms of ``cfg.eval`` (``cfg.sampler`` alone when ``eval.arms`` is empty), as the protocol runs them."""
    return as_run(parse_arms(list(cfg.eval.arms), cfg.sampler), cfg)


def as_run(arms: list[Arm], cfg: Config) -> list[Arm]:
    """``arms`` as the protocol runs them: two head calls when ``eval.exact_pairing`` (so w = 0 reproduces success
    only bit for bit)."""
    return [a.exact() for a in arms] if cfg.eval.exact_pairing else arms


def evaluate_arms(cfg: Config, policy: ChunkPolicy, progress: bool = True, arms: list[Arm] | None = None,
                  runner: UnitRunner | None = None) -> list[EvalResult]:
    """Every arm on the same ``eval.episodes`` seeds x ``eval.runs`` noise draws of every task in ``env.task``
    (each task on its own simulator). A unit of work is one task, one arm, one run (``afil_ray.eval.workers``);
    the units of all tasks at once run on ``eval.workers`` workers (``runner``: the composition root's Ray actors;
    processes when None), so that workers and cluster actors stay busy across tasks (one arm and one run on five
    tasks keeps two workers busy, where a task at a time would leave one idle), with the same episodes whatever
    the worker count. Results are per (task, arm), tasks in ``env.task``'s order, each arm's episodes by run
    then seed."""
    arms = resolve_arms(cfg) if arms is None else arms
    arms = [dataclasses.replace(a, foils=tuple(cfg.env.tasks)) if a.probe == "other_instruction" else a
            for a in arms]
    check_policy_fits(arms, policy)
    tasks, runs = cfg.env.tasks, cfg.eval.runs
    units = task_units(tasks, len(arms), runs)
    episodes: dict[Unit, list[Episode]] = {}
    desc = f"eval {tasks[0]}" if len(tasks) == 1 else f"eval {len(tasks)} tasks"
    with tqdm(total=len(units) * cfg.eval.episodes, desc=desc, unit="ep", disable=not progress,
              dynamic_ncols=True) as bar:
        for unit, eps in run_units(cfg, policy, arms, units, runner=runner):
            episodes[unit] = eps
            bar.update(len(eps))
            bar.set_postfix(done=describe(unit, arms, with_task=len(tasks) > 1))
    return [EvalResult(task, arm, [ep for r in range(runs) for ep in episodes[(task, a, r)]], cfg.eval.metric)
            for task in tasks for a, arm in enumerate(arms)]


def evaluate(cfg: Config, policy: ChunkPolicy, progress: bool = True) -> EvalResult:
    """``cfg.sampler`` on the seeds of ``cfg.eval``, run 0 only (per-episode noise; the loop's evaluator), for
    the one task of ``env.task``."""
    arm = sampler_arm(cfg.sampler)
    with make_vec_env(cfg.env) as env, tqdm(total=cfg.eval.episodes, desc=f"eval {cfg.env.task} {arm.name}",
                                            unit="ep", disable=not progress, dynamic_ncols=True) as bar:
        episodes = run_episodes(env, cfg, policy, arm, 0, bar)
    return EvalResult(cfg.env.task, arm, episodes)


def output_dir(cfg: Config, checkpoint: str | Path, arms: list[Arm] | None = None) -> Path:
    """``run_dir/eval/<task>-<checkpoint>-seeds<start>x<episodes>-runs<runs>-arms<hash>``: neither a tuning range
    nor another arm set overwrites a reported evaluation (report.json lists the arms behind the hash)."""
    names = ",".join(a.name for a in (arms if arms is not None else resolve_arms(cfg)))
    digest = hashlib.sha1(names.encode()).hexdigest()[:8]
    name = (f"{tasks_label(cfg.env.tasks)}-{Path(checkpoint).name}-seeds{cfg.eval.seed_start}x{cfg.eval.episodes}"
            f"-runs{cfg.eval.runs}-arms{digest}")
    return Path(cfg.run_dir) / "eval" / name


def tasks_label(tasks: list[str]) -> str:
    """The task in a directory name, or ``<n>tasks-<hash>`` for a task list."""
    if len(tasks) == 1:
        return tasks[0]
    return f"{len(tasks)}tasks-{hashlib.sha1(','.join(tasks).encode()).hexdigest()[:6]}"


POOLED = "all tasks"
_POOL_STRIDE = 10**9  # pooled episodes are keyed (task index * stride + seed, run): each task's seeds stay apart


def pooled(results: list[ArmResult]) -> list[ArmResult]:
    """Every arm's episodes over all tasks as one more "task", still paired episode by episode; nothing when there
    is only one task. The pool is labelled :data:`POOLED`, or with the suite's name when the tasks are the whole of
    one benchmark suite (``libero_object``: the suite's row of the standard LIBERO protocol; some of its tasks are
    only :data:`POOLED`). Tasks from several suites also get one pool per suite (of those with two tasks or more;
    one task's pool would repeat its row; named after the suite when all of its tasks are there, ``<suite> (k of
    n tasks)`` otherwise), before the pool of all tasks."""
    tasks = list(dict.fromkeys(r.task for r in results))
    if len(tasks) < 2:
        return []
    suites: dict[str | None, list[str]] = {}
    for task in tasks:
        suites.setdefault(suite_of(task), []).append(task)
    if len(suites) == 1:
        suite = next(iter(suites))
        return _pool(results, tasks, suite if suite is not None and len(tasks) == suite_size(suite) else POOLED)
    per_suite = [row for suite, members in suites.items() if suite is not None and len(members) > 1
                 for row in _pool(results, members, suite if len(members) == suite_size(suite)
                                  else f"{suite} ({len(members)} of {suite_size(suite)} tasks)")]
    return per_suite + _pool(results, tasks, POOLED)


def _pool(results: list[ArmResult], tasks: list[str], label: str) -> list[ArmResult]:
    """Every arm's episodes on ``tasks`` as one "task" named ``label``."""
    arms: dict[str, list[EpisodeOutcome]] = {}
    for r in results:
        if r.task in tasks:
            offset = tasks.index(r.task) * _POOL_STRIDE
            arms.setdefault(r.arm, []).extend(dataclasses.replace(e, seed=offset + e.seed) for e in r.episodes)
    return [ArmResult(arm, label, episodes) for arm, episodes in arms.items()]


def metric_note(cfg: Config) -> str:
    if cfg.env.ignore_terminations:
        return ("env.ignore_terminations is true: episodes run to their step limit, so success_once and "
                "success_at_end can differ.")
    return ("env.ignore_terminations is false: an episode ends at its first success, so success_once and "
            "success_at_end coincide.")


def write_evaluation(cfg: Config, results: list[EvalResult], arms: list[Arm], checkpoint: str | Path,
                     directory: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """report.json / report.md / report.png (``afil_ray.eval.report``; report.json records the machine facts) and
    episodes.json (one record per arm and episode)."""
    directory = Path(directory) if directory is not None else output_dir(cfg, checkpoint, arms)
    per_task = [ArmResult(r.arm.name, r.task, r.outcomes()) for r in results]
    report = build_report(per_task + pooled(per_task), metric=cfg.eval.metric, reference_arm=reference_arm(arms),
                          seed=cfg.seed)
    report["protocol"] = {
        "checkpoint": str(checkpoint), "task": cfg.env.task, "seed_start": cfg.eval.seed_start,
        "episodes": cfg.eval.episodes, "runs": cfg.eval.runs, "noise_seed_base": cfg.seed,
        "ignore_terminations": cfg.env.ignore_terminations, "max_episode_steps": cfg.env.max_episode_steps,
        "metric_note": metric_note(cfg), "exact_pairing": cfg.eval.exact_pairing,
        "arms": {a.name: OmegaConf.to_container(OmegaConf.structured(a.sampler)) for a in arms},
    }
    report["machine"] = machine_facts()  # not in episodes.json, which stays byte-identical across machines' runs
    paths = write_report(report, directory, markdown_table(report) + f"\n{metric_note(cfg)}\n")
    records = [{"arm": r.arm.name, "task": r.task, "seed": e.seed, "run": int(e.extra["eval_run"]),
                "noise_seed": int(e.extra["noise_seed"]), "success_once": bool(e.success),
                "success_at_end": success_at_end(e), "length": e.length,
                "w_mean": None if e.chunk_w is None else float(np.mean(e.chunk_w))}
               for r in results for e in r.episodes]
    paths["episodes"] = directory / EPISODES_FILE
    paths["episodes"].write_text(json.dumps({"metric": cfg.eval.metric, "episodes": records}, indent=1) + "\n")
    return report, paths


def load_outcomes(path: str | Path, task: str | None = None) -> dict[str, list[EpisodeOutcome]]:
    """Per-arm outcomes (by arm name) from an evaluation's ``episodes.json`` (of one ``task`` of a task list)."""
    out: dict[str, list[EpisodeOutcome]] = {}
    for r in json.loads(Path(path).read_text())["episodes"]:
        if task is not None and r["task"] != task:
            continue
        out.setdefault(r["arm"], []).append(EpisodeOutcome(r["seed"], r["run"], r["success_once"],
                                                           r["success_at_end"]))
    return out


def load_mean_w(path: str | Path) -> dict[str, float]:
    """Per-arm mean guidance weight actually applied (guided arms only) from ``episodes.json``."""
    path = Path(path)
    if not path.is_file():
        return {}
    per_arm: dict[str, list[float]] = {}
    for r in json.loads(path.read_text())["episodes"]:
        if r.get("w_mean") is not None:
            per_arm.setdefault(r["arm"], []).append(r["w_mean"])
    return {arm: sum(ws) / len(ws) for arm, ws in per_arm.items()}
