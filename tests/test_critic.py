"""The success critic: it learns an outcome the chunk decides, stays at chance within a state where the chunk does not
matter, travels in the checkpoint (old ones still load), trains alone, and its AUROC is exact with ties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from afil_ray.branches import branch_rows
from afil_ray.cli import main
from afil_ray.config import Config, ConfigError, PolicyConfig, load_config
from afil_ray.eval.critic import REPORT_FILE, auroc, within_group_auroc
from afil_ray.loop.learner import OnlineLearner
from afil_ray.loop.weights import apply, pack
from afil_ray.policy import CheckpointError, DAGPolicy, load_component, load_policy, save_policy
from afil_ray.policy.loading import latest_checkpoint, load_start_policy
from afil_ray.replay.episode import Episode
from afil_ray.replay.outcomes import OutcomeSampler, held_out
from afil_ray.replay.store import ReplayStore
from afil_ray.train import Trainer

from conftest import build_episode

TASK = "PullCube-v1"
STATE_DIM, ACTION_DIM, H = 4, 2, 4


def _episode(outcome: str, seed: int, states: np.ndarray, chunks: np.ndarray, won: bool, **branch) -> Episode:
    """An episode of ``len(states)`` steps that re-planned at every step with ``chunks`` [T, H, A]."""
    t = len(states)
    return Episode(task=TASK, outcome=outcome, seed=seed, instruction="pull the cube", source="test",
                   state=states.astype(np.float32), action=chunks[:, 0].astype(np.float32),
                   reward=np.zeros(t, np.float32), step_success=np.arange(t) == t - 1 if won else np.zeros(t, bool),
                   terminated=np.zeros(t, bool), truncated=np.arange(t) == t - 1,
                   final_state=states[-1].astype(np.float32), chunk_steps=list(range(t)),
                   chunks=chunks.astype(np.float32), control_mode="pd_joint_delta_pos", **branch)


def _branch(seed: int, index: int, state: np.ndarray, chunk: np.ndarray, won: bool) -> Episode:
    """Branch ``index`` of the state ``state`` (step 0 of parent ``p<seed>``): one step, its chunk sampled there."""
    return _episode("branch", seed, state[None], chunk[None], won, parent_episode_id=f"p{seed}", branch_step=0,
                    branch_index=index)


def _action_decides(groups: int = 160, k: int = 4) -> list[Episode]:
    """Random states and chunks; a branch succeeds iff its chunk's first action coordinate is far from zero (even in
    the chunk, so an untrained critic, close to linear, ranks at chance and only a trained one passes)."""
    rng = np.random.default_rng(0)
    eps = []
    for g in range(groups):
        state = rng.normal(0, 1, STATE_DIM)
        for i in range(k):
            chunk = rng.uniform(-1, 1, (H, ACTION_DIM))
            eps.append(_branch(g, i, state, chunk, abs(chunk[0, 0]) > 0.5))
    return eps


def _action_irrelevant(groups: int = 400, k: int = 8, episodes: int = 160) -> list[Episode]:
    """Branch outcomes are coin flips, whatever the chunk; whole rollouts (the Monte-Carlo rows) succeed iff their
    states' first coordinate is far from zero, which only V can see (even, as in ``_action_decides``)."""
    rng = np.random.default_rng(1)
    eps = []
    for g in range(groups):
        state = rng.normal(0, 1, STATE_DIM)
        eps += [_branch(g, i, state, rng.uniform(-1, 1, (H, ACTION_DIM)), bool(rng.random() < 0.5)) for i in range(k)]
    for e in range(episodes):
        won = bool(e % 2)
        states = rng.normal(0, 1, (3, STATE_DIM))
        states[:, 0] = rng.uniform(1, 2, 3) * rng.choice([-1, 1], 3) if won else rng.uniform(-1, 1, 3)
        eps.append(_episode("success" if won else "failure", 10_000 + e, states,
                            rng.uniform(-1, 1, (3, H, ACTION_DIM)), won))
    return eps


def _demos(n: int = 3) -> list[Episode]:
    return [build_episode(task=TASK, outcome="demo", length=12, state_dim=STATE_DIM, action_dim=ACTION_DIM, seed=i)
            for i in range(n)]


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
    root = tmp_path_factory.mktemp("decided")
    ReplayStore(root, episodes_per_shard=1024).write_episodes(_demos() + _action_decides())
    return root


@pytest.fixture(scope="module")
def irrelevant(tmp_path_factory):
    root = tmp_path_factory.mktemp("irrelevant")
    ReplayStore(root, episodes_per_shard=2048).write_episodes(_action_irrelevant())
    return root


