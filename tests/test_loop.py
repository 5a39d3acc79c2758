"""The harvest-learn loop's plain classes in one process: harvest, learn, publish, apply, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from afil_ray.loop.board import LocalWeightSource, StaleVersionError, WeightBoard
from afil_ray.loop.evaluator import LoopEvaluator
from afil_ray.loop.harvest import RolloutWorker
from afil_ray.loop.learner import OnlineLearner
from afil_ray.replay.store import ReplayStore

from loop_fixtures import loop_config, make_start_checkpoint


def board_publisher(board: WeightBoard):
    return lambda p: board.publish(p.version, p, p.learner_step, p.nbytes, tuple(p.components))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = loop_config(tmp_path_factory.mktemp("loop"))
    make_start_checkpoint(cfg)
    return cfg


def test_harvest_learn_publish_apply(cfg):
    board = WeightBoard()
    worker = RolloutWorker(cfg, 0, LocalWeightSource(board), seed_start=5_000_000)
    # the start checkpoint is success-only: its failure head starts as the success head, so guidance is a no-op
    assert all(torch.equal(a, b) for a, b in zip(worker.policy.success_head.parameters(),
                                                  worker.policy.failure_head.parameters(), strict=True))
    report = worker.run(4.0)
    assert report.episodes and report.env_steps >= 12 * len(report.episodes)
    assert report.w_mean == pytest.approx(0.0, abs=1e-6) and report.cos_mean == pytest.approx(1.0, abs=1e-5)
    store = ReplayStore(cfg.replay.root)
    stored = sorted(store.read_episodes(), key=lambda e: e.seed)
    assert [e.seed for e in stored] == sorted(e.seed for e in report.episodes)  # every finished episode is durable
    for ep in stored:
        assert ep.source == "rollout" and ep.policy_version == 0 and ep.chunks is not None
        assert bool(ep.snapshots) == (ep.outcome == "failure")  # failures keep snapshots for correction

    learner = OnlineLearner(cfg, board_publisher(board), board.latest_version)
    lr = learner.train(6.0)
    assert lr.waiting_for == 0 and lr.steps >= 3 and lr.published
    versions = [v for v, _, _ in lr.published]
    assert versions == list(range(1, len(versions) + 1))
    version, packet = board.latest()
    assert set(packet.components) == {"failure_head"}  # only what the learner changes is shipped
    assert packet.nbytes == sum(p.numel() * 4 for p in learner.trainer.policy.failure_head.parameters())

    after = worker.run(1.0)
    assert after.version == version and [v for v, _ in after.applied] == [version]
    for name, value in worker.policy.failure_head.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), packet.components["failure_head"][name])
    # an episode carries the version it started with: the two in flight at the switch keep 0, later ones are new
    by_seed = [e.policy_version for e in sorted(after.episodes, key=lambda e: e.seed)]
    assert by_seed == sorted(by_seed) and by_seed[-1] == version and by_seed.count(0) <= cfg.env.num_envs

    # a restarted learner resumes from its checkpoint and numbers its versions after the board's
    step = int(learner.stop().rsplit("_", 1)[1])
    assert board.version == version + (1 if step % cfg.loop.publish_every else 0)
    again = OnlineLearner(cfg, board_publisher(board), board.latest_version)
    resumed = again.train(2.0)
    assert resumed.step > step and all(v > board.history[0].version for v, _, _ in resumed.published)
    with pytest.raises(StaleVersionError):
        board.publish(1, None, 0, 0, ("failure_head",))
    worker.close()
    assert store.verify() == []

    # a worker started (or restarted by Ray) after versions were published acts with the newest from its very
    # first episodes, and they say so
    fresh = RolloutWorker(cfg, 1, LocalWeightSource(board), seed_start=6_000_000)
    first = fresh.run(2.0)
    assert first.episodes and {e.policy_version for e in first.episodes} == {board.version}
    fresh.close()


def test_learner_waits_for_failures(tmp_path):
    cfg = loop_config(tmp_path, min_failures=1)
    make_start_checkpoint(cfg)
    learner = OnlineLearner(cfg, lambda p: None, lambda: 0)
    report = learner.train(0.1)
    assert report.waiting_for == 1 and report.steps == 0 and learner.trainer is None


def test_evaluator_reuses_success_only_while_only_the_failure_head_changes(cfg):
    board = WeightBoard()
    evaluator = LoopEvaluator(cfg, LocalWeightSource(board))
    first = evaluator.evaluate_latest()
    # version 0: the failure head equals the success head, so adaptive sampling reproduces success-only exactly
    assert first.version == 0 and first.success_rate["adaptive"] == first.success_rate["success_only"]
    assert evaluator.evaluate_latest() is None  # nothing new
    learner = OnlineLearner(cfg, board_publisher(board), board.latest_version)
    learner.trainer = None
    learner.train(0.1)
    learner.train(2.0)
    second = evaluator.evaluate_latest()
    assert second.version == board.version >= 1 and second.reused == ["success_only"]


class CrashingEnv:
    """The real env adapter, except that step number ``crash_at`` of each instance raises SimulatorError."""

    made = 0

    def __init__(self, cfg, crash_at: int = 5):
        from afil_ray.envs.maniskill import ManiSkillVecEnv

        CrashingEnv.made += 1
        self._env, self._steps, self._crash_at = ManiSkillVecEnv(cfg), 0, crash_at if CrashingEnv.made == 1 else -1

    def __getattr__(self, name):
        return getattr(self._env, name)

    def step(self, actions):
        self._steps += 1
        if self._steps == self._crash_at:
            from afil_ray.envs.base import SimulatorError

            raise SimulatorError("PullCube-v1 cpu env 0: injected crash")
        return self._env.step(actions)


def test_rollout_worker_survives_a_simulator_crash(cfg):
    worker = RolloutWorker(cfg, 3, LocalWeightSource(WeightBoard()), seed_start=7_000_000, make_env=CrashingEnv)
    errors, episodes = [], []
    for _ in range(20):  # a few seconds at a time until an episode finishes after the rebuild (slow when loaded)
        report = worker.run(3.0)
        errors, episodes = errors + report.simulator_errors, episodes + report.episodes
        if episodes:
            break
    assert errors == ["PullCube-v1 cpu env 0: injected crash"]
    assert CrashingEnv.made == 2 and episodes  # rebuilt and kept harvesting
    stored = [e for e in ReplayStore(cfg.replay.root).read_episodes() if e.seed >= 7_000_000]
    assert sorted(e.seed for e in stored) == sorted(e.seed for e in episodes)
    assert all(e.length == cfg.env.max_episode_steps or e.success for e in stored)  # none cut by the crash
    worker.close()


def test_bad_loop_config_fails_before_ray_starts(cfg):
    import copy
    import dataclasses

    from afil_ray.config import ConfigError
    from afil_ray.driver import check_loop_config

    # the loop section checks its own values when it is built, so no bad value reaches the driver
    for key, value, match in (("learner_mode", "both", "loop.learner_mode must be one of"),
                              ("eval_samplers", ["guided"], "loop.eval_samplers must be one of .* got 'guided'"),
                              ("num_rollout_actors", 0, "loop.num_rollout_actors must be >= 1")):
        with pytest.raises(ConfigError, match=match):
            dataclasses.replace(cfg.loop, **{key: value})
    bad = copy.deepcopy(cfg)
    bad.loop.init_from = "/nonexistent"
    with pytest.raises(Exception, match=r"loop\.init_from"):
        check_loop_config(bad)


def test_plot_loop_curves_reads_each_runs_rolling_rates_per_task(tmp_path: Path) -> None:
    """scripts/plot_loop_curves.py (issue 22's online figure): a run's curves come from every event file below its
    directory (one folder per run id: a resumed loop), per task, in step order; a directory without them is an
    error that names it."""
    import importlib.util
    import subprocess
    import sys

    from torch.utils.tensorboard import SummaryWriter

    script = Path(__file__).parent.parent / "scripts" / "plot_loop_curves.py"
    spec = importlib.util.spec_from_file_location("plot_loop_curves", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def write(folder: Path, points: dict[str, list[tuple[int, float]]]) -> None:
        writer = SummaryWriter(str(folder))
        for task, pts in points.items():
            for step, value in pts:
                writer.add_scalar(f"rollout/success_rate_rolling/{task}", value, step)
        writer.add_scalar("sync/staleness/worker0", 3.0, 10)  # another tag: not read
        writer.close()

    write(tmp_path / "a" / "tb" / "run-2", {"PullCube-v1": [(300, 0.7), (400, 0.8)]})
    write(tmp_path / "a" / "tb" / "run-1", {"PullCube-v1": [(100, 0.5), (200, 0.6)], "PushCube-v1": [(100, 1.0)]})
    write(tmp_path / "b" / "tb" / "run-1", {"PullCube-v1": [(100, 0.5), (200, 0.4)]})
    a = module.curves(tmp_path / "a")
    assert a == {"PullCube-v1": ([100, 200, 300, 400], pytest.approx([0.5, 0.6, 0.7, 0.8])),
                 "PushCube-v1": ([100], [1.0])}
    out = tmp_path / "fig" / "online.png"
    done = subprocess.run([sys.executable, str(script), "--run", "rank=" + str(tmp_path / "a"),
                           "--run", "paper's rule=" + str(tmp_path / "b" / "tb"), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    bad = subprocess.run([sys.executable, str(script), "--run", "x=" + str(tmp_path / "empty"), "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and f"{tmp_path / 'empty'}: no TensorBoard event files" in bad.stderr
