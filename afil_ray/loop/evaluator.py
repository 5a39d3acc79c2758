"""The loop's evaluator: the newest weights on a fixed, seeded set of initial states, per sampler side by side.

Every version is evaluated on the same seeds (``eval.seed_start`` ..) and the same sampling noise, so two
versions' numbers differ by the weights alone. A sampler's result is reused while none of the components it reads
changed (``success_only`` does not read the failure head, so while only the failure head is trained its result is
computed once).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

from afil_ray.config import Config
from afil_ray.eval.protocol import evaluate
from afil_ray.loop.board import WeightSource
from afil_ray.loop.weights import actor_policy, apply

# the policy components each sampler's result depends on: it is reused while none of them changed
_SUCCESS_SIDE = frozenset({"backbone", "success_head"})
READS: dict[str, frozenset[str]] = {"success_only": _SUCCESS_SIDE, "static": _SUCCESS_SIDE | {"failure_head"},
                                    "adaptive": _SUCCESS_SIDE | {"failure_head"}, "rank": _SUCCESS_SIDE | {"critic"},
                                    "outcome": _SUCCESS_SIDE | {"outcome"}}


@dataclass
class EvalReport:
    version: int
    episodes: int
    success_rate: dict[str, float] = field(default_factory=dict)  # per sampler
    seconds: float = 0.0
    reused: list[str] = field(default_factory=list)  # samplers whose result carried over from an older version


class LoopEvaluator:
    """Plain class; ``actors.evaluator.EvalActor`` is its Ray shell."""

    def __init__(self, cfg: Config, weights: WeightSource) -> None:
        self.cfg, self.weights = cfg, weights
        self.policy = actor_policy(cfg)
        self.version = 0
        self.evaluated = -1
        self._cache: dict[str, float] = {}  # sampler -> its result at the last evaluation
        self._changed: set[str] = set()  # components updated since the last evaluation

    def evaluate_latest(self) -> EvalReport | None:
        """Evaluate the newest version, or return None when it was evaluated already."""
        packet = self.weights.poll(self.version, block=True)
        if packet is not None:
            apply(self.policy, packet)
            self.version = packet.version
            self._changed |= set(packet.components)
        if self.version == self.evaluated:
            return None
        t0 = time.perf_counter()
        report = EvalReport(version=self.version, episodes=self.cfg.loop.eval_episodes)
        for kind in self.cfg.loop.eval_samplers:
            if kind in self._cache and not READS[kind] & self._changed:
                report.success_rate[kind] = self._cache[kind]
                report.reused.append(kind)
                continue
            cfg = copy.deepcopy(self.cfg)
            cfg.sampler.kind = kind
            cfg.eval.episodes = self.cfg.loop.eval_episodes
            results = [evaluate(dataclasses.replace(cfg, env=cfg.env.for_task(task)), self.policy, progress=False)
                       for task in cfg.env.tasks]  # a task list: the same seeds on each task, pooled
            report.success_rate[kind] = sum(r.successes for r in results) / sum(len(r.episodes) for r in results)
            self._cache[kind] = report.success_rate[kind]
        self._changed = set()
        self.evaluated = self.version
        report.seconds = time.perf_counter() - t0
        return report
