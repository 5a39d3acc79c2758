"""``ray job submit`` against a real local head: the way users launch the loop on a cluster."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from pathlib import Path

import psutil
import pytest

from afil_ray.config import to_yaml

from loop_fixtures import loop_config, make_start_checkpoint
from ray_head import REPO, _head_processes, _ray, own_head


@pytest.fixture
def head():
    with own_head() as (address, env, _):
        yield address, env


@pytest.mark.timeout(1200)  # actor start-up and restarts are slow on a loaded 2-core machine
def test_ray_job_submit_runs_the_loop(tmp_path, head):
    address, env = head
    cfg = loop_config(tmp_path, duration_s=20, rollout_cpus=1, learner_cpus=1, eval_every_s=0,
                      num_rollout_actors=1)
    make_start_checkpoint(cfg)
    config = tmp_path / "job.yaml"
    config.write_text(to_yaml(cfg))
    job = f"afil-test-{uuid.uuid4().hex[:8]}"
    _ray("job", "submit", "--address", address, "--submission-id", job, "--working-dir", str(REPO), "--no-wait",
         "--", "afil-ray", "run", "--config", str(config), env=env)
    deadline, status = time.monotonic() + 900, ""
    while time.monotonic() < deadline:
        done = _ray("job", "status", "--address", address, job, env=env)
        status = (done.stdout + done.stderr).lower()  # the CLI logs "Job '<id>' succeeded" to stderr
        if any(f"' {s}" in status for s in ("succeeded", "failed", "was stopped")):
            break
        time.sleep(5)
    logs = _ray("job", "logs", "--address", address, job, env=env).stdout
    assert f"job '{job}' succeeded" in status, f"{status}\n{logs[-3000:]}"
    summary = json.loads(logs[logs.index("{\n"):logs.index("\n}\n") + 2])  # the summary the driver prints
    assert summary["env_steps"] > 0 and summary["episodes"]
    assert summary["final_checkpoint"] and Path(summary["final_checkpoint"]).is_dir()
    assert (Path(cfg.run_dir) / "tb").is_dir() and (Path(cfg.run_dir) / "summary.json").is_file()
    # what the user reads: the live progress line, and neither Ray's error-level restart warning nor the
    # simulators' per-actor notices
    assert "afil-ray run 20/20 s, env_steps/s=" in logs and "learner_step=" in logs, logs[-3000:]
    assert "constructor arguments in the object store" not in logs
    around_summary = logs[:logs.index("{\n")] + logs[logs.index("\n}\n"):]  # the summary names mani_skill's version
    assert "mani_skill" not in around_summary, logs[-3000:]


def _actor_pids(temp: str, cls: str) -> set[int]:
    """PIDs of the head's actor processes of one class (Ray titles them ``ray::<Class>...``)."""
    pids = set()
    for proc in _head_processes(temp):
        with contextlib.suppress(psutil.Error):
            if (proc.cmdline() or [""])[0].startswith(f"ray::{cls}"):
                pids.add(proc.pid)
    return pids


def _job_status(address: str, job: str, env: dict[str, str]) -> str:
    done = _ray("job", "status", "--address", address, job, env=env)
    return (done.stdout + done.stderr).lower()  # the CLI logs "Job '<id>' succeeded" to stderr


