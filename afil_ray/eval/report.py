"""The evaluation report: per-episode outcomes of sampler arms turned into JSON, a Markdown table and a plot.

Each arm (``success_only``, ``static w=0.05``, ``adaptive lam=1``, ...) is evaluated on the same fixed set of
``(seed, run)`` episodes per task: the seed fixes the initial configuration and the run index the sampling noise.
The report gives every arm's success rate with a Wilson interval and compares every other arm with the reference
arm *paired*, episode by episode (see :mod:`afil_ray.eval.stats`). Pairing is the point of the protocol, so arms
that did not run exactly the same episodes are an error here, not something to average over.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afil_ray.eval.stats import compare_paired, wilson_interval

METRICS: dict[str, str] = {
    "success_once": "the episode succeeded at some step (ManiSkill's success_once)",
    "success_at_end": "the episode was successful at its last step (ManiSkill's success_at_end)",
}
BOOTSTRAP_METHOD = "percentile"


@dataclass(frozen=True)
class EpisodeOutcome:
    """One evaluated episode: ``seed`` fixes the initial state, ``run`` the sampling-noise draw."""

    seed: int
    run: int
    success_once: bool
    success_at_end: bool


@dataclass(frozen=True)
class ArmResult:
    """All evaluated episodes of one arm (a checkpoint with a sampler setting) on one task."""

    arm: str
    task: str
    episodes: Sequence[EpisodeOutcome]


def build_report(
    results: Sequence[ArmResult],
    metric: str = "success_once",
    reference_arm: str = "success_only",
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Success rates per task and arm, and each arm's paired comparison against ``reference_arm``.

    The result is plain JSON-serialisable data: ``tasks`` maps each task (in order of first appearance) to its
    arms, the reference arm first; every arm has ``episodes``, ``successes``, ``rate``, ``wilson_low``/
    ``wilson_high`` and ``comparison`` (``None`` for the reference, else the fields of
    :class:`~afil_ray.eval.stats.PairedComparison`). Raises ``ValueError`` when an arm's ``(seed, run)`` set
    differs from the reference arm's on the same task, when a task has no reference arm, or on duplicates.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    by_task: dict[str, dict[str, dict[tuple[int, int], bool]]] = {}
    for result in results:
        arms = by_task.setdefault(result.task, {})
        if result.arm in arms:
            raise ValueError(f"arm {result.arm!r} appears more than once for task {result.task!r}")
        arms[result.arm] = _outcomes_by_key(result, metric)

    tasks: dict[str, Any] = {}
    for task, arms in by_task.items():
        if reference_arm not in arms:
            raise ValueError(
                f"task {task!r} has no reference arm {reference_arm!r} to pair against (arms: {sorted(arms)})"
            )
        reference = arms[reference_arm]
        keys = sorted(reference)
        reference_flags = [reference[key] for key in keys]
        entries = [_arm_entry(reference_arm, reference_flags, confidence, comparison=None)]
        for arm, outcomes in arms.items():
            if arm == reference_arm:
                continue
            _check_paired(task, arm, outcomes, reference_arm, reference)
            flags = [outcomes[key] for key in keys]
            comparison = compare_paired(reference_flags, flags, confidence=confidence, resamples=resamples, seed=seed)
            entries.append(_arm_entry(arm, flags, confidence, comparison=dataclasses.asdict(comparison)))
        tasks[task] = {"arms": entries}

    return {
        "metric": metric,
        "metric_definition": METRICS[metric],
        "reference_arm": reference_arm,
        "confidence": confidence,
        "bootstrap": {"method": BOOTSTRAP_METHOD, "resamples": resamples, "seed": seed},
        "tasks": tasks,
    }


def markdown_table(report: dict[str, Any], legend: bool = True) -> str:
    """One Markdown table per task, preceded (``legend``) by a line naming the metric and the reference arm;
    a second table of the same episodes under the first leaves the legend out."""
    pct = _percent(report["confidence"])
    reference = report["reference_arm"]
    lines = [
        f"Metric: `{report['metric']}`: {report['metric_definition']}. Reference arm: `{_cell(reference)}`. "
        f"Δ is the arm's rate minus the reference's on the same (seed, run) episodes; McNemar p is the exact "
        f"two-sided test on the discordant episodes.",
    ] if legend else []
    header = (
        f"| arm | success (k/n) | rate [{pct}% Wilson] | Δ vs reference [{pct}% paired bootstrap] "
        f"| discordant (ref only / arm only) | McNemar p |"
    )
    for task, body in report["tasks"].items():
        lines += ["", f"### {_cell(task)}", "", header, "|---|---|---|---|---|---|"][0 if lines else 1:]
        for entry in body["arms"]:
            rate = f"{entry['rate']:.3f} [{entry['wilson_low']:.3f}, {entry['wilson_high']:.3f}]"
            comparison = entry["comparison"]
            if comparison is None:
                name, delta, discordant, p_value = f"{_cell(entry['arm'])} (reference)", "—", "—", "—"
            else:
                name = _cell(entry["arm"])
                low, high = comparison["diff_low"], comparison["diff_high"]
                delta = f"{comparison['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
                discordant = f"{comparison['only_reference']} / {comparison['only_arm']}"
                p_value = format_p(comparison["mcnemar_p"])
            lines.append(
                f"| {name} | {entry['successes']}/{entry['episodes']} | {rate} | {delta} | {discordant} | {p_value} |"
            )
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of every arm's success rate with its Wilson interval, grouped by task, saved as a PNG.

    Uses matplotlib's object API with the Agg canvas, so it needs no display and leaves pyplot's global state
    (and the process-wide backend) alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    tasks = list(report["tasks"])
    arms: list[str] = []
    for body in report["tasks"].values():
        arms += [entry["arm"] for entry in body["arms"] if entry["arm"] not in arms]
    width = 0.8 / max(len(arms), 1)
    figure = Figure(figsize=(max(4.0, 1.2 + len(tasks) * (0.6 + 0.45 * len(arms))), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(arms))]
    for i, arm in enumerate(arms):
        xs, rates, below, above = [], [], [], []
        for t, task in enumerate(tasks):
            entry = next((e for e in report["tasks"][task]["arms"] if e["arm"] == arm), None)
            if entry is None:
                continue
            xs.append(t - 0.4 + width * (i + 0.5))
            rates.append(entry["rate"])
            below.append(max(entry["rate"] - entry["wilson_low"], 0.0))
            above.append(max(entry["wilson_high"] - entry["rate"], 0.0))
        label = f"{arm} (reference)" if arm == report["reference_arm"] else arm
        axes.bar(xs, rates, width, yerr=[below, above], capsize=3, color=colors[i], label=label)
    axes.set_xticks(range(len(tasks)), tasks)
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel(f"success rate ({report['metric']})")
    axes.set_title(f"{_percent(report['confidence'])}% Wilson intervals", fontsize="medium")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, format="png", dpi=120)
    return path


def write_report(report: dict[str, Any], directory: str | Path, markdown: str | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``directory`` (created if missing).
    ``markdown`` replaces the plain table in ``report.md``: a caller that adds notes or a second table passes the
    whole text, so the file is written once."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "report.json", "md": directory / "report.md", "png": directory / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(markdown_table(report) if markdown is None else markdown)
    plot_report(report, paths["png"])
    return paths


def _outcomes_by_key(result: ArmResult, metric: str) -> dict[tuple[int, int], bool]:
    if not result.episodes:
        raise ValueError(f"arm {result.arm!r} has no episodes for task {result.task!r}")
    outcomes: dict[tuple[int, int], bool] = {}
    for episode in result.episodes:
        key = (int(episode.seed), int(episode.run))
        if key in outcomes:
            raise ValueError(f"arm {result.arm!r} on task {result.task!r} has episode (seed, run)={key} twice")
        outcomes[key] = bool(getattr(episode, metric))
    return outcomes


def _check_paired(
    task: str,
    arm: str,
    outcomes: dict[tuple[int, int], bool],
    reference_arm: str,
    reference: dict[tuple[int, int], bool],
) -> None:
    missing = sorted(reference.keys() - outcomes.keys())
    extra = sorted(outcomes.keys() - reference.keys())
    if missing or extra:
        raise ValueError(
            f"arm {arm!r} on task {task!r} is not paired with reference arm {reference_arm!r}: "
            f"missing (seed, run) {_preview(missing)}, extra (seed, run) {_preview(extra)}"
        )


def _arm_entry(arm: str, flags: list[bool], confidence: float, comparison: dict[str, Any] | None) -> dict[str, Any]:
    n, k = len(flags), sum(flags)
    low, high = wilson_interval(k, n, confidence)
    return {
        "arm": arm,
        "episodes": n,
        "successes": k,
        "rate": k / n,
        "wilson_low": low,
        "wilson_high": high,
        "comparison": comparison,
    }


def _preview(keys: list[tuple[int, int]], limit: int = 10) -> str:
    if not keys:
        return "none"
    shown = ", ".join(str(key) for key in keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def format_p(p: float) -> str:
    """A p-value as the tables print it."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _percent(confidence: float) -> str:
    return f"{100 * confidence:g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")
