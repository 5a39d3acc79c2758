"""The prepared GPU check (``scripts/gpu_check.sh``, ``benchmarks/gpu_check.py``) run at toy size on CPU.

GPU machines are lent rarely; the ``--cpu-smoke`` run executes every part (sim, learner, sampling, loop) end to
end, so the command that runs there has not rotted in the meantime. 1.5-2.5 minutes on 2 cores, depending on
their load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _env() -> dict[str, str]:
    """This checkout first on the path; never a Ray cluster the calling shell points at."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def _command(*args: str) -> list[str]:
    """The wrapper as users run it, with this interpreter's venv as its .venv (so it never runs set-up); the
    script directly when this interpreter is not in a venv."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "python").exists():
        return ["env", f"AFIL_VENV={sys.prefix}", "bash", str(ROOT / "scripts" / "gpu_check.sh"), *args]
    return [sys.executable, str(SCRIPT), *args]


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@pytest.mark.slow  # the whole device check on CPU, about a minute: run before a device session (scripts/gpu_check.sh)
@pytest.mark.timeout(600)
def test_cpu_smoke_measures_every_part(tmp_path):
    out = tmp_path / "figures.json"
    # a 10 s loop instead of the smoke run's 20 s keeps the suite short; everything else is the smoke run as is
    done = subprocess.run(_command("--cpu-smoke", "--out", str(out), "--loop-s", "10"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["ok"]
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"] and report["machine"]["mani_skill"]
    parts = report["parts"]
    assert list(parts) == ["sim", "learner", "sampling", "loop"]
    for name, part in parts.items():
        assert "error" not in part, (name, part)
        assert _positive(part["wall_s"]), name

    sim = parts["sim"]["figures"]["by_num_envs"]["2"]
    assert _positive(sim["random_actions_env_steps_per_s"]) and _positive(sim["policy_env_steps_per_s"])
    assert 0 < sim["policy_share_of_time"] < 1

    learner = parts["learner"]["figures"]
    for mode in ("success_only", "failure_head"):
        assert _positive(learner[mode]["steps_per_s"]) and _positive(learner[mode]["samples_per_s"])
    assert learner["failure_head"]["trainable_parameters"] < learner["success_only"]["trainable_parameters"]

    sampling = parts["sampling"]["figures"]["by_batch"]
    assert set(sampling) == {"1", "8"}
    for figures in sampling.values():
        for key in ("success_only_ms", "guided_fused_ms", "guided_two_calls_ms", "guided_fused_over_success_only",
                    "guided_two_calls_over_success_only", "fused_over_two_calls"):
            assert _positive(figures[key]), key
        assert figures["fused_call_used"]  # equal heads: the stacked call really ran

    loop = parts["loop"]["figures"]
    summary = loop["summary"]
    assert _positive(summary["env_steps"]) and _positive(summary["env_steps_per_s"])
    assert sum(summary["episodes"].values()) > 0 and summary["versions_monotonic"]
    assert isinstance(summary["versions_published"], int) and summary["simulator_errors"] == 0
    assert all(_positive(loop[k]) for k in ("demos_s", "pretrain_s", "run_s", "duration_s"))


def test_a_failed_part_is_recorded_and_the_next_part_still_runs(tmp_path):
    out = tmp_path / "figures.json"
    # num_envs 0 cannot build an env: the sim part fails; sampling runs after it all the same
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), "--parts", "sim",
                           "sampling", "--sim-envs", "0", "--sampling-batches", "1"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report["ok"]
    error = report["parts"]["sim"]["error"]
    assert isinstance(error, str) and error and "\n" not in error
    assert "Traceback" in Path(report["parts"]["sim"]["log"]).read_text()  # the whole story stays in the part's log
    assert "error" not in report["parts"]["sampling"]
    assert _positive(report["parts"]["sampling"]["figures"]["by_batch"]["1"]["guided_fused_ms"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_and_without_cpu_smoke_it_stops_at_once_naming_the_flag(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--cpu-smoke" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()
