"""Matched-state branches (issue 22, part 1): K continuations with fresh noise from restored states of stored
rollouts, stored as grouped ``branch`` episodes. A tiny untrained policy on 12-step PullCube episodes with a
snapshot and a re-planning point every 4 steps (states 0, 4 and 8 are eligible)."""

from __future__ import annotations

import dataclasses
import itertools
import os

import duckdb
import numpy as np
import pyarrow.ipc as ipc
import pytest

from afil_ray.branches import (
    BranchJob,
    BranchPoint,
    BranchRunner,
    branch_noise_seed,
    branch_rows,
    branch_task,
    branched_keys,
    choose_steps,
    critic_scorer,
    eligible_steps,
    group_outcomes,
    open_points,
)
from afil_ray.branches.decides import (
    StateRecord,
    analyse,
    chunk_noise_seed,
    read_records,
    rescore,
    run_decides,
)
from afil_ray.cli import main
from afil_ray.config import BranchConfig, ConfigError, load_config
from afil_ray.envs import snapshot as snap
from afil_ray.envs.maniskill import ManiSkillVecEnv
from afil_ray.policy.checkpoint import load_policy
from afil_ray.replay.episode import Episode
from afil_ray.replay.store import ReplayStore
from afil_ray.rollout import ChunkedRollout

from loop_fixtures import loop_config, make_start_checkpoint

