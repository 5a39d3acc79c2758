"""One policy, many tasks: task lists in the config, phrasings, a VecEnv of several tasks, windows that carry their
own episode's instruction, the evaluation probes (blank cameras, another task's instruction, a held-out phrasing),
per-task and pooled reports, and the bad input of a task list."""

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
from afil_ray.envs.collector import EpisodeCollector
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.tasks import TASKS, TaskSpec, episode_instruction, get_task
from afil_ray.eval.arms import parse_arm, parse_arms
from afil_ray.eval.probes import blank_cameras, probe_inputs
from afil_ray.eval.protocol import POOLED, evaluate_arms, write_evaluation
from afil_ray.replay import ReplayStore
from afil_ray.replay.chunks import ChunkSampler
from afil_ray.replay.sampler import WindowSampler

FIVE = ["PushCube-v1", "PullCube-v1", "PickCube-v1", "StackCube-v1", "LiftPegUpright-v1"]


def test_env_task_takes_a_list_and_each_task_has_training_and_heldout_phrasings():
    cfg = load_config(None, [f"env.task=[{','.join(FIVE)}]"])
    assert cfg.env.tasks == FIVE and cfg.env.for_task("PickCube-v1").task == "PickCube-v1"
    assert load_config(None, ["env.task=PushCube-v1"]).env.tasks == ["PushCube-v1"]
    every_training = [p for t in FIVE for p in get_task(t).phrasings]
    every_heldout = [p for t in FIVE for p in get_task(t).heldout]
    assert len(set(every_training)) == len(every_training) == 15  # no phrasing names two tasks
    assert every_heldout and not set(every_heldout) & set(every_training)
    spec = get_task("PushCube-v1")
    assert [spec.phrasing(s) for s in range(4)] == [*spec.phrasings, spec.phrasings[0]]
    assert episode_instruction(False)(spec, 1) == spec.instruction  # env.paraphrase off: the first, always
    assert episode_instruction(True)(spec, 1) == spec.phrasings[1]
    for bad, says in (("env.task=[]", "non-empty list"), ("env.task=[PushCube-v1,PushCube-v1]", "more than once")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, [bad])


def test_a_multitask_env_runs_each_task_in_its_slots_and_episodes_read_their_own_instruction():
    cfg = EnvConfig(task=["PushCube-v1", "PullCube-v1"], obs_mode="rgb", camera_size=32, num_envs=1,
                    max_episode_steps=4, backend="cpu", cpu_vectorization="loop", paraphrase=True)
    with make_vec_env(cfg) as env:
        assert [t.env_id for t in env.slot_tasks] == ["PushCube-v1", "PullCube-v1"]
        assert env.num_envs == 2 and env.cameras == ("base_camera",)
        collector = EpisodeCollector(env, itertools.count(10), source="test", instruct=episode_instruction(True))
        obs = collector.reset()
        assert obs["state"].shape == (2, 28) and obs["rgb_base_camera"].shape == (2, 32, 32, 3)
        episodes = []
        while len(episodes) < 4:
            _, finished = collector.step(np.zeros((2, env.action_dim), np.float32))
            episodes += finished
        restored = env.restore(1, episodes[1].snapshots[0], 0)  # slot 1 is PullCube's env 0
        assert restored["state"].shape == (28,)
    for ep in episodes:
        assert ep.instruction == get_task(ep.task).phrasing(ep.seed)
    assert {ep.task for ep in episodes} == {"PushCube-v1", "PullCube-v1"}
    assert len({ep.instruction for ep in episodes}) >= 3  # seeds 10.. pick different phrasings


def test_a_task_list_whose_state_layouts_differ_is_one_line_naming_both():
    cfg = EnvConfig(task=["PushCube-v1", "PickCube-v1"], obs_mode="state", num_envs=1, backend="cpu",
                    cpu_vectorization="loop")
    with pytest.raises(ConfigError, match="PushCube-v1 and PickCube-v1 differ in state size"):
        make_vec_env(cfg)


