"""A Ray head of the test's own on 127.0.0.1 (its own temp dir and ports), as a user starts one, and the ``ray``
CLI against it; stopping it ends only its processes (``ray stop`` would end every Ray cluster on the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil

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


@contextlib.contextmanager
def own_head(num_cpus: int = 3, **head_env: str) -> Iterator[tuple[str, dict[str, str], str]]:
    """A Ray head on 127.0.0.1 with its dashboard (the job server): (job address, client env, temp dir); stopped
    afterwards. ``head_env`` goes into the head's environment (e.g. RAY_JOB_STOP_WAIT_TIME_S)."""
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
    _ray("start", "--head", "--node-ip-address=127.0.0.1", *ports, f"--num-cpus={num_cpus}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp}", "--disable-usage-stats", env={**env, **head_env})
    try:
        yield f"http://127.0.0.1:{dashboard}", env, temp
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
    _, alive = psutil.wait_procs(procs, timeout=5)  # a test head need not drain: what outlives 5 s is killed
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    assert not [p for p in _head_processes(temp) if p.is_running()], "the test's Ray head outlived its stop"


