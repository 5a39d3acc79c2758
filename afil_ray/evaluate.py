"""``afil-ray eval``: the paired evaluation protocol (initial states x runs, every arm on the same episodes).

An evaluation episode is a pair ``(seed, run)``: the seed (``eval.seed_start .. seed_start + episodes - 1``) fixes
the initial state, the run index (``0 .. eval.runs - 1``) the sampling noise. Each episode's noise comes from its
own ``torch.Generator``, seeded from ``(seed, run, cfg.seed)`` when the episode starts, and every re-planning of
that episode draws its chunk's initial noise from it, so the noise depends on the episode alone: not on the env
slot it ran in, not on other episodes, not on the arm. Every arm (``eval.arms``) runs the same ``(seed, run)``
set, so arms pair up episode by episode (``afil_ray.eval_report`` compares them with an exact McNemar test and a
paired bootstrap).

What pairing covers: both samplers are deterministic once the initial noise is drawn (flow: Euler steps; ddpm:
DDIM with eta = 0), so the initial noise is all of the sampling randomness and it is shared exactly. Two arms
whose chunks differ drive the env into different states, after which their later chunks see different
observations (and batch compositions); that is the effect being measured, not a pairing leak. With the guided
heads run as two calls (``eval.exact_pairing``), ``static`` with w = 0 and ``adaptive`` with lam = 0 reproduce
``success_only`` bit for bit (same chunks, actions and outcomes). The env must reset deterministically per seed
whatever its slot (true for ManiSkill's CPU envs; batched GPU physics is not checked here).

The evaluated episodes are exactly the seeded ones (not the first N to finish, which would favour short,
successful episodes). Envs that run out of evaluation seeds keep stepping on throw-away seeds (with noise from a
shared generator) until the last evaluated episode ends.

Each episode records ``success_once`` (successful at some step, ``Episode.success``) and ``success_at_end``
(successful at its last step); ``eval.metric`` picks the one reported. With ``env.ignore_terminations`` false
(the default) an episode ends at its first success, so the two coincide; set it true to tell them apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from afil_ray.config import Config, ConfigError, SamplerConfig
from afil_ray.envs.base import VecEnv
from afil_ray.envs.maniskill import ManiSkillVecEnv
from afil_ray.eval_report import METRICS, ArmResult, EpisodeOutcome, build_report, markdown_table, write_report
from afil_ray.policy.sampler import SAMPLER_KINDS
from afil_ray.replay.episode import Episode
from afil_ray.rollout import ChunkedRollout, ChunkPolicy

# Keys an arm spec may set, per sampler kind (the others are meaningless for that kind and therefore errors).
_COMMON_KEYS = ("steps", "execute_steps", "fused_heads")
ARM_KEYS: dict[str, tuple[str, ...]] = {
    "success_only": _COMMON_KEYS,
    "static": ("w", *_COMMON_KEYS),
    "adaptive": ("lam", *_COMMON_KEYS),
}
_MAIN_KEY = {"success_only": None, "static": "w", "adaptive": "lam"}
REFERENCE_ARM = "success_only"


@dataclass
class Arm:
    """One sampler setting: ``name`` labels it in the report, ``sampler`` is the resolved sampler config."""

    name: str
    sampler: SamplerConfig


@dataclass
class EvalResult:
    task: str
    sampler: str  # sampler kind
    episodes: list[Episode]  # ordered by (run, seed); ``extra`` holds ``eval_run`` and ``noise_seed``
    arm: str = ""
    metric: str = "success_once"

    def outcome(self, ep: Episode) -> bool:
        return bool(ep.success) if self.metric == "success_once" else _success_at_end(ep)

    @property
    def successes(self) -> int:
        return sum(self.outcome(e) for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / len(self.episodes) if self.episodes else 0.0

    def summary(self) -> str:
        return (f"{self.task} sampler={self.arm or self.sampler}: success {self.successes}/{len(self.episodes)} = "
                f"{self.success_rate:.3f}")

    def outcomes(self) -> list[EpisodeOutcome]:
        return [EpisodeOutcome(seed=e.seed, run=int(e.extra["eval_run"]), success_once=bool(e.success),
                               success_at_end=_success_at_end(e)) for e in self.episodes]


def _success_at_end(ep: Episode) -> bool:
    """Successful at the last step (the collector records it in ``extra``)."""
    return bool(ep.extra.get("success_at_end", False))


def episode_noise_seed(seed: int, run: int, base_seed: int) -> int:
    """The noise seed of evaluation episode ``(seed, run)`` under ``cfg.seed = base_seed`` (63 bits)."""
    entropy = [int(base_seed) % 2**64, int(run) % 2**64, int(seed) % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def arm_label(sampler: SamplerConfig, extra_keys: tuple[str, ...] = ()) -> str:
    """``success_only``, ``static:w=0.05``, ``adaptive:lam=1`` (plus any ``extra_keys`` set by the spec)."""
    main = _MAIN_KEY.get(sampler.kind)
    keys = ([main] if main else []) + [k for k in extra_keys if k != main]
    if not keys:
        return sampler.kind
    return sampler.kind + ":" + ",".join(f"{k}={_fmt(getattr(sampler, k))}" for k in keys)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_arm(spec: str, base: SamplerConfig) -> Arm:
    """``kind[:key=value,...]`` -> an Arm whose sampler is ``base`` with those overrides; ConfigError if bad."""
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    if kind not in SAMPLER_KINDS:
        raise ConfigError(f"eval.arms: unknown sampler kind {kind!r} in arm {text!r}; "
                          f"expected one of {', '.join(SAMPLER_KINDS)} (e.g. 'static:w=0.05', 'adaptive:lam=1')")
    types = {f.name: type(getattr(base, f.name)) for f in dataclasses.fields(SamplerConfig)}
    overrides: dict[str, Any] = {}
    for item in (p.strip() for p in rest.split(",")) if rest.strip() else ():
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise ConfigError(f"eval.arms: {item!r} in arm {text!r} is not of the form key=value")
        if key not in ARM_KEYS[kind]:
            raise ConfigError(f"eval.arms: key {key!r} does not apply to sampler {kind!r} in arm {text!r}; "
                              f"keys for {kind}: {', '.join(ARM_KEYS[kind])}")
        if key in overrides:
            raise ConfigError(f"eval.arms: key {key!r} given twice in arm {text!r}")
        overrides[key] = _coerce(value, types[key], key, text)
    sampler = dataclasses.replace(base, kind=kind, **overrides)
    return Arm(arm_label(sampler, tuple(overrides)), sampler)


def _coerce(value: str, kind: type, key: str, spec: str) -> Any:
    try:
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(value)
            return value.lower() == "true"
        return kind(value)
    except ValueError:
        raise ConfigError(f"eval.arms: {key}={value!r} in arm {spec!r} is not a valid {kind.__name__}") from None


def resolve_arms(cfg: Config) -> list[Arm]:
    """The arms of ``cfg.eval`` (``cfg.sampler`` alone when ``eval.arms`` is empty), validated with the protocol."""
    if cfg.eval.metric not in METRICS:
        raise ConfigError(f"eval.metric must be one of {', '.join(METRICS)}, got {cfg.eval.metric!r}")
    if cfg.eval.runs < 1 or cfg.eval.episodes < 1:
        raise ConfigError(f"eval.episodes and eval.runs must be >= 1, got {cfg.eval.episodes} and {cfg.eval.runs}")
    if cfg.sampler.kind not in SAMPLER_KINDS:
        raise ConfigError(f"sampler.kind must be one of {', '.join(SAMPLER_KINDS)}, got {cfg.sampler.kind!r}")
    arms = [parse_arm(s, cfg.sampler) for s in cfg.eval.arms] or [Arm(arm_label(cfg.sampler), cfg.sampler)]
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"eval.arms: arm {duplicates[0]!r} is listed more than once")
    if cfg.eval.exact_pairing:
        arms = [Arm(a.name, dataclasses.replace(a.sampler, fused_heads=False)) for a in arms]
    return arms


def reference_arm(arms: list[Arm]) -> str:
    """``success_only`` when it is an arm, else the first arm."""
    return REFERENCE_ARM if any(a.name == REFERENCE_ARM for a in arms) else arms[0].name


def run_episodes(env: VecEnv, cfg: Config, policy: ChunkPolicy, sampler: SamplerConfig, run: int,
                 bar: tqdm | None = None, keep_snapshots: bool = False) -> list[Episode]:
    """Episodes ``(seed, run)`` for the seeds of ``cfg.eval`` with ``sampler``, ordered by seed (simulator
    snapshots kept only when asked: harvesting failures to correct needs them, a report does not)."""
    n, s0 = cfg.eval.episodes, cfg.eval.seed_start
    wanted = range(s0, s0 + n)

    def noise_seed(seed: int) -> int | None:
        return episode_noise_seed(seed, run, cfg.seed) if seed in wanted else None

    rollout = ChunkedRollout(env, policy, sampler, itertools.count(s0), source="eval",
                             generator=torch.Generator().manual_seed(cfg.seed), noise_seed=noise_seed)
    kept: list[Episode] = []
    while len(kept) < n:
        for ep in rollout.step():
            if ep.seed in wanted:
                ep.extra.update(eval_run=run, noise_seed=episode_noise_seed(ep.seed, run, cfg.seed))
                if not keep_snapshots:
                    ep.snapshot_steps, ep.snapshots = [], []  # keeps worker replies small
                kept.append(ep)
                if bar is not None:
                    bar.update(1)
    kept.sort(key=lambda e: e.seed)
    return kept


def evaluate_arms(cfg: Config, policy: ChunkPolicy, progress: bool = True,
                  arms: list[Arm] | None = None) -> list[EvalResult]:
    """Every arm on the same ``eval.episodes`` seeds x ``eval.runs`` noise draws; the units (arm, run) run on
    ``eval.workers`` workers (afil_ray/eval_workers.py), with the same episodes whatever the worker count."""
    from afil_ray.eval_workers import run_units

    arms = resolve_arms(cfg) if arms is None else arms
    units = [(a, r) for a in range(len(arms)) for r in range(cfg.eval.runs)]
    episodes: dict[tuple[int, int], list[Episode]] = {}
    with tqdm(total=len(units) * cfg.eval.episodes, desc=f"eval {cfg.env.task}", unit="ep", disable=not progress,
              dynamic_ncols=True) as bar:
        for unit, eps in run_units(cfg, policy, [a.sampler for a in arms], units):
            episodes[unit] = eps
            bar.update(len(eps))
            bar.set_postfix(done=f"{arms[unit[0]].name} run {unit[1]}")
    return [EvalResult(cfg.env.task, arm.sampler.kind, [ep for r in range(cfg.eval.runs) for ep in episodes[(a, r)]],
                       arm.name, cfg.eval.metric) for a, arm in enumerate(arms)]


def evaluate(cfg: Config, policy: ChunkPolicy, progress: bool = True) -> EvalResult:
    """``cfg.sampler`` on the seeds of ``cfg.eval``, run 0 only (per-episode noise; the loop's evaluator)."""
    arm = Arm(arm_label(cfg.sampler), cfg.sampler)
    with ManiSkillVecEnv(cfg.env) as env, tqdm(total=cfg.eval.episodes, desc=f"eval {cfg.env.task} {arm.name}",
                                               unit="ep", disable=not progress, dynamic_ncols=True) as bar:
        episodes = run_episodes(env, cfg, policy, cfg.sampler, 0, bar)
    return EvalResult(cfg.env.task, cfg.sampler.kind, episodes, arm.name)


def output_dir(cfg: Config, checkpoint: str | Path, arms: list[Arm] | None = None) -> Path:
    """``run_dir/eval/<task>-<checkpoint>-seeds<start>x<episodes>-runs<runs>-arms<hash>``: neither a tuning range
    nor another arm set overwrites a reported evaluation (report.json lists the arms behind the hash)."""
    names = ",".join(a.name for a in (arms if arms is not None else resolve_arms(cfg)))
    digest = hashlib.sha1(names.encode()).hexdigest()[:8]
    name = (f"{cfg.env.task}-{Path(checkpoint).name}-seeds{cfg.eval.seed_start}x{cfg.eval.episodes}"
            f"-runs{cfg.eval.runs}-arms{digest}")
    return Path(cfg.run_dir) / "eval" / name


def metric_note(cfg: Config) -> str:
    if cfg.env.ignore_terminations:
        return ("env.ignore_terminations is true: episodes run to their step limit, so success_once and "
                "success_at_end can differ.")
    return ("env.ignore_terminations is false: an episode ends at its first success, so success_once and "
            "success_at_end coincide.")


def write_evaluation(cfg: Config, results: list[EvalResult], arms: list[Arm], checkpoint: str | Path,
                     directory: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """report.json / report.md / report.png (eval_report) and episodes.json (one record per arm and episode)."""
    directory = Path(directory) if directory is not None else output_dir(cfg, checkpoint, arms)
    report = build_report([ArmResult(r.arm, r.task, r.outcomes()) for r in results], metric=cfg.eval.metric,
                          reference_arm=reference_arm(arms), seed=cfg.seed)
    report["protocol"] = {
        "checkpoint": str(checkpoint), "task": cfg.env.task, "seed_start": cfg.eval.seed_start,
        "episodes": cfg.eval.episodes, "runs": cfg.eval.runs, "noise_seed_base": cfg.seed,
        "ignore_terminations": cfg.env.ignore_terminations, "max_episode_steps": cfg.env.max_episode_steps,
        "metric_note": metric_note(cfg), "exact_pairing": cfg.eval.exact_pairing,
        "arms": {a.name: OmegaConf.to_container(OmegaConf.structured(a.sampler)) for a in arms},
    }
    paths = write_report(report, directory, markdown_table(report) + f"\n{metric_note(cfg)}\n")
    records = [{"arm": r.arm, "task": r.task, "seed": e.seed, "run": int(e.extra["eval_run"]),
                "noise_seed": int(e.extra["noise_seed"]), "success_once": bool(e.success),
                "success_at_end": _success_at_end(e), "length": e.length,
                "w_mean": None if e.chunk_w is None else float(np.mean(e.chunk_w))}
               for r in results for e in r.episodes]
    paths["episodes"] = directory / "episodes.json"
    paths["episodes"].write_text(json.dumps({"metric": cfg.eval.metric, "episodes": records}, indent=1) + "\n")
    return report, paths