def _cfg(store, run_dir, steps: int = 150, **train) -> Config:
    cfg = load_config(None, ["policy.critic=true", "train.mode=critic"])
    cfg.run_dir, cfg.env.task, cfg.replay.root = str(run_dir), TASK, str(store)
    p = cfg.policy
    p.hidden_size, p.num_layers, p.head_width, p.head_depth, p.horizon = 32, 1, 32, 1, H
    p.critic_width, p.critic_depth = 64, 2
    t = cfg.train
    t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every, t.checkpoint_every = steps, 64, 5e-3, 10, 50, 10_000
    t.num_threads = 1  # the suite may share the cores: more threads only contend
    cfg.data.critic_holdout = 0.3
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


# ---------------------------------------------------------------- learning


def test_the_critic_learns_an_outcome_the_chunk_decides(decided, tmp_path, capsys):
    trainer = Trainer(_cfg(decided, tmp_path / "run"), progress=False)
    untrained = trainer.evaluate_critic(trainer.save())
    assert abs(untrained.overall.auroc_q - 0.5) < 0.15  # a critic that learned nothing fails the checks below
    trainer.run()
    report = trainer.evaluate_critic()
    o = report.overall
    assert o.branches > 100 and o.mixed_groups > 20 and o.mc_rows == 0 and o.auroc_v is None
    assert o.auroc_q > 0.9 and o.auroc_q_within_group > 0.9, report.lines()
    assert not o.no_action_signal and "guidance cannot help" not in report.tasks[0].summary()
    saved = json.loads((latest_checkpoint(tmp_path / "run") / REPORT_FILE).read_text())
    assert saved["overall"]["auroc_q"] == pytest.approx(o.auroc_q) and saved["holdout"] == 0.3
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"losses/critic_q", "losses/critic_v", "critic/auroc_q", "critic/auroc_q_within_group"} <= tags
    assert "critic/auroc_v" not in tags  # undefined without Monte-Carlo rows: left out, not logged as a number
    assert events.Scalars("losses/critic_q")[-1].value < 0.35  # ln 2 = 0.69 at chance


def test_within_a_state_the_critic_stays_at_chance_when_the_chunk_does_not_matter(irrelevant, tmp_path):
    # the rollouts' outcomes are certain given the state: they may weigh more than the coin-flip branches
    trainer = Trainer(_cfg(irrelevant, tmp_path / "run", steps=250, critic_mc_weight=2.0), progress=False)
    untrained = trainer.evaluate_critic(trainer.save())
    assert untrained.overall.auroc_v < 0.75  # V has to learn what decides the rollouts
    trainer.run()
    report = trainer.evaluate_critic()
    o = report.overall
    assert o.mixed_groups >= 50 and o.mc_rows > 100
    assert abs(o.auroc_q_within_group - 0.5) < 0.1 and abs(o.auroc_q - 0.5) < 0.1, report.lines()
    assert o.auroc_v > 0.9, report.lines()
    [line] = report.lines()
    if o.no_action_signal:
        assert line.endswith("no action-level signal at this state: guidance cannot help here")


# ---------------------------------------------------------------- data and evaluation


def test_critic_rows_are_the_branches_first_chunks_split_by_initial_state(irrelevant):
    store = ReplayStore(irrelevant)
    every = OutcomeSampler(store, H, tasks=[TASK], mc_outcomes=["failure", "success"], holdout=0.3, split="all")
    rows = branch_rows(store, TASK)
    assert len(every.branch_rows) == rows.num_rows == 400 * 8 and len(every.mc_rows) == 160 * 3
    batch = every.gather(every.branch_rows, np.ones(len(every.branch_rows), bool))
    mine = sorted(zip(batch["group"].tolist(), batch["state"].tolist(), batch["action"].reshape(rows.num_rows, -1)
                      .tolist(), batch["label"].tolist(), strict=True))
    theirs = sorted(zip(rows["branch_group"].to_pylist(), rows["first_state"].to_pylist(),
                        rows["first_chunk"].to_pylist(), [float(s) for s in rows["success"].to_pylist()], strict=True))
    assert mine == theirs

    parts = {s: OutcomeSampler(store, H, tasks=[TASK], mc_outcomes=["failure", "success"], holdout=0.3, split=s)
             for s in ("train", "test")}
    origins = {s: set(p.pairs.origin[np.concatenate([p.branch_rows, p.mc_rows])]) for s, p in parts.items()}
    assert origins["train"] and origins["test"] and not origins["train"] & origins["test"]
    assert len(parts["train"].branch_rows) + len(parts["test"].branch_rows) == len(every.branch_rows)
    assert all(held_out(o, 0.3) for o in origins["test"]) and 0.2 < len(origins["test"]) / 560 < 0.4
    assert not held_out("PullCube-v1/seed=7", 0.0)
    # a batch is half branch rows (weight 1) and half Monte-Carlo rows (train.critic_mc_weight)
    weighted = OutcomeSampler(store, H, tasks=[TASK], mc_outcomes=["failure"], mc_weight=0.25)
    batch = weighted.sample(10)
    assert batch["is_branch"].tolist() == [True] * 5 + [False] * 5
    assert batch["weight"].tolist() == [1.0] * 5 + [0.25] * 5
    assert OutcomeSampler(store, H, tasks=[TASK], mc_outcomes=["failure"], mc_weight=0).sample(4)["is_branch"].all()


