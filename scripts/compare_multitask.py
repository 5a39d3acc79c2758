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


ByTask = dict[str, dict[str, list[EpisodeOutcome]]]  # arm label -> task -> episodes


def success_only_by_task(rs: list[dict]) -> dict[str, list[EpisodeOutcome]]:
    by_task: dict[str, list[EpisodeOutcome]] = {}
    for r in rs:
        if r["arm"] == "success_only":
            by_task.setdefault(r["task"], []).append(outcome(r))
    return by_task


def success_only_arms(image: list[dict], specs: list[str]) -> ByTask:
    """The reference policy's success-only episodes, then each ``--variant``'s, by label and task."""
    arms = {LABELS["success_only"]: success_only_by_task(image)}
    for spec in specs:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--variant {spec!r}: expected LABEL=episodes.json")
        arms[label] = success_only_by_task(records(path))
    return arms


def paired_by_task(arms: ByTask, tasks: list[str]) -> list[ArmResult]:
    """Per task, the arms that have it on the (seed, run) episodes all of them ran there (a policy trained on
    fewer tasks joins only those tables); pooled, the arms that have every task."""
    results: list[ArmResult] = []
    for task in tasks:
        mine = {label: by_task[task] for label, by_task in arms.items() if by_task.get(task)}
        common = set.intersection(*({(e.seed, e.run) for e in eps} for eps in mine.values()))
        results += [ArmResult(label, task, [e for e in eps if (e.seed, e.run) in common])
                    for label, eps in mine.items()]
    whole = [r for r in results if all(arms[r.arm].get(t) for t in tasks)]
    return results + pooled(whole)


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
        print(markdown_table(build_report(paired_by_task(arms, tasks), metric=args.metric,
                                          reference_arm=LABELS["success_only"])))
    states: list[ArmResult] = []
    for path in args.state:
        states += [ArmResult(STATE, task, eps) for task, eps in success_only_by_task(records(path)).items()
                   if task in tasks]
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
    with_states: ByTask = {STATE: {s.task: s.episodes for s in states}, **arms}
    results = paired_by_task(with_states, [s.task for s in states])
    print(markdown_table(build_report(results, metric=args.metric, reference_arm=STATE)))


if __name__ == "__main__":
    main()
