"""Ray shell of :class:`afil_ray.loop.learner.OnlineLearner`."""

from __future__ import annotations

import os

import ray
import torch

from actors.weight_board import board_named, ray_publisher
from afil_ray.config import Config
from afil_ray.loop.learner import LearnerReport, OnlineLearner


@ray.remote
class LearnerActor:
    def __init__(self, cfg: Config, board_name: str) -> None:
        if cfg.loop.torch_threads:
            torch.set_num_threads(cfg.loop.torch_threads)
        board = board_named(board_name)
        self.learner = OnlineLearner(cfg, ray_publisher(board), lambda: ray.get(board.latest_version.remote()))

    def train(self, seconds: float) -> LearnerReport:
        return self.learner.train(seconds)

    def stop(self) -> str | None:
        return self.learner.stop()

    def pid(self) -> int:
        return os.getpid()
