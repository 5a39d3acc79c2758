"""Acting on the alarm: hand the episode to the task's demonstrator when the alarm fires.

For stored rollouts with simulator snapshots this is measured exactly, without re-running the policy: the episode is
what it was up to the alarm, and from there the demonstrator takes over (``Corrector.handover``: at the last
snapshot at or before the alarm, planned and replayed in the policy's control mode). An episode without an alarm
keeps its outcome. Paired with the episodes as they were, this gives the success gained by the alarm's hand-overs,
and what its false alarms cost (a success handed to a planner that then fails).

A loop with ``loop.handover`` does the same live (afil_ray/loop/harvest.py) and stores what happened: each judged
episode its alarm's verdict, each hand-over that succeeded the episode it became; ``loop_handovers`` pairs them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from afil_ray.correction import HANDOVER_SOURCE, Corrector
from afil_ray.detect.live import LIVE_ALARM_KEY
from afil_ray.eval.stats import ClusteredComparison, PairedComparison, compare_paired, compare_paired_clustered
from afil_ray.replay.chunks import origin_of
from afil_ray.replay.episode import Episode

log = logging.getLogger(__name__)


@dataclass
class HandoverReport:
    signal: str
    comparison: PairedComparison  # reference: as they ran; arm: with the alarm's hand-overs
    handovers: int
    handovers_of_successes: int  # false alarms acted on
    handovers_won: int  # hand-overs after which the episode succeeded
    reasons: dict[str, int]  # why hand-overs did not succeed
    by_state: ClusteredComparison  # the same difference, initial states as the unit (noise draws share one)

    def row(self) -> list[str]:
        c = self.comparison
        return [self.signal, f"{c.reference_successes}/{c.n}", f"{c.arm_successes}/{c.n}",
                *self.by_state.cells(), f"{c.mcnemar_p:.3f}",
                f"{self.handovers / c.n:.3f}", f"{self.handovers_won}/{self.handovers}",
                str(self.handovers_of_successes)]


class Handovers:
    """The demonstrator's outcomes from alarm points, each (episode, take-over step) planned once; with ``keep``,
    kept in that file for the next study on the same episodes (another combiner alarms mostly at the same steps),
    as long as its ``key`` (what decides a plan: the demonstrator's settings) is the same."""

    def __init__(self, corrector: Corrector, keep: Path | None = None, key: str = "") -> None:
        self.corrector, self.keep, self.key = corrector, keep, key
        self.cache: dict[tuple[str, int], tuple[bool, str]] = {}
        if keep is not None and keep.is_file():
            try:
                saved = json.loads(keep.read_text())
                if saved.get("key") == key:
                    self.cache = {(episode, int(step)): (bool(won), reason)
                                  for episode, step, won, reason in saved["outcomes"]}
            except (ValueError, KeyError, TypeError) as e:  # only a cache: planned again, and rewritten
                log.warning("%s: unreadable kept hand-overs (%s); they are planned again", keep, e)

    def save(self) -> None:
        if self.keep is not None:
            outcomes = [[episode, step, won, reason] for (episode, step), (won, reason) in self.cache.items()]
            self.keep.parent.mkdir(parents=True, exist_ok=True)
            self.keep.write_text(json.dumps({"key": self.key, "outcomes": outcomes}) + "\n")

    def outcome(self, episode: Episode, alarm: int) -> tuple[bool, str]:
        at = max((s for s in episode.snapshot_steps if s <= alarm), default=None)
        if at is None:
            return False, "no_snapshot"
        key = (episode.episode_id, at)
        if key not in self.cache:
            won, _, reason = self.corrector.handover(episode, alarm)
            self.cache[key] = (won, reason)
        return self.cache[key]

    def report(self, signal: str, episodes: Sequence[Episode], alarms: dict[str, int | None],
               progress: bool = False) -> HandoverReport:
        with_handover, handovers, of_successes, won = [], 0, 0, 0
        reasons: dict[str, int] = {}
        for e in tqdm(episodes, desc=f"hand-overs ({signal})", unit="ep", disable=not progress):
            alarm = alarms.get(e.episode_id)
            if alarm is None:
                with_handover.append(e.success)
                continue
            success, reason = self.outcome(e, alarm)
            handovers += 1
            of_successes += e.success
            won += success
            if not success:
                reasons[reason] = reasons.get(reason, 0) + 1
            with_handover.append(success)
        self.save()
        as_run = [e.success for e in episodes]
        states = [origin_of(e.task, e.seed, e.parent_episode_id, e.episode_id) for e in episodes]
        by_state = compare_paired_clustered(as_run, with_handover, states)
        return HandoverReport(signal, compare_paired(as_run, with_handover), handovers, of_successes, won, reasons,
                              by_state)


def loop_handovers(episodes: Sequence[Episode], signal: str) -> HandoverReport:
    """What a loop's hand-overs (``loop.handover``) gave: every episode its live alarm judged (after calibration),
    as the policy ran it and with the hand-over where the alarm fired, which succeeded when the episode the
    demonstrator made of it is stored. Why the others did not is not stored (TensorBoard has the counts)."""
    won_parents = {e.parent_episode_id for e in episodes if e.source == HANDOVER_SOURCE}
    judged = [e for e in episodes if e.source != HANDOVER_SOURCE and LIVE_ALARM_KEY in e.extra]
    if not judged:
        raise ValueError("no episode a calibrated live alarm judged (loop.monitor unset, or the run ended before "
                         "the alarm had its successes)")
    alarmed = [e.extra[LIVE_ALARM_KEY]["step"] is not None for e in judged]
    as_run = [e.success for e in judged]
    with_handover = [e.episode_id in won_parents if fired else e.success for e, fired in zip(judged, alarmed,
                                                                                            strict=True)]
    states = [origin_of(e.task, e.seed, e.parent_episode_id, e.episode_id) for e in judged]
    return HandoverReport(signal, compare_paired(as_run, with_handover), sum(alarmed),
                          sum(f and e.success for f, e in zip(alarmed, judged, strict=True)),
                          sum(with_handover[i] for i, f in enumerate(alarmed) if f), {},
                          compare_paired_clustered(as_run, with_handover, states))


def markdown_table(reports: Sequence[HandoverReport]) -> str:
    header = ["alarm signal", "success as run", "success with hand-over", "Δ [95% CI, by initial state]",
              "p (by initial state)", "McNemar p (by episode)",
              "hand-overs per episode", "hand-overs that succeeded", "false alarms handed over"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r.row()) + " |" for r in reports])