def test_auroc_is_exact_with_ties():
    # pairs (positive, negative): (.5, .5) tie = 1/2, (.5, .1), (.9, .5), (.9, .1) = 1 each -> 3.5 / 4
    assert auroc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1]) == 0.875
    assert auroc([0, 0, 1, 1], [0.2, 0.2, 0.2, 0.2]) == 0.5
    assert auroc([0, 1], [0.9, 0.1]) == 0.0 and auroc([1, 1], [0.1, 0.2]) is None
    rng = np.random.default_rng(0)
    labels, scores = rng.random(500) < 0.3, np.round(rng.random(500), 1)  # many ties
    pos, neg = scores[labels], scores[~labels]
    by_pairs = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(labels, scores) == pytest.approx(by_pairs, abs=1e-12)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert auroc(labels, scores) == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    # groups with one outcome have no pair to rank and are not counted
    value, mixed = within_group_auroc(np.array([1, 0, 1, 1, 0, 1.0]), np.array([0.9, 0.1, 0.5, 0.4, 0.8, 0.7]),
                                      np.array(["a", "a", "b", "b", "c", "c"]))
    assert (value, mixed) == (pytest.approx((1.0 + 0.0) / 2), 2)
    assert within_group_auroc(np.ones(3), np.ones(3), np.array(["a", "a", "b"])) == (None, 0)


# ---------------------------------------------------------------- the policy and its checkpoint


def _policy_config(**overrides) -> PolicyConfig:
    base = dict(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=10, horizon=H, head_width=32,
                head_depth=1, critic=True, critic_width=32, critic_depth=2)
    return PolicyConfig(**{**base, **overrides})


def _policy(seed: int = 0, **overrides) -> DAGPolicy:
    torch.manual_seed(seed)
    policy = DAGPolicy.from_config(_policy_config(**overrides), STATE_DIM, ACTION_DIM)
    rng = np.random.default_rng(seed)
    policy.fit_normalizer(rng.normal(1, 2, (64, STATE_DIM)), rng.uniform(-2, 3, (64, ACTION_DIM)))
    return policy


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_checkpoint_round_trip_with_a_critic_and_old_checkpoints_without_one(tmp_path):
    policy = _policy()
    obs = {"state": np.random.default_rng(2).normal(1, 2, (3, STATE_DIM)).astype(np.float32)}
    chunks = np.random.default_rng(3).uniform(-2, 3, (3, 5, H, ACTION_DIM)).astype(np.float32)
    save_policy(policy, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "critic.safetensors").is_file()
    loaded = load_policy(tmp_path / "ckpt", expect=_policy_config())
    _same_weights(policy, loaded)
    q, v = policy.q(obs, "pull", chunks), policy.v(obs, "pull")
    assert q.shape == (3, 5) and v.shape == (3,) and ((q > 0) & (q < 1)).all()
    assert np.array_equal(loaded.q(obs, "pull", chunks), q) and np.array_equal(loaded.v(obs, "pull"), v)
    # K chunks per state in one call score as each chunk alone
    np.testing.assert_allclose(policy.q(obs, "pull", chunks[:, 2]), q[:, 2], rtol=1e-5, atol=1e-6)

    # a checkpoint from before critics: no critic file, no critic keys in policy.yaml
    old = _policy(critic=False)
    assert old.critic is None and old.components == ("backbone", "success_head", "failure_head")
    save_policy(old, tmp_path / "old")
    yaml = tmp_path / "old" / "policy.yaml"
    yaml.write_text("".join(line for line in yaml.read_text().splitlines(True) if not line.startswith("critic")))
    reloaded = load_policy(tmp_path / "old")
    assert reloaded.critic is None and not (tmp_path / "old" / "critic.safetensors").exists()
    _same_weights(old, reloaded)
    with pytest.raises(ValueError, match="has no critic"):
        reloaded.v(obs, "pull")
    with pytest.raises(CheckpointError, match="carries a critic, the policy has none"):
        load_component(reloaded, tmp_path / "ckpt", "critic")
    # started from with policy.critic=true, it gets a fresh, seeded critic, which its checkpoints then carry
    started = load_start_policy(tmp_path / "old", critic=_policy_config(), seed=4)
    again = load_start_policy(tmp_path / "old", critic=_policy_config(), seed=4)
    _same_weights(started.critic, again.critic)
    for name in ("backbone", "success_head", "failure_head"):
        _same_weights(started.component(name), old.component(name))
    save_policy(started, tmp_path / "with_critic")
    _same_weights(started, load_policy(tmp_path / "with_critic"))

    (tmp_path / "ckpt" / "critic.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint file not found: .*critic\.safetensors"):
        load_policy(tmp_path / "ckpt")


