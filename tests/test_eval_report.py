"""The evaluation report: pairing checks, counts on a hand-built example, the metric switch and the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afil_ray.eval.report import ArmResult, EpisodeOutcome, build_report, markdown_table, write_report

SEEDS, RUNS = range(10), range(3)


def arm_result(arm: str, task: str, once, at_end, keys=None) -> ArmResult:
    keys = list(keys) if keys is not None else [(s, r) for s in SEEDS for r in RUNS]
    return ArmResult(arm, task, [EpisodeOutcome(s, r, bool(once(s, r)), bool(at_end(s, r))) for s, r in keys])


def reference_once(s: int, r: int) -> bool:
    return s < 6  # 18 of 30


def reference_end(s: int, r: int) -> bool:
    return reference_once(s, r) and r != 2  # 12 of 30


def static_once(s: int, r: int) -> bool:
    # loses episode (0, 0), gains seeds 6 and 7: 18 - 1 + 6 = 23 of 30
    return (s < 6 and (s, r) != (0, 0)) or s in (6, 7)


def static_end(s: int, r: int) -> bool:
    return static_once(s, r) and s != 7  # 20 of 30


def example_results() -> list[ArmResult]:
    return [
        arm_result("static w=0.05", "PullCube-v1", static_once, static_end),
        arm_result("success_only", "PullCube-v1", reference_once, reference_end),
        arm_result("adaptive lam=1", "PullCube-v1", reference_once, reference_end),
        arm_result("success_only", "StackCube-v1", lambda s, r: s == 0, lambda s, r: False),
        arm_result("static w=0.05", "StackCube-v1", lambda s, r: s < 2, lambda s, r: s == 1),
    ]


def arms_of(report: dict, task: str) -> dict[str, dict]:
    return {entry["arm"]: entry for entry in report["tasks"][task]["arms"]}


def test_counts_and_discordant_pairs_of_a_hand_built_example() -> None:
    report = build_report(example_results())
    assert report["metric"] == "success_once"
    assert report["reference_arm"] == "success_only"
    assert list(report["tasks"]) == ["PullCube-v1", "StackCube-v1"]
    assert [e["arm"] for e in report["tasks"]["PullCube-v1"]["arms"]] == [
        "success_only",
        "static w=0.05",
        "adaptive lam=1",
    ]
    arms = arms_of(report, "PullCube-v1")
    reference, static, adaptive = arms["success_only"], arms["static w=0.05"], arms["adaptive lam=1"]
    assert (reference["episodes"], reference["successes"], reference["rate"]) == (30, 18, pytest.approx(0.6))
    assert reference["wilson_low"] < 0.6 < reference["wilson_high"]
    assert reference["comparison"] is None
    assert (static["episodes"], static["successes"]) == (30, 23)
    comparison = static["comparison"]
    assert (comparison["only_reference"], comparison["only_arm"]) == (1, 6)
    assert comparison["difference"] == pytest.approx(5 / 30)
    assert comparison["mcnemar_p"] == pytest.approx(16 / 128)  # 2·(C(7,0)+C(7,1))/2^7
    assert comparison["diff_low"] < comparison["difference"] < comparison["diff_high"]
    same = adaptive["comparison"]
    assert (same["only_reference"], same["only_arm"], same["mcnemar_p"]) == (0, 0, 1.0)
    assert (same["difference"], same["diff_low"], same["diff_high"]) == (0.0, 0.0, 0.0)

    stack = arms_of(report, "StackCube-v1")
    assert (stack["success_only"]["successes"], stack["static w=0.05"]["successes"]) == (3, 6)
    static_stack = stack["static w=0.05"]["comparison"]
    assert (static_stack["only_reference"], static_stack["only_arm"]) == (0, 3)


def test_metric_switch_to_success_at_end() -> None:
    report = build_report(example_results(), metric="success_at_end")
    assert report["metric"] == "success_at_end"
    assert "success_at_end" in report["metric_definition"]
    arms = arms_of(report, "PullCube-v1")
    assert arms["success_only"]["successes"] == 12
    assert arms["static w=0.05"]["successes"] == 20
    comparison = arms["static w=0.05"]["comparison"]
    # reference-only: (0, 0); arm-only: the six run-2 episodes of seeds 1..5 and 0, plus seed 6's three runs
    assert (comparison["only_reference"], comparison["only_arm"]) == (1, 9)
    assert comparison["mcnemar_p"] == pytest.approx(22 / 1024)
    stack = arms_of(report, "StackCube-v1")
    assert (stack["success_only"]["successes"], stack["static w=0.05"]["successes"]) == (0, 3)
    assert stack["success_only"]["wilson_low"] == 0.0


def test_unknown_metric_is_rejected() -> None:
    with pytest.raises(ValueError, match="metric"):
        build_report(example_results(), metric="success")


def test_pairing_mismatch_names_the_arm_and_the_keys() -> None:
    keys = [(s, r) for s in SEEDS for r in RUNS if (s, r) != (9, 2)]
    results = [
        arm_result("success_only", "PullCube-v1", reference_once, reference_end),
        arm_result("static w=0.05", "PullCube-v1", static_once, static_end, keys=keys),
    ]
    with pytest.raises(ValueError, match=r"static w=0\.05") as error:
        build_report(results)
    assert "(9, 2)" in str(error.value)

    shifted = [(s + 1, r) for s in SEEDS for r in RUNS]  # same size, different initial states
    results[1] = arm_result("static w=0.05", "PullCube-v1", static_once, static_end, keys=shifted)
    with pytest.raises(ValueError, match=r"static w=0\.05.*missing .*\(0, 0\).*extra .*\(10, 0\)"):
        build_report(results)


def test_missing_reference_and_duplicates_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"StackCube-v1.*success_only"):
        build_report([*example_results()[:3], arm_result("static w=0.05", "StackCube-v1", static_once, static_end)])
    with pytest.raises(ValueError, match="more than once"):
        build_report([*example_results(), arm_result("success_only", "PullCube-v1", reference_once, reference_end)])
    doubled = [(0, 0), (0, 0)]
    with pytest.raises(ValueError, match="twice"):
        build_report([arm_result("success_only", "PullCube-v1", reference_once, reference_end, keys=doubled)])


def test_reference_arm_is_configurable() -> None:
    report = build_report(example_results()[:3], reference_arm="static w=0.05")
    comparison = arms_of(report, "PullCube-v1")["success_only"]["comparison"]
    assert (comparison["only_reference"], comparison["only_arm"]) == (6, 1)
    assert comparison["difference"] == pytest.approx(-5 / 30)


def test_markdown_names_the_metric_and_has_one_row_per_arm() -> None:
    report = build_report(example_results())
    text = markdown_table(report)
    assert "Metric: `success_once`" in text
    assert text.count("### ") == 2
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| arm |")]
    assert len(rows) == 5
    assert "| success_only (reference) | 18/30 |" in text
    static_row = next(row for row in rows if row.startswith("| static w=0.05 | 23/30 |"))
    assert "+0.167 [" in static_row
    assert "| 1 / 6 | 0.125 |" in static_row
    assert "95% Wilson" in text and "95% paired bootstrap" in text
    assert "Metric: `success_at_end`" in markdown_table(build_report(example_results(), metric="success_at_end"))


def test_markdown_without_legend_starts_at_the_first_task() -> None:
    """The second table under a first one (same episodes, another reference) repeats only the tables."""
    report = build_report(example_results())
    full, bare = markdown_table(report), markdown_table(report, legend=False)
    assert bare.startswith("### ") and "Metric:" not in bare
    assert full.endswith(bare) and full.count("### ") == bare.count("### ") == 2


def test_write_report_writes_three_files_and_json_round_trips(tmp_path: Path) -> None:
    report = build_report(example_results())
    paths = write_report(report, tmp_path / "eval")
    assert set(paths) == {"json", "md", "png"}
    assert [p.name for p in paths.values()] == ["report.json", "report.md", "report.png"]
    assert json.loads(paths["json"].read_text()) == report
    assert paths["md"].read_text() == markdown_table(report)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["png"].stat().st_size > 1000
    # a caller with notes passes the whole text: report.md holds it, the json and plot are unchanged
    again = write_report(report, tmp_path / "eval", "notes\n")
    assert again["md"].read_text() == "notes\n" and json.loads(again["json"].read_text()) == report


def test_compare_evals_pairs_arms_of_different_evaluations(tmp_path: Path) -> None:
    """scripts/compare_evals.py: arms from two evaluations' episodes.json, paired by (seed, run)."""
    import subprocess
    import sys

    def write(name: str, arm: str, flags: list[bool]) -> Path:
        rows = [{"arm": arm, "task": "PullCube-v1", "seed": 100 + i // 2, "run": i % 2, "success_once": f,
                 "success_at_end": f} for i, f in enumerate(flags)]
        path = tmp_path / name / "episodes.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"episodes": rows}))
        return path

    a = write("a", "success_only", [True, False, False, True, False, False])
    b = write("b", "success_only", [True, True, True, True, False, True])
    script = Path(__file__).parent.parent / "scripts" / "compare_evals.py"
    out = subprocess.run([sys.executable, str(script), "--arm", "ref", str(a), "success_only", "--arm", "new w=1",
                          str(b), "success_only"], capture_output=True, text=True, check=True).stdout
    assert "| ref (reference) | 2/6 |" in out and "| new w=1 | 5/6 |" in out and "| 0 / 3 |" in out
    bad = subprocess.run([sys.executable, str(script), "--arm", "ref", str(a), "success_only",
                          "--arm", "new", str(b), "static:w=0.05"], capture_output=True, text=True)
    assert bad.returncode != 0 and "has no arm 'static:w=0.05'" in bad.stderr
