"""The paired evaluation protocol: per-episode noise, arms on the same (seed, run) episodes, the report."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from afil_ray.cli import main
from afil_ray.config import Config, ConfigError, EnvConfig, SamplerConfig, load_config
from afil_ray.envs.maniskill import ManiSkillVecEnv
from afil_ray.envs.tasks import get_task
from afil_ray.eval.arms import make_arm, parse_arm
from afil_ray.eval.episodes import episode_noise_seed
from afil_ray.eval.protocol import evaluate_arms, resolve_arms, write_evaluation
from afil_ray.eval.workers import process_units, task_units
from afil_ray.policy.checkpoint import load_policy
from afil_ray.provenance import machine_facts
from afil_ray.rollout import ChunkedRollout

from loop_fixtures import loop_config, make_start_checkpoint

H, A = 4, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small untrained policy whose failure head differs from its success head (so guidance changes chunks)."""
    cfg = loop_config(tmp_path_factory.mktemp("eval"))
    path = make_start_checkpoint(cfg)
    policy = load_policy(path)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in policy.failure_head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    policy.eval()
    cfg.env.max_episode_steps = 8
    cfg.eval.seed_start, cfg.eval.episodes, cfg.eval.runs = 700, 3, 2
    cfg.sampler = SamplerConfig(kind="success_only", steps=2, execute_steps=4)
    return cfg, policy, path


def by_key(result):
    return {(e.seed, e.extra["eval_run"]): e for e in result.episodes}


def assert_same_episodes(a, b):
    ka, kb = by_key(a), by_key(b)
    assert ka.keys() == kb.keys()
    for key in ka:
        x, y = ka[key], kb[key]
        assert np.array_equal(x.chunks, y.chunks), key
        assert np.array_equal(x.action, y.action), key
        assert np.array_equal(x.step_success, y.step_success) and x.success == y.success, key


def test_arms_are_paired_and_evaluation_is_deterministic(setup):
    cfg, policy, _ = setup
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, arms=["success_only", "static:w=0", "adaptive:lam=0", "static:w=0.5"]))
    first = evaluate_arms(cfg, policy, progress=False)
    assert [r.arm.name for r in first] == ["success_only", "static:w=0", "adaptive:lam=0", "static:w=0.5"]
    base, static0, adaptive0, static_half = first
    keys = sorted(by_key(base))
    assert keys == [(s, r) for s in (700, 701, 702) for r in (0, 1)]
    # w = 0 and lam = 0 reproduce success_only bit for bit, episode by episode
    assert_same_episodes(base, static0)
    assert_same_episodes(base, adaptive0)
    # ... while real guidance, with the same noise, changes the chunks (the comparison can see a difference)
    assert not np.array_equal(by_key(base)[(700, 0)].chunks[0], by_key(static_half)[(700, 0)].chunks[0])
    # run 1 re-draws the noise of the same initial state: the initial observation is equal, the chunk is not
    run0, run1 = by_key(base)[(700, 0)], by_key(base)[(700, 1)]
    assert np.array_equal(run0.state[0], run1.state[0])
    assert not np.array_equal(run0.chunks[0], run1.chunks[0])
    assert run0.extra["noise_seed"] != run1.extra["noise_seed"]
    # a second evaluation (other arm order, one arm) gives the same episodes
    again = evaluate_arms(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, arms=["static:w=0.5"])),
                          policy, progress=False)
    assert_same_episodes(static_half, again[0])


class NoiseEcho:
    """Returns its initial noise as the chunk, so the test sees exactly which noise each episode got."""

    noise_shape = (H, A)

    def sample(self, obs, instructions, sampler, generator=None, noise=None):
        chunk = 0.01 * noise.numpy()
        return chunk, {"w": None, "cos": None}


def first_chunks(num_envs: int, seeds: list[int], run: int) -> dict[int, np.ndarray]:
    env = ManiSkillVecEnv(EnvConfig(task="PullCube-v1", num_envs=num_envs, max_episode_steps=6, backend="cpu",
                                    cpu_vectorization="loop"))
    wanted = set(seeds)
    stream = itertools.chain(seeds, itertools.count(10**6))  # then throw-away seeds
    rollout = ChunkedRollout(env, NoiseEcho(), SamplerConfig(execute_steps=4), stream,
                             noise_seed=lambda s: episode_noise_seed(s, run, 0) if s in wanted else None)
    out = {}
    while len(out) < len(seeds):
        for ep in rollout.step():
            if ep.seed in wanted:
                out[ep.seed] = ep.chunks
    env.close()
    return out


