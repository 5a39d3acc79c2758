"""Ray shells of the evaluators: the loop's (:class:`afil_ray.loop.evaluator.LoopEvaluator`) and
``afil-ray eval``'s workers (:class:`afil_ray.eval.workers.EvalWorker`)."""

from __future__ import annotations

import os

import ray
import torch

from actors.weight_board import BoardWeightSource, board_named
from afil_ray.config import Config
from afil_ray.eval.arms import Arm
from afil_ray.eval.workers import EvalWorker
from afil_ray.loop.evaluator import EvalReport, LoopEvaluator
from afil_ray.replay.episode import Episode


@ray.remote
class EvalActor:
    def __init__(self, cfg: Config, board: str) -> None:
        self.evaluator = LoopEvaluator(cfg, BoardWeightSource(board_named(board)))

    def evaluate_latest(self) -> EvalReport | None:
        return self.evaluator.evaluate_latest()

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class EvalUnitActor:
    """Ray shell of :class:`afil_ray.eval.workers.EvalWorker` (``afil-ray eval`` on a cluster): units of any task
    of ``cfg.env.task``."""

    def __init__(self, cfg: Config, policy: torch.nn.Module, torch_threads: int) -> None:
        self.worker = EvalWorker(cfg, policy, torch_threads)

    def run(self, task: str, arm: Arm, run: int, keep_snapshots: bool = False) -> list[Episode]:
        return self.worker.run(task, arm, run, keep_snapshots)
