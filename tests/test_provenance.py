"""Machine facts (``afil_ray.provenance``): what they hold, that they never fail, and where runs record them."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from afil_ray import provenance
from afil_ray.pipeline import stages
from afil_ray.pipeline.stages import StageCache
from afil_ray.provenance import compare_facts, describe_differences, machine_facts

REPO = Path(__file__).resolve().parents[1]
TYPES = {"cpu_model": str, "cpu_flags": list, "logical_cores": int, "torch_threads": int,
         "torch_interop_threads": int, "torch_cpu_capability": str, "omp_num_threads": str, "mkl_num_threads": str,
         "versions": dict, "commit": str, "hostname": str, "os": str}


def test_machine_facts_are_small_json_and_typed(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    facts = machine_facts()
    assert set(facts) == set(TYPES)
    for key, kind in TYPES.items():
        assert facts[key] is None or isinstance(facts[key], kind), (key, facts[key])
    assert json.loads(json.dumps(facts)) == facts and len(json.dumps(facts)) < 2000
    assert facts["omp_num_threads"] == "3" and facts["mkl_num_threads"] is None
    assert facts["torch_threads"] == torch.get_num_threads() and facts["logical_cores"] >= 1
    assert set(facts["versions"]) == {"python", *provenance.PACKAGES}
    assert facts["versions"]["torch"] == torch.__version__
    flags = facts["cpu_flags"] or []
    assert flags == sorted(flags) and all(provenance.SIMD_FLAG.match(f) for f in flags)
    assert facts["commit"] is None or len(facts["commit"]) == 40  # this checkout's, when git can say
    t0 = time.perf_counter()
    machine_facts()
    assert time.perf_counter() - t0 < 0.1  # the fixed facts are read once per process


def test_machine_facts_never_raise(monkeypatch):
    """No /proc/cpuinfo, no git, a package whose version cannot be read: those facts are None, nothing fails."""
    for cached in (provenance._cpuinfo, provenance._versions, provenance._commit):
        cached.cache_clear()
    real_open = open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise PermissionError(path)
        return real_open(path, *args, **kwargs)

    def no_version(name):
        raise ValueError(name)

    monkeypatch.setattr("builtins.open", no_cpuinfo)
    monkeypatch.setattr(provenance.importlib.metadata, "version", no_version)
    monkeypatch.setattr(provenance.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("git")))
    monkeypatch.setattr(provenance.socket, "gethostname", lambda: 1 / 0)
    try:
        facts = machine_facts()
        assert facts["cpu_flags"] is None and facts["commit"] is None and facts["hostname"] is None
        assert facts["versions"]["torch"] is None and facts["versions"]["python"]
    finally:
        for cached in (provenance._cpuinfo, provenance._versions, provenance._commit):
            cached.cache_clear()


def test_differences_are_named():
    a = machine_facts()
    b = {**a, "torch_threads": 7, "cpu_flags": ["avx2", "amx_tile"], "versions": {**a["versions"], "numpy": "0"}}
    assert compare_facts(a, a) == [] and describe_differences(a, a) == ""
    assert compare_facts(a, b) == ["cpu_flags", "torch_threads", "versions.numpy"]
    text = describe_differences({"cpu_flags": ["avx2", "fma"], "commit": "a" * 40},
                                {"cpu_flags": ["amx_tile", "avx2"], "commit": "b" * 40})
    assert text == f"commit: {'a' * 10} -> {'b' * 10}; cpu_flags: only A fma, only B amx_tile"
    assert compare_facts({}, {"torch_threads": 1}) == ["torch_threads"]


def test_stage_records_carry_the_machine_and_are_reused_on_another(tmp_path, monkeypatch, capsys):
    calls = []

    def work():
        calls.append(1)
        return {"demos": 3}

    first = StageCache(tmp_path)
    assert first.run("demos", work, {"env": {"task": "PullCube-v1"}}) == {"demos": 3}
    record = json.loads((tmp_path / "stages" / "demos.json").read_text())
    assert record["machine"] == machine_facts() and "machine" not in record["settings"]
    capsys.readouterr()

    assert StageCache(tmp_path).run("demos", work, {"env": {"task": "PullCube-v1"}}) == {"demos": 3}
    assert "machine facts differ" not in capsys.readouterr().out  # same machine: no line

    other = {**machine_facts(), "torch_threads": 64, "cpu_model": "Other CPU"}
    monkeypatch.setattr(stages, "machine_facts", lambda: other)
    again = StageCache(tmp_path)
    assert again.run("demos", work, {"env": {"task": "PullCube-v1"}}) == {"demos": 3} and calls == [1]
    lines = [line for line in capsys.readouterr().out.splitlines() if "machine facts differ" in line]
    assert len(lines) == 1 and lines[0].startswith("[demos]")
    assert f"cpu_model: {record['machine']['cpu_model']} -> Other CPU" in lines[0]
    assert f"torch_threads: {record['machine']['torch_threads']} -> 64" in lines[0]
    # the record still says where the outputs were made
    assert json.loads((tmp_path / "stages" / "demos.json").read_text())["machine"] == record["machine"]


def test_compare_runs_names_the_machine_differences(tmp_path):
    spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts" / "compare_runs.py")
    compare_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_runs)
    here = machine_facts()
    for run, facts in (("a", here), ("b", {**here, "omp_num_threads": "1"})):
        (tmp_path / run / "stages").mkdir(parents=True)
        for name in ("demos", "harvest"):
            record = {"stage": name, "outputs": {}, "machine": facts}
            (tmp_path / run / "stages" / f"{name}.json").write_text(json.dumps(record))
    (tmp_path / "b" / "stages" / "correct.json").write_text(json.dumps({"stage": "correct", "outputs": {}}))
    rows = compare_runs.machine_rows(tmp_path / "a", tmp_path / "b")
    assert rows == ["| correct | stage missing |", f"| demos | omp_num_threads: {here['omp_num_threads']} -> 1 |",
                    f"| harvest | omp_num_threads: {here['omp_num_threads']} -> 1 |"]