def test_noise_depends_on_the_episode_not_the_env_slot():
    one = first_chunks(1, [5, 6, 7], run=0)
    two = first_chunks(2, [7, 5, 6], run=0)  # other slots, other order, other batch compositions
    for seed in (5, 6, 7):
        assert one[seed].shape == (2, H, A)  # 6 steps, re-planned every 4
        assert np.array_equal(one[seed], two[seed])
    other_run = first_chunks(1, [5], run=1)
    assert not np.array_equal(one[5], other_run[5])


def test_bad_arm_specs_are_clear_errors():
    base = SamplerConfig()
    assert parse_arm("adaptive:lam=1", base).sampler.lam == 1.0
    arm = parse_arm("static:w=0.05,steps=5", base)
    assert arm.name == "static:w=0.05,steps=5" and arm.sampler.kind == "static" and arm.sampler.steps == 5
    assert parse_arm("static", base).name == "static:w=0.05"
    # one arm, two names: the name keys files, the title the tables; built arms equal parsed ones
    assert parse_arm("adaptive:lam=1.0", base).title == "adaptive FIL λ=1"
    assert parse_arm("success_only", base).title == "success only"
    assert make_arm(base, "static", w=0.05) == parse_arm("static:w=0.05", base)
    with pytest.raises(ConfigError, match="unknown sampler kind 'guided'"):
        parse_arm("guided:w=1", base)
    with pytest.raises(ConfigError, match="key 'lam' does not apply to sampler 'static'"):
        parse_arm("static:lam=1", base)
    with pytest.raises(ConfigError, match="not a valid float"):
        parse_arm("static:w=big", base)
    with pytest.raises(ConfigError, match="key=value"):
        parse_arm("adaptive:lam", base)
    cfg = Config()
    cfg.eval.arms = ["success_only", "static:w=0.05", "static:w=0.050"]
    with pytest.raises(ConfigError, match="more than once"):
        resolve_arms(cfg)
    with pytest.raises(ConfigError, match=r"eval\.metric must be one of success_once, success_at_end"):
        load_config(None, ["eval.metric=success_sometimes"])
    with pytest.raises(ConfigError, match=r"sampler\.kind must be one of"):
        load_config(None, ["sampler.kind=guided"])
    with pytest.raises(ConfigError, match=r"eval\.rnus"):
        load_config(None, ["eval.rnus=2"])
    loaded = load_config(None, ["eval.arms=[success_only,static:w=0.05,adaptive:lam=1]", "eval.runs=2"])
    assert [a.name for a in resolve_arms(loaded)] == ["success_only", "static:w=0.05", "adaptive:lam=1"]
    assert all(not a.sampler.fused_heads for a in resolve_arms(loaded))  # exact pairing


@pytest.mark.slow  # about 20 s idle; test_tasks_share_the_workers_and_give_the_same_episodes runs 2 workers
def test_results_do_not_depend_on_the_worker_count(setup):
    """Units (task, arm, run) spread over two spawned processes give the same episodes as one in-process worker."""
    cfg, policy, _ = setup
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, arms=["success_only", "static:w=0.5"]))
    alone = evaluate_arms(cfg, policy, progress=False)
    spread = evaluate_arms(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, workers=2,
                                                                             backend="processes")),
                           policy, progress=False)
    assert [r.arm for r in spread] == [r.arm for r in alone]
    for a, b in zip(alone, spread, strict=True):
        assert [(e.seed, e.extra["eval_run"]) for e in a.episodes] == [(e.seed, e.extra["eval_run"])
                                                                       for e in b.episodes]
        assert_same_episodes(a, b)
    with pytest.raises(ConfigError, match=r"eval\.backend"):
        dataclasses.replace(cfg.eval, workers=2, backend="mpi")
    with pytest.raises(ConfigError, match=r"eval\.backend=ray needs Ray eval actors"):  # no runner given
        evaluate_arms(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, workers=2, backend="ray")),
                      policy, progress=False)


