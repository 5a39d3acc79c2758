"""The trainer end to end on a small synthetic store: modes, TensorBoard, checkpoints, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from afil_ray.config import Config, ConfigError, load_config
from afil_ray.policy.checkpoint import CheckpointError, load_policy
from afil_ray.policy.loading import latest_checkpoint
from afil_ray.provenance import machine_facts
from afil_ray.replay.store import ReplayStore
from afil_ray.train import Trainer

from conftest import build_episode

TASK = "PullCube-v1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    eps = [build_episode(task=TASK, outcome="demo", length=20, seed=i) for i in range(6)]
    for i in range(4):  # failures as policy rollouts record them: with the chunk sampled at each re-planning step
        ep = build_episode(task=TASK, outcome="failure", length=20, seed=100 + i)
        ep.chunk_steps = [0, 8, 16]
        ep.chunks = np.stack([ep.action[[min(t + k, 19) for k in range(4)]] for t in ep.chunk_steps])
        eps.append(ep)
    ReplayStore(root).write_episodes(eps)
    return root


def _cfg(store, run_dir, **train) -> Config:
    cfg = Config(run_dir=str(run_dir))
    cfg.env.task = TASK
    cfg.replay.root = str(store)
    cfg.policy.hidden_size, cfg.policy.head_width, cfg.policy.horizon = 32, 32, 4
    cfg.policy.num_layers, cfg.policy.head_depth = 1, 1
    cfg.train.batch_size, cfg.train.warmup_steps, cfg.train.log_every = 8, 2, 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_success_training_logs_checkpoints_and_resumes(store, tmp_path):
    cfg = _cfg(store, tmp_path / "run", steps=6, checkpoint_every=3)
    trainer = Trainer(cfg, progress=False)
    final = trainer.run()
    assert final.name == "step_00000006" and latest_checkpoint(cfg.run_dir) == final
    assert json.loads((final / "trainer.json").read_text())["machine"] == machine_facts()  # where it was made
    assert (tmp_path / "run" / "config.yaml").is_file()
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"losses/success_head", "train/grad_norm", "time/samples_per_s"} <= set(tags)
    assert [e.step for e in events.Scalars("losses/success_head")] == [2, 4, 6]

    # a new trainer on the same run_dir resumes from step 6 with the same weights and optimizer state
    cfg.train.steps = 8
    resumed = Trainer(cfg, progress=False)
    assert resumed.step == 6
    for a, b in zip(trainer.policy.state_dict().values(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b.cpu())
    assert resumed.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()
    # checkpoints hold the moving average (what eval and the loop act with); resuming restores both
    saved = load_policy(latest_checkpoint(cfg.run_dir)).state_dict()
    for key, value in resumed.inference_policy.state_dict().items():
        assert torch.equal(value.cpu(), saved[key]), key
    assert not torch.equal(saved["success_head.action_out.weight"],
                           resumed.policy.state_dict()["success_head.action_out.weight"])
    assert int(resumed.ema.n_averaged) == 6
    assert resumed.run().name == "step_00000008"


def test_failure_head_mode_trains_only_the_failure_head(store, tmp_path):
    base = Trainer(_cfg(store, tmp_path / "base", steps=2), progress=False).run()
    cfg = _cfg(store, tmp_path / "fail", steps=3, mode="failure_head", init_from=str(base))
    trainer = Trainer(cfg, progress=False)
    trained = load_policy(base)
    # the failure head starts from the *trained* success head, not the untrained copy stored with it
    assert torch.equal(trainer.policy.failure_head.action_out.weight, trained.success_head.action_out.weight)
    assert not torch.equal(trained.failure_head.action_out.weight, trained.success_head.action_out.weight)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.run()
    after = trainer.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("failure_head.") for k in changed), sorted(changed)[:5]
    assert load_policy(latest_checkpoint(cfg.run_dir)) is not None


def test_bad_inputs(store, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.mode must be one of success_only, failure_head, joint"):
        load_config(None, ["train.mode=both"])  # the section checks its own values, before any trainer exists
    with pytest.raises(CheckpointError):
        Trainer(_cfg(store, tmp_path / "b", mode="failure_head", init_from=str(tmp_path / "nope")), progress=False)
    with pytest.raises(ConfigError, match="holds no success windows"):
        cfg = _cfg(store, tmp_path / "c")
        cfg.env.task = "StackCube-v1"
        Trainer(cfg, progress=False)


def test_random_failure_head_init_is_fresh_and_seeded(store, tmp_path):
    base = Trainer(_cfg(store, tmp_path / "base", steps=2), progress=False).run()
    trained = load_policy(base)
    heads = []
    for name in ("r1", "r2"):
        cfg = _cfg(store, tmp_path / name, steps=1, mode="failure_head", init_from=str(base))
        cfg.policy.failure_head_init = "random"
        heads.append(Trainer(cfg, progress=False).policy.failure_head.action_out.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])  # seeded by cfg.seed
    assert not torch.equal(heads[0], trained.success_head.action_out.weight)
    assert not torch.equal(heads[0], trained.failure_head.action_out.weight)


def test_failure_window_keeps_the_chunks_after_the_correction_restore_point(tmp_path):
    from afil_ray.replay.chunks import ChunkSampler

    root = tmp_path / "store"
    failures = []
    for i in range(3):
        ep = build_episode(task=TASK, outcome="failure", length=40, seed=200 + i)
        ep.chunk_steps = [0, 8, 16, 24, 32]
        ep.chunks = np.stack([ep.action[[min(t + k, 39) for k in range(4)]] for t in ep.chunk_steps])
        failures.append(ep)
    fix = build_episode(task=TASK, outcome="corrected", length=30, seed=200)
    fix.parent_episode_id, fix.extra = failures[0].episode_id, {"restore_step": 16}
    ReplayStore(root).write_episodes([*failures, fix])
    store = ReplayStore(root)
    whole = ChunkSampler(store, 4, tasks=[TASK], outcomes=["failure"])
    assert whole.num_steps == 15
    near = ChunkSampler(store, 4, tasks=[TASK], outcomes=["failure"], window=16)
    # only the corrected failure, only its chunks at steps 16 and 24 (restore step .. restore step + 16)
    assert near.num_steps == 2
    np.testing.assert_array_equal(near.state, failures[0].state[[16, 24]])
    with pytest.raises(ValueError, match="failure_window"):
        ChunkSampler(store, 4, tasks=[TASK], outcomes=["failure"], window=-1)
    cfg = _cfg(root, tmp_path / "x", mode="failure_head", failure_targets="executed")
    cfg.data.failure_window = 8
    with pytest.raises(ValueError, match="failure_window needs"):
        Trainer(cfg, progress=False)


def test_failure_window_quarantines_a_correction_with_an_unreadable_restore_step(tmp_path):
    from afil_ray.replay.chunks import ChunkSampler

    store = ReplayStore(tmp_path / "store", episodes_per_shard=1)
    good, bad = _failure_with_chunks(400), _failure_with_chunks(401)
    fixes = [build_episode(task=TASK, outcome="corrected", length=30, seed=s) for s in (400, 401)]
    fixes[0].parent_episode_id, fixes[0].extra = good.episode_id, {"restore_step": 16}
    fixes[1].parent_episode_id, fixes[1].extra = bad.episode_id, {"restore_step": "late"}
    *_, bad_fix_shard = store.write_episodes([good, bad, *fixes])
    near = ChunkSampler(store, 4, tasks=[TASK], outcomes=["failure"], window=16)
    np.testing.assert_array_equal(near.state, good.state[[16, 24]])  # the readable correction's window only
    [quarantined] = store.quarantined
    assert quarantined.path == bad_fix_shard.path and "restore_step" in quarantined.reason


def _failure_with_chunks(seed: int, length: int = 40):
    ep = build_episode(task=TASK, outcome="failure", length=length, seed=seed)
    ep.chunk_steps = list(range(0, length, 8))
    ep.chunks = np.stack([ep.action[[min(t + k, length - 1) for k in range(4)]] for t in ep.chunk_steps])
    return ep


def test_chunk_sampler_refresh_reads_new_shards_only_and_quarantines_damaged_ones(tmp_path):
    """The learner refreshes while rollout actors write: only new shards are read, a correction written later
    opens its failure's window, a retired shard's pairs go, and a damaged shard is set aside, not fatal."""
    from afil_ray.replay.chunks import ChunkSampler

    store = ReplayStore(tmp_path / "store", episodes_per_shard=1)
    first = _failure_with_chunks(300)
    [first_shard] = store.write_episodes([first])
    whole = ChunkSampler(store, 4, tasks=[TASK], outcomes=["failure"])
    near = ChunkSampler(store, 4, tasks=[TASK], outcomes=["failure"], window=16)
    assert (whole.num_steps, near.num_steps) == (5, 0)  # no correction yet: no window

    second = _failure_with_chunks(301)
    fix = build_episode(task=TASK, outcome="corrected", length=30, seed=300)
    fix.parent_episode_id, fix.extra = first.episode_id, {"restore_step": 8}
    store.write_episodes([second, fix])
    reads = []
    original = store.read_checked
    store.read_checked = lambda rel, *a, **k: reads.append(rel) or original(rel, *a, **k)
    assert whole.refresh() == 1 and whole.num_steps == 10
    assert [r for r in reads if "failure" in r] == [s.path for s in store.list_shards(outcome="failure")][1:]
    near.refresh()
    np.testing.assert_array_equal(near.state, first.state[[8, 16]])  # the late correction's window

    (tmp_path / "store" / first_shard.path).unlink()  # retired by another process
    assert whole.refresh() == 0 and whole.num_steps == 5
    np.testing.assert_array_equal(whole.state, second.state[second.chunk_steps])

    [damaged] = store.write_episodes([_failure_with_chunks(302)])
    path = tmp_path / "store" / damaged.path
    path.write_bytes(path.read_bytes()[:-100])
    assert whole.refresh() == 0 and whole.num_steps == 5
    assert [c.path for c in store.quarantined] == [damaged.path] and not path.exists()


def test_training_is_repeatable_for_a_seed(store, tmp_path):
    """Same seed, same data: the same weights (the model's noise and time draws were unseeded once, so re-training
    a stage gave a different policy); another seed: other weights."""
    def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        cfg = _cfg(store, tmp_path / name, steps=6, checkpoint_every=6)
        cfg.seed = seed
        Trainer(cfg, progress=False).run()
        return load_policy(latest_checkpoint(tmp_path / name)).state_dict()

    a, b, c = weights("a", 0), weights("b", 0), weights("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
