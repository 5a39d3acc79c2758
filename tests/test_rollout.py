"""Chunked closed-loop rollouts and evaluation with a scripted chunk policy (no learning involved)."""

from __future__ import annotations

import itertools

import numpy as np

from afil_ray.config import Config, EnvConfig, SamplerConfig
from afil_ray.envs.maniskill import ManiSkillVecEnv
from afil_ray.eval.protocol import evaluate
from afil_ray.replay.episode import episodes_to_table, table_to_episodes
from afil_ray.rollout import ChunkedRollout

H, K = 6, 4


class ScriptedPolicy:
    """Chunks whose every action encodes (call number, row, position), so the test can see what ran."""

    noise_shape = (H, 8)  # evaluation draws per-episode noise; this policy ignores it

    def __init__(self) -> None:
        self.calls: list[int] = []

    def sample(self, obs, instructions, sampler, generator=None, noise=None):
        b = len(obs["state"])
        self.calls.append(b)
        call = len(self.calls)
        chunk = np.zeros((b, H, 8), np.float32)
        chunk[:, :, 0] = call / 1000
        chunk[:, :, 1] = np.arange(H)[None, :] / 100
        diag = {"w": np.full((b, K), 0.1 * call, np.float32), "cos": np.full((b, K), 0.5, np.float32)}
        return chunk, diag


def test_chunks_are_executed_and_recorded():
    env = ManiSkillVecEnv(EnvConfig(task="PushCube-v1", num_envs=2, max_episode_steps=10, backend="cpu",
                                    cpu_vectorization="loop"))
    policy = ScriptedPolicy()
    sampler = SamplerConfig(kind="adaptive", execute_steps=4)
    rollout = ChunkedRollout(env, policy, sampler, itertools.count(0))
    episodes = []
    for _ in range(10):
        episodes += rollout.step()
    env.close()
    assert len(episodes) == 2 and rollout.stats.episodes == 2
    ep = episodes[0]
    assert ep.chunk_steps == [0, 4, 8]  # re-planned every 4 executed steps
    assert ep.chunks.shape == (3, H, 8) and ep.chunk_w.shape == (3, K)
    # executed actions are the first 4 of each chunk, in order
    np.testing.assert_allclose(ep.action[:4, 1], np.arange(4) / 100)
    np.testing.assert_allclose(ep.action[4:8, 0], ep.chunks[1, :4, 0])
    assert policy.calls[0] == 2  # both envs planned in one batch
    assert ep.sampler == "adaptive" and ep.sampler_params["execute_steps"] == 4
    back = table_to_episodes(episodes_to_table(episodes))[0]
    np.testing.assert_array_equal(back.chunks, ep.chunks)
    np.testing.assert_array_equal(back.chunk_w, ep.chunk_w)


def test_evaluate_uses_exactly_the_seeded_episodes():
    cfg = Config(env=EnvConfig(task="PushCube-v1", num_envs=2, max_episode_steps=8, backend="cpu",
                               cpu_vectorization="loop"),
                 sampler=SamplerConfig(execute_steps=4))
    cfg.eval.episodes, cfg.eval.seed_start = 3, 500
    result = evaluate(cfg, ScriptedPolicy(), progress=False)
    assert [e.seed for e in result.episodes] == [500, 501, 502]
    assert result.success_rate == 0.0 and "0/3" in result.summary()


def test_a_monitor_scores_every_replanning_state_and_the_episode_keeps_the_scores():
    env = ManiSkillVecEnv(EnvConfig(task="PushCube-v1", num_envs=2, max_episode_steps=10, backend="cpu",
                                    cpu_vectorization="loop"))
    seen, chunks = [], []

    def monitor(obs, instructions, sampled):
        seen.append(len(instructions))
        chunks.append(np.array(sampled))  # the chunks about to run, which the chosen signal judges
        return obs["state"][:, 0] + len(seen)  # a score the test can recompute

    rollout = ChunkedRollout(env, ScriptedPolicy(), SamplerConfig(execute_steps=4), itertools.count(0),
                             monitor=monitor)
    episodes = []
    for _ in range(10):
        episodes += rollout.step()
    env.close()
    assert seen == [2, 2, 2]  # once per re-planning, for the envs that re-plan
    for ep in episodes:
        for c, kept in enumerate(ep.chunks):  # the monitor saw the very chunk the episode then ran
            assert any(np.array_equal(kept, row) for row in chunks[c])
        steps = [s for s, _ in ep.extra["failure_scores"]]
        assert steps == ep.chunk_steps == [0, 4, 8]
        np.testing.assert_allclose([v for _, v in ep.extra["failure_scores"]],
                                   ep.state[[0, 4, 8], 0] + np.array([1, 2, 3]), rtol=1e-6)
    back = table_to_episodes(episodes_to_table(episodes))[0]
    assert back.extra["failure_scores"] == episodes[0].extra["failure_scores"]