TWO_TASKS = ["PushCube-v1", "PullCube-v1"]  # the same 35-number state: the fixture's policy acts on both


def two_tasks(cfg: Config, **eval_settings) -> Config:
    return dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, task=TWO_TASKS, paraphrase=True),
                               eval=dataclasses.replace(cfg.eval, **eval_settings))


def test_tasks_share_the_workers_and_give_the_same_episodes(setup, tmp_path):
    """The units of both tasks go to two spawned workers at once (one arm and one run per task still keep both
    busy), and the episodes and episodes.json are those of one in-process worker running task after task; an
    other_instruction arm reads the other task's instruction in the workers too."""
    cfg, policy, _ = setup
    cfg = two_tasks(cfg, runs=1, episodes=2, arms=["success_only", "success_only@other_instruction"])
    arms = resolve_arms(cfg)
    alone = evaluate_arms(cfg, policy, progress=False, arms=arms)
    calls = []

    def recording(cfg, policy, arms, units, workers, keep_snapshots):
        calls.append((list(units), workers))
        yield from process_units(cfg, policy, arms, units, workers, keep_snapshots)

    spread_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, workers=2, backend="processes"))
    spread = evaluate_arms(spread_cfg, policy, progress=False, arms=arms, runner=recording)
    assert calls == [([(t, a, 0) for t in TWO_TASKS for a in (0, 1)], 2)]  # one pool, task-major units
    assert [(r.task, r.arm.name) for r in spread] == [(r.task, r.arm.name) for r in alone] == [
        (t, a) for t in TWO_TASKS for a in ("success_only", "success_only@other_instruction")]
    for a, b in zip(alone, spread, strict=True):
        assert [(e.seed, e.extra["eval_run"]) for e in a.episodes] == [(e.seed, e.extra["eval_run"])
                                                                       for e in b.episodes]
        assert_same_episodes(a, b)
        assert [e.instruction for e in a.episodes] == [e.instruction for e in b.episodes]
    push_told = [e.instruction for e in spread[1].episodes]  # PushCube's episodes, told PullCube's phrasings
    assert push_told == [get_task("PullCube-v1").phrasing(e.seed) for e in spread[1].episodes]
    _, one = write_evaluation(cfg, alone, arms, "ckpt/step_0", tmp_path / "one")
    _, two = write_evaluation(spread_cfg, spread, arms, "ckpt/step_0", tmp_path / "two")
    assert one["episodes"].read_bytes() == two["episodes"].read_bytes()
    assert len(json.loads(one["episodes"].read_text())["episodes"]) == 8


def test_one_arm_and_one_run_on_two_tasks_is_two_units_for_two_workers():
    """The usual case (one arm, eval.runs=1) on a task list: a unit per task, so two workers both get one (the
    units of one task at a time would be one, and the second worker idle); more workers than units are not
    started."""
    cfg = Config()
    cfg.env.task = TWO_TASKS
    cfg.eval.runs = 1
    calls = []

    def recording(cfg, policy, arms, units, workers, keep_snapshots):
        calls.append((list(units), workers))
        for unit in units:
            yield unit, []

    for workers in (2, 5):
        cfg.eval.workers = workers
        results = evaluate_arms(cfg, torch.nn.Linear(1, 1), progress=False, runner=recording)
        assert [r.task for r in results] == TWO_TASKS
    assert calls == [([("PushCube-v1", 0, 0), ("PullCube-v1", 0, 0)], 2)] * 2
    assert task_units(["a", "b"], 2, 2) == [("a", 0, 0), ("a", 0, 1), ("a", 1, 0), ("a", 1, 1),
                                            ("b", 0, 0), ("b", 0, 1), ("b", 1, 0), ("b", 1, 1)]


