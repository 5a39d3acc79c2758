"""The deployment files in cluster/: Ray's own schema for the launcher configs, plus what no schema can see.

Nothing here talks to a cloud: the launcher configs go through the same offline steps `ray up` runs before it
contacts a provider (``prepare_config`` then ``validate_config``, which checks ``ray/autoscaler/ray-schema.json``
with jsonschema). Every project-specific check is a function returning problems, and each is shown to catch a
broken copy, so a passing run means the checks looked, not that they could not fail.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from afil_ray.config import ConfigError, load_config
from afil_ray.envs.checks import with_suites_expanded

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
RAYJOB = "kuberay-rayjob.yaml"
SHARED_PATH_KEYS = ("run_dir", "replay.root", "loop.init_from")
URI_OK_KEYS = ("replay.root",)  # the replay store may be s3:// or gs://; checkpoints may not

Config = dict[str, Any]
Mutation = Callable[[Config], None]


def _load(name: str) -> Config:
    return yaml.safe_load((CLUSTER / name).read_text())


def _load_all(name: str) -> list[Config]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def _prepared(cfg: Config) -> Config:
    """Defaults filled and setup commands merged, as `ray up` does before validating."""
    return prepare_config(copy.deepcopy(cfg))


# ---- launcher configs (ray up) -------------------------------------------------------------------------------


def _has_gpu_hardware(provider: str, node_config: Config) -> bool:
    """Whether the VM itself comes with a GPU: AWS g*/p* instance types, GCP accelerators or a2/a3/g2 machines."""
    if provider == "aws":
        return re.match(r"^[gp]\d", node_config.get("InstanceType", "")) is not None
    if provider == "gcp":
        return bool(node_config.get("guestAccelerators")) or re.match(
            r"^(a2|a3|a4|g2|g4)-", node_config.get("machineType", "")) is not None
    raise AssertionError(f"unknown provider {provider}")


def _installs(commands: list[str]) -> list[str]:
    """What a node's setup commands fail to install: torch and the project (editable, from the synced repo)."""
    text = "\n".join(commands)
    missing = []
    if not re.search(r"pip install[^\n]*\btorch\b", text):
        missing.append("torch")
    if not re.search(r"pip install[^\n]*-e ~/afil-ray\b", text):
        missing.append("the project (pip install -e ~/afil-ray)")
    return missing


