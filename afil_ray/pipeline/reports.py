"""The reproduction's tables and figures: the main report with the paper's rates beside ours, ``summary.md``,
and the training-seed spread. Pure functions of evaluated rows; nothing here runs an episode.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

from afil_ray.eval.report import ArmResult, build_report, format_p, markdown_table, write_report
from afil_ray.eval.stats import compare_paired_over_seeds
from afil_ray.pipeline.plan import CORRECTED_ARM, SUCCESS_ONLY


def paper_rates(task: str) -> dict[str, float]:
    """The paper's success rates (%) for ``task`` by row label (``paper_rates.json``; {} for other tasks)."""
    data = json.loads(resources.files("afil_ray.pipeline").joinpath("paper_rates.json").read_text())
    return data["rates"].get(task, {})


def main_report(results: list[ArmResult], mean_w: dict[str, float | None], adaptive: set[str], tasks: list[str],
                metric: str, seed: int, stage_seconds: dict[str, float], out: Path) -> dict[str, Any]:
    """``results/report.{json,md,png}`` and ``summary.md``: every arm against success only; the FIL arms and the
    online arm also against "+ failure correction", whose success head they share (the failure head's own
    effect). ``adaptive``: the labels of the adaptive rows, whose applied weight the report spells out. A
    multi-task reproduction's ``results`` hold each task's rows and the pooled ones (a table each, ``tasks``)."""
    report = build_report(results, metric=metric, reference_arm=SUCCESS_ONLY, seed=seed)
    # how hard the adaptive rule actually steered: a FIL arm level with "+ correction" reads differently at
    # w = 0.001 (the heads agree) than at w = 0.1
    report["mean_w"] = {r.arm: mean_w[r.arm] for r in results if mean_w.get(r.arm) is not None}
    out.mkdir(parents=True, exist_ok=True)
    lines = [markdown_table(report)]
    applied = {arm: w for arm, w in report["mean_w"].items() if arm in adaptive}
    if applied:
        lines += ["", mean_w_sentence("by the adaptive arms", applied)]
    guided, fil = [r for r in results if r.arm != SUCCESS_ONLY], None
    if len(guided) > 1:
        fil = build_report(guided, metric=metric, reference_arm=CORRECTED_ARM, seed=seed)
        (out / "report_vs_correction.json").write_text(json.dumps(fil, indent=1) + "\n")
        lines += ["", f"The failure head's own effect: the same arms against `{CORRECTED_ARM}` (same success "
                  "head and backbone; with w = 0 the guided sampler reproduces it episode by episode).", "",
                  markdown_table(fil, legend=False)]
    shown = list(report["tasks"])
    summaries = [(f"### {task}\n\n" if len(shown) > 1 else "")
                 + summary_table(report, fil, report["mean_w"], paper_rates(task), task=task) for task in shown]
    (out / "summary.md").write_text("\n".join(summaries))
    for task in (t for t in shown if paper_rates(t)):
        paper = paper_rates(task)
        lines += ["", f"The paper's numbers for {task} (%, 1500 demos, 1500 failures and 1000 corrections per task; "
                  "../shared/afil-method.md):", "", "| arm | ours (%) | paper (%) |", "|---|---|---|"]
        for entry in report["tasks"][task]["arms"]:
            ref = paper.get(entry["arm"])
            lines.append(f"| {entry['arm']} | {100 * entry['rate']:.1f} | {'—' if ref is None else ref} |")
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items())]
    paths = write_report(report, out, "\n".join(lines) + "\n")
    rates = {t: {e["arm"]: e["rate"] for e in report["tasks"][t]["arms"]} for t in shown}
    return {"report": str(paths["md"]), "rates": rates[tasks[0]] if len(tasks) == 1 else rates}


