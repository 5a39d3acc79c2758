"""``ray job submit`` against a real local head: the way users launch the loop on a cluster."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from afil_ray.config import to_yaml

from loop_fixtures import loop_config, make_start_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict[str, str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"ray {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n"
                             f"{done.stderr[-3000:]}")
    return done


@pytest.fixture
def head(tmp_path):
    """A Ray head on 127.0.0.1 with its dashboard (the job server), stopped afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    # Ray 2.60 heads require a token for the job API; head and clients share this one
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", uuid.uuid4().hex + uuid.uuid4().hex
    dashboard = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under ~107 characters
    # every port of its own, so a head already on the machine (another user's, another test's) does not clash
    ports = [f"--{name}={_free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    _ray("start", "--head", "--node-ip-address=127.0.0.1", *ports, "--num-cpus=3",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp}", "--disable-usage-stats", env=env)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _head_processes(temp: str) -> list[psutil.Process]:
    """The processes of the head started under ``temp`` (its session directory is in their command lines) and
    their children (workers, the job's driver)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if any(temp in part for part in proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                for p in [proc, *proc.children(recursive=True)]:
                    found[p.pid] = p
    return list(found.values())


def _stop_head(temp: str) -> None:
    """Stop this head alone: ``ray stop`` ends every Ray cluster on the machine, other people's too."""
    procs = _head_processes(temp)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    assert not [p for p in _head_processes(temp) if p.is_running()], "the test's Ray head outlived its stop"


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
    assert "mani_skill" not in logs, logs[-3000:]