def launcher_problems(raw: Config) -> list[str]:
    """Project requirements on a launcher config that Ray's schema does not express."""
    cfg = _prepared(raw)
    provider = cfg["provider"]["type"]
    types: Config = cfg["available_node_types"]
    head = cfg["head_node_type"]
    problems: list[str] = []
    if head not in types:
        return [f"head_node_type {head!r} is not in available_node_types"]
    workers = {name: t for name, t in types.items() if name != head}
    if not workers:
        problems.append("no worker node type")
    if types[head]["resources"].get("GPU") != 0:
        problems.append("head must declare GPU: 0 (CPU-only head)")
    if _has_gpu_hardware(provider, types[head]["node_config"]):
        problems.append("head node_config has GPU hardware")
    if not any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()):
        problems.append("no worker type declares a GPU resource")
    for name, t in workers.items():
        if t["resources"].get("GPU", 0) >= 1 and not _has_gpu_hardware(provider, t["node_config"]):
            problems.append(f"{name} declares a GPU its node_config does not provide")
        if t["resources"].get("GPU", 0) < 1 and _has_gpu_hardware(provider, t["node_config"]):
            problems.append(f"{name} has a GPU it does not declare, so Ray would never schedule on it")
        if provider == "gcp" and t["node_config"].get("guestAccelerators"):
            scheduling = t["node_config"].get("scheduling")
            if not isinstance(scheduling, dict) or scheduling.get("onHostMaintenance") != "TERMINATE":
                problems.append(f"{name}: GPU VMs need scheduling: {{onHostMaintenance: TERMINATE}} (an object)")
        own = t.get("worker_setup_commands", cfg["worker_setup_commands"])
        problems += [f"{name} setup does not install {m}" for m in _installs(own)]
    problems += [f"head setup does not install {m}" for m in _installs(cfg["head_setup_commands"])]
    if cfg["file_mounts"].get("~/afil-ray") != ".":
        problems.append("file_mounts must sync the repo root to ~/afil-ray")
    if not any("ray start --head" in c for c in cfg["head_start_ray_commands"]):
        problems.append("head_start_ray_commands do not start a Ray head")
    if not any("--address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"]):
        problems.append("worker_start_ray_commands do not join the head")
    return problems


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_own_validation(name: str) -> None:
    """`ray up` would reject anything validate_config rejects, before spending money on a node."""
    validate_config(_prepared(_load(name)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_meets_project_requirements(name: str) -> None:
    assert launcher_problems(_load(name)) == []


@pytest.mark.parametrize(("where", "key"), [("top", "max_worker"), ("node_type", "min_worker")])
def test_ray_validator_rejects_misspelled_keys(where: str, key: str) -> None:
    """The schema forbids unknown keys, so a typo fails validation instead of being silently ignored."""
    cfg = _load("aws.yaml")
    target = cfg if where == "top" else cfg["available_node_types"]["gpu_worker"]
    target[key] = 1
    with pytest.raises(jsonschema.ValidationError, match=key):
        validate_config(_prepared(cfg))


def _aws_gpu_head(cfg: Config) -> None:
    cfg["available_node_types"][cfg["head_node_type"]]["node_config"]["InstanceType"] = "g5.xlarge"


def _worker_without_gpu(cfg: Config) -> None:
    del cfg["available_node_types"]["gpu_worker"]["resources"]["GPU"]


def _head_type_missing(cfg: Config) -> None:
    cfg["head_node_type"] = "head_typo"


def _no_project_install(cfg: Config) -> None:
    cfg["setup_commands"] = [c for c in cfg["setup_commands"] if "-e ~/afil-ray" not in c]


def _gcp_scheduling_as_list(cfg: Config) -> None:
    cfg["available_node_types"]["gpu_worker"]["node_config"]["scheduling"] = [{"onHostMaintenance": "TERMINATE"}]


@pytest.mark.parametrize(("name", "mutate", "expect"), [
    ("aws.yaml", _aws_gpu_head, "head node_config has GPU hardware"),
    ("aws.yaml", _worker_without_gpu, "no worker type declares a GPU"),
    ("aws.yaml", _head_type_missing, "not in available_node_types"),
    ("gcp.yaml", _no_project_install, "does not install the project"),
    ("gcp.yaml", _gcp_scheduling_as_list, "onHostMaintenance"),
])
def test_launcher_checks_catch_broken_configs(name: str, mutate: Mutation, expect: str) -> None:
    _assert_caught(launcher_problems, name, mutate, expect)


def _assert_caught(problems: Callable[[Config], list[str]], name: str, mutate: Mutation, expect: str) -> None:
    """``problems`` finds ``expect`` in config ``name`` once ``mutate`` broke it."""
    cfg = _load(name)
    mutate(cfg)
    assert any(expect in p for p in problems(cfg)), problems(cfg)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_commands_are_valid_bash(name: str) -> None:
    """Folded YAML blocks make quoting mistakes easy; `bash -n` parses each command without running it."""
    cfg = _prepared(_load(name))
    keys = ("head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for cmd in (c for k in keys for c in cfg[k]):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r}: {result.stderr}"


# ---- KubeRay RayJob ------------------------------------------------------------------------------------------


def _gpus(container: Config) -> int:
    res = container.get("resources", {})
    return max(int(res.get(kind, {}).get("nvidia.com/gpu", 0)) for kind in ("limits", "requests"))


def _pvc_mounts(pod: Config) -> dict[str, str]:
    """mountPath -> claimName for every PVC-backed mount of a pod spec."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    return {m["mountPath"]: claims[m["name"]]
            for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] in claims}


def rayjob_problems(docs: list[Config]) -> list[str]:
    """What KubeRay or the job needs from the manifest; Ray ships no schema for RayJob."""
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    if len(jobs) != 1:
        return [f"expected one RayJob, found {len(jobs)}"]
    job, problems = jobs[0], []
    if job.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {job.get('apiVersion')!r}, expected ray.io/v1")
    spec = job["spec"]
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true (GPU nodes otherwise idle after the job)")
    tokens = shlex.split(spec.get("entrypoint", ""))
    if tokens[:2] != ["afil-ray", "run"]:
        problems.append(f"entrypoint must start with 'afil-ray run', got {tokens[:2]}")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    if any(_gpus(c) for c in head["containers"]):
        problems.append("head requests nvidia.com/gpu; it must be CPU-only")
    groups = spec["rayClusterSpec"].get("workerGroupSpecs", [])
    gpu_groups = [g for g in groups if any(_gpus(c) >= 1 for c in g["template"]["spec"]["containers"])]
    if not gpu_groups:
        problems.append("no worker group requests nvidia.com/gpu")
    head_mounts = _pvc_mounts(head)
    shared = set(head_mounts.items())
    for g in groups:  # GPU workers and LIBERO's CPU workers alike write the replay store
        shared &= set(_pvc_mounts(g["template"]["spec"]).items())
    if not shared:
        problems.append("head and worker groups share no PVC mount (same claim at the same path)")
    pvcs = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    for _, claim in shared:
        if claim in pvcs and "ReadWriteMany" not in pvcs[claim]["spec"].get("accessModes", []):
            problems.append(f"PVC {claim} must be ReadWriteMany to mount on several nodes")
    overrides = dict(t.split("=", 1) for t in tokens[2:] if "=" in t and not t.startswith("-"))
    roots = [path for path, _ in shared]
    for key in SHARED_PATH_KEYS:
        value = overrides.get(key)
        if value is None:
            problems.append(f"entrypoint does not set {key} (the config's default is node-local)")
        elif not (any(value.startswith(r.rstrip("/") + "/") for r in roots) or (key in URI_OK_KEYS and "://" in value)):
            problems.append(f"{key}={value} is not on the shared volume")
    problems += entrypoint_config_problems(tokens)
    return problems


def entrypoint_config_problems(tokens: list[str]) -> list[str]:
    """The entrypoint's ``--config`` must be a file of this repo that loads with the entrypoint's overrides."""
    if "--config" not in tokens[:-1]:
        return ["entrypoint has no --config"]
    path = REPO / tokens[tokens.index("--config") + 1]
    if not path.is_file():
        return [f"entrypoint config {path.relative_to(REPO)} does not exist"]
    overrides = [t for t in tokens[2:] if "=" in t and not t.startswith("-")]
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        return [f"entrypoint config does not load: {e}"]
    return [] if cfg.loop.num_rollout_actors >= 1 else ["entrypoint config runs no rollout actor"]


def test_every_cluster_yaml_parses_and_is_checked() -> None:
    """A new YAML file in cluster/ must get checks here, not slip through unparsed."""
    names = sorted(p.name for p in CLUSTER.glob("*.yaml"))
    assert names == sorted([*LAUNCHER_CONFIGS, RAYJOB])
    for name in names:
        assert _load_all(name), f"{name} is empty"


def test_rayjob_meets_requirements() -> None:
    assert rayjob_problems(_load_all(RAYJOB)) == []


def _job(docs: list[Config]) -> Config:
    return next(d for d in docs if d.get("kind") == "RayJob")


def _worker_pod(docs: list[Config]) -> Config:
    return _job(docs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def _set_entrypoint(text: str) -> Callable[[list[Config]], None]:
    def mutate(docs: list[Config]) -> None:
        _job(docs)["spec"]["entrypoint"] = text
    return mutate


def _drop_worker_gpu(docs: list[Config]) -> None:
    for c in _worker_pod(docs)["containers"]:
        for kind in ("limits", "requests"):
            c["resources"][kind].pop("nvidia.com/gpu", None)


def _gpu_on_head(docs: list[Config]) -> None:
    head = _job(docs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1


def _other_claim_on_workers(docs: list[Config]) -> None:
    _worker_pod(docs)["volumes"][0]["persistentVolumeClaim"]["claimName"] = "other"


def _other_claim_on_cpu_workers(docs: list[Config]) -> None:
    group = next(g for g in _job(docs)["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "cpu")
    group["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "other"


def _rwo_claim(docs: list[Config]) -> None:
    next(d for d in docs if d.get("kind") == "PersistentVolumeClaim")["spec"]["accessModes"] = ["ReadWriteOnce"]


def _alpha_api(docs: list[Config]) -> None:
    _job(docs)["apiVersion"] = "ray.io/v1alpha1"


@pytest.mark.parametrize(("mutate", "expect"), [
    (_set_entrypoint("python -m afil_ray.cli run"), "must start with 'afil-ray run'"),
    (_set_entrypoint("afil-ray run run_dir=runs/x replay.root=/mnt/afil/r "
                     "loop.init_from=/mnt/afil/c"), "run_dir=runs/x is not on the shared volume"),
    (_drop_worker_gpu, "no worker group requests nvidia.com/gpu"),
    (_gpu_on_head, "head requests nvidia.com/gpu"),
    (_other_claim_on_workers, "share no PVC mount"),
    (_other_claim_on_cpu_workers, "share no PVC mount"),
    (_rwo_claim, "must be ReadWriteMany"),
    (_alpha_api, "expected ray.io/v1"),
    (_set_entrypoint("afil-ray run --config configs/no_such.yaml run_dir=/mnt/afil/x replay.root=/mnt/afil/r "
                     "loop.init_from=/mnt/afil/c"), "configs/no_such.yaml does not exist"),
    (_set_entrypoint("afil-ray run --config configs/cluster_gpu.yaml run_dir=/mnt/afil/x replay.root=/mnt/afil/r "
                     "loop.init_from=/mnt/afil/c loop.num_actors=8"), "does not load"),
])
def test_rayjob_checks_catch_broken_manifests(mutate: Callable[[list[Config]], None], expect: str) -> None:
    docs = _load_all(RAYJOB)
    mutate(docs)
    assert any(expect in p for p in rayjob_problems(docs)), rayjob_problems(docs)


# ---- LIBERO on the cluster -------------------------------------------------------------------------------------

LIBERO_CONFIG = REPO / "configs" / "libero_cluster.yaml"


def _libero_cfg(overrides: list[str] | None = None):
    """The LIBERO cluster config as the CLI loads it (its suite expanded)."""
    return with_suites_expanded(load_config(LIBERO_CONFIG, overrides or []))


def libero_setup_problems(text: str) -> list[str]:
    """What a node's setup (a launcher config's commands, or the image's Dockerfile) must give LIBERO: the project
    with its libero extra, MuJoCo rendering headless (MUJOCO_GL=egl) and Mesa's EGL for the nodes without a GPU."""
    problems = []
    if not re.search(r"pip install[^\n]*-e\s+\S*\[libero\]", text):
        problems.append("the project is not installed with its libero extra")
    if "MUJOCO_GL=egl" not in text:
        problems.append("MUJOCO_GL=egl is not set")
    problems += [f"{lib} is not installed" for lib in ("libegl1", "libegl-mesa0", "libgl1-mesa-dri") if lib not in text]
    return problems


def libero_launcher_problems(raw: Config) -> list[str]:
    """A launcher config runs configs/libero_cluster.yaml: LIBERO on every node, CPU-only workers its eval actors
    fit on, and no GPU-only setup step that fails on them (a CPU worker shares the workers' setup commands)."""
    cfg = _prepared(raw)
    keys = ("head_setup_commands", "worker_setup_commands")
    problems = libero_setup_problems("\n".join(c for k in keys for c in cfg[k]))
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    cpus = _libero_cfg().eval.worker_cpus
    if not any(t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) >= cpus for t in workers):
        problems.append(f"no CPU-only worker type with eval.worker_cpus={cpus:g} CPUs for LIBERO's eval actors")
    for cmd in cfg["worker_setup_commands"]:
        if "nvidia-smi" in cmd and "0x10de" not in cmd:  # NVIDIA's PCI vendor id: the step runs on GPU nodes only
            problems.append("worker setup runs nvidia-smi on CPU workers too, where it fails (guard it by 0x10de)")
    return problems


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_runs_libero(name: str) -> None:
    assert libero_launcher_problems(_load(name)) == []


def test_the_image_runs_libero_and_the_rayjob_has_cpu_workers_for_it() -> None:
    assert libero_setup_problems((CLUSTER / "Dockerfile").read_text()) == []
    cpus = _libero_cfg().eval.worker_cpus
    groups = _job(_load_all(RAYJOB))["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    containers = [g["template"]["spec"]["containers"] for g in groups]
    cpu_only = [c for group in containers if not any(_gpus(c) for c in group) for c in group]
    assert any(float(c["resources"]["limits"]["cpu"]) >= cpus for c in cpu_only), "no CPU group fits an eval actor"


def _unguarded_nvidia_smi(cfg: Config) -> None:
    cfg["worker_setup_commands"] = [*cfg["worker_setup_commands"], "nvidia-smi -L"]


def _no_libero_extra(cfg: Config) -> None:
    cfg["setup_commands"] = [c.replace("'[libero]'", "") for c in cfg["setup_commands"]]


def _no_cpu_worker(cfg: Config) -> None:
    del cfg["available_node_types"]["cpu_worker"]


@pytest.mark.parametrize(("name", "mutate", "expect"), [
    ("aws.yaml", _unguarded_nvidia_smi, "nvidia-smi on CPU workers"),
    ("gcp.yaml", _no_libero_extra, "libero extra"),
    ("aws.yaml", _no_cpu_worker, "no CPU-only worker type"),
])
def test_libero_launcher_checks_catch_broken_configs(name: str, mutate: Mutation, expect: str) -> None:
    _assert_caught(libero_launcher_problems, name, mutate, expect)


def test_libero_setup_checks_catch_a_broken_image() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    broken = text.replace("MUJOCO_GL=egl", "").replace(" libegl-mesa0", "")
    assert libero_setup_problems(broken) == ["MUJOCO_GL=egl is not set", "libegl-mesa0 is not installed"]


def test_libero_cluster_config_is_the_standard_protocol_with_the_cpu_configs_policy() -> None:
    """Every task of a suite (the shorthand) x 50 shipped starts x 3 runs on Ray eval actors; rollouts and eval on
    CPUs, the learner on a GPU; and the policy, cameras and actions of configs/libero_object_cpu.yaml, so that its
    checkpoints evaluate here."""
    cfg = _libero_cfg()
    assert cfg.env.tasks == [f"libero_object/{i}" for i in range(10)]
    for suite in ("libero_spatial", "libero_goal", "libero_10"):
        assert _libero_cfg([f"env.task={suite}"]).env.tasks == [f"{suite}/{i}" for i in range(10)]
    assert (cfg.eval.episodes, cfg.eval.runs, cfg.eval.seed_start, cfg.eval.backend) == (50, 3, 100000, "ray")
    assert cfg.eval.worker_gpus == cfg.loop.rollout_gpus == cfg.loop.eval_gpus == 0 and cfg.loop.learner_gpus >= 1
    cpu = load_config(REPO / "configs" / "libero_object_cpu.yaml")
    assert cfg.policy == cpu.policy and cfg.sampler == cpu.sampler
    for key in ("obs_mode", "camera_size", "cameras", "control_mode"):
        assert getattr(cfg.env, key) == getattr(cpu.env, key), key


# ---- across files --------------------------------------------------------------------------------------------


def test_one_ray_version_everywhere() -> None:
    """Ray refuses mixed versions in one cluster; the launcher pins, the RayJob and its image must agree."""
    versions = {}
    for name in LAUNCHER_CONFIGS:
        pins = set(re.findall(r"ray\[default\]==([\w.]+)", "\n".join(_load(name)["setup_commands"])))
        assert len(pins) == 1, f"{name}: expected one ray[default]==X pin, found {pins}"
        versions[name] = pins.pop()
    versions[RAYJOB] = _job(_load_all(RAYJOB))["spec"]["rayClusterSpec"]["rayVersion"]
    image = re.search(r"^FROM rayproject/ray:([\d.]+)-", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert image, "cluster/Dockerfile does not start FROM a rayproject/ray image"
    versions["Dockerfile"] = image.group(1)
    assert len(set(versions.values())) == 1, versions


def test_every_config_the_cluster_docs_name_exists() -> None:
    """cluster/README.md and the manifests tell users to run ``--config configs/X.yaml``: X must be in the repo."""
    texts = [p.read_text() for p in [*CLUSTER.glob("*.yaml"), CLUSTER / "README.md"]]
    named = {m for text in texts for m in re.findall(r"--config\s+(\S+\.yaml)", text)}
    assert named, "the cluster docs name no config"
    for rel in sorted(named):
        load_config(REPO / rel)  # exists and has only known keys


def test_the_documented_job_stop_variable_is_the_one_ray_reads():
    """``ray job stop`` waits RAY_JOB_STOP_WAIT_TIME_S before SIGKILL; a wrong name in the docs means no clean stop
    (no final checkpoint, no summary) for every user who follows them."""
    import inspect

    from ray.dashboard.modules.job import job_supervisor

    source = inspect.getsource(job_supervisor)
    for doc in (REPO / "README.md", CLUSTER / "README.md"):
        names = set(re.findall(r"RAY_JOB_STOP_\w+", doc.read_text()))
        assert names, f"{doc.name} names no job-stop variable"
        assert all(f'"{name}"' in source for name in names), f"{doc.name}: {names} not read by Ray"
