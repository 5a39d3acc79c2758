"""``afil-ray explain`` on a tiny reproduction: it trains the detector-explainer on the detector's store on first
use, answers for the episodes asked, writes the answers into the replay store beside them (and keeps the trained
explainer for the next call); a missing episode or stage is one line."""

from __future__ import annotations

import json

import numpy as np
import torch

from afil_ray.cli import main
from afil_ray.config import EXPLAINER_RECIPES, PolicyConfig
from afil_ray.detect.armor import RECIPES
from afil_ray.detect.causes import TAXONOMY
from afil_ray.detect.explain import read_explanations
from afil_ray.policy import DAGPolicy
from afil_ray.policy.checkpoint import save_policy
from afil_ray.replay import ReplayStore
from afil_ray.replay.episode import Episode

STATE_DIM = max(s.stop for s in TAXONOMY["PullCube-v1"].layout.values())


def _episodes(n: int, rng: np.random.Generator, source: str, task: str = "PullCube-v1") -> list[Episode]:
    out = []
    for i in range(n):
        won, length = i % 2 == 0, 20
        out.append(Episode(task=task, outcome="success" if won else "failure", source=source,
                           state=rng.normal(0, 0.1, (length, STATE_DIM)).astype("f4"),
                           action=np.zeros((length, 8), np.float32), reward=np.zeros(length, np.float32),
                           step_success=(np.arange(length) == length - 1) & won, terminated=np.zeros(length, bool),
                           truncated=np.zeros(length, bool), final_state=np.zeros(STATE_DIM, np.float32),
                           instruction="pull the cube", seed=1000 + i))
    return out


def test_recipes_are_the_configs():
    assert tuple(RECIPES) == EXPLAINER_RECIPES


def _tiny_run(tmp_path, rng: np.random.Generator):
    torch.manual_seed(0)
    cfg = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=10, horizon=4, head_width=32,
                       head_depth=1)
    policy = DAGPolicy.from_config(cfg, STATE_DIM, 8)
    policy.fit_normalizer(rng.normal(0, 1, (64, STATE_DIM)), rng.uniform(-1, 1, (64, 8)))
    run = tmp_path / "run"
    save_policy(policy, run / "ckpt")
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "success_only.json").write_text(json.dumps({"outputs": {"checkpoint": str(run / "ckpt")}}))
    return run


def test_afil_ray_explain_on_a_tiny_store(tmp_path, capsys):
    rng = np.random.default_rng(0)
    run = _tiny_run(tmp_path, rng)
    ReplayStore(run / "detect" / "replay").write_episodes(_episodes(24, rng, "detect:success_only"))
    asked = _episodes(6, rng, "harvest")
    ReplayStore(run / "replay").write_episodes(asked)
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {run}\nreplay:\n  root: {run / 'replay'}\nenv:\n  task: PullCube-v1\n"
                      "detect:\n  collect_policies: [success_only]\n  frames: 4\n  warmup_epochs: 2\n"
                      "  online_epochs: 1\n")
    assert main(["explain", "--config", str(config), "--quiet", "--episode", "nope"]) == 2
    assert "--episode: no episode nope" in capsys.readouterr().err
    assert main(["explain", "--config", str(config), "--quiet", "--outcome", "failure"]) == 0
    printed = capsys.readouterr().out
    assert "3 answers written" in printed
    table = read_explanations(run / "replay")
    failures = {e.episode_id for e in asked if not e.success}
    assert set(table.column("episode_id").to_pylist()) == failures
    assert all(0.0 <= p <= 1.0 for p in table.column("failure_probability").to_pylist())
    assert (run / "detect" / "explainer" / "explainer.json").is_file()
    spec = json.loads((run / "detect" / "explainer" / "explainer.json").read_text())
    assert (spec["recipe"], spec["episodes"]) == ("armor", 24)
    # a second call answers with the kept explainer; another recipe asked of it is a clear error
    assert main(["explain", "--config", str(config), "--quiet", "--episode", asked[0].episode_id]) == 0
    assert main(["explain", "--config", str(config), "--quiet", "detect.recipe=multitask"]) == 2
    assert "was trained with recipe 'armor'" in capsys.readouterr().err


def test_the_cross_task_study_trains_on_the_other_tasks_and_measures_on_the_named_one(tmp_path, capsys):
    rng = np.random.default_rng(1)
    run = _tiny_run(tmp_path, rng)
    ReplayStore(run / "detect" / "replay").write_episodes(
        _episodes(16, rng, "detect:success_only", "PushCube-v1") + _episodes(8, rng, "detect:success_only"))
    config = tmp_path / "config.yaml"
    config.write_text(f"run_dir: {run}\nenv:\n  task: [PushCube-v1, PullCube-v1]\n"
                      "detect:\n  collect_policies: [success_only]\n  frames: 4\n  warmup_epochs: 2\n"
                      "  online_epochs: 1\n  transfer_to: PullCube-v1\n  study_recipes: [multitask]\n"
                      "  study_ratios: [2.0]\n")
    assert main(["explain", "--config", str(config), "--quiet", "--study"]) == 0
    result = json.loads((run / "detect" / "explain.json").read_text())
    assert result["transfer"] == {"train_tasks": ["PushCube-v1"], "test_task": "PullCube-v1"}
    assert (result["train"]["episodes"], result["test"]["episodes"]) == (16, 8)
    assert sum(result["test"]["causes"].values()) == 8  # what a failure-cause accuracy reads against
    assert result["test"]["failures"] == 8 - result["test"]["causes"].get("success", 0)
    assert "PullCube-v1, a task it never saw" in (run / "detect" / "explain.md").read_text()
    # each row is kept as it is measured: a second call reads it back instead of training again
    row_file = run / "detect" / "explain_rows" / "multitask@2.json"
    kept = json.loads(row_file.read_text())
    kept["row"]["detection_accuracy"] = -1.0
    row_file.write_text(json.dumps(kept))
    assert main(["explain", "--config", str(config), "--quiet", "--study"]) == 0
    assert json.loads((run / "detect" / "explain.json").read_text())["rows"][0]["detection_accuracy"] == -1.0
    capsys.readouterr()
    assert main(["explain", "--config", str(config), "--quiet", "--study", "detect.transfer_to=StackCube-v1"]) == 2
    assert "detect.transfer_to='StackCube-v1' must be one of several tasks" in capsys.readouterr().err
