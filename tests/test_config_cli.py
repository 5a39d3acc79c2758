"""Config validation and the command line, end to end on a real (small) store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afil_ray.cli import main
from afil_ray.config import ConfigError, load_config, save_resolved
from afil_ray.replay import ReplayStore

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  tsk: StackCube-v1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: bad config key 'env\.tsk'.*Did you mean: 'task'"):
        load_config(bad)


def test_wrong_type_and_bad_overrides_are_errors():
    with pytest.raises(ConfigError, match=r"env\.num_envs=many.*bad config key 'env\.num_envs'"):
        load_config(None, ["env.num_envs=many"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["env.task"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such/file.yaml")


def test_one_key_per_fact_and_sections_check_their_own_values(tmp_path):
    """The store has one key (replay.root): the old data.store is an error that says what to use, in a file or on
    the command line; each section rejects a value outside its choices when it is built, wherever it comes from."""
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  store: runs/replay\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: 'data\.store' is no longer a key: set 'replay\.root'"):
        load_config(old)
    with pytest.raises(ConfigError, match=r"override 'data\.store=x': 'data\.store' is no longer a key"):
        load_config(None, ["data.store=x"])
    for item, match in (("sampler.kind=guided", r"sampler\.kind must be one of success_only, static, adaptive"),
                        ("train.mode=both", r"train\.mode must be one of"),
                        ("train.balance=true", r"train\.balance must be one of none, tasks, partitions"),
                        ("loop.learner_mode=all", r"loop\.learner_mode must be one of"),
                        ("policy.failure_head_init=zero", r"policy\.failure_head_init must be one of success"),
                        ("eval.backend=mpi", r"eval\.backend must be one of auto, processes, ray"),
                        ("sampler.steps=0", r"sampler\.steps must be >= 1")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [item])
    assert main(["train", "sampler.kind=guided"]) == 2  # one line from the CLI, before anything runs


def test_a_mapping_override_replaces_the_mapping():
    shipped = load_config("configs/reproduce.yaml")
    assert shipped.reproduce.variants  # the study is on by default
    assert load_config("configs/reproduce.yaml", ["reproduce.variants={}"]).reproduce.variants == {}
    one = load_config("configs/reproduce.yaml", ["reproduce.variants={w: [data.failure_window=8]}"])
    assert one.reproduce.variants == {"w": ["data.failure_window=8"]}
    # schema sections still merge key by key, and bad values name the key
    assert load_config("configs/reproduce.yaml", ["env={task: PullCube-v1}"]).env.control_mode == \
        shipped.env.control_mode
    with pytest.raises(ConfigError, match=r"bad value for 'reproduce\.variants'"):
        load_config(None, ["reproduce.variants={w: 3}"])


def test_overrides_win_and_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["env.task=StackCube-v1", "demos.max_length=99"])
    assert cfg.env.task == "StackCube-v1" and cfg.demos.max_length == 99
    saved = save_resolved(cfg, tmp_path / "run")
    assert load_config(saved) == cfg


def test_demos_then_stats_from_the_command_line(tmp_path, capsys):
    store = tmp_path / "store"
    args = ["demos", "--task", "PullCube-v1", "--num", "2", "--workers", "1", "--quiet",
            f"replay.root={store}", "env.snapshot_every=20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PullCube-v1: 2/2 demos in the store" in out
    runs = list((store / "_meta" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "config.yaml").is_file() and (runs[0] / "report.json").is_file()
    assert load_config(runs[0] / "config.yaml").replay.root == str(store)
    # the demos carry the invocation's run id, which also names its record under _meta/runs
    [run_id] = {ep.run_id for ep in ReplayStore(store).read_episodes()}
    assert "-demos-" in run_id and runs[0].name == f"{run_id}-PullCube-v1"
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["machine"]["versions"]["mani_skill"] and "logical_cores" in report["machine"]

    assert main(["replay", "stats", str(store)]) == 0
    table = capsys.readouterr().out
    assert "PullCube-v1" in table and "demo" in table
    assert main(["replay", "stats", "--verify", str(store)]) == 0  # a clean store says so
    assert "verified 1 shards: every one reads back intact" in capsys.readouterr().out

    # a corrupt shard is reported with its path and moved aside; the rest still counts; the exit code tells
    shard = next(store.glob("task=PullCube-v1/outcome=demo/*.arrow"))
    shard.write_bytes(shard.read_bytes()[:200])
    assert main(["replay", "stats", "--verify", str(store)]) == 1
    captured = capsys.readouterr()
    assert "verified 1 shards: 1 corrupt (quarantined), 0 readable" in captured.out
    assert shard.name in captured.err and "quarantined" in captured.err
    assert (store / "_quarantine").exists()


def test_config_error_exit_code_and_message(tmp_path, capsys):
    assert main(["demos", f"replay.root={tmp_path}", "demos.nmu=3"]) == 2
    assert "bad config key 'demos.nmu'" in capsys.readouterr().err
