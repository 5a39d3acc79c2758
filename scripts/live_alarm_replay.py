"""The loop's live alarm on a study's episodes: a fixed threshold against the time-aware band, as a rollout
worker would have judged them one after another.

`afil-ray run` with `loop.monitor=<signal>` judges each finished episode by a threshold calibrated on the worker's
last ``--window`` successes (afil_ray/detect/live.py); with `detect.time_aware` that threshold is a band per step.
This replays an alarm study's fresh rollouts (`scripts/detect_study.sh alarm <task>`) in seed order through both,
from the scores the study kept for ``--signal`` at each episode's re-planning steps, and counts, over the
episodes judged after calibration, false alarms on successes, failures flagged, and failures flagged at or before
their point of no return. It scores nothing itself.

    .venv/bin/python scripts/live_alarm_replay.py runs/fs_LiftPegUpright --signal critic
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from afil_ray.config import ConfigError
from afil_ray.detect.live import LiveAlarm
from afil_ray.detect.signals import scored_steps
from afil_ray.detect.study import kept_study
from afil_ray.envs.collector import FAILURE_SCORES_KEY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--signal", default="critic")
    parser.add_argument("--window", type=int, default=200,
                        help="successes the alarm calibrates on (loop.monitor_window)")
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    try:
        cfg, episodes, points, kept = kept_study(args.run_dir, [args.signal])
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    every = cfg.sampler.execute_steps
    alarms = {"fixed": LiveAlarm(args.alpha, args.window), "band": LiveAlarm(args.alpha, args.window, True)}
    counts = {name: {"successes": 0, "false_alarms": 0, "failures": 0, "flagged": 0, "with_point": 0,
                     "in_time": 0, "leads": []} for name in alarms}
    for i in sorted(range(len(episodes)), key=lambda i: (episodes[i].seed, episodes[i].episode_id)):
        episode = episodes[i]
        steps = scored_steps(episode, every)
        episode.extra[FAILURE_SCORES_KEY] = [[int(s), float(kept[args.signal][i][s])] for s in steps]
        for name, alarm in alarms.items():
            verdict = alarm.observe(episode)
            if verdict is None or math.isinf(verdict.threshold):  # not calibrated yet: not counted
                continue
            c = counts[name]
            if episode.success:
                c["successes"] += 1
                c["false_alarms"] += verdict.fired
                continue
            c["failures"] += 1
            c["flagged"] += verdict.fired
            point = points.get(episode.episode_id)
            if point is not None:
                c["with_point"] += 1
                if verdict.fired and verdict.alarm_step <= point:
                    c["in_time"] += 1
                    c["leads"].append(point - verdict.alarm_step)
    print(f"{cfg.env.tasks[0]}, signal {args.signal}, window {args.window}, alpha {args.alpha}: "
          f"{len(episodes)} episodes in seed order")
    print("| live alarm | successes judged | false alarms | failures judged | flagged | "
          "flagged before point of no return | median lead (steps) |")
    print("|---|---|---|---|---|---|---|")
    for name, c in counts.items():
        lead = f"{np.median(c['leads']):.0f}" if c["leads"] else "—"
        print(f"| {name} | {c['successes']} | {c['false_alarms'] / max(c['successes'], 1):.3f} | {c['failures']} | "
              f"{c['flagged'] / max(c['failures'], 1):.3f} | {c['in_time'] / max(c['with_point'], 1):.3f} "
              f"({c['in_time']}/{c['with_point']}) | {lead} |")


if __name__ == "__main__":
    main()
