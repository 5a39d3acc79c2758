"""What a loop's alarm-triggered hand-overs gave (`afil-ray run` with `loop.monitor=<signal> loop.handover=true`):
every episode the rollout actors' live alarm judged, paired as the policy ran it and with the planner's hand-over
where the alarm fired, from what the loop stored (afil_ray/detect/intervention.py ``loop_handovers``).

    .venv/bin/python scripts/loop_handover_report.py runs/handover_loop/replay --signal critic [--run-id ID]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from afil_ray.detect.intervention import loop_handovers, markdown_table
from afil_ray.replay.store import ReplayStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("replay_root", type=Path)
    parser.add_argument("--signal", default="critic", help="the loop's loop.monitor (the table's label)")
    parser.add_argument("--run-id", help="only this loop run's episodes (a store several runs wrote to)")
    args = parser.parse_args()
    if not args.replay_root.is_dir():
        raise SystemExit(f"{args.replay_root}: no replay store here")
    episodes = [e for e in ReplayStore(args.replay_root).read_episodes()
                if args.run_id is None or e.run_id == args.run_id]
    try:
        report = loop_handovers(episodes, args.signal)
    except ValueError as e:
        raise SystemExit(f"{args.replay_root}: {e}") from None
    print(markdown_table([report]))


if __name__ == "__main__":
    main()
