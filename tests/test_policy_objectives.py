"""Flow matching and DDPM: training pairs, samplers that land exactly on a point given the exact field, masked
loss, and both objectives fitting a small conditional data set end to end through DAGPolicy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from afil_ray.config import PolicyConfig, SamplerConfig
from afil_ray.policy import DAGPolicy, HeadPair, Prefix, sample_chunk
from afil_ray.policy.objectives import DDPM, FlowMatching, masked_mse


class Oracle(nn.Module):
    """The exact velocity / noise field of a data set that is one chunk ``a0``."""

    def __init__(self, objective, a0: torch.Tensor) -> None:
        super().__init__()
        self.objective, self.a0 = objective, a0

    def prefix_memory(self, hidden):
        return ()

    def forward(self, x, t, memory, mask):
        tt = t[:, None, None]
        if isinstance(self.objective, FlowMatching):  # x = τ ε + (1 − τ) a0  ->  u = ε − a0 = (x − a0) / τ
            return (x - self.a0) / tt
        k = torch.round(t * self.objective.num_steps - 1).long()  # head time (k + 1) / T
        a = self.objective.alpha_bar[k].float()[:, None, None]
        return (x - a.sqrt() * self.a0) / (1 - a).sqrt()


@pytest.mark.parametrize("objective", [FlowMatching(), DDPM(100, "cosine"), DDPM(50, "linear")])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_samplers_land_on_the_data_point_given_the_exact_field(objective, steps):
    a0 = torch.tensor([[0.3, -0.7], [0.9, 0.1]])
    oracle = Oracle(objective, a0)
    noise = torch.randn(6, 2, 2, generator=torch.Generator().manual_seed(0))
    prefix = Prefix(torch.zeros(6, 1, 4), torch.ones(6, 1, dtype=torch.bool))
    x, diag = sample_chunk(HeadPair(oracle, oracle), objective, prefix, noise, SamplerConfig(steps=steps))
    # Euler is exact on straight paths, DDIM on x0 (up to float32: one DDIM step divides by √ᾱ of ~0.006)
    assert torch.allclose(x, a0.expand(6, 2, 2), atol=1e-3)
    assert diag["w"].shape == (6, steps) and diag["w_mean"].shape == (steps,)


def test_flow_training_pair_follows_the_convention():
    flow = FlowMatching()
    a, eps = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    x, t_head, u = flow.training_pair(a, eps, torch.tensor([1.0, 0.0, 0.25]))
    assert torch.equal(x[0], eps[0]) and torch.equal(x[1], a[1])  # τ = 1 noise, τ = 0 data
    assert torch.allclose(x[2], 0.25 * eps[2] + 0.75 * a[2])
    assert torch.equal(u, eps - a) and torch.equal(t_head, torch.tensor([1.0, 0.0, 0.25]))
    steps = flow.steps(5)
    assert [s.index for s in steps] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert all(s.next_index - s.index == pytest.approx(-0.2) for s in steps)


def test_flow_training_time_distributions():
    g = torch.Generator().manual_seed(0)
    beta = FlowMatching("beta").sample_time(200_000, g, torch.device("cpu"))
    uniform = FlowMatching("uniform").sample_time(200_000, g, torch.device("cpu"))
    assert beta.min() >= 0.001 and beta.max() <= 1.0
    assert float(beta.mean()) == pytest.approx(0.6 * 0.999 + 0.001, abs=0.005)  # Beta(1.5, 1) has mean 0.6
    assert float((beta < 0.5).float().mean()) == pytest.approx(0.5**1.5, abs=0.005)  # CDF τ^1.5
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.005)
    with pytest.raises(ValueError, match="flow_time"):
        FlowMatching("lognormal")


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddpm_schedule_and_ddim_steps(schedule):
    ddpm = DDPM(100, schedule)
    ab = ddpm.alpha_bar
    assert ab.shape == (100,) and torch.all(ab[1:] < ab[:-1]) and ab[0] < 1 and ab[-1] > 0
    assert ab[-1] < 0.01  # the last training step is (nearly) pure noise
    steps = ddpm.steps(10)
    ks = [s.index for s in steps]
    assert ks[0] == 99 and ks[-1] == 0 and ks == sorted(ks, reverse=True) and len(ks) == 10
    assert [s.next_index for s in steps] == [*ks[1:], -1]
    a, eps = torch.randn(2, 3, 2), torch.randn(2, 3, 2)
    x, t_head, target = ddpm.training_pair(a, eps, torch.tensor([0, 99]))
    assert torch.equal(target, eps)
    assert torch.allclose(x[0], ab[0].sqrt().float() * a[0] + (1 - ab[0]).sqrt().float() * eps[0])
    assert t_head.tolist() == pytest.approx([0.01, 1.0])


def test_masked_mse_ignores_padded_steps():
    pred, target = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    pad = torch.tensor([[False, False, True, True], [False, True, True, True]])
    pred[pad] = 1000.0
    assert float(masked_mse(pred, target, pad)) == pytest.approx(1.0)
    assert float(masked_mse(pred, target, torch.ones(2, 4, dtype=torch.bool))) == 0.0  # nothing real: no NaN


def test_policy_loss_counts_only_unpadded_steps():
    """Padded steps still feed the head as context (they repeat the last action), but their errors do not count."""
    policy = DAGPolicy.from_config(PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, horizon=4, head_width=32,
                                                head_depth=1), 3, 2)
    rng = np.random.default_rng(0)
    pad = np.array([[False, False, True, True], [False, True, True, True], [False] * 4])
    batch = {"state": rng.standard_normal((3, 3)).astype(np.float32),
             "action": rng.standard_normal((3, 4, 2)).astype(np.float32), "action_is_pad": pad,
             "instruction": ["go"] * 3}
    seen = {}
    policy.success_head.register_forward_hook(lambda m, args, out: seen.update(x=args[0], pred=out))
    loss, metrics = policy.loss(batch, "success", torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # replay the draws: noise, then τ
    noise = torch.randn(3, 4, 2, generator=g)
    tau = policy.objective.sample_time(3, g, torch.device("cpu"))
    _, _, target = policy.objective.training_pair(torch.from_numpy(batch["action"]), noise, tau)
    per_step = (seen["pred"] - target).pow(2).mean(-1).detach().numpy()
    assert loss.item() == pytest.approx(per_step[~pad].mean(), rel=1e-6)
    assert abs(per_step[~pad].mean() - per_step.mean()) > 1e-3  # padding would have changed it
    assert metrics["pad_fraction"] == pytest.approx(pad.mean())
    with pytest.raises(KeyError, match="instruction"):
        policy.loss({k: v for k, v in batch.items() if k != "instruction"})


@pytest.mark.parametrize(("objective", "steps"), [("flow", 300), ("ddpm", 600)])
def test_objective_fits_a_small_conditional_data_set(objective, steps):
    """Four states, each with its own chunk (in env units, far from [-1, 1]): after training, samples for a
    state land on that state's chunk."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    scale = np.array([3.0, 0.5], np.float32)
    chunks = (rng.uniform(-1, 1, (4, 4, 2)) * scale + np.array([1.0, -2.0])).astype(np.float32)
    states = (np.eye(4) * 5 + 2).astype(np.float32)
    cfg = PolicyConfig(hidden_size=32, num_layers=1, num_heads=2, max_text_tokens=8, horizon=4, head_width=64,
                       head_depth=2, objective=objective)
    policy = DAGPolicy.from_config(cfg, 4, 2)
    policy.fit_normalizer(states, chunks.reshape(-1, 2))
    optimizer = torch.optim.Adam(policy.set_trainable("success_only"), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        i = rng.integers(0, 4, 128)
        loss, metrics = policy.loss({"state": states[i], "action": chunks[i], "action_is_pad": np.zeros((128, 4), bool),
                                     "instruction": ["reach"] * 128}, "success", g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(metrics["loss"])
    assert np.mean(losses[-20:]) < 0.05 * np.mean(losses[:10])

    actions, _ = policy.sample({"state": np.repeat(states, 50, 0)}, "reach", SamplerConfig(),
                               torch.Generator().manual_seed(1))
    error = np.abs(actions - np.repeat(chunks, 50, 0)) / scale  # in units of each dimension's range
    assert np.median(error) < 0.03 and (error < 0.1).mean() > 0.95
