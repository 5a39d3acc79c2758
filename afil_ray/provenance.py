"""What machine and software a result was made on: the facts that decide its last digits.

A command re-run with the same config gives the same digits only on the same kind of machine with the same thread
counts and library versions (``docs/results.md``, "Reproducibility"): float reductions are ordered differently
under other SIMD units or thread counts, and one changed step of a closed-loop replay changes a demo. Every JSON
record a user compares (stage records, checkpoints' ``trainer.json``, evaluation and demo reports) carries
``machine_facts()``, so two runs whose digits differ can say whether their machines did too
(``compare_facts``). Cheap and never raises: a fact that cannot be read is None.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "numpy", "mani_skill", "sapien", "gymnasium", "pyarrow")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# vector units whose presence changes which kernels (so which float rounding) torch, numpy and the simulator use
SIMD_FLAG = re.compile(r"^(avx\w*|fma\w*|amx\w*|f16c|asimd\w*|sve\w*)$")
REPO = Path(__file__).resolve().parents[1]


def _safe(fn, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # a fact that cannot be read is None, never a failed run
        return None


@functools.cache
def _cpuinfo() -> tuple[str | None, tuple[str, ...] | None]:
    """(model name, sorted SIMD flags) from /proc/cpuinfo's first processor; the model from platform elsewhere."""
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if model is None and key in ("model name", "cpu model", "hardware"):
                    model = value.strip()
                elif flags is None and key in ("flags", "features"):
                    flags = tuple(sorted(v for v in value.split() if SIMD_FLAG.match(v)))
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return model or platform.processor() or None, flags


@functools.cache
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        out[name] = _safe(importlib.metadata.version, name)
    return out


@functools.cache
def _commit() -> str | None:
    """This checkout's commit, when the code runs from a git checkout (None for an installed wheel)."""
    try:
        done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _torch() -> dict[str, Any]:
    """torch's thread counts (this process's, now) and the CPU kernels it dispatches to (imports torch if no one
    has yet: about a second, once)."""
    try:
        import torch
    except Exception:
        return {"torch_threads": None, "torch_interop_threads": None, "torch_cpu_capability": None}
    return {"torch_threads": _safe(torch.get_num_threads),
            "torch_interop_threads": _safe(torch.get_num_interop_threads),
            "torch_cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability())}


def machine_facts() -> dict[str, Any]:
    """A small JSON-able dict of what decides a run's digits on this machine, in this process, now.

    The thread counts are this process's at the call (a trainer's after ``train.num_threads``); the rest is fixed
    for the process and read once."""
    model, flags = _cpuinfo()
    facts: dict[str, Any] = {
        "cpu_model": model,
        "cpu_flags": None if flags is None else list(flags),
        "logical_cores": os.cpu_count(),
        **_torch(),
        **{name.lower(): os.environ.get(name) for name in THREAD_ENV},
        "versions": dict(_versions()),
        "commit": _commit(),
        "hostname": _safe(socket.gethostname),
        "os": _safe(platform.platform),
    }
    return facts


def _flat(facts: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in facts.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare_facts(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The (dotted) keys whose values differ between two ``machine_facts()`` records, sorted."""
    fa, fb = _flat(a or {}), _flat(b or {})
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def _show(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40,64}", value):
        return value[:10]  # a commit
    return str(value)


def describe_differences(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str] = ("A", "B")) -> str:
    """``key: A -> B; ...`` for the facts that differ ('' when none); a flag list shows what only one side has."""
    fa, fb = _flat(a or {}), _flat(b or {})
    parts = []
    for key in compare_facts(a, b):
        va, vb = fa.get(key), fb.get(key)
        if isinstance(va, list) and isinstance(vb, list):
            only_a, only_b = sorted(set(va) - set(vb)), sorted(set(vb) - set(va))
            parts.append(f"{key}: only {names[0]} {' '.join(only_a) or '-'}, only {names[1]} {' '.join(only_b) or '-'}")
        else:
            parts.append(f"{key}: {_show(va)} -> {_show(vb)}")
    return "; ".join(parts)


if __name__ == "__main__":  # python -m afil_ray.provenance: this machine's facts
    import json

    json.dump(machine_facts(), sys.stdout, indent=1)
    print()
