"""The runtime-alarm study on a reproduction's harvest (``afil-ray alarm``), and why its failures failed.

The harvest is the success-only policy rolled out on fresh initial states, every episode stored; the correction
stage then finished each failure it could from the latest restore point that still worked, which is the failure's
point of no return. Each signal is read from the stage whose policy it belongs to:

- ``spread``: the success-only policy itself (the policy that ran the episodes);
- ``critic``: the critic stage's success critic (trained on branches from the harvest's states, so it has seen
  these states, not these episodes' outcomes alone: its score is an estimate of the running policy's chances);
- ``disagreement``: the ``dag`` stage's heads (the corrected success head and the failure head), the quantity the
  paper's adaptive rule computes at every step.

Scores are replayed on the stored states at each episode's re-planning steps (what a live monitor computes), and
measured with cross-fitted folds (``afil_ray/detect/alarm.py``). The causes come from the labeller on the same
failures (``afil_ray/detect/labels.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from afil_ray.config import Config, ConfigError
from afil_ray.correction import Corrector
from afil_ray.detect.alarm import ScoredEpisode, evaluate_alarm, markdown_table
from afil_ray.detect.intervention import Handovers
from afil_ray.detect.intervention import markdown_table as handover_table
from afil_ray.detect.labels import check_labelled_task, diagnose
from afil_ray.detect.signals import FailureSignals, score_episodes
from afil_ray.pipeline.pipeline import HARVEST_SOURCE
from afil_ray.pipeline.stages import recorded_outputs
from afil_ray.policy.checkpoint import load_policy
from afil_ray.replay import ReplayStore
from afil_ray.replay.chunks import origin_of
from afil_ray.replay.episode import Episode
from afil_ray.replay.outcomes import held_out

SIGNAL_STAGES = {"spread": "success_only", "critic": "critic", "disagreement": "dag"}
OUTPUT_DIR = "detect"


def harvest_episodes(store: ReplayStore, task: str) -> tuple[list[Episode], dict[str, int]]:
    """The task's harvested rollouts (successes and failures) and, per corrected failure, its point of no return
    (the correction's restore step)."""
    episodes = [e for e in store.read_episodes(task, ["success", "failure"]) if e.source == HARVEST_SOURCE]
    if not episodes:
        raise ConfigError(f"replay.root={store.root}: no harvested episodes of {task} (the reproduction's "
                          "harvest stage stores them)")
    points = {c.parent_episode_id: int(c.extra["restore_step"]) for c in store.read_episodes(task, "corrected")
              if c.parent_episode_id and "restore_step" in c.extra}
    return episodes, points


def cause_table(failures: list[Episode], points: dict[str, int]) -> list[dict[str, Any]]:
    """Per cause: how many failures, and the median point of no return (as a share of the episode) of those the
    planner corrected."""
    by_cause: dict[str, list[Episode]] = {}
    for episode in failures:
        by_cause.setdefault(diagnose(episode).cause, []).append(episode)
    rows = []
    for cause, members in sorted(by_cause.items(), key=lambda kv: -len(kv[1])):
        fractions = [points[e.episode_id] / e.length for e in members if e.episode_id in points]
        rows.append({"cause": cause, "failures": len(members), "corrected": len(fractions),
                     "median_point_of_no_return": float(np.median(fractions)) if fractions else None})
    return rows


def alarm_study(cfg: Config, progress: bool = True, handover: bool = True) -> dict[str, Any]:
    """Score the harvest of ``cfg.run_dir``'s reproduction with ``cfg.detect.signals`` and report the alarm and
    (``handover``) what handing each alarmed episode to the demonstrator would have given; writes
    ``run_dir/detect/alarm.{json,md}`` and returns the JSON's content."""
    if len(cfg.env.tasks) != 1:
        raise ConfigError(f"env.task: the alarm study reads one task's harvest, got {', '.join(cfg.env.tasks)}")
    task, root = cfg.env.tasks[0], Path(cfg.run_dir)
    check_labelled_task("env.task", task)  # the causes table labels every failure
    store = ReplayStore.from_config(cfg.replay)
    episodes, points = harvest_episodes(store, task)
    every = cfg.sampler.execute_steps
    scores: list[dict[str, np.ndarray]] = [{} for _ in episodes]
    sources = {}
    for signal in cfg.detect.signals:
        checkpoint = recorded_outputs(root, SIGNAL_STAGES[signal])["checkpoint"]
        sources[signal] = checkpoint
        cache = root / OUTPUT_DIR / f"scores_{signal}.npz"  # scoring is the slow part: kept for re-runs
        key = json.dumps([checkpoint, cfg.detect.spread_k, cfg.seed, every, [e.episode_id for e in episodes]])
        if cache.is_file() and str(np.load(cache)["key"]) == key:
            with np.load(cache) as saved:
                new = [{signal: saved[f"e{i}"]} for i in range(len(episodes))]
        else:
            signals = FailureSignals(load_policy(checkpoint).eval(), cfg.sampler, k=cfg.detect.spread_k,
                                     seed=cfg.seed, signals=(signal,))
            new = score_episodes(signals, episodes, every, progress=progress)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, key=key, **{f"e{i}": s[signal] for i, s in enumerate(new)})
        for mine, part in zip(scores, new, strict=True):
            mine.update(part)
    scored = [ScoredEpisode(e.episode_id, e.success, s, points.get(e.episode_id))
              for e, s in zip(episodes, scores, strict=True)]
    # The critic trained on these episodes' outcomes (Monte-Carlo rows) except on the initial states it held out
    # (data.critic_holdout): its score is in-sample elsewhere, so the study is repeated on those states alone.
    unseen = [held_out(origin_of(e.task, e.seed, e.parent_episode_id, e.episode_id), cfg.data.critic_holdout)
              for e in episodes]
    corrector = Corrector(cfg.env, cfg.correct, cfg.demos) if handover else None
    planner = Handovers(corrector) if corrector is not None else None
    try:
        result = {"task": task, "alpha": cfg.detect.alpha, "signal_checkpoints": sources, "causes": cause_table(
            [e for e in episodes if not e.success], points)}
        parts = {"all": (scored, episodes), "critic_unseen": (
            [s for s, u in zip(scored, unseen, strict=True) if u], [e for e, u in zip(episodes, unseen, strict=True)
                                                                    if u])}
        tables = []
        for name, (part, part_episodes) in parts.items():
            reports = evaluate_alarm(part, list(cfg.detect.signals), alpha=cfg.detect.alpha)
            handovers = [] if planner is None else [planner.report(r.signal, part_episodes, r.alarms, progress)
                                                    for r in reports]
            result[name] = _part(part_episodes, points, reports, handovers)
            tables.append(markdown(result[name], task, cfg.detect.alpha, reports, handovers, name))
    finally:
        if corrector is not None:
            corrector.close()
    out = root / OUTPUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "alarm.json").write_text(json.dumps(result, indent=1) + "\n")
    causes = ["| cause | failures | corrected | median point of no return (share of the episode) |",
              "|---|---|---|---|"]
    for row in result["causes"]:
        point = row["median_point_of_no_return"]
        causes.append(f"| {row['cause']} | {row['failures']} | {row['corrected']} | "
                      f"{'—' if point is None else f'{point:.2f}'} |")
    (out / "alarm.md").write_text("\n\n".join([*tables, "\n".join(causes)]) + "\n")
    return result