def test_the_loop_ships_the_critic_alone_in_critic_mode(tmp_path):
    learner = _policy(seed=1)
    actor = _policy(seed=2)
    packet = pack(learner, ("critic",), version=3)
    assert set(packet.components) == {"critic"}
    apply(actor, packet)
    _same_weights(learner.critic, actor.critic)
    assert not torch.equal(learner.success_head.action_out.weight, actor.success_head.action_out.weight)
    with pytest.raises(ValueError, match="unknown component 'critic'"):
        pack(_policy(critic=False), ("critic",), version=1)
    with pytest.raises(CheckpointError, match="carries a critic, the policy has none"):
        apply(_policy(critic=False), packet)
    cfg = load_config(None, ["policy.critic=true", "loop.learner_mode=critic", f"loop.init_from={tmp_path}",
                             f"run_dir={tmp_path / 'loop'}", f"replay.root={tmp_path / 'store'}"])
    assert OnlineLearner(cfg, publish=lambda _: None, latest_version=lambda: 0).components == ("critic",)


def test_critic_mode_trains_the_critic_alone(decided, tmp_path):
    base_cfg = _cfg(decided, tmp_path / "base", steps=2, mode="success_only")
    base_cfg.policy.critic = False
    base = Trainer(base_cfg, progress=False).run()
    assert load_policy(base).critic is None
    cfg = _cfg(decided, tmp_path / "critic", steps=3, init_from=str(base))
    trainer = Trainer(cfg, progress=False)
    assert trainer.policy.critic is not None and {id(p) for p in trainer.params} == \
        {id(p) for p in trainer.policy.critic.parameters()}
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    final = trainer.run()
    after = trainer.policy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("critic.") for k in changed), sorted(changed)[:5]
    written = load_policy(final).state_dict()  # the moving average, of a critic alone
    assert written.keys() == before.keys()
    for key in before:
        assert key.startswith("critic.") or torch.equal(written[key], before[key]), key
    assert json.loads((final / "trainer.json").read_text())["mode"] == "critic"
    cfg.train.steps = 4
    resumed = Trainer(cfg, progress=False)  # resumes with the critic it saved
    assert resumed.step == 3
    _same_weights(resumed.policy.critic, trainer.policy.critic)