def test_a_multitask_window_batch_carries_each_episodes_own_instruction(tmp_path, make_episode):
    store = ReplayStore(tmp_path / "store")
    said = {}
    for i, task in enumerate(["PushCube-v1", "PullCube-v1"] * 3):
        ep = dataclasses.replace(make_episode(task=task, seed=i, cameras=("base",)), outcome="failure",
                                 instruction=f"phrasing {i} of {task}",
                                 chunk_steps=[0, 4], chunks=np.full((2, 4, 3), i, np.float32))
        said[i] = ep.instruction
        store.write_episodes([ep])
    windows = WindowSampler(store, 4, tasks=["PushCube-v1", "PullCube-v1"], outcomes=["failure"], cameras=None)
    batch = windows.sample(64)
    seeds = (batch["state"][:, 0] // 1000).astype(int)  # build_episode: state = 1000 * seed + ...
    assert [batch["instruction"][j] for j in range(64)] == [said[s] for s in seeds]
    chunks = ChunkSampler(store, 4, tasks=["PushCube-v1", "PullCube-v1"], outcomes=["failure"], cameras=None)
    batch = chunks.sample(64)
    seeds = batch["action"][:, 0, 0].astype(int)  # each episode's chunks are filled with its seed
    assert list(batch["instruction"]) == [said[s] for s in seeds]
    assert set(batch["image_features" if "image_features" in batch else "images"]) == {"base"}


def test_probe_arms_parse_and_change_only_what_they_name():
    base = SamplerConfig()
    arm = parse_arm("success_only@blank_cameras", base)
    assert (arm.name, arm.title, arm.probe) == ("success_only@blank_cameras", "success only, blank cameras",
                                                "blank_cameras")
    assert parse_arm("static:w=0.1@heldout_phrasing", base).name == "static:w=0.1@heldout_phrasing"
    with pytest.raises(ConfigError, match="unknown probe 'blind'"):
        parse_arm("success_only@blind", base)
    assert len(parse_arms(["success_only", "success_only@other_instruction"], base)) == 2
    obs = {"state": np.ones((2, 3), np.float32), "rgb_base": np.full((2, 4, 4, 3), 9, np.uint8)}
    dark = blank_cameras(obs)
    assert not dark["rgb_base"].any() and np.array_equal(dark["state"], obs["state"]) and obs["rgb_base"].all()
    push, pull = get_task("PushCube-v1"), get_task("PullCube-v1")
    other, _ = probe_inputs("other_instruction", ("PushCube-v1", "PullCube-v1"), True)
    assert other(push, 1) == pull.phrasing(1) and other(pull, 2) == push.phrasing(2)
    heldout, shown = probe_inputs("heldout_phrasing", (), True)
    assert heldout(push, 0) in push.heldout and shown is None
    with pytest.raises(ConfigError, match="two or more"):
        probe_inputs("other_instruction", ("PushCube-v1",), True)[0](push, 0)


class RecordingPolicy(torch.nn.Module):
    """Zero actions; remembers what it was shown (did any image have a lit pixel) and told, per call."""

    noise_shape = (4, 8)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, bool]] = []

    def sample(self, obs, instructions, sampler, generator=None, noise=None):
        lit = bool(obs["rgb_base_camera"].any())
        self.seen += [(text, lit) for text in instructions]
        return np.zeros((len(instructions), 4, 8), np.float32), {}


