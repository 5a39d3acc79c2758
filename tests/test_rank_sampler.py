"""``rank``: K chunks per state from the success head, the executed one picked by the critic's Q (or at random, the
control). K = 1 is success only bit for bit; the pick is the argmax of the critic; a random pick repeats with the
noise; an arm names it; a policy without a critic cannot rank by one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from afil_ray.config import ConfigError, PolicyConfig, SamplerConfig
from afil_ray.eval.arms import parse_arm
from afil_ray.policy import DAGPolicy
from afil_ray.rollout import draw_noise

STATE_DIM, ACTION_DIM, H = 4, 2, 4
INSTRUCTION = "pull the cube"


def _policy(critic: bool = True) -> DAGPolicy:
    torch.manual_seed(0)
    cfg = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=10, horizon=H, head_width=32,
                       head_depth=1, critic=critic, critic_width=32, critic_depth=2)
    policy = DAGPolicy.from_config(cfg, STATE_DIM, ACTION_DIM)
    rng = np.random.default_rng(0)
    policy.fit_normalizer(rng.normal(1, 2, (64, STATE_DIM)), rng.uniform(-2, 3, (64, ACTION_DIM)))
    return policy.eval()


def _obs(batch: int = 3) -> dict[str, np.ndarray]:
    return {"state": np.random.default_rng(1).normal(0, 1, (batch, STATE_DIM)).astype(np.float32)}


@pytest.mark.parametrize("pick", ["critic", "random"])
def test_rank_with_one_candidate_is_success_only_bit_for_bit(pick):
    policy, obs = _policy(), _obs()
    plain, ranked = SamplerConfig(kind="success_only", steps=4), SamplerConfig(kind="rank", k=1, pick=pick, steps=4)
    want, _ = policy.sample(obs, INSTRUCTION, plain, generator=torch.Generator().manual_seed(5))
    got, diag = policy.sample(obs, INSTRUCTION, ranked, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(got, want)
    assert diag["sampler"] == "rank" and diag["pick"].tolist() == [0, 0, 0] and diag["q"] is None
    # per-episode noise as the rollouts draw it: K = 1 is the very draw success only makes
    noise = [torch.stack([draw_noise(policy.noise_shape, cfg, torch.Generator().manual_seed(s)) for s in range(3)])
             for cfg in (plain, ranked)]
    got, _ = policy.sample(obs, INSTRUCTION, ranked, noise=noise[1])
    want, _ = policy.sample(obs, INSTRUCTION, plain, noise=noise[0])
    np.testing.assert_array_equal(got, want)


class _StubCritic(nn.Module):
    """Q = the chunk's mean (a logit): the best candidate is the one with the largest mean."""

    def forward(self, hidden, mask, chunk):
        return chunk.mean(dim=(-2, -1)), torch.zeros(hidden.shape[0])


def test_rank_executes_the_candidate_the_critic_scores_highest():
    policy, obs, k = _policy(), _obs(), 6
    policy.critic = _StubCritic()
    noise = torch.stack([draw_noise(policy.noise_shape, SamplerConfig(kind="rank", k=k), torch.Generator()
                                    .manual_seed(s)) for s in range(3)])  # [B, K, H, A]
    got, diag = policy.sample(obs, INSTRUCTION, SamplerConfig(kind="rank", k=k, steps=4), noise=noise)
    plain = SamplerConfig(kind="success_only", steps=4)
    candidates = np.stack([policy.sample(obs, INSTRUCTION, plain, noise=noise[:, j])[0] for j in range(k)], 1)
    normalised = policy.normalizer.normalize_action(torch.as_tensor(candidates)).mean(dim=(-2, -1))
    best = normalised.argmax(dim=1).numpy()
    assert len(set(best.tolist())) > 1 or k == 1  # the states pick different candidates (not a fixed index)
    np.testing.assert_array_equal(diag["pick"], best)
    np.testing.assert_allclose(got, candidates[np.arange(3), best], atol=1e-5)  # B x K in one call vs one by one
    np.testing.assert_allclose(diag["q"], torch.sigmoid(normalised).numpy(), atol=1e-5)


def test_a_random_pick_repeats_with_its_noise_and_covers_the_candidates():
    policy, obs, cfg = _policy(critic=False), _obs(32), SamplerConfig(kind="rank", k=4, pick="random", steps=2)
    noise = torch.randn((32, 4, H, ACTION_DIM), generator=torch.Generator().manual_seed(0))
    a, first = policy.sample(obs, INSTRUCTION, cfg, noise=noise)
    b, again = policy.sample(obs, INSTRUCTION, cfg, noise=noise)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first["pick"], again["pick"])
    assert set(first["pick"].tolist()) == {0, 1, 2, 3} and first["q"] is None


def test_ranking_by_a_critic_needs_one():
    with pytest.raises(ValueError, match="no critic"):
        _policy(critic=False).sample(_obs(), INSTRUCTION, SamplerConfig(kind="rank", k=2), generator=None)


def test_rank_arms_are_named_and_checked():
    base = SamplerConfig()
    arm = parse_arm("rank:k=4", base)
    assert (arm.name, arm.title, arm.sampler.k, arm.sampler.pick) == ("rank:k=4", "rank k=4", 4, "critic")
    control = parse_arm("rank:k=4,pick=random", base)
    assert (control.name, control.title) == ("rank:k=4,pick=random", "rank k=4 pick=random")
    assert control.sampler.params()["pick"] == "random" and "k" not in base.params()
    with pytest.raises(ConfigError, match="does not apply"):
        parse_arm("static:k=4", base)
    with pytest.raises(ConfigError, match=r"sampler\.pick"):
        dataclasses.replace(base, kind="rank", pick="best").check()
    with pytest.raises(ConfigError, match=r"sampler\.k"):
        dataclasses.replace(base, kind="rank", k=0).check()


def test_an_evaluation_that_ranks_by_a_missing_critic_stops_before_any_episode():
    from afil_ray.config import Config
    from afil_ray.eval.protocol import evaluate_arms

    cfg = Config()
    cfg.eval.arms = ["success_only", "rank:k=4"]
    with pytest.raises(ConfigError, match=r"rank:k=4.*has none"):
        evaluate_arms(cfg, _policy(critic=False), progress=False)
