"""Bad input a user meets: one clear line naming the key, the value and what is allowed, a non-zero exit, nothing
written (no store folder, no run directory) and no Ray started. In process, through ``afil_ray.cli.main``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import ray

from afil_ray.cli import main
from afil_ray.config import Config, ConfigError, load_config
from afil_ray.envs.tasks import TASKS, TaskSpec


def _run(capsys, tmp_path: Path, command: str, *args: str) -> tuple[int, str]:
    """``afil-ray command`` on a fresh run_dir and store under ``tmp_path``; (exit code, the one stderr line)."""
    root, run_dir = tmp_path / "replay", tmp_path / "run"
    code = main([command, f"run_dir={run_dir}", f"replay.root={root}", *args])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert not root.exists(), sorted(root.rglob("*"))  # nothing written to the store, not even a folder
    assert not run_dir.exists(), sorted(run_dir.rglob("*"))
    assert not ray.is_initialized()
    return code, err.strip()


@pytest.mark.parametrize(("command", "args", "key"), [
    ("demos", ["--task", "FooBar-v1", "--num", "2"], "--task"),
    ("train", ["env.task=FooBar-v1"], "env.task"),
    ("train", ["data.tasks=[PullCube-v1,FooBar-v1]"], "data.tasks"),
    ("run", ["env.task=FooBar-v1"], "env.task"),
    ("reproduce", ["reproduce.ood_tasks=[FooBar-v1]"], "reproduce.ood_tasks"),
])
def test_an_unregistered_task_is_one_line_before_anything_starts(capsys, tmp_path, command, args, key):
    code, line = _run(capsys, tmp_path, command, *args)
    assert code == 2
    assert line.startswith(f"afil-ray: config error: {key}: unknown task 'FooBar-v1'; registered tasks: ")
    assert "PullCube-v1" in line


def test_a_simulator_task_afil_ray_does_not_register_says_so(capsys, tmp_path):
    _, line = _run(capsys, tmp_path, "demos", "--task", "PickSingleYCB-v1")
    assert "unknown task 'PickSingleYCB-v1' (ManiSkill has PickSingleYCB-v1" in line and "register_task" in line


def test_a_registered_task_whose_assets_are_missing_is_one_line(capsys, tmp_path, monkeypatch):
    from afil_ray.envs.maniskill import AssetsMissingError, check_assets

    try:
        check_assets("PickSingleYCB-v1")
    except AssetsMissingError:
        pass
    else:
        pytest.skip("the YCB assets are downloaded on this machine")
    monkeypatch.setitem(TASKS, "PickSingleYCB-v1", TaskSpec("PickSingleYCB-v1", "pick it up", 100,
                                                            planner="PickCube-v1"))
    code, line = _run(capsys, tmp_path, "demos", "--task", "PickSingleYCB-v1", "--num", "2")
    assert code == 1
    assert line.startswith("afil-ray: --task: task PickSingleYCB-v1 needs ManiSkill assets that are not downloaded")


def test_a_task_without_a_planner_gets_no_demo_workers(capsys, tmp_path):
    _, line = _run(capsys, tmp_path, "demos", "--task", "LiftThickPegUpright-v1")
    assert "--task: task LiftThickPegUpright-v1 has no motion planner" in line


@pytest.mark.parametrize(("command", "args", "message"), [
    ("train", ["train.steps=-5"], "train.steps must be >= 1, got -5"),
    ("train", ["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
    ("demos", ["--num", "-1"], "demos.num must be >= 1, got -1"),
    ("run", ["loop.duration_s=-5"], "loop.duration_s must be > 0, got -5.0"),
    ("run", ["loop.num_rollout_actors=0"], "loop.num_rollout_actors must be >= 1, got 0"),
])
def test_a_bad_number_is_one_line(capsys, tmp_path, command, args, message):
    code, line = _run(capsys, tmp_path, command, *args)
    assert code == 2
    assert line == f"afil-ray: config error: {message}"


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize("where", ["proc", "file"])
def test_an_unwritable_run_dir_is_one_line_before_ray(capsys, tmp_path, command, where):
    if where == "proc":
        if not Path("/proc").is_dir():
            pytest.skip("no /proc")
        bad, reason = "/proc/x", "cannot create a directory in /proc"
    else:
        (tmp_path / "a_file").write_text("")
        bad, reason = str(tmp_path / "a_file" / "x"), f"{tmp_path / 'a_file'} is not a directory"
    code, line = _run(capsys, tmp_path, command, f"run_dir={bad}", f"loop.init_from={tmp_path}")
    assert code == 2
    assert line.startswith(f"afil-ray: config error: run_dir={bad} is not writable: {reason}")


def test_an_unwritable_store_is_one_line(capsys, tmp_path):
    _, line = _run(capsys, tmp_path, "demos", "replay.root=/proc/x/replay", "--num", "1")
    assert line.startswith("afil-ray: config error: replay.root=/proc/x/replay is not writable")


def test_an_empty_store_is_one_line(capsys, tmp_path):
    code, line = _run(capsys, tmp_path, "train")
    assert code == 2
    assert f"replay.root={tmp_path / 'replay'} holds no success windows for tasks PullCube-v1" in line


@pytest.mark.parametrize(("item", "message"), [
    ("env.num_envs=0", "env.num_envs must be >= 1"),
    ("env.max_episode_steps=0", r"env.max_episode_steps must be >= 1 or null \(the task's limit\)"),
    ("env.obs_mode=depth", "env.obs_mode must be one of state, rgb"),
    ("env.robot=fetch", "env.robot must be one of panda, panda_wristcam, got 'fetch'"),
    ("replay.episodes_per_shard=0", "replay.episodes_per_shard must be >= 1"),
    ("demos.workers=0", "demos.workers must be >= 1"),
    ("correct.fraction=1.5", r"correct.fraction must be in \[0.0, 1.0\]"),
    ("policy.horizon=0", "policy.horizon must be >= 1"),
    ("sampler.execute_steps=0", "sampler.execute_steps must be >= 1"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.ema_decay=1", r"train.ema_decay must be in \[0.0, 1.0\)"),
    ("data.failure_window=-1", "data.failure_window must be >= 0"),
    ("eval.workers=0", "eval.workers must be >= 1"),
    ("loop.round_s=0", "loop.round_s must be > 0"),
    ("loop.eval_every_s=-1", "loop.eval_every_s must be >= 0"),
    ("detect.combiner=mean", "detect.combiner must be one of logistic, boosted, got 'mean'"),
    ("reproduce.harvest_runs=0", "reproduce.harvest_runs must be >= 1"),
    ("reproduce.lams=[1.0,-2.0]", "reproduce.lams must be >= 0.0, got -2.0"),
    ("seed=-1", "seed must be >= 0"),
])
def test_the_schema_bounds_its_numbers(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [item])


def test_documented_zeros_stay_allowed():
    cfg = load_config(None, ["env.snapshot_every=0", "train.ema_decay=0", "train.num_threads=0",
                             "train.warmup_steps=0", "data.failure_window=0", "loop.eval_every_s=0",
                             "loop.weight_poll_s=0", "loop.max_restarts=0", "reproduce.online_s=0",
                             "sampler.w=0", "policy.action_clip=null", "correct.max_failures=null"])
    assert cfg.train.ema_decay == 0 and cfg.loop.eval_every_s == 0


def test_every_way_of_building_or_changing_a_section_is_checked():
    """``dataclasses.replace`` and a later assignment (a script setting ``cfg.loop.num_rollout_actors``) run the
    same checks as a YAML file or an override; a rejected assignment leaves the old value."""
    cfg = Config()
    with pytest.raises(ConfigError, match=r"loop\.num_rollout_actors must be >= 1, got 0"):
        dataclasses.replace(cfg.loop, num_rollout_actors=0)
    with pytest.raises(ConfigError, match=r"loop\.num_rollout_actors must be >= 1, got 0"):
        cfg.loop.num_rollout_actors = 0
    assert cfg.loop.num_rollout_actors == 2
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        cfg.seed = -1
    cfg.loop.num_rollout_actors = 3  # a good value is simply set
    assert cfg.loop.num_rollout_actors == 3


def test_replay_stats_of_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["replay", "stats", "--verify", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"afil-ray: no replay store at {tmp_path / 'nothing'} (no such directory)"]
    assert not (tmp_path / "nothing").exists()


# the demos command's check (about 30 s idle: the first rendering env of the run) is the same as eval's
@pytest.mark.parametrize("command", [pytest.param("demos", marks=pytest.mark.slow), "eval"])
def test_a_camera_the_task_does_not_have_is_one_line(capsys, tmp_path, command):
    code, line = _run(capsys, tmp_path, command, "env.obs_mode=rgb", "env.camera_size=32", "env.cameras=[wrist]")
    assert code == 2
    assert line == ("afil-ray: config error: env.cameras: task PullCube-v1 has no camera 'wrist'; its cameras are "
                    "base_camera")


def test_cameras_without_rgb_observations_are_one_line(capsys, tmp_path):
    code, line = _run(capsys, tmp_path, "demos", "env.cameras=[base_camera]")
    assert code == 2 and "env.cameras=['base_camera'] needs env.obs_mode=rgb" in line


def test_gpu_physics_without_sapiens_gpu_library_names_the_file(tmp_path, monkeypatch):
    """SAPIEN fetches libPhysXGpu_64.so from GitHub on first GPU use; an offline node gets the file and its source."""
    import afil_ray.envs.maniskill as maniskill
    from afil_ray.config import EnvConfig
    from afil_ray.envs.base import SimulatorError
    from afil_ray.envs.tasks import get_task

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    monkeypatch.setattr(maniskill.gym, "make", offline)
    with pytest.raises(SimulatorError) as e:
        maniskill._make_maniskill(get_task("PullCube-v1"), EnvConfig(task="PullCube-v1"), 4, "physx_cuda")
    message = str(e.value)
    assert "\n" not in message and "libPhysXGpu_64.so" in message and str(tmp_path / ".sapien" / "physx") in message
    assert "releases/download/" in message and "env.backend=cpu" in message
    with pytest.raises(SimulatorError, match=r"^cannot create ManiSkill task PullCube-v1 \(physx_cpu"):
        maniskill._make_maniskill(get_task("PullCube-v1"), EnvConfig(task="PullCube-v1"), 1, "physx_cpu")