@pytest.mark.slow  # ten rgb simulators built in turn: about a minute (the probes themselves are tested above)
def test_probe_arms_in_the_paired_protocol_per_task_and_pooled(tmp_path):
    cfg = load_config(None, [
        "env.task=[PushCube-v1,PullCube-v1]", "env.obs_mode=rgb", "env.camera_size=32", "env.num_envs=1",
        "env.max_episode_steps=2", "env.backend=cpu", "env.cpu_vectorization=loop", "env.paraphrase=true",
        "eval.episodes=2", "eval.runs=1", f"run_dir={tmp_path}",
        "eval.arms=[success_only,success_only@blank_cameras,success_only@other_instruction,"
        "success_only@heldout_phrasing]"])
    arms = parse_arms(list(cfg.eval.arms), cfg.sampler)
    told: dict[str, set[tuple[str, bool]]] = {}
    for arm in arms:  # one arm at a time, so each arm's inputs are known apart
        policy = RecordingPolicy()
        results = evaluate_arms(cfg, policy, progress=False, arms=[arm])
        assert [r.task for r in results] == ["PushCube-v1", "PullCube-v1"]
        told[arm.probe] = set(policy.seen)
    push, pull = get_task("PushCube-v1"), get_task("PullCube-v1")
    seeds = (100000, 100001)
    own = {p for t in (push, pull) for p in t.phrasings}
    assert {text for text, _ in told[""]} <= own and all(lit for _, lit in told[""])
    assert all(not lit for _, lit in told["blank_cameras"])
    assert {text for text, _ in told["other_instruction"]} >= {pull.phrasing(s) for s in seeds}
    assert {text for text, _ in told["heldout_phrasing"]} <= set(push.heldout) | set(pull.heldout)
    results = evaluate_arms(cfg, RecordingPolicy(), progress=False, arms=arms)
    report, paths = write_evaluation(cfg, results, arms, tmp_path / "ckpt")
    assert list(report["tasks"]) == ["PushCube-v1", "PullCube-v1", POOLED]
    pooled = report["tasks"][POOLED]["arms"]
    assert [a["episodes"] for a in pooled] == [4, 4, 4, 4]
    assert "2tasks-" in paths["md"].parent.name


