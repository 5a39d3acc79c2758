"""Outcome-conditioned guidance (issue 22; CFGRL): one success head told each window's outcome, sampled with
v = v_none + w (v_success - v_none). Fresh tokens change nothing; w = 0 is success only bit for bit; trained on a
task where the outcome decides the action, the success token steers toward it and w > 1 further; ``afil-ray train``
in ``outcome`` mode writes the tokens into the checkpoint; an arm on a policy without tokens is a config error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afil_ray.config import Config, ConfigError, PolicyConfig, SamplerConfig
from afil_ray.eval.arms import check_policy_fits, parse_arm
from afil_ray.policy import DAGPolicy
from afil_ray.policy.checkpoint import load_policy
from afil_ray.policy.heads import OUTCOME_TOKENS
from afil_ray.replay.store import ReplayStore
from afil_ray.train import Trainer

STATE_DIM, ACTION_DIM, H = 4, 2, 4
INSTRUCTION = "pull the cube"


def _policy(outcome: bool = True) -> DAGPolicy:
    torch.manual_seed(0)
    cfg = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=10, horizon=H, head_width=32,
                       head_depth=1, outcome_conditioning=outcome)
    policy = DAGPolicy.from_config(cfg, STATE_DIM, ACTION_DIM)
    policy.fit_normalizer(np.zeros((4, STATE_DIM)), np.array([[-1.0, -1.0], [1.0, 1.0]] * 2))
    return policy.eval()


def _obs(batch: int = 8) -> dict[str, np.ndarray]:
    return {"state": np.random.default_rng(1).normal(0, 1, (batch, STATE_DIM)).astype(np.float32)}


def _sample(policy: DAGPolicy, kind: str, w: float = 0.0) -> np.ndarray:
    chunk, _ = policy.sample(_obs(), INSTRUCTION, SamplerConfig(kind=kind, w=w, steps=8),
                             generator=torch.Generator().manual_seed(3))
    return chunk


def test_fresh_tokens_change_nothing_and_w_zero_is_success_only():
    plain, tokens = _policy(outcome=False), _policy(outcome=True)
    np.testing.assert_array_equal(_sample(tokens, "success_only"), _sample(plain, "success_only"))
    np.testing.assert_array_equal(_sample(tokens, "outcome", w=1.0), _sample(plain, "success_only"))  # all zero
    with torch.no_grad():
        tokens.outcome.table.weight[OUTCOME_TOKENS["success"]] = 1.0  # as if trained: now the token matters
    assert not np.array_equal(_sample(tokens, "outcome", w=1.0), _sample(tokens, "success_only"))
    np.testing.assert_array_equal(_sample(tokens, "outcome", w=0.0), _sample(tokens, "success_only"))
    assert tokens.outcome.table.weight[OUTCOME_TOKENS["none"]].abs().sum() == 0  # "none" stays zero


def test_the_success_token_steers_toward_what_succeeded():
    """Every state: successes acted +1 and failures -1. Unconditioned the head learns the mixture; the success
    token pulls its chunks to +1, and w = 2 (past the conditioned head) no less."""
    policy = _policy()
    policy.train()
    params = policy.set_trainable("outcome")
    optimizer = torch.optim.Adam(params, lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        state = rng.normal(0, 1, (64, STATE_DIM)).astype(np.float32)
        won = rng.random(64) < 0.5
        action = np.where(won[:, None, None], 1.0, -1.0) * np.ones((64, H, ACTION_DIM), np.float32)
        label = np.where(won, OUTCOME_TOKENS["success"], OUTCOME_TOKENS["failure"])
        label = np.where(rng.random(64) < 0.2, OUTCOME_TOKENS["none"], label)
        batch = {"state": state, "action": action, "action_is_pad": np.zeros((64, H), bool),
                 "instruction": [INSTRUCTION] * 64, "outcome": label}
        loss, _ = policy.loss(batch, head="success")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    plain, steered, further = (float(_sample(policy, k, w).mean()) for k, w in
                               (("success_only", 0.0), ("outcome", 1.0), ("outcome", 2.0)))
    assert steered > 0.7 and further >= steered - 0.05 and steered > plain + 0.3, (plain, steered, further)


def test_outcome_mode_trains_the_success_head_and_its_tokens_into_the_checkpoint(tmp_path, make_episode):
    store = ReplayStore(tmp_path / "replay")
    failures = []
    for i in range(2):
        ep = make_episode("PullCube-v1", "failure", length=12, state_dim=STATE_DIM, action_dim=ACTION_DIM, seed=10 + i)
        ep.chunk_steps, ep.chunks = [0, 6], np.zeros((2, H, ACTION_DIM), np.float32)
        failures.append(ep)
    store.write_episodes([make_episode("PullCube-v1", "demo", length=12, state_dim=STATE_DIM,
                                       action_dim=ACTION_DIM, seed=i) for i in range(2)] + failures)
    cfg = Config(run_dir=str(tmp_path / "run"))
    cfg.replay.root = str(tmp_path / "replay")
    cfg.policy = _policy().config
    cfg.train.mode, cfg.train.steps, cfg.train.batch_size, cfg.train.device = "outcome", 3, 4, "cpu"
    cfg.train.warmup_steps, cfg.train.checkpoint_every = 1, 3
    trainer = Trainer(cfg, progress=False, tensorboard=False)
    before = {k: v.clone() for k, v in trainer.policy.backbone.state_dict().items()}
    metrics = trainer.train_step()
    assert {"losses/outcome_success", "losses/outcome_failure"} <= set(metrics)
    final = trainer.run()
    policy = load_policy(final)
    assert policy.outcome is not None and policy.outcome.table.weight[OUTCOME_TOKENS["success"]].abs().sum() > 0
    for k, v in trainer.policy.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # the backbone is frozen in this mode
    with pytest.raises(ConfigError, match="outcome_conditioning"):
        cfg.policy = PolicyConfig()
        cfg.check()


def test_outcome_arms_are_named_and_need_tokens():
    arm = parse_arm("outcome:w=2", SamplerConfig())
    assert (arm.name, arm.title) == ("outcome:w=2", "outcome-conditioned w=2")
    check_policy_fits([arm], _policy(outcome=True))
    with pytest.raises(ConfigError, match="outcome tokens"):
        check_policy_fits([arm], _policy(outcome=False))