def test_a_worker_keeps_one_env_open_and_builds_a_fresh_one_for_every_unit(monkeypatch):
    import afil_ray.eval.workers as workers

    open_envs: list[str] = []  # the tasks of the envs built and not closed yet
    built: list[str] = []

    class CountedEnv:
        def __init__(self, env_cfg):
            self.task = env_cfg.task
            open_envs.append(self.task)
            built.append(self.task)

        def close(self):
            open_envs.remove(self.task)

    ran = []
    monkeypatch.setattr(workers, "make_vec_env", CountedEnv)
    monkeypatch.setattr(workers, "run_episodes", lambda env, cfg, policy, arm, run, keep_snapshots: ran.append(
        (env.task, cfg.env.task, run, list(open_envs))) or [])
    cfg = Config()
    cfg.env.task = TWO_TASKS
    worker = workers.EvalWorker(cfg, torch.nn.Linear(1, 1))
    assert open_envs == []  # no env before a unit needs one
    arm = resolve_arms(cfg)[0]
    units = [("PushCube-v1", 0), ("PushCube-v1", 1), ("PullCube-v1", 0), ("PushCube-v1", 2)]
    for task, run in units:
        worker.run(task, arm, run)
    # each unit on its own task's env, with a cfg naming that task alone; never two envs open at once
    assert ran == [(task, task, run, [task]) for task, run in units]
    assert built == [task for task, _ in units]  # no unit inherits the simulator state an earlier one left
    worker.close()
    assert open_envs == []
    with pytest.raises(ConfigError, match="not one of"):
        worker.run("StackCube-v1", arm, 0)


@pytest.mark.timeout(1200)  # actor start-up is slow on a loaded 2-core machine
def test_ray_eval_actors_give_the_same_episodes(setup):
    import ray

    from afil_ray.driver import eval_runner

    cfg, policy, _ = setup
    # two tasks x two arms: four units on two actors, which switch task on the way
    cfg = two_tasks(cfg, arms=["success_only", "static:w=0.5"], runs=1, episodes=2)
    alone = evaluate_arms(cfg, policy, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = evaluate_arms(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, workers=2)), policy,
                               progress=False, runner=eval_runner)  # backend auto: Ray is initialised: actors
        assert [(r.task, r.arm) for r in on_ray] == [(r.task, r.arm) for r in alone]
        assert [r.task for r in on_ray] == [t for t in TWO_TASKS for _ in range(2)]
        for a, b in zip(alone, on_ray, strict=True):
            assert_same_episodes(a, b)
    finally:
        ray.shutdown()


def test_report_files(setup, tmp_path):
    cfg, policy, _ = setup
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, runs=1, episodes=2,
                                                            arms=["static:w=0.5", "success_only"]))
    arms = resolve_arms(cfg)
    results = evaluate_arms(cfg, policy, progress=False, arms=arms)
    report, paths = write_evaluation(cfg, results, arms, "ckpt/step_0", tmp_path / "out")
    assert report["reference_arm"] == "success_only" and report["metric"] == "success_once"
    for key in ("json", "md", "png", "episodes"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    md = paths["md"].read_text()
    assert "success_once" in md and "coincide" in md
    # the machine is recorded with the report, not in episodes.json (which is byte-identical across machines)
    assert json.loads(paths["json"].read_text())["machine"] == report["machine"] == machine_facts()
    assert "machine" not in paths["episodes"].read_text()
    records = json.loads(paths["episodes"].read_text())["episodes"]
    assert len(records) == 4 and {(r["arm"], r["seed"], r["run"]) for r in records} == set(
        itertools.product(["static:w=0.5", "success_only"], [700, 701], [0]))


def test_cli_eval(setup, capsys):
    cfg, _, path = setup
    args = ["eval", f"run_dir={cfg.run_dir}", f"eval.checkpoint={path}", "env.task=PullCube-v1", "env.num_envs=2",
            "env.max_episode_steps=6", "env.backend=cpu", "env.cpu_vectorization=loop", "sampler.steps=2",
            "sampler.execute_steps=4", "eval.seed_start=700", "eval.arms=[success_only,adaptive:lam=1]",
            "eval.metric=success_at_end", "--episodes", "2", "--runs", "1", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PullCube-v1 sampler=success_only: success " in out and "/2 = " in out
    assert "sampler=adaptive:lam=1: success" in out and "Metric: `success_at_end`" in out
    report_dir = next((Path(cfg.run_dir) / "eval").iterdir())
    assert report_dir.name.startswith(f"PullCube-v1-{path.name}-seeds700x2-runs1-arms")
    assert {p.name for p in report_dir.iterdir()} >= {"report.json", "report.md", "report.png", "episodes.json"}
    assert main(["eval", "eval.arms=[static:lam=1]"]) == 2  # a bad arm fails before any checkpoint is read
