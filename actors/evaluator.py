"""Ray shell of :class:`afil_ray.loop.evaluator.LoopEvaluator`."""

from __future__ import annotations

import os
from typing import Any

import ray

from afil_ray.config import Config
from afil_ray.loop.evaluator import EvalReport, LoopEvaluator
from afil_ray.loop.ray_weights import BoardWeightSource


@ray.remote
class EvalActor:
    def __init__(self, cfg: Config, board: Any) -> None:
        self.evaluator = LoopEvaluator(cfg, BoardWeightSource(board))

    def evaluate_latest(self) -> EvalReport | None:
        return self.evaluator.evaluate_latest()

    def pid(self) -> int:
        return os.getpid()
