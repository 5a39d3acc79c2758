"""Benchmark suites by name: a whole suite in a task list (``env.task=libero_object``) and the evaluation report's
pooled table per suite. Nothing here simulates or imports LIBERO."""

from __future__ import annotations

import sys

import pytest

from afil_ray.cli import main
from afil_ray.config import ConfigError, load_config
from afil_ray.envs.checks import check_task, with_suites_expanded
from afil_ray.envs.libero import SUITE_LIMITS, SUITE_SIZES
from afil_ray.envs.tasks import expand_suites, suite_of
from afil_ray.eval.protocol import POOLED, pooled
from afil_ray.eval.report import ArmResult, EpisodeOutcome, build_report

SUITES = "libero_spatial, libero_object, libero_goal, libero_10, libero_90"


def _loaded(*overrides: str):
    """A config as every command loads it (afil_ray/cli.py)."""
    return with_suites_expanded(load_config(None, list(overrides)))


def test_a_suite_name_stands_for_all_of_its_tasks_in_order():
    imported = "libero" in sys.modules
    assert expand_suites(["libero_object"]) == [f"libero_object/{i}" for i in range(10)]
    assert expand_suites(["libero_90"]) == [f"libero_90/{i}" for i in range(90)]
    assert expand_suites(["libero_spatial/3", "libero_goal", "PullCube-v1"]) == [
        "libero_spatial/3", *[f"libero_goal/{i}" for i in range(10)], "PullCube-v1"]
    assert list(SUITE_SIZES) == list(SUITE_LIMITS)  # one suite list, two facts per suite
    assert imported or "libero" not in sys.modules  # the sizes are known without the simulator's package


def test_every_command_sees_the_expanded_task_list():
    cfg = _loaded("env.task=libero_object", "env.control_mode=osc_pose")
    assert cfg.env.tasks == [f"libero_object/{i}" for i in range(10)]
    assert cfg.env.for_task("libero_object/9").task == "libero_object/9"
    mixed = _loaded("env.task=[libero_10/4,libero_spatial]", "data.tasks=[libero_spatial]")
    assert mixed.env.tasks == ["libero_10/4", *[f"libero_spatial/{i}" for i in range(10)]]
    assert mixed.data.tasks == [f"libero_spatial/{i}" for i in range(10)]
    ood = _loaded("env.task=libero_object", "reproduce.ood_tasks=[libero_goal,libero_10/3]").reproduce.ood_tasks
    assert ood == [*[f"libero_goal/{i}" for i in range(10)], "libero_10/3"]
    plain = load_config(None, ["env.task=PullCube-v1"])
    assert with_suites_expanded(plain) is plain  # no suite: the config as loaded, task still a plain name
    assert _loaded("env.task=PullCube-v1", "data.tasks=[libero_goal]").env.task == "PullCube-v1"
    with pytest.raises(ConfigError, match=r"env\.task lists libero_object/3 more than once"):
        _loaded("env.task=[libero_object,libero_object/3]")


def test_an_unknown_suite_is_one_line_naming_the_valid_ones(capsys):
    for overrides, key in ((["env.task=libero_nope"], "env.task"), (["data.tasks=[libero]"], "data.tasks")):
        with pytest.raises(ConfigError) as e:
            _loaded(*overrides)
        message = str(e.value)
        assert message.startswith(f"{key}: unknown LIBERO suite") and SUITES in message and "\n" not in message
    assert main(["train", "env.task=[PullCube-v1,libero_nope]"]) == 2  # the CLI, before anything runs
    err = capsys.readouterr().err
    assert "env.task: unknown LIBERO suite 'libero_nope'" in err and SUITES in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match=r"^env\.task: 'libero_goal' is a whole suite, not one task"):
        check_task("env.task", "libero_goal")  # a suite that reaches a task check unexpanded


def _arm(arm: str, task: str, wins: set[int], seeds: int = 4) -> ArmResult:
    """``seeds`` episodes x 2 runs of ``arm`` on ``task``; seed s succeeds (in both runs) when s is in ``wins``."""
    return ArmResult(arm, task, [EpisodeOutcome(100000 + s, r, s in wins, s in wins)
                                 for r in range(2) for s in range(seeds)])


def _both_arms(task: str, wins: set[int], guided_wins: set[int]) -> list[ArmResult]:
    return [_arm("success_only", task, wins), _arm("adaptive", task, guided_wins)]


OBJECT_2, SPATIAL_2 = "libero_object (2 of 10 tasks)", "libero_spatial (2 of 10 tasks)"


def test_tasks_from_several_suites_get_a_pooled_row_per_suite_then_one_over_all():
    per_task = (_both_arms("libero_object/0", {0, 1}, {0, 1, 2}) + _both_arms("libero_object/1", {0}, {0})
                + _both_arms("libero_spatial/0", set(), {3}) + _both_arms("libero_spatial/1", {1, 2}, {1, 2})
                + _both_arms("libero_goal/5", {0}, set()))  # one task of its suite: its row is the suite's
    rows = pooled(per_task)
    assert [(r.task, r.arm, len(r.episodes)) for r in rows] == [
        (OBJECT_2, "success_only", 16), (OBJECT_2, "adaptive", 16),
        (SPATIAL_2, "success_only", 16), (SPATIAL_2, "adaptive", 16),
        (POOLED, "success_only", 40), (POOLED, "adaptive", 40)]
    report = build_report(per_task + rows, reference_arm="success_only", resamples=200)
    assert list(report["tasks"])[-3:] == [OBJECT_2, SPATIAL_2, POOLED]
    spatial = {a["arm"]: a for a in report["tasks"][SPATIAL_2]["arms"]}
    assert spatial["success_only"]["successes"] == 4 and spatial["adaptive"]["successes"] == 6
    paired = spatial["adaptive"]["comparison"]  # the same paired statistics as every other row
    assert paired["n"] == 16 and paired["only_arm"] == 2 and paired["only_reference"] == 0
    assert [a["successes"] for a in report["tasks"][POOLED]["arms"]] == [12, 14]


def test_one_whole_suite_pools_under_the_suites_name_and_other_tasks_stay_as_they_were():
    whole = pooled([arm for i in range(10) for arm in _both_arms(f"libero_object/{i}", {i % 4}, {0})])
    assert {r.task for r in whole} == {"libero_object"} and [len(r.episodes) for r in whole] == [80, 80]
    rows = pooled(_both_arms("libero_object/0", {0}, {0, 1}) + _both_arms("libero_object/7", {2}, {2}))
    assert {r.task for r in rows} == {POOLED} and [len(r.episodes) for r in rows] == [16, 16]  # not the suite's row
    maniskill = pooled(_both_arms("PushCube-v1", {0}, {1}) + _both_arms("PullCube-v1", {2}, {3}))
    assert [(r.task, r.arm) for r in maniskill] == [(POOLED, "success_only"), (POOLED, "adaptive")]
    assert pooled(_both_arms("libero_object/0", {0}, {0})) == []  # one task: nothing to pool
    assert suite_of("libero_object/3") == "libero_object" and suite_of("PullCube-v1") is None
    assert suite_of("libero_object") is None  # a suite is not a suite task
