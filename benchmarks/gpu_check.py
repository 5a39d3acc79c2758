"""The prepared GPU check: one command, one JSON of figures, for a machine with one NVIDIA GPU (under 8 minutes).

Run: ``AFIL_TORCH_SPEC=torch bash scripts/gpu_check.sh [--out runs/gpu_check/figures.json]`` on the GPU machine
(the wrapper sets up ``.venv`` when it is missing), or ``.venv/bin/python benchmarks/gpu_check.py`` where the
venv exists. ``--cpu-smoke`` runs every part at toy size on CPU (what ``tests/test_gpu_check.py`` does, so this
script cannot rot between the rare sessions that have a GPU).

Parts, each in its own process with a time cap (a hung simulator or a crash costs that part, not the run; a
failed part records ``{"error": ...}`` and the next part runs; the exit code is 1 if any part failed):

1. ``sim``: ManiSkill GPU simulation (``physx_cuda``, 256 and 1024 PullCube scenes by default) through
   ``ManiSkillVecEnv``: env steps/s with random actions, and with the policy sampling every action chunk
   (``success_only``, the GPU config's policy on CUDA), the way a rollout actor steps.
2. ``learner``: ``Trainer`` steps/s on CUDA in ``success_only`` and ``failure_head`` mode on a synthetic store
   (``bench_train.synthetic_store``), interleaved rounds.
3. ``sampling``: per-chunk latency of ``success_only``, guided with both heads in one stacked call, and guided
   as two calls, at batch 1 and 64, in interleaved rounds (``bench_sampling.time_samplers``); ratios are medians
   of per-round ratios. Issue 3 measured these on CPU only.
4. ``loop``: ``afil-ray demos`` (a handful), a short ``afil-ray train`` for the start checkpoint, then
   ``afil-ray run`` for 120 s with GPU rollouts (``env.backend=gpu``, fractional ``loop.*_gpus``); the figures
   are the loop's ``summary.json``.

The JSON is rewritten after every part, so a run cut short still leaves what it measured. The loop part's work
directory (``loop-*/`` beside the JSON: stage logs, replay store, run directory) is kept for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_sampling, bench_train: scripts beside this one

PARTS = ("sim", "learner", "sampling", "loop")
# Share of the budget each part may use at most (the loop gets what is left, at least its own share).
CAPS = {"sim": 0.22, "learner": 0.12, "sampling": 0.14, "loop": 0.52}
TASK = "PullCube-v1"

# Sizes: the GPU run and the toy CPU smoke run. Every one can be overridden on the command line.
GPU_SIZES: dict[str, Any] = dict(
    budget_s=450.0, sim_envs=[256, 1024], sim_seconds=8.0, sim_min_steps=40, learner_rounds=5, learner_steps=20,
    learner_batch=0, sampling_batches=[1, 64], sampling_rounds=9, sampling_budget=0.25, loop_s=120.0,
    loop_actors=2, loop_envs=256, demos=8, pretrain_steps=300)
SMOKE_SIZES: dict[str, Any] = dict(
    budget_s=360.0, sim_envs=[2], sim_seconds=0.0, sim_min_steps=16, learner_rounds=2, learner_steps=2,
    learner_batch=16, sampling_batches=[1, 8], sampling_rounds=2, sampling_budget=0.02, loop_s=20.0,
    loop_actors=1, loop_envs=2, demos=2, pretrain_steps=10)


def store_overrides(root: str | Path) -> list[str]:
    """Dotlist overrides that point every stage (demos, trainer, loop) at one replay store (one key: replay.root)."""
    return [f"replay.root={root}"]


def one_line(e: BaseException | str) -> str:
    """The first line of an error, with its type, so the JSON says what broke without a traceback."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else "unknown error")[:300]


# --------------------------------------------------------------------------------------------------- machine


