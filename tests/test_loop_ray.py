"""The loop on a real local Ray: rollout actors and the learner are killed mid-run and the loop carries on."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray

from afil_ray.config import ConfigError
from afil_ray.driver import LoopDriver, _placement_problem
from afil_ray.replay.store import ReplayStore

from loop_fixtures import loop_config, make_start_checkpoint


def _kill_then_stop(driver: LoopDriver, log: list[str]) -> None:
    """Kill rollout actor 0 once episodes flow and the learner once it has published; stop the loop when the
    restarted learner has published twice more and the restarted worker 0 has applied a newer version."""
    deadline = time.monotonic() + 800

    def wait(condition) -> bool:
        while time.monotonic() < deadline and not condition():
            time.sleep(0.5)
        return condition()

    wait(lambda: driver.metrics is not None and driver.metrics.env_steps > 0)
    ray.kill(driver.rollouts[0], no_restart=False)
    log.append("rollout0")
    wait(lambda: driver.metrics.newest_version >= 2)
    at_kill = driver.metrics.newest_version
    ray.kill(driver.learner, no_restart=False)
    log.append("learner")
    if wait(lambda: driver.metrics.newest_version >= at_kill + 2
            and max(driver.metrics.versions_applied.get(0, {0})) > at_kill):
        log.append("recovered")
    driver.stopping = True


@pytest.mark.timeout(1200)  # actor start-up and restarts are slow on a loaded 2-core machine
def test_loop_survives_killed_rollout_actor_and_learner(tmp_path):
    cfg = loop_config(tmp_path, duration_s=900, local_num_cpus=3, rollout_cpus=1, learner_cpus=1,
                      eval_every_s=0, round_s=2.0)
    make_start_checkpoint(cfg)
    driver = LoopDriver(cfg)
    killed: list[str] = []
    killer = threading.Thread(target=_kill_then_stop, args=(driver, killed), daemon=True)
    killer.start()
    summary = driver.run()
    killer.join(timeout=5)
    assert killed == ["rollout0", "learner", "recovered"]
    assert summary["actor_restarts"] >= 2  # both kills were seen and survived
    assert summary["versions_published"] >= 3 and summary["versions_monotonic"]
    # both workers picked up versions, including worker 0 after its restart
    assert all(n >= 1 for n in summary["versions_applied_per_worker"].values())
    assert len(summary["versions_applied_per_worker"]) == 2
    assert summary["final_checkpoint"] is not None
    store = ReplayStore(cfg.replay.root)
    assert store.verify() == []  # every shard reads back: a kill never leaves a partial shard
    episodes = store.read_episodes()
    # the summary counts what this run stored (its run id on every episode), which includes what a killed
    # round stored but never reported
    ours = Counter(e.outcome for e in episodes if e.run_id == summary["run_id"])
    assert len(episodes) == sum(ours.values()) and summary["episodes"] == dict(ours)
    assert sum(summary["episodes_reported"].values()) <= sum(ours.values())
    assert {e.policy_version for e in episodes} - {0}  # episodes from published versions were harvested
    tb = Path(cfg.run_dir) / "tb" / summary["run_id"]  # a TensorBoard folder per run
    assert any(f.name.startswith("events.out.tfevents") for f in tb.iterdir())


@pytest.fixture(autouse=True)
def _no_ray_left():
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow  # about 45 s (the clean stop on SIGTERM); test_ray_job runs the same command line end to end
@pytest.mark.timeout(1200)
def test_sigterm_stops_the_loop_cleanly(tmp_path):
    """`afil-ray run` as users start it; SIGTERM (what `ray job stop` and schedulers send) ends it cleanly."""
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from afil_ray.config import to_yaml

    cfg = loop_config(tmp_path, duration_s=900, local_num_cpus=3, rollout_cpus=1, learner_cpus=1,
                      num_rollout_actors=1, eval_every_s=0)
    make_start_checkpoint(cfg)
    config = tmp_path / "loop.yaml"
    config.write_text(to_yaml(cfg))
    run = subprocess.Popen([str(Path(sys.executable).parent / "afil-ray"), "run", "--config", str(config)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    checkpoints = Path(cfg.run_dir) / "learner" / "checkpoints"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not (checkpoints / "latest").is_file() and run.poll() is None:
        time.sleep(1)  # the learner has trained and checkpointed: every part of the loop is running
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    summary = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    assert summary["stopped_by_signal"] and summary["final_checkpoint"]
    final = Path(summary["final_checkpoint"])
    assert final.is_dir() and (checkpoints / "latest").read_text().strip() == final.name
    store = ReplayStore(cfg.replay.root)
    assert store.verify() == [] and len(store.read_episodes()) >= sum(summary["episodes"].values())


@pytest.mark.timeout(600)
def test_more_cpus_than_the_local_ray_has_is_an_error_at_once(tmp_path):
    cfg = loop_config(tmp_path, local_num_cpus=2, rollout_cpus=1, learner_cpus=1, num_rollout_actors=2,
                      eval_every_s=0)
    make_start_checkpoint(cfg)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"ask for 3 CPU in all .* there are 2 on the local Ray"):
        LoopDriver(cfg).run()
    assert time.monotonic() - t0 < 120  # not the 10-minute wait for actors that can never be placed


@pytest.mark.timeout(300)
def test_a_published_version_outlives_the_learner_that_published_it():
    """The board owns each packet: killing the publisher (the learner) loses no version (issue 19 item 5)."""
    import numpy as np

    from actors.weight_board import BoardWeightSource, WeightBoardActor, ray_publisher
    from afil_ray.loop.weights import WeightPacket

    @ray.remote(num_cpus=0)
    class Publisher:
        def publish(self, board: object, version: int) -> None:
            big = np.full(300_000, version, np.float32)  # above Ray's inline size: a real object-store object
            ray_publisher(board)(WeightPacket(version, {"failure_head": {"w": big}}, learner_step=version))

    ray.init(num_cpus=1, include_dashboard=False)
    board = WeightBoardActor.remote()
    publisher = Publisher.remote()
    ray.get(publisher.publish.remote(board, 5))
    ray.kill(publisher, no_restart=True)
    time.sleep(1.0)
    packet = BoardWeightSource(board).poll(0, block=True)
    assert packet is not None and packet.version == 5
    assert float(packet.components["failure_head"]["w"][0]) == 5.0


def test_placement_problem_names_the_demand_and_the_capacity():
    """What the loop checks before it places actors (on a cluster after loop.resource_wait_s): totals, and that
    every actor fits on one node."""
    node = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
    actors = [("learner", {"CPU": 2.0, "GPU": 0.25}), *[(f"rollout {i}", {"CPU": 1.0, "GPU": 0.15}) for i in range(4)]]
    assert _placement_problem(actors, [node]) is None
    assert "ask for 1.85 GPU in all" in _placement_problem([*actors, ("rollout 4", {"CPU": 1.0, "GPU": 1.0})], [node])
    dead = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    assert "there are 8" in _placement_problem([("learner", {"CPU": 9.0, "GPU": 0.0})], [node, dead])
    two_small = [{"Alive": True, "Resources": {"CPU": 2.0}}] * 2
    problem = _placement_problem([("learner", {"CPU": 3.0, "GPU": 0.0})], two_small)
    assert problem == ("the learner actor asks for 3 CPU, 0 GPU but no node has that much (the largest: 2 CPU, "
                       "0 GPU)")


def _stop_when(driver: LoopDriver, condition, timeout_s: float = 500) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (driver.metrics is not None and condition(driver.metrics)):
        time.sleep(0.5)
    driver.stopping = True


@pytest.mark.timeout(900)
def test_the_loop_branches_trains_the_critic_and_ranks_with_it(tmp_path):
    """Issue 22's loop: a branch actor branches the rollouts the rank-sampling actor stores, the learner trains the
    critic on those branches and ships it, and the actor ranks its candidates with the shipped critic; TensorBoard
    gets the branch counts, the critic's loss and held-out AUROC, and the live alarm that scores with the critic."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = loop_config(tmp_path, duration_s=600, local_num_cpus=4, rollout_cpus=1, learner_cpus=1, branch_cpus=1,
                      num_rollout_actors=1, num_branch_actors=1, eval_every_s=0, learner_mode="critic",
                      keep_success_snapshots=True, min_failures=2, branch_states_per_round=2, monitor="critic")
    cfg.env.snapshot_every = 4
    cfg.policy.critic = True
    cfg.sampler.kind, cfg.sampler.k = "rank", 2
    cfg.train.mode = "critic"
    cfg.branches.per_state, cfg.branches.states_per_episode = 2, 1
    make_start_checkpoint(cfg)
    driver = LoopDriver(cfg)
    stopper = threading.Thread(target=_stop_when, daemon=True, args=(
        driver, lambda m: m.newest_version >= 2 and m.branches >= 4 and any(m.versions_applied.values())))
    stopper.start()
    summary = driver.run()
    stopper.join(timeout=5)
    assert summary["branches"]["branches"] >= 4 and summary["versions_published"] >= 2
    assert summary["episodes_in_lost_rounds"] == 0  # the branches are stored and reported, not lost
    assert summary["versions_applied_per_worker"].get(0, 0) >= 1  # the rank actor acts with a shipped critic
    store = ReplayStore(cfg.replay.root)
    branches = store.read_episodes(outcome="branch")
    rollouts = {e.episode_id for e in store.read_episodes() if e.source == "rollout"}
    assert branches and {e.parent_episode_id for e in branches} <= rollouts
    assert {e.sampler for e in store.read_episodes() if e.source == "rollout"} == {"rank"}
    # the live alarm (loop.monitor=critic): every rollout keeps the critic's score at each re-planning step
    assert all(len(e.extra["failure_scores"]) == len(e.chunk_steps) for e in store.read_episodes()
               if e.source == "rollout")
    tags = EventAccumulator(str(Path(cfg.run_dir) / "tb" / summary["run_id"])).Reload().Tags()["scalars"]
    assert {"branches/total", "branches/success_rate", "learner/loss_critic_q"} <= set(tags)
    assert {f"detect/max_score/{o}" for o in ("success", "failure")} & set(tags)
    assert any(t.startswith("critic/") for t in tags)  # held-out AUROC at the learner's checkpoints