def test_afil_ray_train_in_critic_mode_ends_with_one_line_per_task(decided, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["policy.critic=true", "train.mode=critic", f"run_dir={run}", f"env.task={TASK}", f"replay.root={decided}",
            "policy.hidden_size=32", "policy.num_layers=1", "policy.head_width=32", "policy.head_depth=1",
            f"policy.horizon={H}", "policy.critic_width=32", "train.steps=2", "train.batch_size=16",
            "train.warmup_steps=1", "train.num_threads=1"]
    assert main(["train", "--quiet", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    final = latest_checkpoint(run)
    assert out[1].startswith(f"{TASK}: held-out critic: Q AUROC ") and "mixed groups" in out[1]
    assert out[2] == f"critic evaluation (held-out fraction 0.2): {final}/{REPORT_FILE}" and len(out) == 3
    assert json.loads((final / REPORT_FILE).read_text())["tasks"][0]["task"] == TASK


def test_monte_carlo_rows_train_what_data_critic_mc_targets_names():
    policy = _policy()
    rng = np.random.default_rng(0)
    batch = {"state": rng.normal(0, 1, (6, STATE_DIM)), "action": rng.uniform(-1, 1, (6, H, ACTION_DIM)),
             "instruction": ["pull the cube"] * 6, "label": np.array([1, 0, 1, 0, 1, 0], np.float32),
             "weight": np.array([1, 1, 0.5, 0.5, 0.5, 0.5], np.float32),
             "is_branch": np.array([True, True, False, False, False, False])}

    def q_net_grad(targets) -> float:
        policy.zero_grad()
        loss, metrics = policy.critic_loss(batch, targets)
        loss.backward()
        return float(sum(p.grad.abs().sum() for p in policy.critic.q_net.parameters())), metrics

    both, m_both = q_net_grad(("q", "v"))
    v_only, m_v = q_net_grad(("v",))
    assert m_both["critic_v"] == pytest.approx(m_v["critic_v"])  # V still learns every row
    q, _ = policy.critic_logits(batch)
    branch_q = torch.nn.functional.binary_cross_entropy_with_logits(q[:2], torch.tensor([1.0, 0.0]))
    assert m_v["critic_q"] == pytest.approx(float(branch_q), rel=1e-5) != m_both["critic_q"]  # Q: branch rows only
    assert both > 0 and v_only > 0
    batch["is_branch"][:] = False  # a batch of Monte-Carlo rows alone leaves Q untouched
    assert q_net_grad(("v",))[0] == 0.0


# ---------------------------------------------------------------- bad settings


def test_bad_critic_settings_are_one_line_errors(tmp_path, capsys):
    for items, match in (
            (["train.mode=critic"], r"train\.mode=critic needs policy\.critic=true"),
            (["loop.learner_mode=critic"], r"loop\.learner_mode=critic needs policy\.critic=true"),
            (["data.critic_holdout=1.0"], r"data\.critic_holdout must be in \[0\.0, 1\.0\), got 1\.0"),
            (["data.critic_mc_outcomes=[demo]"], r"data\.critic_mc_outcomes must be one of failure, success, branch"),
            (["data.critic_mc_outcomes=[]"], r"data\.critic_mc_outcomes must name at least one"),
            (["train.critic_mc_weight=-1"], r"train\.critic_mc_weight must be >= 0\.0, got -1"),
            (["data.critic_mc_targets=[a]"], r"data\.critic_mc_targets must be one of q, v"),
            (["data.critic_mc_targets=[]"], r"data\.critic_mc_targets must name q, v or both"),
            (["policy.critic_width=0"], r"policy\.critic_width must be >= 1, got 0"),
            (["policy.critc=true"], r"bad config key 'policy\.critc'")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, items)
        assert main(["train", *items]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "config error" in err, err
    empty = tmp_path / "store"
    ReplayStore(empty).write_episodes(_demos())
    with pytest.raises(ConfigError, match="holds no critic rows"):
        Trainer(_cfg(empty, tmp_path / "run"), progress=False)


def test_branch_splits_give_each_head_one_outcome_of_the_same_states(tmp_path):
    """``branch_success`` / ``branch_failure`` select the branch episodes that succeeded / failed (the paper's rule
    as a same-state contrast: the success head on one, the failure head on the other); ``branch`` or both splits
    select every branch, and a misspelt outcome is a config error."""
    from afil_ray.replay.chunks import ChunkSampler
    from afil_ray.replay.sampler import WindowSampler

    store = ReplayStore(tmp_path)
    eps = _action_decides(groups=6, k=4)
    store.write_episodes(eps)
    won = {e.episode_id: e.success for e in eps}
    assert 0 < sum(won.values()) < len(eps)
    by_action = {e.action[0].tobytes(): e.success for e in eps}  # branches share their state, not their chunk

    def window_outcomes(outcomes: list[str]) -> set[bool]:
        s = WindowSampler(store, H, tasks=[TASK], outcomes=outcomes)
        return {by_action[a[0].tobytes()] for a in s.sample(200)["action"]}

    def chunk_outcomes(outcomes: list[str]) -> tuple[int, set[bool]]:
        s = ChunkSampler(store, H, tasks=[TASK], outcomes=outcomes)
        assert s.partitions == [(TASK, "branch")]
        return s.num_steps, set(s.success.tolist())

    assert window_outcomes(["branch_success"]) == {True} and window_outcomes(["branch_failure"]) == {False}
    assert window_outcomes(["branch"]) == window_outcomes(["branch_success", "branch_failure"]) == {True, False}
    wins = sum(won.values())
    assert chunk_outcomes(["branch_success"]) == (wins, {True})
    assert chunk_outcomes(["branch_failure"]) == (len(won) - wins, {False})
    assert chunk_outcomes(["branch"]) == (len(won), {True, False})
    with pytest.raises(ConfigError, match=r"data\.success_outcomes must be one of"):
        load_config(None, ["data.success_outcomes=[demos]"])
