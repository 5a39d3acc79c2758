"""Ray shell of :class:`afil_ray.loop.harvest.RolloutWorker` (the logic and its tests live there)."""

from __future__ import annotations

import os
from typing import Any

import ray

from actors.weight_board import BoardWeightSource
from afil_ray.config import Config
from afil_ray.loop.harvest import RolloutReport, RolloutWorker


@ray.remote
class RolloutActor:
    def __init__(self, cfg: Config, index: int, board: Any) -> None:
        self.worker = RolloutWorker(cfg, index, BoardWeightSource(board))

    def run(self, seconds: float) -> RolloutReport:
        return self.worker.run(seconds)

    def close(self) -> None:
        self.worker.close()

    def pid(self) -> int:
        return os.getpid()