def test_a_task_list_that_mixes_action_spaces_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "PushT-v1", TaskSpec("PushT-v1", "push the T onto its outline", 100))
    code = main(["eval", f"run_dir={tmp_path / 'run'}", "env.task=[PushCube-v1,PushT-v1]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "env.task mixes action spaces: PushCube-v1 acts with 8 dims" in err and "PushT-v1 with 7 dims" in err
    assert not Path(tmp_path / "run").exists()


@pytest.mark.slow  # about 15 s idle (two tasks rendered); the single-task camera check stays in the suite
def test_a_task_list_whose_cameras_differ_is_one_line_naming_the_shared_ones(capsys, tmp_path):
    code = main(["eval", f"run_dir={tmp_path / 'run'}", "env.task=[PushCube-v1,StackCube-v1]", "env.obs_mode=rgb",
                 "env.camera_size=32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "PushCube-v1 has cameras base_camera and StackCube-v1 has base_camera, hand_camera" in err
    assert "set env.cameras to ones they share (base_camera)" in err


def test_config_object_accepts_a_task_list_in_place(tmp_path):
    cfg = Config()
    cfg.env.task = ["PushCube-v1", "PullCube-v1"]
    assert cfg.env.tasks == ["PushCube-v1", "PullCube-v1"]
    with pytest.raises(ConfigError):
        cfg.env.task = []
    assert cfg.env.tasks == ["PushCube-v1", "PullCube-v1"]  # a rejected assignment keeps the old value


def test_a_rollout_worker_harvests_every_task_of_a_list_with_its_own_instruction(tmp_path):
    from afil_ray.loop.board import LocalWeightSource, WeightBoard
    from afil_ray.loop.harvest import RolloutWorker
    from tests.loop_fixtures import loop_config, make_start_checkpoint

    cfg = loop_config(tmp_path)
    cfg.env.num_envs = 1
    make_start_checkpoint(cfg)  # PullCube's dims: PushCube's state has the same 35 numbers
    cfg.env.task, cfg.env.paraphrase = ["PushCube-v1", "PullCube-v1"], True
    worker = RolloutWorker(cfg, 0, LocalWeightSource(WeightBoard()), seed_start=5_000_000)
    try:
        tasks: set[str] = set()
        for _ in range(10):
            tasks |= {e.task for e in worker.run(2.0).episodes}
            if len(tasks) == 2:
                break
    finally:
        worker.close()
    stored = ReplayStore(cfg.replay.root).read_episodes()
    assert {e.task for e in stored} == {"PushCube-v1", "PullCube-v1"}
    assert all(e.instruction == get_task(e.task).phrasing(e.seed) for e in stored)


@pytest.mark.timeout(900)
def test_reproduce_on_a_task_list_gives_per_task_and_pooled_tables(tmp_path, capsys):
    from tests.test_reproduce import tiny_args

    args = [a for a in tiny_args(tmp_path) if not a.startswith("env.task=")]
    args += ["env.task=[PushCube-v1,PullCube-v1]", "env.paraphrase=true", "reproduce.lams=[1.0]"]
    assert main(["reproduce", "--quiet", *args, "reproduce.ood_tasks=[PullCubeDistractors-v1]"]) == 2
    assert "config error: reproduce.ood_tasks: the studies run on one task" in capsys.readouterr().err
    assert main(["reproduce", "--quiet", *args]) == 0
    capsys.readouterr()
    root = tmp_path / "run"
    store = ReplayStore(str(tmp_path / "replay"))
    for task in ("PushCube-v1", "PullCube-v1"):
        assert len(store.read_episodes(task=task, outcome="demo")) == 3
        assert store.read_episodes(task=task, outcome="failure")  # each task harvested
    report = json.loads((root / "results" / "report.json").read_text())
    assert list(report["tasks"]) == ["PushCube-v1", "PullCube-v1", POOLED]
    arms = ["success only", "+ failure correction", "static FIL w=0.05", "adaptive FIL λ=1"]
    for task, n in (("PushCube-v1", 2), ("PullCube-v1", 2), (POOLED, 4)):
        assert [a["arm"] for a in report["tasks"][task]["arms"]] == arms
        assert all(a["episodes"] == n for a in report["tasks"][task]["arms"])
    summary = (root / "results" / "summary.md").read_text()
    assert "### PushCube-v1" in summary and f"### {POOLED}" in summary
    assert "The paper's numbers for PullCube-v1" in (root / "results" / "report.md").read_text()
    assert main(["reproduce", "--quiet", *args]) == 0  # cached: the tables rebuilt from stored episodes
    assert "running" not in capsys.readouterr().out


def test_an_image_policy_on_observations_without_its_camera_is_one_line_not_a_blind_run(capsys, tmp_path):
    from afil_ray.config import PolicyConfig
    from afil_ray.policy.checkpoint import save_policy
    from afil_ray.policy.model import DAGPolicy

    policy = DAGPolicy.from_config(PolicyConfig(hidden_size=32, num_layers=1, head_width=32, head_depth=1,
                                                horizon=4, image_size=32), 28, 8, ["base_camera"])
    rng = np.random.default_rng(0)
    policy.fit_normalizer(rng.standard_normal((16, 28)).astype(np.float32),
                          rng.uniform(-1, 1, (16, 8)).astype(np.float32))
    save_policy(policy, tmp_path / "ckpt")
    code = main(["eval", f"run_dir={tmp_path / 'run'}", f"eval.checkpoint={tmp_path / 'ckpt'}",
                 "env.task=PullCube-v1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "the policy acts on state 28, action 8, cameras base_camera; PullCube-v1 with env.obs_mode=state" in err
    with pytest.raises(KeyError, match="camera 'base_camera'"):  # and the policy itself never runs blind
        policy.sample({"state": np.zeros((1, 28), np.float32)}, ["pull the cube"], SamplerConfig(steps=2))


@pytest.mark.slow  # five process-backed simulators: about 30 s; keeps the default suite under 15 min
def test_a_multitask_env_of_process_backed_envs_steps_every_task_at_once_and_matches_the_loop():
    def rollout(vectorization: str) -> list[np.ndarray]:
        cfg = EnvConfig(task=["PushCube-v1", "PullCube-v1"], obs_mode="rgb", camera_size=32, num_envs=1,
                        max_episode_steps=50, backend="cpu", cpu_vectorization=vectorization, snapshot_every=0)
        actions = np.random.default_rng(0).uniform(-1, 1, (6, 2, 8)).astype(np.float32)
        with make_vec_env(cfg) as env:
            obs, _ = env.reset([3, 4])
            out = [obs["state"]]
            for a in actions:
                out.append(env.step(a).obs["state"])
        return out

    for loop_state, async_state in zip(rollout("loop"), rollout("async"), strict=True):
        np.testing.assert_allclose(loop_state, async_state, rtol=1e-5, atol=1e-6)
