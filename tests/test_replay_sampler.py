"""Window sampler on real shards: exact windows and padding, images, selection, balance, refresh, memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from afil_ray.replay import Episode, ReplayStore, WindowSampler, table_to_episodes


def source_episodes(store: ReplayStore) -> dict[tuple[str, int], Episode]:
    """(shard path, row) -> episode, to look up where a sampled window came from."""
    return {(shard.path, row): ep for shard in store.list_shards()
            for row, ep in enumerate(table_to_episodes(store.read_shard(shard.path)))}


def test_windows_match_the_source_episode_exactly_with_end_padding(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=2)
    store.write_episodes([make_episode(length=n, seed=i) for i, n in enumerate([6, 1, 9])])
    sampler = WindowSampler(store, horizon=4, seed=0)
    assert (sampler.num_steps, sampler.num_episodes, sampler.state_dim, sampler.action_dim) == (16, 3, 5, 3)

    batch = sampler.sample(2000)

    assert batch["state"].shape == (2000, 5) and batch["state"].dtype == np.float32
    assert batch["action"].shape == (2000, 4, 3) and batch["action"].dtype == np.float32
    assert batch["action_is_pad"].shape == (2000, 4) and batch["action_is_pad"].dtype == bool
    assert "images" not in batch
    sources = source_episodes(store)
    seen = set()
    for i in range(2000):
        ep = sources[(sampler.shard_paths[batch["shard"][i]], batch["row"][i])]
        t, T = int(batch["timestep"][i]), ep.length
        chunk = [min(t + k, T - 1) for k in range(4)]
        assert np.array_equal(batch["state"][i], ep.state[t])
        assert np.array_equal(batch["action"][i], ep.action[chunk])
        assert batch["action_is_pad"][i].tolist() == [t + k >= T for k in range(4)]
        seen.add((ep.episode_id, t))
    assert len(seen) == 16  # every step of every episode is a window start

    # The window two steps before the end of the 9-step episode: the last action twice more, flagged as pad.
    long_ep = next(ep for ep in sources.values() if ep.length == 9)
    i = next(i for i in range(2000) if batch["timestep"][i] == 7 and sources[
        (sampler.shard_paths[batch["shard"][i]], batch["row"][i])] is long_ep)
    assert batch["action_is_pad"][i].tolist() == [False, False, True, True]
    assert np.array_equal(batch["action"][i], long_ep.action[[7, 8, 8, 8]])


def test_images_are_observed_at_the_window_start(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=3, compression="zstd")  # decompressed on load
    store.write_episodes([make_episode(length=5, cameras=("base", "hand"), seed=i) for i in range(3)])
    sampler = WindowSampler(store, horizon=2, seed=1)
    assert sampler.cameras == ("base", "hand")

    batch = sampler.sample(64)

    sources = source_episodes(store)
    for cam in ("base", "hand"):
        assert batch["images"][cam].shape == (64, 8, 6, 3) and batch["images"][cam].dtype == np.uint8
    for i in range(64):
        ep = sources[(sampler.shard_paths[batch["shard"][i]], batch["row"][i])]
        t = batch["timestep"][i]
        for cam in ("base", "hand"):
            assert np.array_equal(batch["images"][cam][i], ep.images[cam][t])
    assert "images" not in WindowSampler(store, horizon=2, cameras=()).sample(4)


def test_selection_by_task_and_outcome(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=4)
    for task in ("A", "B"):
        for outcome in ("demo", "success", "corrected", "failure"):
            store.write_episodes([make_episode(task, outcome, length=3, seed=i) for i in range(2)])

    success_head = WindowSampler(store, horizon=2, tasks="A", outcomes=("demo", "success", "corrected"))
    failure_head = WindowSampler(store, horizon=2, outcomes=("failure",))

    assert set(success_head.partitions) == {("A", "demo"), ("A", "success"), ("A", "corrected")}
    assert set(failure_head.partitions) == {("A", "failure"), ("B", "failure")}
    for sampler in (success_head, failure_head):
        picked = {sampler.partitions[p] for p in sampler.sample(500)["partition"]}
        assert picked == set(sampler.partitions)
    with pytest.raises(RuntimeError, match="no replay steps"):
        WindowSampler(store, horizon=2, tasks="C").sample(1)


def test_balanced_and_weighted_sampling_proportions(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=8)
    store.write_episodes([make_episode("A", "demo", length=50, seed=i) for i in range(8)])  # 400 steps
    store.write_episodes([make_episode("A", "failure", length=10, seed=9)])  # 10 steps
    n = 20000

    def share_of_failures(sampler: WindowSampler) -> float:
        partition = sampler.sample(n)["partition"]
        return float(np.mean([sampler.partitions[p][1] == "failure" for p in partition]))

    assert share_of_failures(WindowSampler(store, horizon=4, seed=0)) == pytest.approx(10 / 410, abs=0.01)
    balanced = WindowSampler(store, horizon=4, balance="partitions", seed=0)
    assert share_of_failures(balanced) == pytest.approx(0.5, abs=0.02)
    weighted = WindowSampler(store, horizon=4, weights={("A", "demo"): 3, ("A", "failure"): 1}, seed=0)
    assert share_of_failures(weighted) == pytest.approx(0.25, abs=0.02)
    # Within a partition the steps stay uniform: every failure step turns up about equally often.
    batch = WindowSampler(store, horizon=4, outcomes="failure", seed=0).sample(n)
    assert np.bincount(batch["timestep"], minlength=10) / n == pytest.approx(np.full(10, 0.1), abs=0.01)


def test_task_balance_weighs_tasks_equally_and_keeps_outcomes_proportional_within_each(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=8)
    store.write_episodes([make_episode("Long", "demo", length=90, seed=i) for i in range(6)])  # 540 steps
    store.write_episodes([make_episode("Long", "corrected", length=60, seed=9)])  # 60 steps
    store.write_episodes([make_episode("Short", "demo", length=20, seed=i) for i in range(3)])  # 60 steps
    n = 30000

    def shares(sampler: WindowSampler) -> dict[tuple[str, str], float]:
        drawn = [sampler.partitions[p] for p in sampler.sample(n)["partition"]]
        return {part: drawn.count(part) / n for part in set(drawn)}

    uniform = shares(WindowSampler(store, horizon=4, seed=0))  # by steps: the long task takes 10 of 11 draws
    assert uniform[("Short", "demo")] == pytest.approx(60 / 660, abs=0.01)
    by_task = shares(WindowSampler(store, horizon=4, balance="tasks", seed=0))
    assert by_task[("Short", "demo")] == pytest.approx(0.5, abs=0.015)
    assert by_task[("Long", "demo")] == pytest.approx(0.5 * 540 / 600, abs=0.015)  # demos 9:1 to corrections
    assert by_task[("Long", "corrected")] == pytest.approx(0.5 * 60 / 600, abs=0.01)
    by_partition = shares(WindowSampler(store, horizon=4, balance="partitions", seed=0))
    assert by_partition[("Long", "corrected")] == pytest.approx(1 / 3, abs=0.015)
    with pytest.raises(ValueError, match="balance must be one of none, tasks, partitions"):
        WindowSampler(store, horizon=4, balance="episodes")


def test_seeded_samplers_repeat_and_refresh_follows_the_store(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=1)
    store.write_episodes([make_episode(length=6, seed=i) for i in range(3)])
    a, b = WindowSampler(store, horizon=3, seed=7), WindowSampler(store, horizon=3, seed=7)
    first, second = a.sample(32), b.sample(32)
    assert all(np.array_equal(first[k], second[k]) for k in ("state", "action", "action_is_pad", "timestep"))

    store.write_episodes([make_episode(length=4, seed=10)])
    (tmp_path / store.list_shards()[0].path).unlink()  # retired by another process
    assert a.refresh() == 1
    assert a.num_steps == 6 + 6 + 4 and a.num_episodes == 3
    assert {int(s) for s in a.sample(500)["shard"]} == {1, 2, 3}  # shard indexes never shift


def test_mismatched_dims_name_the_shard(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=1)
    store.write_episodes([make_episode("A", "demo", state_dim=5)])
    [odd] = store.write_episodes([make_episode("B", "demo", state_dim=7)])
    with pytest.raises(ValueError, match=f"{odd.path}.*state has 7 values per step.*have 5"):
        WindowSampler(store, horizon=2)
    assert WindowSampler(store, horizon=2, tasks="B").state_dim == 7

    [no_camera] = store.write_episodes([make_episode("C", "demo")])
    store.write_episodes([make_episode("C", "failure", cameras=("base",))])
    with pytest.raises(ValueError, match=f"{no_camera.path} has no images for camera"):
        WindowSampler(store, horizon=2, tasks="C", cameras=("base",))


def test_a_corrupt_shard_is_quarantined_and_skipped(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=1)
    shards = store.write_episodes([make_episode(length=5, seed=i) for i in range(3)])
    path = tmp_path / shards[1].path
    path.write_bytes(path.read_bytes()[:-100])

    sampler = WindowSampler(store, horizon=2)

    assert sampler.num_steps == 10 and [c.path for c in store.quarantined] == [shards[1].path]
    assert not path.exists()


def test_sampler_maps_shards_instead_of_loading_them(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=8)
    store.write_episodes([make_episode(length=200, state_dim=64, action_dim=16, seed=i) for i in range(32)])
    data_bytes = 32 * 200 * (64 + 16) * 4  # 2 MB of state and action values
    before = pa.total_allocated_bytes()

    sampler = WindowSampler(store, horizon=8)
    sampler.sample(16)

    assert pa.total_allocated_bytes() - before < data_bytes / 20  # views over the memory maps, no copies
    for segment in sampler._segments:
        assert not segment.state.flags.owndata and not segment.action.flags.owndata


def test_corrected_from_restore_starts_windows_at_the_restore_step(tmp_path, make_episode):
    """The success head can skip the failed prefix a corrected trajectory keeps: windows of corrected episodes
    start at their restore step (their actions still run into the planner's suffix), other outcomes unchanged."""
    store = ReplayStore(tmp_path, episodes_per_shard=2)
    fixes = []
    for i, restore in enumerate([7, 0, 30]):  # 30 > length: nothing sampleable, not an error
        ep = make_episode(outcome="corrected", length=12, seed=10 + i)
        ep.extra = {"restore_step": restore}
        fixes.append(ep)
    store.write_episodes([*fixes, make_episode(outcome="demo", length=5, seed=20)])
    everything = WindowSampler(store, horizon=3, seed=0)
    suffix = WindowSampler(store, horizon=3, seed=0, corrected_from_restore=True)
    assert everything.num_steps == 3 * 12 + 5
    assert suffix.num_steps == 5 + 12 + 0 + 5
    assert suffix.partition_steps() == {("PullCube-v1", "corrected"): 17, ("PullCube-v1", "demo"): 5}
    sources = source_episodes(store)
    batch = suffix.sample(2000)
    seen = set()
    for i in range(len(batch["state"])):
        ep = sources[(suffix.shard_paths[batch["shard"][i]], int(batch["row"][i]))]
        t = int(batch["timestep"][i])
        seen.add((ep.seed, t))
        if ep.outcome == "corrected":
            assert t >= ep.extra["restore_step"]
        np.testing.assert_array_equal(batch["state"][i], ep.state[t])
        np.testing.assert_array_equal(batch["action"][i], ep.action[[min(t + k, ep.length - 1) for k in range(3)]])
    assert seen == {(10, t) for t in range(7, 12)} | {(11, t) for t in range(12)} | {(20, t) for t in range(5)}


def test_an_unreadable_restore_step_quarantines_its_shard_not_the_run(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=1)
    good, bad = make_episode(outcome="corrected", length=6, seed=1), make_episode(outcome="corrected", length=6, seed=2)
    good.extra, bad.extra = {"restore_step": 2}, {"restore_step": "late"}
    _, bad_shard = store.write_episodes([good, bad])
    sampler = WindowSampler(store, horizon=2, corrected_from_restore=True)
    assert sampler.num_steps == 4
    [quarantined] = store.quarantined
    assert quarantined.path == bad_shard.path and "restore_step" in quarantined.reason