def _part(episodes: list[Episode], points: dict[str, int], reports: list, handovers: list) -> dict[str, Any]:
    failures = [e for e in episodes if not e.success]
    return {
        "episodes": len(episodes), "failures": len(failures),
        "failures_with_point_of_no_return": sum(e.episode_id in points for e in failures),
        "reports": [{**{k: v for k, v in r.__dict__.items() if k != "alarms"},
                     "auroc": {str(f): a for f, a in r.auroc.items()}} for r in reports],
        "handovers": [{"signal": h.signal, **dataclasses.asdict(h.comparison), "handovers": h.handovers,
                       "handovers_of_successes": h.handovers_of_successes, "handovers_won": h.handovers_won,
                       "reasons": h.reasons} for h in handovers],
    }


PART_TITLES = {"all": "every harvested episode",
               "critic_unseen": "the initial states the critic held out (its score is out-of-sample)"}


def markdown(part: dict[str, Any], task: str, alpha: float, reports: list, handovers: list, name: str) -> str:
    lines = [f"{task}, {PART_TITLES[name]}: {part['episodes']} episodes, {part['failures']} failures, "
             f"{part['failures_with_point_of_no_return']} of them with a point of no return (corrected).", "",
             markdown_table(reports, alpha)]
    if handovers:
        lines += ["", handover_table(handovers)]
    return "\n".join(lines)