STEP = 4  # the state most tests branch from


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Config, policy, checkpoint path and two stored-rollout parents (failures with snapshots and chunks)."""
    cfg = loop_config(tmp_path_factory.mktemp("branches"))
    cfg.env.snapshot_every, cfg.sampler.steps = 4, 2
    path = make_start_checkpoint(cfg)
    policy = load_policy(path).eval()
    with ManiSkillVecEnv(cfg.env) as env:
        rollout = ChunkedRollout(env, policy, cfg.sampler, itertools.count(10), noise_seed=lambda seed: seed)
        parents: list[Episode] = []
        while len(parents) < 2:
            parents += rollout.step()
    for p in parents:
        assert p.outcome == "failure" and p.length == 12 and p.snapshot_steps == [0, 4, 8] == p.chunk_steps
    return cfg, policy, path, parents[:2]


def store_with(tmp_path, cfg, parents) -> ReplayStore:
    cfg.replay.root = str(tmp_path / "replay")
    store = ReplayStore.from_config(cfg.replay)
    store.write_episodes(parents)
    return store


def flat_state(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """A simulator state dict (torch tensors or arrays) as {path: array}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat_state(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v.cpu().numpy() if hasattr(v, "cpu") else np.asarray(v)
    return out


def test_branch_groups_share_their_restored_state_exactly(setup):
    cfg, policy, _, parents = setup
    parent = parents[0]
    point = BranchPoint(parent, STEP, dict(zip(parent.snapshot_steps, parent.snapshots, strict=True))[STEP])
    with ManiSkillVecEnv(dataclasses.replace(cfg.env, num_envs=3)) as env:
        env.reset([1, 2, 3])  # every slot with its own history before the restore
        rng = np.random.default_rng(0)
        for _ in range(3):
            env.step(rng.uniform(-1, 1, (3, env.action_dim)).astype(np.float32))
        restored = [env.restore(i, point.snapshot, STEP)["state"] for i in range(3)]
        sims = [flat_state(env.local_env(i).base.get_state_dict()) for i in range(3)]
        want = flat_state(snap.loads(point.snapshot))
        for sim in sims:
            assert sim.keys() == want.keys()
            for key in want:  # every slot holds the same state: the snapshot's, to the physics round trip's rounding
                np.testing.assert_array_equal(sim[key], sims[0][key], err_msg=key)
                np.testing.assert_allclose(sim[key], want[key], rtol=0, atol=1e-6, err_msg=key)
        branches = list(BranchRunner(env, policy, cfg.sampler).run([BranchJob(point, k) for k in range(3)]))
    assert sorted(b.branch_index for b in branches) == [0, 1, 2]
    for b in branches:
        assert b.outcome == "branch" and b.branch_group == point.group == f"{parent.episode_id}@{STEP}"
        assert b.parent_episode_id == parent.episode_id and b.branch_step == STEP and b.chunk_steps[0] == 0
        assert b.length == parent.length - STEP  # the parent's remaining step budget
        assert np.array_equal(b.state[0], branches[0].state[0]) and np.array_equal(b.state[0], restored[0])
        np.testing.assert_allclose(b.state[0], parent.state[STEP], rtol=0, atol=1e-6)
        assert not b.snapshots and b.seed == parent.seed and b.instruction == parent.instruction
    firsts = [b.chunks[0] for b in branches]
    assert not np.array_equal(firsts[0], firsts[1]) and not np.array_equal(firsts[1], firsts[2])  # fresh noise


def test_branches_are_deterministic_and_their_noise_is_their_own(setup):
    cfg, policy, _, parents = setup
    points = [BranchPoint(p, s, b) for p in parents for s, b in zip(p.snapshot_steps, p.snapshots, strict=True)
              if s in (0, 8)]
    jobs = [BranchJob(pt, k) for pt in points for k in range(2)]

    def run(seed: int) -> dict[tuple[str, int], Episode]:
        runner = BranchRunner(env, policy, cfg.sampler, seed=seed)
        return {(b.branch_group, b.branch_index): b for b in runner.run(jobs)}

    with ManiSkillVecEnv(cfg.env) as env:
        first, again, other = run(0), run(0), run(1)
    assert first.keys() == again.keys() == {(pt.group, k) for pt in points for k in range(2)}
    for key, b in first.items():
        assert np.array_equal(b.chunks, again[key].chunks) and np.array_equal(b.action, again[key].action)
        assert np.array_equal(b.state, again[key].state) and b.success == again[key].success
        parent_id, step = key[0].split("@")
        assert b.extra["noise_seed"] == branch_noise_seed(parent_id, int(step), key[1], 0)
        assert not np.array_equal(b.chunks[0], other[key].chunks[0])  # another branches.seed, other noise
    for pt in points:
        assert not np.array_equal(first[(pt.group, 0)].chunks[0], first[(pt.group, 1)].chunks[0])
    seeds = {branch_noise_seed(pt.parent.episode_id, pt.step, k) for pt in points for k in range(2)}
    assert len(seeds) == len(jobs)


def test_states_are_chunk_boundaries_with_snapshots_and_the_scorer_window_filters_them(make_episode):
    assert eligible_steps([0, 10, 20, 30, 40], [0, 8, 16, 24, 32, 40], 40) == [0]  # 40 is the episode's end
    parent = make_episode(outcome="failure", length=12, snapshots=3)
    parent.chunk_steps = [0, 4, 8]  # snapshots at 0, 4, 8 too
    cfg = BranchConfig(states_per_episode=None, open_low=0.2, open_high=0.8)
    assert [p.step for p in open_points(parent, cfg)] == [0, 4, 8]  # no scorer: every eligible state is open
    assert [p.step for p in open_points(parent, cfg, limit=8)] == [0, 4]  # no steps left at the env's limit
    estimates = {0: 0.05, 4: 0.5, 8: 0.95}
    seen = []

    def scorer(points):
        seen.append([p.step for p in points])
        assert all(np.array_equal(p.observation()["state"], parent.state[p.step]) for p in points)
        return [estimates[p.step] for p in points]

    chosen = open_points(parent, cfg, scorer)
    assert [(p.step, p.estimate) for p in chosen] == [(4, 0.5)] and seen == [[0, 4, 8]]  # one batched call
    assert open_points(parent, cfg, lambda pts: [float("nan")] * len(pts)) == []
    wide = dataclasses.replace(cfg, open_low=0.0, open_high=1.0)
    assert [p.step for p in open_points(parent, wide, scorer)] == [0, 4, 8]
    # a started group is finished whatever the scorer says of it now
    assert [p.step for p in open_points(parent, cfg, scorer, started={8})] == [4, 8]
    with pytest.raises(ValueError, match="2 estimates for 3 states"):
        open_points(parent, cfg, lambda pts: [0.5, 0.5])
    # the critic's V as the scorer: one batched call on what the parent saw at each state and its instruction
    calls = []

    def value(obs, instructions):
        calls.append((obs["state"].copy(), list(instructions)))
        return np.array([estimates[next(t for t in estimates if np.array_equal(parent.state[t], row))]
                         for row in obs["state"]])

    assert [p.step for p in open_points(parent, cfg, critic_scorer(value))] == [4]
    np.testing.assert_array_equal(calls[0][0], parent.state[[0, 4, 8]])
    assert calls[0][1] == [parent.instruction] * 3
    # uniform without a scorer: the parent's own order, a quota's states a prefix of a larger quota's
    steps = list(range(0, 200, 8))
    one = choose_steps("a", steps, BranchConfig(states_per_episode=1))
    three = choose_steps("a", steps, BranchConfig(states_per_episode=3))
    assert set(one) < set(three) and three == choose_steps("a", steps, BranchConfig(states_per_episode=3))
    picks = {tuple(choose_steps(f"ep{i}", steps, BranchConfig(states_per_episode=1))) for i in range(30)}
    assert len(picks) > 10  # spread over the states, not always the same one


def test_stored_branches_round_trip_and_the_reader_groups_them(setup, tmp_path):
    cfg, policy, _, parents = setup
    cfg = dataclasses.replace(cfg, branches=BranchConfig(per_state=3, states_per_episode=2))
    store = store_with(tmp_path, cfg, parents)
    report = branch_task(cfg, policy, store, progress=False, extra={"checkpoint": "x"})
    assert (report.parents, report.states, report.branches) == (2, 4, 12) and report.done_before == 0
    assert report.summary().startswith("PullCube-v1: branched 4 states of 2 episodes: 12 branches, success 0.00")
    stored = {b.episode_id: b for b in store.read_episodes(outcome="branch")}
    assert len(stored) == 12
    rows = branch_rows(store)
    df = rows.to_pandas()
    assert list(df["branch_group"]) == sorted(df["branch_group"]) and df.groupby("branch_group").size().eq(3).all()
    by_parent = {p.episode_id: p for p in parents}
    for row in df.itertuples():
        b = stored[row.episode_id]
        assert (b.parent_episode_id, b.branch_step, b.branch_index, b.branch_group) == (
            row.parent_episode_id, row.branch_step, row.branch_index, row.branch_group)
        assert b.extra["checkpoint"] == "x" and b.extra["parent_outcome"] == "failure" and b.source == "branch"
        assert np.array_equal(np.asarray(row.first_chunk).reshape(-1, row.action_dim), b.chunks[0])
        np.testing.assert_allclose(row.first_state, by_parent[b.parent_episode_id].state[b.branch_step], atol=1e-6)
    groups = group_outcomes(rows).to_pylist()
    assert len(groups) == 4 and all(g["branches"] == 3 and not g["mixed"] for g in groups)
    con = duckdb.connect()  # DuckDB groups the store's own columns the same way
    con.register("store", store.dataset())
    sql = con.sql("select branch_group, count(*), sum(success::int), max(chunk_steps[1]) from store "
                  "where outcome = 'branch' group by all order by all").fetchall()
    assert sql == [(g["branch_group"], 3, g["successes"], 0) for g in groups]
    others = con.sql("select count(*) from store where outcome <> 'branch' and branch_group is null").fetchall()
    assert others == [(2,)]


def test_resume_skips_done_states_and_old_shards_still_read(setup, tmp_path, capsys):
    cfg, policy, path, parents = setup
    store = store_with(tmp_path, cfg, parents)
    # a parent shard from before the branch columns existed
    shard = store.list_shards(outcome="failure")[0]
    legacy = store.read_shard(shard.path).drop_columns(["branch_group", "branch_step", "branch_index"])
    with ipc.new_file(str(tmp_path / "legacy.tmp"), legacy.schema) as w:
        w.write_table(legacy)
    os.replace(tmp_path / "legacy.tmp", store.abspath(shard.path))
    store.rebuild_manifest()
    assert all(p.branch_step is None for p in store.read_episodes())

    small = dataclasses.replace(cfg, branches=BranchConfig(per_state=1, states_per_episode=2, max_states=1))
    first = branch_task(small, policy, store, progress=False)
    assert (first.states, first.branches) == (1, 1)
    # the rest of the states, then a second branch for every state: only what is missing is rolled out
    assert branch_task(dataclasses.replace(small, branches=BranchConfig(per_state=1)), policy, store,
                       progress=False).states == 3
    keys = branched_keys(store, "PullCube-v1")
    assert len(keys) == 4 and {k[2] for k in keys} == {0}
    nothing = branch_task(dataclasses.replace(small, branches=BranchConfig(from_outcomes=["success"])), policy,
                          store, progress=False)
    assert nothing.parents == 0 and nothing.branches == 0  # no success parents in this store

    overrides = [f"replay.root={cfg.replay.root}", f"branches.checkpoint={path}", "branches.per_state=2",
                 "env.task=PullCube-v1", "env.max_episode_steps=12", "env.snapshot_every=4", "env.num_envs=2",
                 "env.backend=cpu", "env.cpu_vectorization=loop", "sampler.steps=2", "sampler.execute_steps=4"]
    assert main(["branch", "--quiet", *overrides]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("PullCube-v1: branched 4 states of 2 episodes: 4 branches") and "(4 groups from" in line
    assert len(branched_keys(store, "PullCube-v1")) == 8
    assert main(["branch", "--quiet", *overrides]) == 0
    assert capsys.readouterr().out.startswith("PullCube-v1: branched 0 states of 0 episodes: 0 branches")
    rows = branch_rows(store)
    assert rows.num_rows == 8 and group_outcomes(rows)["branches"].to_pylist() == [2, 2, 2, 2]

    # a scorer opens each parent's one state not branched yet: only those are added, with their estimate
    begun = {(p, s) for p, s, _ in branched_keys(store, "PullCube-v1")}
    wider = dataclasses.replace(cfg, branches=BranchConfig(per_state=2, states_per_episode=3))
    scored = branch_task(wider, policy, store, progress=False,
                         scorer=lambda pts: [0.0 if (p.parent.episode_id, p.step) in begun else 0.5 for p in pts])
    assert (scored.states, scored.branches) == (2, 4)
    new = [b for b in store.read_episodes(outcome="branch") if (b.parent_episode_id, b.branch_step) not in begun]
    assert len(new) == 4 and all(b.extra["estimate"] == 0.5 for b in new)
    assert branch_task(wider, policy, store, progress=False, scorer=lambda pts: [0.0] * len(pts)).states == 0


def test_bad_branch_settings_are_one_line_errors(capsys):
    for item, match in (("branches.per_state=0", r"branches\.per_state must be >= 1, got 0"),
                        ("branches.open_low=0.9", r"branches\.open_low \(0\.9\) must be <= branches\.open_high"),
                        ("branches.from_outcomes=[demo]", r"branches\.from_outcomes must be one of failure"),
                        ("branches.k=3", r"bad config key 'branches\.k'")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [item])
        assert main(["branch", item]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "config error" in err
    with pytest.raises(ValueError, match="a branch needs parent_episode_id, branch_step and branch_index"):
        Episode(task="t", outcome="branch", state=np.zeros((1, 2)), action=np.zeros((1, 1)), reward=np.zeros(1),
                step_success=np.zeros(1, bool), terminated=np.zeros(1, bool), truncated=np.zeros(1, bool),
                final_state=np.zeros(2))


def test_groups_with_both_outcomes_are_mixed(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=4)
    outcomes = {("p", 0): [True, False, False], ("p", 8): [False, False], ("q", 4): [True, True]}
    branches = []
    for (parent, step), wins in outcomes.items():
        for k, won in enumerate(wins):
            ep = make_episode(outcome="failure", length=5, seed=len(branches), snapshots=0)
            ep.step_success[:] = won
            branches.append(dataclasses.replace(
                ep, outcome="branch", parent_episode_id=parent, branch_step=step, branch_index=k, chunk_steps=[0],
                chunks=np.full((1, 2, 3), len(branches), np.float32)))
    store.write_episodes(branches)
    rows = branch_rows(store, "PullCube-v1")
    assert rows["first_chunk"].to_pylist()[3] == [3.0] * 6 and rows["action_dim"].to_pylist() == [3] * 7
    groups = {g["branch_group"]: (g["branches"], g["successes"], g["mixed"]) for g in group_outcomes(rows).to_pylist()}
    assert groups == {"p@0": (3, 1, True), "p@8": (2, 0, False), "q@4": (2, 2, False)}
    assert branch_rows(store, "StackCube-v1").num_rows == 0 and group_outcomes(branch_rows(store, "x")).num_rows == 0


def test_the_loops_branch_worker_branches_new_rollouts_with_the_newest_weights(setup, tmp_path):
    """``loop.num_branch_actors``' worker (Ray-free): each round branches at most ``loop.branch_states_per_round``
    states per task with the newest published weights, into the store the learner reads; rollouts stored later
    are branched in later rounds, and a round with nothing left says so (idle)."""
    from afil_ray.loop.board import LocalWeightSource, WeightBoard
    from afil_ray.loop.branching import BranchWorker
    from afil_ray.loop.weights import pack

    cfg, policy, path, parents = setup
    cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, init_from=str(path),
                                                            branch_states_per_round=1),
                              branches=dataclasses.replace(cfg.branches, per_state=2, states_per_episode=1))
    store = store_with(tmp_path, cfg, parents[:1])
    board = WeightBoard()
    worker = BranchWorker(cfg, 0, LocalWeightSource(board))
    try:
        first = worker.run(60.0)  # one state of the one parent, then nothing left: the round ends early
        assert (first.states, first.branches, first.idle) == (1, 2, True) and first.seconds < 60
        stored = store.read_episodes(outcome="branch")
        assert len(stored) == 2 and {e.parent_episode_id for e in stored} == {parents[0].episode_id}
        assert {e.policy_version for e in stored} == {0}
        packet = pack(policy, ("failure_head",), 7, 70)
        board.publish(7, packet, 70, packet.nbytes, ("failure_head",))  # a newer version, then a new rollout
        store.write_episodes(parents[1:])
        second = worker.run(60.0)
        assert (second.version, second.branches, second.per_task) == (7, 2, {cfg.env.task: 2})
        new = [e for e in store.read_episodes(outcome="branch") if e.parent_episode_id == parents[1].episode_id]
        assert len(new) == 2 and {e.policy_version for e in new} == {7}
        assert {e.extra.get("branch_worker") for e in new} == {0}
    finally:
        worker.close()


def test_chunk_decides_continues_each_first_chunk_with_fresh_noise_and_resumes(setup, tmp_path):
    cfg, policy, _, parents = setup
    points = [BranchPoint(p, STEP, dict(zip(p.snapshot_steps, p.snapshots, strict=True))[STEP]) for p in parents]
    out = tmp_path / "decides.jsonl"
    branches: list[Episode] = []

    def scorer(point, first):  # a stub critic: Q grows with the chunk's first action, V is fixed
        return first[:, 0, 0], 0.5

    with ManiSkillVecEnv(cfg.env) as env:
        runner = BranchRunner(env, policy, cfg.sampler)
        records = run_decides(runner, points, 2, 2, out, scorer, on_branch=branches.append)
        assert [r.group for r in records] == [p.group for p in points] and len(branches) == 8
        for pt in points:
            mine = {b.branch_index: b for b in branches if b.branch_group == pt.group}
            # a chunk's continuations run the same first chunk (seeded from the chunk, not the branch) ...
            for c in range(2):
                a, b = mine[2 * c], mine[2 * c + 1]
                assert a.extra["first_noise_seed"] == b.extra["first_noise_seed"] == chunk_noise_seed(
                    pt.parent.episode_id, STEP, c)
                np.testing.assert_allclose(a.chunks[0], b.chunks[0], rtol=0, atol=1e-5)
                assert not np.allclose(a.chunks[1], b.chunks[1])  # ... and then their own noise
            assert not np.allclose(mine[0].chunks[0], mine[2].chunks[0])  # two first chunks, two noises
            record = next(r for r in records if r.group == pt.group)
            assert record.outcomes == [[mine[2 * c + m].success for m in range(2)] for c in range(2)]
            np.testing.assert_allclose(record.q, [mine[0].chunks[0][0, 0], mine[2].chunks[0][0, 0]], atol=1e-6)
            assert record.v == 0.5 and record.step == STEP
        # a critic trained later scores the same first chunks, drawn again from their noise seeds
        for old, new in zip(records, rescore(records, points, policy, scorer, cfg.sampler), strict=True):
            np.testing.assert_allclose(new.q, old.q, rtol=0, atol=1e-5)
            assert new.outcomes == old.outcomes
        # resumable: a finished state is never run again, a truncated record (a kill mid-write) is
        lines = out.read_text().splitlines()
        out.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
        again: list[Episode] = []
        records_again = run_decides(runner, points, 2, 2, out, scorer, on_branch=again.append)
    assert {b.branch_group for b in again} == {points[1].group} and len(again) == 4
    assert [r.group for r in records_again] == [p.group for p in points]
    assert len(out.read_text().splitlines()) == 2 and read_records(out)[0] == records[0]


def test_chunk_decides_analysis_tells_a_deciding_chunk_from_later_noise():
    rng = np.random.default_rng(0)
    # the chunk decides everything: chunk 1 and 3 always succeed, 0 and 2 never
    decided = [StateRecord(f"s{i}", "T", "failure", 0, [[c % 2 == 1] * 8 for c in range(4)], q=[0.1, 0.9, 0.2, 0.8])
               for i in range(20)]
    result = analyse(decided)
    assert result.chunk_share == pytest.approx(1.0) and result.chunk_share_p < 0.01
    assert result.oracle_gain == pytest.approx(0.5) and result.critic_gain == pytest.approx(0.5)
    assert result.critic_concordance == pytest.approx(1.0)
    backwards = [dataclasses.replace(r, q=[0.9, 0.1, 0.8, 0.2]) for r in decided]
    assert analyse(backwards).critic_gain == pytest.approx(-0.5) and analyse(backwards).critic_concordance == 0.0

    def states(rates_of_state, n=300):
        return [StateRecord(f"s{i}", "T", "success", 0,
                            [list(rng.random(8) < p) for p in rates_of_state(i)], q=list(rng.random(4)))
                for i in range(n)]

    # later noise decides everything: every chunk succeeds half the time
    noise = analyse(states(lambda i: [0.5] * 4))
    assert abs(noise.chunk_share) < 0.03 and noise.chunk_share_p > 0.01
    assert noise.oracle_ci[0] < 0 < noise.oracle_ci[1] and noise.critic_ci[0] < 0 < noise.critic_ci[1]
    # each chunk 0.2 or 0.8 at random: Var(p_c) / p(1-p) = 0.09 / 0.25 = 0.36 of the variance is the chunk's
    mixed = analyse(states(lambda i: rng.choice([0.2, 0.8], 4)))
    assert mixed.chunk_share == pytest.approx(0.36, abs=0.06) and mixed.chunk_share_p < 0.01
    assert mixed.chunk_share_ci[0] < 0.36 < mixed.chunk_share_ci[1] and mixed.chunk_sd == pytest.approx(0.3, abs=0.03)
    assert noise.critic_concordance_ci[0] < 0.5 < noise.critic_concordance_ci[1]
    assert 0.15 < mixed.oracle_gain < 0.3 and mixed.oracle_ci[0] > 0  # picking by 4 continuations: not always right
    with pytest.raises(ValueError, match="2 chunks and 2 continuations"):
        analyse([StateRecord("s", "T", "failure", 0, [[True, False]])])
