"""The runtime-alarm study on a reproduction (``afil-ray alarm``), and why its failures failed.

It measures on the success-only policy's rollouts: by default fresh ones (``detect.alarm_seeds`` initial states
none of the reproduction's stages saw, ``detect.alarm_runs`` noise draws each, kept with their snapshots in
``run_dir/detect/alarm_replay``), whose failures the correction planner then finishes from the latest restore point
that still works: the failure's point of no return. With ``detect.alarm_seeds=0`` it reads the reproduction's
harvest and its corrections instead (the critic trained on those episodes' outcomes, so its score is in-sample
there except on the initial states it held out, which are reported apart). Each signal is read from the stage whose
policy it belongs to:

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

from afil_ray.config import Config, ConfigError, load_config
from afil_ray.correction import Corrector, correct_failures
from afil_ray.detect.alarm import (
    AgainstCombination,
    ScoredEpisode,
    TooFewEpisodes,
    against_combination,
    against_combination_table,
    evaluate_alarm,
    markdown_table,
    splits_table,
)
from afil_ray.detect.intervention import Handovers
from afil_ray.detect.intervention import markdown_table as handover_table
from afil_ray.detect.labels import check_labelled_task, diagnose
from afil_ray.detect.signals import FailureSignals, score_episodes
from afil_ray.eval.arms import sampler_arm
from afil_ray.eval.workers import run_units, task_units
from afil_ray.pipeline.pipeline import HARVEST_SOURCE
from afil_ray.pipeline.stages import recorded_outputs, with_updates
from afil_ray.policy.checkpoint import load_policy
from afil_ray.policy.loading import load_start_policy
from afil_ray.replay import ReplayStore
from afil_ray.replay.chunks import origin_of
from afil_ray.replay.episode import Episode
from afil_ray.replay.outcomes import held_out

SIGNAL_STAGES = {"spread": "success_only", "critic": "critic", "disagreement": "dag", "chosen": "critic"}
OUTPUT_DIR = "detect"
ALARM_REPLAY = "alarm_replay"  # under OUTPUT_DIR: the fresh rollouts the study measures on
ALARM_SOURCE = "detect:alarm"


def harvest_episodes(store: ReplayStore, task: str, source: str = HARVEST_SOURCE
                     ) -> tuple[list[Episode], dict[str, int]]:
    """The task's rollouts from ``source`` (successes and failures) and, per corrected failure, its point of no
    return (the correction's restore step)."""
    episodes = [e for e in store.read_episodes(task, ["success", "failure"]) if e.source == source]
    if not episodes:
        raise ConfigError(f"replay.root={store.root}: no {source} episodes of {task} (the reproduction's "
                          "harvest stage stores them)")
    points = {c.parent_episode_id: int(c.extra["restore_step"]) for c in store.read_episodes(task, "corrected")
              if c.parent_episode_id and "restore_step" in c.extra}
    return episodes, points


def fresh_episodes(cfg: Config, root: Path, progress: bool) -> tuple[ReplayStore, list[Episode], dict[str, int]]:
    """The success-only policy's rollouts on the study's own initial states, with snapshots, and their failures'
    points of no return: rolled out and corrected on first use (per noise draw, so a stopped study resumes), then
    read back."""
    task, dc = cfg.env.tasks[0], cfg.detect
    store = ReplayStore(root / OUTPUT_DIR / ALARM_REPLAY)
    ledger = root / OUTPUT_DIR / "alarm_rollouts.json"
    done: dict[str, int] = json.loads(ledger.read_text()) if ledger.is_file() else {}
    spec = f"{dc.alarm_seed_start}..{dc.alarm_seed_start + dc.alarm_seeds - 1}"
    if done and done.get("seeds") != spec:
        raise ConfigError(f"{store.root} holds rollouts of seeds {done.get('seeds')}, not {spec} "
                          "(detect.alarm_seed_start, detect.alarm_seeds): delete it to roll out again")
    run_cfg = with_updates(cfg, eval={"seed_start": dc.alarm_seed_start, "episodes": dc.alarm_seeds,
                                      "runs": dc.alarm_runs}, sampler={"kind": "success_only"},
                           replay={"root": str(store.root)})
    units = [u for u in task_units([task], 1, dc.alarm_runs) if str(u[2]) not in done]
    for _, _, run in units:  # stored by a study stopped before its ledger line: rolled out again
        store.discard_writer(f"alarm-run-{run}")
    if units:
        policy = load_start_policy(recorded_outputs(root, SIGNAL_STAGES["spread"])["checkpoint"])
        for (_, _, run), episodes in run_units(run_cfg, policy, [sampler_arm(run_cfg.sampler)], units,
                                               keep_snapshots=True):
            for ep in episodes:
                ep.source = ALARM_SOURCE
            store.write_episodes(episodes, f"alarm-run-{run}")
            done.update({"seeds": spec, str(run): len(episodes)})  # after the run is stored: a stop in between
            ledger.write_text(json.dumps(done, indent=1) + "\n")  # discards its shards and repeats it
            if progress:
                print(f"  alarm rollouts run {run}: {sum(not e.success for e in episodes)} failures of "
                      f"{len(episodes)}")
    correct_failures(run_cfg, store, progress)  # resumable: corrects the failures not handled yet
    return store, *harvest_episodes(store, task, ALARM_SOURCE)


def kept_fresh_scores(root: Path, signal: str, episodes: list[Episode]) -> list[np.ndarray]:
    """The per-step scores of ``signal`` that an alarm study on fresh rollouts kept for ``episodes`` (the study's
    own, from ``ALARM_REPLAY``), for probes that score nothing themselves; a one-line error when there are none."""
    path = root / OUTPUT_DIR / f"scores_{signal}_fresh.npz"
    if not path.is_file():
        raise ConfigError(f"{path}: no kept scores of {signal} (scripts/detect_study.sh alarm <task> keeps them)")
    with np.load(path) as saved:
        if json.loads(str(saved["key"]))[-1] != [e.episode_id for e in episodes]:
            raise ConfigError(f"{path}: scored other episodes than {root / OUTPUT_DIR / ALARM_REPLAY} holds")
        return [saved[f"e{i}"] for i in range(len(episodes))]


def kept_study(root: Path, signals: list[str] | None = None
               ) -> tuple[Config, list[Episode], dict[str, int], dict[str, list[np.ndarray]]]:
    """What an alarm study on fresh rollouts left in ``root`` (a reproduction's run directory), for the probes that
    score nothing themselves: its config, its episodes, their points of no return, and each of ``signals``' kept
    per-step scores (None: the config's ``detect.signals``); a one-line error when any is missing."""
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"{root / 'config.yaml'}: no reproduction here (scripts/failure_signal.sh makes one)")
    cfg = load_config(root / "config.yaml")
    episodes, points = harvest_episodes(ReplayStore(root / OUTPUT_DIR / ALARM_REPLAY), cfg.env.tasks[0],
                                        ALARM_SOURCE)
    return cfg, episodes, points, {s: kept_fresh_scores(root, s, episodes) for s in signals or cfg.detect.signals}


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
    if cfg.detect.alarm_seeds:
        store, episodes, points = fresh_episodes(cfg, root, progress)
    else:
        store = ReplayStore.from_config(cfg.replay)
        episodes, points = harvest_episodes(store, task)
    every = cfg.sampler.execute_steps
    scores: list[dict[str, np.ndarray]] = [{} for _ in episodes]
    sources = {}
    for signal in cfg.detect.signals:
        checkpoint = recorded_outputs(root, SIGNAL_STAGES[signal])["checkpoint"]
        sources[signal] = checkpoint
        # scoring is the slow part: kept for re-runs, one file per signal and episode set
        cache = root / OUTPUT_DIR / f"scores_{signal}{'_fresh' if cfg.detect.alarm_seeds else ''}.npz"
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
    # the fresh rollouts' noise draws of one initial state share its seed: folds and paired tests keep them together
    scored = [ScoredEpisode(e.episode_id, e.success, s, points.get(e.episode_id), initial_state=f"{e.task}:{e.seed}")
              for e, s in zip(episodes, scores, strict=True)]
    # On the harvest the critic trained on these episodes' outcomes (Monte-Carlo rows) except on the initial states
    # it held out (data.critic_holdout): its score is in-sample elsewhere, so the study is repeated on those alone.
    unseen = [held_out(origin_of(e.task, e.seed, e.parent_episode_id, e.episode_id), cfg.data.critic_holdout)
              for e in episodes]
    parts = {"fresh": (scored, episodes)} if cfg.detect.alarm_seeds else {
        "all": (scored, episodes),
        "critic_unseen": ([s for s, u in zip(scored, unseen, strict=True) if u],
                          [e for e, u in zip(episodes, unseen, strict=True) if u])}
    corrector = Corrector(cfg.env, cfg.correct, cfg.demos) if handover else None
    planner = None if corrector is None else Handovers(
        corrector, root / OUTPUT_DIR / f"handovers{'_fresh' if cfg.detect.alarm_seeds else ''}.json",
        key=json.dumps([dataclasses.asdict(cfg.correct), dataclasses.asdict(cfg.demos)], sort_keys=True))
    try:
        result = {"task": task, "alpha": cfg.detect.alpha, "combiner": cfg.detect.combiner,
                  "time_aware": cfg.detect.time_aware,
                  "signal_checkpoints": sources,
                  "causes": cause_table([e for e in episodes if not e.success], points)}
        tables = []
        for name, (part, part_episodes) in parts.items():
            try:
                reports = _reports(cfg, part)
            except TooFewEpisodes as error:
                raise ConfigError(f"detect.time_aware: {error} ({len(part)} episodes of {name}); set it false or "
                                  "raise detect.alarm_seeds") from None
            handovers = [] if planner is None else [planner.report(r.signal, part_episodes, r.alarms, progress)
                                                    for r in reports]
            paired = against_combination(reports, part)
            splits = [paired] + [_against_on_split(cfg, part, split)  # other draws of the folds
                                 for split in range(1, cfg.detect.alarm_splits if paired else 1)]
            result[name] = _part(part_episodes, points, reports, handovers, splits)
            alarms = (f"every alarm a {cfg.detect.combiner} model of its score(s) and the step (detect.time_aware)"
                      if cfg.detect.time_aware else "each single signal on a fixed threshold")
            tables.append(markdown(result[name], task, cfg.detect.alpha, reports, handovers, splits, name, alarms))
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