def summary_table(vs_success: dict[str, Any], vs_correction: dict[str, Any] | None,
                  mean_w: dict[str, float | None] | None = None, paper: dict[str, float] | None = None,
                  task: str | None = None) -> str:
    """One row per arm with both paired comparisons side by side (``summary.md``): the table a reader wants,
    where the full report needs two tables and a third for the paper. Bold: the paired interval excludes 0.
    The mean-w and paper columns appear when given (out of domain there is neither). ``task``: which of the
    reports' tasks (None: their only one)."""
    if task is None:
        [task] = vs_success["tasks"]
    body = vs_success["tasks"][task]
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
            cells.append("—" if not w else format_w(w))
        if paper is not None:
            ref = paper.get(entry["arm"])
            cells.append("—" if ref is None else f"{ref / 100:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_spread(by_seed: dict[int, dict[str, ArmResult]], roles: list[str], reference: ArmResult, task: str,
                metric: str, seed: int, out: Path, what: str, paper_rule: str | None = None) -> dict[str, Any]:
    """Per training seed, "+ failure correction" paired against success only and every other row against that
    seed's "+ failure correction"; the mean ± sd over seeds; ``report.{md,json,png}``, ``spread.{json,png}`` under
    ``out``. ``by_seed[s][role]``: seed ``s``'s row ``role`` (``roles`` in table order, "+ correction" first).
    Over the seeds, every row is also paired with success only and (``paper_rule``, one of ``roles``) with the
    paper's rule of the same seed."""
    flat = [reference] + [ArmResult(f"seed {s}: {role}", r.task, r.episodes)
                          for s, group in by_seed.items() for role, r in group.items()]
    report = build_report(flat, metric=metric, reference_arm=SUCCESS_ONLY, seed=seed)

    def paired(ref: ArmResult, arm: ArmResult) -> dict[str, Any]:
        two = [ArmResult("ref", ref.task, ref.episodes), ArmResult("arm", arm.task, arm.episodes)]
        return build_report(two, metric=metric, reference_arm="ref", seed=seed)["tasks"][ref.task]["arms"][1]

    rows = {s: {a: paired(reference if a == CORRECTED_ARM else group[CORRECTED_ARM], group[a]) for a in roles}
            for s, group in by_seed.items()}
    head = ["training seed"] + [h for a in roles
                                for h in (a, f"Δ vs {SUCCESS_ONLY if a == CORRECTED_ARM else CORRECTED_ARM}")]
    lines = [f"Training-seed spread on {task} (`{metric}`, {len(reference.episodes)} paired "
             f"episodes per arm): {what} Δ: paired on the same episodes, [95% bootstrap], exact McNemar p.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, row in rows.items():
        cells = [f"{s}{' (main stages)' if s == seed else ''}"]
        for a in roles:
            c = row[a]["comparison"]
            cells += [f"{row[a]['rate']:.3f}", f"{c['difference']:+.3f} [{c['diff_low']:+.3f}, "
                      f"{c['diff_high']:+.3f}] p{_p(c['mcnemar_p'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    spread = {a: {"rate": _mean_sd([r[a]["rate"] for r in rows.values()]),
                  "difference": _mean_sd([r[a]["comparison"]["difference"] for r in rows.values()])} for a in roles}
    lines.append("| mean ± sd | " + " | ".join(
        f"{spread[a]['rate'][0]:.3f} ± {spread[a]['rate'][1]:.3f} | "
        f"{spread[a]['difference'][0]:+.3f} ± {spread[a]['difference'][1]:.3f}" for a in roles) + " |")
    # over the seeds: every row against success only, and against the same seed's "+ failure correction" (whose
    # success head the critic, outcome and branch rows start from) and paper rule
    references = {SUCCESS_ONLY: None, CORRECTED_ARM: CORRECTED_ARM, **({paper_rule: paper_rule} if paper_rule else {})}
    pooled = {name: pooled_over_seeds(by_seed, roles, reference, metric, seed, role)
              for name, role in references.items()}
    head = ["row", "rate over seeds"] + [h for name in references for h in (f"Δ vs {name}", "p")]
    lines += ["", f"Over the {len(by_seed)} training seeds, every row against {SUCCESS_ONLY} and against the same "
              f"seed's {' and '.join(f'`{r}`' for r in list(references)[1:])}: per episode the mean over seeds of "
              "the row's success minus the reference's, averaged over the episodes; [95% bootstrap over episodes], "
              "two-sided sign-flip permutation p (the seeds share the episodes, so each episode counts once).", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in roles:
        cells = [a, f"{pooled[SUCCESS_ONLY][a]['arm_rate']:.3f}"]
        for name in references:
            c = pooled[name][a]
            cells += ["—", "—"] if name == a else [
                f"{c['difference']:+.3f} [{c['diff_low']:+.3f}, {c['diff_high']:+.3f}]", format_p(c["p"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every arm against success only:", "", markdown_table(report, legend=False)]
    paths = write_report(report, out, "\n".join(lines) + "\n")
    summary = {"report": str(paths["md"]), "spread": spread, "over_seeds": pooled,
               "per_seed": {s: {a: r[a]["rate"] for a in roles} for s, r in rows.items()}}
    (out / "spread.json").write_text(json.dumps(summary, indent=1) + "\n")
    entries = {e["arm"]: e for e in report["tasks"][task]["arms"]}
    points = {role: [(s, entries[f"seed {s}: {role}"]) for s in by_seed] for role in roles}
    plot_seed_spread(entries[SUCCESS_ONLY], points, out / "spread.png", task, metric, main_seed=seed)
    return summary


def pooled_over_seeds(by_seed: dict[int, dict[str, ArmResult]], roles: list[str], reference: ArmResult,
                      metric: str, seed: int, per_seed_reference: str | None = None) -> dict[str, dict[str, Any]]:
    """Each row over the training seeds (``compare_paired_over_seeds``), episode for episode, against
    ``reference`` or, with ``per_seed_reference`` (a role), against that row of the same seed."""
    def flags(result: ArmResult) -> dict[tuple[int, int], bool]:
        return {(int(e.seed), int(e.run)): bool(getattr(e, metric)) for e in result.episodes}

    ref = flags(reference)
    keys = sorted(ref)

    def aligned(result: ArmResult, role: str) -> list[bool]:
        mine = flags(result)
        if set(mine) != set(ref):
            raise ValueError(f"{role}: a training seed's episodes differ from {SUCCESS_ONLY}'s")
        return [mine[k] for k in keys]

    against = [ref[k] for k in keys] if per_seed_reference is None else \
        [aligned(group[per_seed_reference], per_seed_reference) for group in by_seed.values()]
    return {role: dataclasses.asdict(compare_paired_over_seeds(
        against, [aligned(group[role], role) for group in by_seed.values()], seed=seed)) for role in roles}


def plot_seed_spread(reference: dict[str, Any], points: dict[str, list[tuple[int, dict[str, Any]]]],
                     path: str | Path, task: str, metric: str, main_seed: int = 0) -> Path:
    """``spread.png``: per row, one point per training seed (Wilson interval) beside the success-only rate, so the
    spread across re-trainings reads against the distance between arms at a glance."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.0 + 1.6 * len(points), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.axhspan(reference["wilson_low"], reference["wilson_high"], color="0.9")
    axes.axhline(reference["rate"], color="0.4", linestyle="--", label=f"{reference['arm']} (one checkpoint)")
    seeds = sorted({s for row in points.values() for s, _ in row})
    for a, row in enumerate(points.values()):
        for s, entry in row:
            x = a + 0.5 * (seeds.index(s) - (len(seeds) - 1) / 2) / max(len(seeds), 1)
            axes.errorbar([x], [entry["rate"]], yerr=[[entry["rate"] - entry["wilson_low"]],
                                                      [entry["wilson_high"] - entry["rate"]]],
                          fmt="o" if s != main_seed else "s", color=f"C{seeds.index(s) % 10}", capsize=2,
                          label=f"seed {s}{' (main stages)' if s == main_seed else ''}" if a == 0 else None)
    axes.set_xticks(range(len(points)), [a.replace(": ", ":\n") for a in points], fontsize="small")
    axes.set_ylabel(f"success rate ({metric})")
    axes.set_title(f"{task}: training-seed spread, 95% Wilson intervals", fontsize="medium")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path, format="png", dpi=120)
    return Path(path)


def mean_w_sentence(which: str, mean_w: dict[str, float | None]) -> str:
    """The reports' line of applied guidance weights (arms without one are left out)."""
    return f"Mean guidance weight applied {which}: " + ", ".join(
        f"{arm} {format_w(w)}" for arm, w in mean_w.items() if w is not None) + "."


def format_w(w: float) -> str:
    """A guidance weight to 4 places without trailing zeros: a static arm's ``0.05`` as given, an adaptive arm's
    measured mean as ``0.0133``."""
    return f"{w:.4f}".rstrip("0").rstrip(".")


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


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, var ** 0.5
