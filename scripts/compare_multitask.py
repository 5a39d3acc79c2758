"""Per-task and pooled tables of a multi-task image-and-language evaluation against state policies (issue 20).

Each task's table pairs, on the (seed, run) episodes they all ran: the state policy of that task (reference,
from its own ``afil-ray eval``), the image-and-language policy, and its probe arms (blank cameras, another
task's instruction, a held-out phrasing); the last table pools every task. Rates carry 95% Wilson intervals,
differences a paired bootstrap and McNemar's exact test (afil_ray/eval/report.py).

    python scripts/compare_multitask.py --image runs/vla_cpu/success_only/eval/*/episodes.json \\
        --state runs/vla_state/*/eval/*/episodes.json

``--variant LABEL=episodes.json`` (repeatable) adds another image policy (another architecture or recipe,
evaluated on the same seeds): its success-only arm, per task and pooled, paired against this one's and against
the state policies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from afil_ray.eval.protocol import pooled
from afil_ray.eval.report import ArmResult, EpisodeOutcome, build_report, markdown_table
from afil_ray.eval.stats import wilson_interval

LABELS = {
    "success_only": "image + language",
    "success_only@blank_cameras": "image + language, cameras blank",
    "success_only@other_instruction": "image + language, another task's instruction",
    "success_only@heldout_phrasing": "image + language, held-out phrasing",
}
STATE = "state policy (object poses)"


def records(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())["episodes"]


def outcome(r: dict) -> EpisodeOutcome:
    return EpisodeOutcome(r["seed"], r["run"], r["success_once"], r["success_at_end"])


def success_only_arms(image: list[dict], specs: list[str]) -> dict[str, list[dict]]:
    """The reference policy's success-only episodes, then each ``--variant``'s, by label."""
    arms = {LABELS["success_only"]: [r for r in image if r["arm"] == "success_only"]}
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--variant {spec!r}: expected LABEL=episodes.json")
        arms[label] = [r for r in records(path) if r["arm"] == "success_only"]
    return arms


def variants(arms: dict[str, list[dict]], tasks: list[str], metric: str) -> str:
    """Each variant's success-only episodes beside the reference policy's, per task and pooled."""
    common = set.intersection(*({(r["task"], r["seed"], r["run"]) for r in rs} for rs in arms.values()))
    results = [ArmResult(label, task, [outcome(r) for r in rs if r["task"] == task
                                       and (task, r["seed"], r["run"]) in common])
               for task in tasks for label, rs in arms.items()]
    results = [r for r in results if r.episodes]
    return markdown_table(build_report(results + pooled(results), metric=metric,
                                       reference_arm=LABELS["success_only"]))


def against_states(states: list[ArmResult], arms: dict[str, list[dict]], metric: str) -> str:
    """Every image policy beside each task's state policy on the (seed, run) episodes all of them ran there
    (the state policies may have run more; a variant trained on fewer tasks joins only those tasks' tables).
    The pooled table takes the image policies that have every task."""
    results: list[ArmResult] = []
    for state in states:
        mine = {label: [outcome(r) for r in rs if r["task"] == state.task] for label, rs in arms.items()}
        mine = {label: eps for label, eps in mine.items() if eps}
        common = set.intersection({(e.seed, e.run) for e in state.episodes},
                                  *({(e.seed, e.run) for e in eps} for eps in mine.values()))
        results += [ArmResult(arm, state.task, [e for e in eps if (e.seed, e.run) in common])
                    for arm, eps in [(STATE, state.episodes), *mine.items()]]
    tasks = {s.task for s in states}
    whole = [r for r in results if {q.task for q in results if q.arm == r.arm} == tasks]
    return markdown_table(build_report(results + pooled(whole), metric=metric, reference_arm=STATE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="episodes.json of the multi-task evaluation")
    parser.add_argument("--state", nargs="*", default=[], help="episodes.json of each task's state policy")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=PATH",
                        help="episodes.json of another image policy, paired against --image's success-only arm")
    parser.add_argument("--metric", default="success_once")
    args = parser.parse_args()
    image = records(args.image)
    tasks = list(dict.fromkeys(r["task"] for r in image))
    probes = [ArmResult(label, task, [outcome(r) for r in image if r["task"] == task and r["arm"] == arm])
              for task in tasks for arm, label in LABELS.items()]
    probes = [r for r in probes if r.episodes]
    print("## The probes: the image-and-language policy against itself, per task and pooled\n")
    report = build_report(probes + pooled(probes), metric=args.metric, reference_arm=LABELS["success_only"])
    print(markdown_table(report))
    arms = success_only_arms(image, args.variant)
    if args.variant:
        print("\n## Other image policies against this one, on the seeds both ran\n")
        print(variants(arms, tasks, args.metric))
    states: list[ArmResult] = []
    for path in args.state:
        by_task: dict[str, list[EpisodeOutcome]] = {}
        for r in records(path):
            if r["arm"] == "success_only":
                by_task.setdefault(r["task"], []).append(outcome(r))
        states += [ArmResult(STATE, task, eps) for task, eps in by_task.items() if task in tasks]
    if not states:
        return
    states.sort(key=lambda s: tasks.index(s.task))  # the image evaluation's task order
    print("\n## The state policies on all their seeds\n\n| task | success (k/n) | rate [95% Wilson] |\n|---|---|---|")
    for state in states:
        k, n = sum(getattr(e, args.metric) for e in state.episodes), len(state.episodes)
        low, high = wilson_interval(k, n)
        print(f"| {state.task} | {k}/{n} | {k / n:.3f} [{low:.3f}, {high:.3f}] |")
    missing = [t for t in tasks if t not in {s.task for s in states}]
    print("\n## Against the state policies" + (f" (none evaluated for {', '.join(missing)})" if missing else "")
          + "\n")
    print(against_states(states, arms, args.metric))


if __name__ == "__main__":
    main()