def machine_facts() -> dict[str, Any]:
    """What the figures were measured on: GPU, library versions, cores (and the commit, when in a git tree)."""
    import numpy as np
    import torch

    facts: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
    }
    for package in ("mani_skill", "sapien", "ray"):
        try:
            facts[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            facts[package] = None
    with contextlib.suppress(OSError, ValueError):
        facts["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    try:
        facts["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        facts["commit"] = None
    return facts


# ---------------------------------------------------------------------------------------------- the parts


def _device(args: argparse.Namespace) -> str:
    return "cpu" if args.cpu_smoke else "cuda"


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _base_config(args: argparse.Namespace, overrides: list[str] | None = None) -> Any:
    """The policy and trainer the part measures: the GPU cluster config on GPU, the quickstart's on CPU."""
    from afil_ray.config import load_config

    name = "quickstart.yaml" if args.cpu_smoke else "cluster_gpu.yaml"
    return load_config(ROOT / "configs" / name, overrides or [])


def _reset_done(env: Any, result: Any, seeds: Any) -> dict[str, Any]:
    """The observation after a step, with every finished env reset to its next seed (as rollouts do)."""
    import numpy as np

    done = result.done
    if not done.any():
        return result.obs
    fresh, _ = env.reset([next(seeds) for _ in range(env.num_envs)], mask=done)
    # reset returns every env's observation; rows of envs that did not finish keep the step's
    return {k: np.where(done.reshape(-1, *[1] * (v.ndim - 1)), fresh[k], v) for k, v in result.obs.items()}


def _sim_rates(env: Any, policy: Any, sampler: Any, args: argparse.Namespace, seconds: float,
               device: str) -> dict[str, Any]:
    """Env steps/s with random actions, then with the policy sampling a chunk every ``execute_steps`` steps."""
    import numpy as np
    import torch

    n = env.num_envs
    seeds = iter(range(10**9))
    obs, _ = env.reset([next(seeds) for _ in range(n)])
    actions = np.random.default_rng(0).uniform(-1, 1, (64, n, env.action_dim)).astype(np.float32)
    for a in actions[:5]:  # warm-up
        obs = _reset_done(env, env.step(a), seeds)
    t0, steps = time.perf_counter(), 0
    while steps < args.sim_min_steps or time.perf_counter() - t0 < seconds:
        obs = _reset_done(env, env.step(actions[steps % len(actions)]), seeds)
        steps += 1
    bare = steps * n / (time.perf_counter() - t0)

    g = torch.Generator().manual_seed(0)
    instruction = env.task.instruction
    policy.sample(obs, instruction, sampler, g)  # warm-up (kernels, allocations)
    _sync(device)
    t0, steps, in_policy = time.perf_counter(), 0, 0.0
    while steps < args.sim_min_steps or time.perf_counter() - t0 < seconds:
        p0 = time.perf_counter()
        chunk, _ = policy.sample(obs, instruction, sampler, g)  # returns numpy: synchronised
        in_policy += time.perf_counter() - p0
        for j in range(sampler.execute_steps):
            obs = _reset_done(env, env.step(chunk[:, j]), seeds)
            steps += 1
    spent = time.perf_counter() - t0
    return {"random_actions_env_steps_per_s": round(bare, 1), "policy_env_steps_per_s": round(steps * n / spent, 1),
            "policy_share_of_time": round(in_policy / spent, 3),
            "policy_ms_per_chunk": round(1e3 * in_policy / (steps / sampler.execute_steps), 2),
            "steps_timed_with_policy": steps}


def part_sim(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Env steps/s of GPU-batched ManiSkill, bare (random actions) and with the policy choosing the actions."""
    import dataclasses

    import numpy as np
    import torch

    from afil_ray.config import EnvConfig
    from afil_ray.envs.maniskill import ManiSkillVecEnv
    from afil_ray.policy import DAGPolicy

    cfg = _base_config(args)
    device = _device(args)
    sampler = dataclasses.replace(cfg.sampler, kind="success_only")
    backend = "cpu" if args.cpu_smoke else "gpu"
    out: dict[str, Any] = {"task": TASK, "backend": backend, "obs_mode": "state", "snapshot_every": 0,
                           "sampler": "success_only", "policy_device": device, "sampler_steps": sampler.steps,
                           "execute_steps": sampler.execute_steps, "by_num_envs": {}}
    for i, n in enumerate(args.sim_envs):
        if time.time() > deadline - 5:
            raise TimeoutError(f"no time left for num_envs={n}")
        env_cfg = EnvConfig(task=TASK, num_envs=n, backend=backend, cpu_vectorization="loop", snapshot_every=0)
        t0 = time.perf_counter()
        with ManiSkillVecEnv(env_cfg) as env:
            created = time.perf_counter() - t0
            torch.manual_seed(0)
            policy = DAGPolicy.from_config(cfg.policy, env.state_dim, env.action_dim)
            rng = np.random.default_rng(0)
            policy.fit_normalizer(rng.standard_normal((256, env.state_dim)).astype(np.float32),
                                  rng.uniform(-1, 1, (256, env.action_dim)).astype(np.float32))
            policy = policy.to(device).eval()
            # the two measurements of each size share what is left of this part's time (env creation aside)
            left = len(args.sim_envs) - i
            seconds = min(args.sim_seconds, max(0.0, (deadline - time.time() - 10 * left) / (2 * left)))
            out["by_num_envs"][str(n)] = {"env_create_s": round(created, 2),
                                          **_sim_rates(env, policy, sampler, args, seconds, device)}
            if device == "cuda":
                out["by_num_envs"][str(n)]["torch_max_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            del policy
    return out


def part_learner(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Trainer optimizer steps/s per mode on the device, on a synthetic PullCube-sized store (shapes matter,
    not values), modes interleaved round by round so drift hits both alike."""
    import torch
    from bench_train import synthetic_store

    from afil_ray.train import Trainer

    device = _device(args)
    modes = ("success_only", "failure_head")
    with tempfile.TemporaryDirectory(prefix="gpu-check-learner-") as tmp_name:
        tmp = Path(tmp_name)
        synthetic_store(tmp / "store")
        common = [*store_overrides(tmp / "store"), f"train.device={device}"]
        if args.learner_batch:
            common.append(f"train.batch_size={args.learner_batch}")
        base = Trainer(_base_config(args, [*common, f"run_dir={tmp / 'base'}", "train.steps=1"]),
                       progress=False, tensorboard=False)
        start = base.save()
        trainers = {m: Trainer(_base_config(args, [*common, f"run_dir={tmp / m}", f"train.mode={m}",
                                                   f"train.init_from={start}"]), progress=False, tensorboard=False)
                    for m in modes}
        for t in trainers.values():  # warm-up (kernels, optimizer state)
            t.train_step()
        _sync(device)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(args.learner_rounds):
            if r and time.time() > deadline - 10:
                break
            for mode in modes[r % 2:] + modes[: r % 2]:
                t0 = time.perf_counter()
                for _ in range(args.learner_steps):
                    trainers[mode].train_step()
                _sync(device)
                rates[mode].append(args.learner_steps / (time.perf_counter() - t0))
        batch = base.cfg.train.batch_size
        out: dict[str, Any] = {"device": str(base.device), "batch_size": batch, "rounds": len(rates[modes[0]]),
                               "steps_per_round": args.learner_steps}
        for m in modes:
            med = statistics.median(rates[m])
            out[m] = {"steps_per_s": round(med, 2), "samples_per_s": round(med * batch, 1),
                      "trainable_parameters": sum(p.numel() for p in trainers[m].params)}
        out["failure_head_over_success_only"] = round(statistics.median(
            a / b for a, b in zip(rates["failure_head"], rates["success_only"], strict=True)), 3)
        if device == "cuda":
            out["torch_max_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def part_sampling(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Per-chunk latency: success_only, guided with the heads as one stacked call, guided as two calls."""
    import dataclasses

    import torch
    from bench_sampling import INSTRUCTION, build, observation, ratio, time_samplers

    from afil_ray.config import PolicyConfig, SamplerConfig

    device = _device(args)
    # the default PolicyConfig, as in bench_sampling.py's table (docs/benchmarks.md), so CPU and GPU compare;
    # toy width on the CPU smoke run
    cfg = dataclasses.replace(PolicyConfig(), hidden_size=32, head_width=32) if args.cpu_smoke else PolicyConfig()
    samplers = {
        "success_only": SamplerConfig(kind="success_only"),
        "guided_fused": SamplerConfig(kind="adaptive", lam=1.0, fused_heads=True),
        "guided_two_calls": SamplerConfig(kind="adaptive", lam=1.0, fused_heads=False),
    }
    policy = build(cfg).to(device)
    out: dict[str, Any] = {"device": device, "policy": {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
                                                        "head_width": cfg.head_width, "head_depth": cfg.head_depth,
                                                        "horizon": cfg.horizon},
                           "steps": SamplerConfig().steps, "parameters": policy.num_parameters(), "by_batch": {}}
    for batch in args.sampling_batches:
        if time.time() > deadline - 5:
            raise TimeoutError(f"no time left for batch {batch}")
        obs = observation(batch, (), 0)
        _, diag = policy.sample(obs, INSTRUCTION, samplers["guided_fused"])  # warm-up; and did it fuse?
        start = time.perf_counter()
        policy.sample(obs, INSTRUCTION, samplers["guided_fused"])
        calls = max(1, int(args.sampling_budget / (time.perf_counter() - start)))
        t = time_samplers(policy, obs, samplers, args.sampling_rounds, calls)
        out["by_batch"][str(batch)] = {
            **{f"{name}_ms": round(statistics.median(t[name]), 3) for name in samplers},
            "guided_fused_over_success_only": round(ratio(t, "guided_fused"), 3),
            "guided_two_calls_over_success_only": round(ratio(t, "guided_two_calls"), 3),
            "fused_over_two_calls": round(ratio(t, "guided_fused", "guided_two_calls"), 3),
            "fused_call_used": bool(diag.get("fused")), "calls_per_round": calls, "rounds": args.sampling_rounds,
        }
    if device == "cuda":
        out["torch_max_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def _cli(args: list[str], log: Path, timeout: float) -> float:
    """Run ``afil-ray`` as users do (a subprocess of this interpreter), output to ``log``; seconds it took.

    On a timeout it gets SIGTERM first (the loop then stops cleanly and writes its summary), then SIGKILL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, never a cluster this shell happens to point at
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "afil_ray.cli", *args], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        raise RuntimeError(f"afil-ray {args[0]} exited {proc.returncode} ({log}): {tail[0]}")
    return time.perf_counter() - t0


def part_loop(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """Demos, a start checkpoint and a timed ``afil-ray run`` with GPU rollouts; figures from its summary.json."""
    out_dir = Path(args.out).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loop-", dir=out_dir))  # fresh each time: nothing cached, nothing resumed
    config = str(ROOT / "configs" / "quickstart.yaml")
    common = [f"env.task={TASK}", *store_overrides(work / "replay"),
              f"demos.workers={1 if args.cpu_smoke else min(8, os.cpu_count() or 1)}"]
    small = ["train.batch_size=16", "train.warmup_steps=1", "train.num_threads=1"] if args.cpu_smoke else []
    times: dict[str, float] = {}
    times["demos_s"] = _cli(["demos", "--config", config, "--num", str(args.demos), "--quiet", *common],
                            work / "demos.log", deadline - time.time())
    steps = args.pretrain_steps
    times["pretrain_s"] = _cli(["train", "--config", config, "--quiet", *common, *small,
                                f"run_dir={work / 'pretrain'}", "train.mode=success_only", f"train.steps={steps}",
                                f"train.log_every={steps}", f"train.checkpoint_every={steps}", "train.device=auto"],
                               work / "train.log", deadline - time.time())
    # what is left of the part, less start-up and shutdown of the local Ray and the actors
    reserve = 60.0
    duration = min(args.loop_s, deadline - time.time() - reserve)
    if duration < 5:
        raise TimeoutError(f"only {duration:.0f} s left for afil-ray run")
    if args.cpu_smoke:
        place = ["env.backend=cpu", "env.max_episode_steps=20", "loop.min_failures=1", "loop.publish_every=3",
                 "loop.checkpoint_every=100", "loop.refresh_every=3", "loop.round_s=2", "loop.weight_poll_s=0",
                 "train.device=cpu", *small]
    else:
        place = ["env.backend=gpu", "loop.rollout_gpus=0.3", "loop.learner_gpus=0.3", "train.device=auto",
                 "loop.rollout_cpus=1", "loop.learner_cpus=1"]
    run_dir = work / "loop"
    times["run_s"] = _cli(["run", "--config", config, *common, *place, f"run_dir={run_dir}",
                           f"loop.init_from={work / 'pretrain'}", f"loop.duration_s={duration:.0f}",
                           f"loop.num_rollout_actors={args.loop_actors}", f"env.num_envs={args.loop_envs}",
                           "loop.eval_every_s=0"],
                          work / "run.log", deadline - time.time() - 20)  # SIGTERM leaves it 30 s to stop
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise RuntimeError(f"afil-ray run wrote no {summary_file}")
    summary = json.loads(summary_file.read_text())
    if not summary.get("env_steps"):
        raise RuntimeError(f"afil-ray run stepped no env ({summary_file})")
    keep = ("wall_s", "env_steps", "env_steps_per_s", "episodes", "success_rate_cumulative", "learner_step",
            "versions_published", "versions_monotonic", "versions_applied_per_worker",
            "publish_to_applied_s_median", "bytes_per_version", "staleness_histogram", "simulator_errors",
            "actor_restarts")
    return {"work_dir": str(work), "duration_s": round(duration), "rollout_actors": args.loop_actors,
            "envs_per_actor": args.loop_envs, "backend": "cpu" if args.cpu_smoke else "gpu",
            **{k: round(v, 1) for k, v in times.items()}, "summary": {k: summary.get(k) for k in keep}}


RUNNERS: dict[str, Callable[[argparse.Namespace, float], dict[str, Any]]] = {
    "sim": part_sim, "learner": part_learner, "sampling": part_sampling, "loop": part_loop}


# --------------------------------------------------------------------------------------------------- driver


def run_part(name: str, argv: list[str], cap: float, log: Path) -> dict[str, Any]:
    """One part in a child process (its own session, killed as a group at the cap); its figures or its error.

    The child's output (a failed part's traceback) stays in ``log``: a GPU session may not come again soon."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--part", name, "--part-out", str(result_file),
               "--deadline", f"{time.time() + cap:.1f}"]
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=cap + 30)  # the part sizes itself to its deadline; this is the backstop
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
        wall = round(time.perf_counter() - t0, 1)
        if result_file.is_file():
            return {**json.loads(result_file.read_text()), "wall_s": wall, "log": str(log)}
    if killed:
        return {"error": f"killed at its time cap ({cap:.0f} s + 30 s)", "wall_s": wall, "log": str(log)}
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    why = lines[-1] if lines else "no output"
    return {"error": one_line(f"part process exited {proc.returncode}: {why}"), "wall_s": wall, "log": str(log)}


def child(args: argparse.Namespace) -> int:
    """Run one part; write ``{"figures": ...}`` or ``{"error": ...}`` to ``--part-out``."""
    import logging

    logging.getLogger("mani_skill").setLevel(logging.ERROR)
    if args.cpu_smoke:
        import torch

        # one thread: on a loaded small machine OpenMP threads that spin-wait for each other can slow a toy
        # run tenfold, and the smoke run checks that the parts work, not how fast
        torch.set_num_threads(1)
    try:
        result: dict[str, Any] = {"figures": RUNNERS[args.part](args, args.deadline)}
    except Exception as e:  # every failure becomes one line in the JSON; the traceback goes to the part's log
        import traceback

        traceback.print_exc()
        result = {"error": one_line(e)}
    Path(args.part_out).write_text(json.dumps(result))
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check/figures.json", help="the JSON of figures")
    p.add_argument("--cpu-smoke", action="store_true", help="every part at toy size on CPU (no GPU needed)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget of all parts (default 450; smoke 360)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--sim-envs", type=int, nargs="+", help="num_envs values for the sim part (default 256 1024)")
    p.add_argument("--sim-seconds", type=float, help="seconds per sim measurement")
    p.add_argument("--sim-min-steps", type=int, help="at least this many vector steps per sim measurement")
    p.add_argument("--learner-rounds", type=int)
    p.add_argument("--learner-steps", type=int, help="optimizer steps per mode per round")
    p.add_argument("--learner-batch", type=int, help="train.batch_size (0: the config's)")
    p.add_argument("--sampling-batches", type=int, nargs="+", help="batch sizes (default 1 64)")
    p.add_argument("--sampling-rounds", type=int)
    p.add_argument("--sampling-budget", type=float, help="seconds per (sampler, round) measurement")
    p.add_argument("--loop-s", type=float, help="afil-ray run duration (default 120)")
    p.add_argument("--loop-actors", type=int, help="rollout actors")
    p.add_argument("--loop-envs", type=int, help="env.num_envs per rollout actor")
    p.add_argument("--demos", type=int, help="motion-planner demos for the loop's start checkpoint")
    p.add_argument("--pretrain-steps", type=int, help="success-only steps for the loop's start checkpoint")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (SMOKE_SIZES if args.cpu_smoke else GPU_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.part:
        return child(args)
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}); on a GPU machine set up with "
              "AFIL_TORCH_SPEC=torch, or run the toy-size CPU check with --cpu-smoke", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [*argv, "--out", str(out)]  # the parts run in the repository root: give them the absolute path
    started = time.time()
    report: dict[str, Any] = {
        "check": "benchmarks/gpu_check.py", "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), "budget_s": args.budget_s,
        "sizes": {k: getattr(args, k) for k in GPU_SIZES}, "machine": machine_facts(), "parts": {}}
    for i, name in enumerate(args.parts):
        left = args.budget_s - (time.time() - started)
        later = sum(CAPS[p] for p in args.parts[i + 1:]) * args.budget_s
        # the last part gets what is left; the others their share, less what the later parts are owed
        cap = max(20.0, left if i == len(args.parts) - 1 else min(CAPS[name] * args.budget_s, left - later))
        print(f"gpu_check: {name} (up to {cap:.0f} s) ...", file=sys.stderr, flush=True)
        report["parts"][name] = run_part(name, argv, cap, out.with_name(f"{out.stem}.{name}.log"))
        state = report["parts"][name].get("error", "ok")
        print(f"gpu_check: {name} {report['parts'][name]['wall_s']} s: {state}", file=sys.stderr, flush=True)
        report["wall_s"] = round(time.time() - started, 1)
        report["ok"] = all("error" not in p for p in report["parts"].values())
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_check: {report['wall_s']} s; figures in {out}" + ("" if report["ok"] else "; SOME PARTS FAILED"),
          file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
