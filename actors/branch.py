"""Ray shell of :class:`afil_ray.loop.branching.BranchWorker` (the logic and its tests live there)."""

from __future__ import annotations

import os

import ray

from actors.weight_board import BoardWeightSource, board_named
from afil_ray.config import Config
from afil_ray.loop.branching import BranchRoundReport, BranchWorker


@ray.remote
class BranchActor:
    def __init__(self, cfg: Config, index: int, board: str) -> None:
        self.worker = BranchWorker(cfg, index, BoardWeightSource(board_named(board)))

    def run(self, seconds: float) -> BranchRoundReport:
        return self.worker.run(seconds)

    def close(self) -> None:
        self.worker.close()

    def pid(self) -> int:
        return os.getpid()