def _reports(cfg: Config, part: list[ScoredEpisode], split: int = 0) -> list:
    """Every alarm of ``cfg.detect`` measured on ``part`` with the ``split``-th draw of the folds."""
    return evaluate_alarm(part, list(cfg.detect.signals), alpha=cfg.detect.alpha, combiner=cfg.detect.combiner,
                          split=split, time_aware=cfg.detect.time_aware)


def _against_on_split(cfg: Config, part: list[ScoredEpisode], split: int) -> list[AgainstCombination]:
    """Each signal against the combination on the ``split``-th draw of the folds; none where a half lacks an
    outcome (the table says so)."""
    try:
        return against_combination(_reports(cfg, part, split), part)
    except TooFewEpisodes:
        return []


def _paired(p: AgainstCombination) -> dict[str, Any]:
    return {"signal": p.signal, "in_time": dataclasses.asdict(p.in_time),
            "false_alarms": dataclasses.asdict(p.false_alarms),
            "in_time_by_state": dataclasses.asdict(p.in_time_by_state),
            "false_alarms_by_state": dataclasses.asdict(p.false_alarms_by_state),
            "in_time_at_matched_false_alarms": p.in_time_at_matched_false_alarms}


def _part(episodes: list[Episode], points: dict[str, int], reports: list, handovers: list,
          splits: list[list]) -> dict[str, Any]:
    """``splits[0]``: each signal against the combination on the main folds; ``splits[s]``: on the s-th draw."""
    failures = [e for e in episodes if not e.success]
    return {
        "episodes": len(episodes), "failures": len(failures),
        "failures_with_point_of_no_return": sum(e.episode_id in points for e in failures),
        "reports": [{**{k: v for k, v in r.__dict__.items() if k not in ("alarms", "judged")},
                     "auroc": {str(f): a for f, a in r.auroc.items()}} for r in reports],
        "handovers": [{"signal": h.signal, **dataclasses.asdict(h.comparison), "handovers": h.handovers,
                       "by_state": dataclasses.asdict(h.by_state),
                       "handovers_of_successes": h.handovers_of_successes, "handovers_won": h.handovers_won,
                       "reasons": h.reasons} for h in handovers],
        "against_combination": [_paired(p) for p in splits[0]],
        "against_combination_splits": [[_paired(p) for p in rows] for rows in splits[1:]],
    }


PART_TITLES = {"fresh": "fresh initial states (no stage of the reproduction saw them)",
               "all": "every harvested episode",
               "critic_unseen": "the initial states the critic held out (its score is out-of-sample)"}


def markdown(part: dict[str, Any], task: str, alpha: float, reports: list, handovers: list, splits: list[list],
             name: str, alarms: str) -> str:
    lines = [f"{task}, {PART_TITLES[name]}: {part['episodes']} episodes, {part['failures']} failures, "
             f"{part['failures_with_point_of_no_return']} of them with a point of no return (corrected); "
             f"{alarms}.", "",
             markdown_table(reports, alpha)]
    if splits[0]:
        lines += ["", against_combination_table(splits[0])]
    if len(splits) > 1:
        lines += ["", f"The combination against each signal on {len(splits)} draws of the folds (split 0: above):",
                  "", splits_table(splits)]
    if handovers:
        lines += ["", handover_table(handovers)]
    return "\n".join(lines)