def _episodes_by_process(store) -> dict[int, list]:
    """Episodes grouped by the process that wrote them (its pid is in the shard name: one actor incarnation)."""
    from afil_ray.replay.episode import table_to_episodes

    out: dict[int, list] = {}
    for shard in store.list_shards():
        pid = int(Path(shard.path).name.split("-")[2])  # <created_ns>-<host>-<pid>-<hex>.arrow
        out.setdefault(pid, []).extend(table_to_episodes(store.read_checked(shard.path)))
    return out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill_9_then_ray_job_stop_loses_nothing(tmp_path):
    """The user's path on a real head: ``ray job submit``, ``kill -9`` of a rollout actor and of the learner,
    ``ray job stop``; then restarts counted, versions monotonic and none lost with the learner, every shard
    readable, at most one actor's envs' episodes lost per kill, counted = stored, summary and final checkpoint
    written. Figures go to $AFIL_RELIABILITY_JSON when set (docs/reliability.md)."""
    import os
    import signal
    from collections import Counter

    from afil_ray.replay.store import ReplayStore

    cfg = loop_config(tmp_path, duration_s=1200, num_rollout_actors=2, rollout_cpus=0.5, learner_cpus=1,
                      eval_cpus=0.5, eval_every_s=10, round_s=2.0)
    make_start_checkpoint(cfg)
    config = tmp_path / "job.yaml"
    config.write_text(to_yaml(cfg))
    checkpoints = Path(cfg.run_dir) / "learner" / "checkpoints"
    figures: dict[str, object] = {"num_envs_per_actor": cfg.env.num_envs}

    def newest_version() -> int:
        if not Path(cfg.replay.root).is_dir():
            return 0
        return max((ep.policy_version for ep in ReplayStore(cfg.replay.root).read_episodes()), default=0)

    def wait(condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not condition():
            time.sleep(2)
        return bool(condition())

    with own_head(num_cpus=3, RAY_JOB_STOP_WAIT_TIME_S="120") as (address, env, temp):
        job = f"afil-kill-{uuid.uuid4().hex[:8]}"
        _ray("job", "submit", "--address", address, "--submission-id", job, "--working-dir", str(REPO),
             "--no-wait", "--", "afil-ray", "run", "--config", str(config), env=env)
        # every part of the loop runs: the learner has checkpointed and rollouts act with published weights
        ok = wait(lambda: (checkpoints / "latest").is_file() and newest_version() >= 1, 900)
        assert ok, _ray("job", "logs", "--address", address, job, env=env).stdout[-3000:]

        rollouts_before = _actor_pids(temp, "RolloutActor")
        assert len(rollouts_before) == 2, rollouts_before
        killed_rollout = min(rollouts_before)
        os.kill(killed_rollout, signal.SIGKILL)
        time.sleep(10)
        [learner] = _actor_pids(temp, "LearnerActor")
        steps_before = {p.name for p in checkpoints.glob("step_*")}
        figures["version_harvested_at_learner_kill"] = newest_version()
        os.kill(learner, signal.SIGKILL)
        # the restarted learner trains on (a new checkpoint) and a restarted rollout actor harvests
        assert wait(lambda: {p.name for p in checkpoints.glob("step_*")} - steps_before
                    and len(_actor_pids(temp, "RolloutActor") - rollouts_before) == 1, 600)
        [restarted_rollout] = _actor_pids(temp, "RolloutActor") - rollouts_before
        time.sleep(10)  # let the restarted actor store a few episodes

        t0 = time.monotonic()
        _ray("job", "stop", "--address", address, job, env=env, timeout=600)  # waits until the job has stopped
        figures["ray_job_stop_s"] = round(time.monotonic() - t0, 1)
        status = _job_status(address, job, env)
        logs = _ray("job", "logs", "--address", address, job, env=env).stdout
    assert "stopped" in status, status

    summary = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    assert summary["stopped_by_signal"], logs[-3000:]
    assert summary["final_checkpoint"] and Path(summary["final_checkpoint"]).is_dir()
    assert summary["actor_restarts"] >= 2 and summary["versions_monotonic"]
    assert "is gone" not in logs  # no reader lost a published version with the learner
    store = ReplayStore(cfg.replay.root)
    corrupt = store.verify()
    temporaries = [p for p in Path(cfg.replay.root).rglob("*") if p.name.endswith(".tmp")]
    assert corrupt == [] and temporaries == []
    by_process = _episodes_by_process(store)
    # the restarted rollout actor started from the newest published version, not the starting weights
    assert by_process.get(restarted_rollout), "the restarted rollout actor stored nothing"
    assert min(ep.policy_version for ep in by_process[restarted_rollout]) >= 1
    # each incarnation takes consecutive seeds; the ones missing inside its range are the episodes it lost
    lost = {}
    for pid, eps in by_process.items():
        seeds = sorted(ep.seed for ep in eps if ep.source == "rollout")
        if seeds:
            lost[pid] = (seeds[-1] - seeds[0] + 1) - len(seeds)
    assert all(n <= cfg.env.num_envs for n in lost.values()), lost
    episodes = [ep for eps in by_process.values() for ep in eps]
    stored = Counter(ep.outcome for ep in episodes if ep.run_id == summary["run_id"])
    assert dict(stored) == summary["episodes"] and len(episodes) == sum(stored.values())
    assert sum(summary["episodes_reported"].values()) <= sum(stored.values())
    figures.update(
        actor_restarts=summary["actor_restarts"], versions_published=summary["versions_published"],
        versions_monotonic=summary["versions_monotonic"], stopped_by_signal=summary["stopped_by_signal"],
        final_checkpoint=Path(summary["final_checkpoint"]).name, summary_written=True,
        lowest_version_of_restarted_rollout=min(ep.policy_version for ep in by_process[restarted_rollout]),
        lost_episodes_killed_rollout=lost.get(killed_rollout), lost_episodes_per_incarnation=sorted(lost.values()),
        shards=len(store.list_shards()), corrupt_shards=len(corrupt), temporaries_left=len(temporaries),
        episodes_stored=sum(stored.values()), episodes_reported=sum(summary["episodes_reported"].values()),
        episodes_in_lost_rounds=summary["episodes_in_lost_rounds"], wall_s=summary["wall_s"])
    if os.environ.get("AFIL_RELIABILITY_JSON"):
        Path(os.environ["AFIL_RELIABILITY_JSON"]).write_text(json.dumps(figures, indent=1) + "\n")
