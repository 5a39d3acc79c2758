"""The AFIL rule and the guided sampler: weights, exact reduction to success-only, one fused call for two heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afil_ray.config import PolicyConfig, SamplerConfig
from afil_ray.policy import DAGPolicy, HeadPair, adaptive_weight, cosine, guide

STATE_DIM, ACTION_DIM, HORIZON, BATCH = 6, 3, 4, 5


def small_config(**overrides) -> PolicyConfig:
    base = dict(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=8, horizon=HORIZON, head_width=32,
                head_depth=2)
    return PolicyConfig(**{**base, **overrides})


def make_policy(seed: int = 0, **overrides) -> DAGPolicy:
    """A policy whose failure head differs from its success head (as after failure training)."""
    torch.manual_seed(seed)
    policy = DAGPolicy.from_config(small_config(**overrides), STATE_DIM, ACTION_DIM)
    with torch.no_grad():
        for p in policy.failure_head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy


def obs(batch: int = BATCH, seed: int = 0) -> dict[str, np.ndarray]:
    return {"state": np.random.default_rng(seed).standard_normal((batch, STATE_DIM)).astype(np.float32)}


def gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the rule


def test_adaptive_weight_is_zero_when_heads_agree_and_lambda_when_opposite():
    v = torch.randn(4, HORIZON, ACTION_DIM)
    assert torch.allclose(adaptive_weight(v, v, 2.5), torch.zeros(4), atol=1e-6)
    assert torch.allclose(adaptive_weight(v, 3 * v, 2.5), torch.zeros(4), atol=1e-6)  # direction, not size
    assert torch.allclose(adaptive_weight(v, -v, 2.5), torch.full((4,), 2.5), atol=1e-6)
    assert torch.allclose(adaptive_weight(v, -0.2 * v, 1.0), torch.ones(4), atol=1e-6)


def test_adaptive_weight_is_per_sample_over_the_flattened_chunk():
    v_s = torch.randn(3, HORIZON, ACTION_DIM)
    other = torch.randn(HORIZON, ACTION_DIM)
    orthogonal = other - (other * v_s[2]).sum() / v_s[2].pow(2).sum() * v_s[2]  # orthogonal over the whole chunk
    v_f = torch.stack([v_s[0], -v_s[1], orthogonal])
    w = adaptive_weight(v_s, v_f, 2.0)
    assert w.shape == (3,)
    assert torch.allclose(w, torch.tensor([0.0, 2.0, 1.0]), atol=1e-5)
    assert abs(float(cosine(v_s[2:], v_f[2:]))) < 1e-5
    # per action the same pair is not orthogonal: the cosine is not taken per action and averaged
    per_action = torch.nn.functional.cosine_similarity(v_s[2], orthogonal, dim=-1)
    assert per_action.abs().max() > 1e-2


def test_guide_reads_like_the_equation():
    v_s, v_f = torch.randn(3, HORIZON, ACTION_DIM), torch.randn(3, HORIZON, ACTION_DIM)
    w = torch.tensor([0.0, 0.5, 2.0])
    out = guide(v_s, v_f, w)
    for i in range(3):
        assert torch.allclose(out[i], v_s[i] + w[i] * (v_s[i] - v_f[i]))
    assert torch.equal(guide(v_s, v_f, torch.zeros(3)), v_s)


# ------------------------------------------------------------------ the sampler


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
@pytest.mark.parametrize("fused", [True, False])
def test_zero_guidance_equals_success_only_sampling(objective, fused):
    """Exact with two calls. The fused call computes v_s with batched GEMMs, which round differently from a
    single head's GEMM in the last bit for some shapes (measured: 18 of 210 shapes differ between baddbmm with
    2 and with 1 matrices), so there it is equal to float32 rounding."""
    policy = make_policy(objective=objective)
    plain, _ = policy.sample(obs(), "push", SamplerConfig(kind="success_only"), gen())
    adaptive, diag = policy.sample(obs(), "push", SamplerConfig(kind="adaptive", lam=0.0, fused_heads=fused), gen())
    static, _ = policy.sample(obs(), "push", SamplerConfig(kind="static", w=0.0, fused_heads=fused), gen())
    assert diag["fused"] is fused and diag["failure_head_evals"] == 10
    if fused:
        np.testing.assert_allclose(adaptive, plain, rtol=0, atol=1e-5)
        np.testing.assert_allclose(static, plain, rtol=0, atol=1e-5)
    else:
        assert np.array_equal(plain, adaptive)
        assert np.array_equal(plain, static)
    guided, _ = policy.sample(obs(), "push", SamplerConfig(kind="adaptive", lam=1.0, fused_heads=fused), gen())
    assert not np.allclose(plain, guided)  # the failure head really enters when lam > 0


def test_fused_two_head_call_equals_two_separate_calls():
    policy = make_policy()
    pair = HeadPair(policy.success_head, policy.failure_head)
    assert pair.can_fuse
    with torch.no_grad():
        prefix = policy.encode(obs()["state"], {}, "push")
        x = torch.randn(BATCH, HORIZON, ACTION_DIM)
        t = torch.rand(BATCH)
        v_s, v_f = pair(x, t, pair.prefix_memory(prefix.hidden, fused=True), prefix.mask, fused=True)
        want_s = policy.success_head.predict(x, t, prefix.hidden, prefix.mask)
        want_f = policy.failure_head.predict(x, t, prefix.hidden, prefix.mask)
    assert torch.allclose(v_s, want_s, atol=1e-5) and torch.allclose(v_f, want_f, atol=1e-5)
    assert not torch.allclose(v_s, v_f, atol=1e-3)

    for kind in ("static", "adaptive"):
        a_fused, d_fused = policy.sample(obs(), "push", SamplerConfig(kind=kind, fused_heads=True), gen())
        a_two, d_two = policy.sample(obs(), "push", SamplerConfig(kind=kind, fused_heads=False), gen())
        assert d_fused["fused"] and not d_two["fused"]
        np.testing.assert_allclose(a_fused, a_two, atol=1e-5)
        np.testing.assert_allclose(d_fused["w"], d_two["w"], atol=1e-5)


def test_stacked_weights_follow_head_updates():
    """The fused call caches stacked weights; an in-place update (optimizer step, load) must invalidate them."""
    policy = make_policy()
    cfg = SamplerConfig(kind="adaptive", fused_heads=True)
    before, _ = policy.sample(obs(), "push", cfg, gen())
    with torch.no_grad():
        policy.failure_head.action_out.weight.mul_(-2.0)
    after, _ = policy.sample(obs(), "push", cfg, gen())
    unfused, _ = policy.sample(obs(), "push", SamplerConfig(kind="adaptive", fused_heads=False), gen())
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, unfused, atol=1e-5)


def test_success_only_never_runs_the_failure_head(monkeypatch):
    policy = make_policy()
    calls = []
    for module in policy.failure_head.modules():
        module.register_forward_hook(lambda *args: calls.append(1))

    def forbidden(*args, **kwargs):
        raise AssertionError("success_only sampling used the two-head path")

    with monkeypatch.context() as patch:
        patch.setattr(HeadPair, "__call__", forbidden)
        patch.setattr(HeadPair, "prefix_memory", forbidden)
        patch.setattr(HeadPair, "stacked", forbidden)
        _, diag = policy.sample(obs(), "push", SamplerConfig(kind="success_only"), gen())
    assert calls == [] and diag["failure_head_evals"] == 0 and not diag["fused"]
    assert diag["w"].shape == (BATCH, 10) and np.all(diag["w"] == 0) and diag["cos"] is None

    policy.sample(obs(), "push", SamplerConfig(kind="adaptive", fused_heads=False), gen())
    assert len(calls) > 0  # the hooks do see the failure head when it runs


def test_heads_of_different_shape_fall_back_to_two_calls():
    policy = make_policy(failure_head_width=16, failure_head_depth=1)
    assert sum(p.numel() for p in policy.failure_head.parameters()) < sum(
        p.numel() for p in policy.success_head.parameters())
    actions, diag = policy.sample(obs(), "push", SamplerConfig(kind="adaptive", lam=1.5), gen())
    assert not diag["fused"] and diag["failure_head_evals"] == 10
    assert actions.shape == (BATCH, HORIZON, ACTION_DIM) and np.isfinite(actions).all()
    assert np.all((diag["w"] >= 0) & (diag["w"] <= 1.5))


def test_diagnostics_hold_weight_and_cosine_per_sample_and_step():
    policy = make_policy()
    _, diag = policy.sample(obs(), "push", SamplerConfig(kind="adaptive", lam=2.0, steps=7), gen())
    assert diag["w"].shape == diag["cos"].shape == (BATCH, 7)
    assert diag["w_mean"].shape == diag["cos_mean"].shape == (7,)
    assert np.all((diag["w"] >= 0) & (diag["w"] <= 2.0)) and np.all(np.abs(diag["cos"]) <= 1)
    np.testing.assert_allclose(diag["w"], 2.0 * (1 - diag["cos"]) / 2, atol=1e-6)  # the rule, per sample
    np.testing.assert_allclose(diag["w_mean"], diag["w"].mean(0), atol=1e-6)
    assert diag["w"].std(0).max() > 0  # not one weight for the whole batch
    _, static = policy.sample(obs(), "push", SamplerConfig(kind="static", w=0.05, steps=7), gen())
    np.testing.assert_allclose(static["w"], 0.05)


def test_unknown_sampler_kind_is_an_error():
    with pytest.raises(ValueError, match=r"sampler\.kind"):
        make_policy().sample(obs(), "push", SamplerConfig(kind="negative"), gen())
