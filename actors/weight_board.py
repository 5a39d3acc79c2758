"""Ray shell of :class:`afil_ray.loop.board.WeightBoard`: a tiny actor (no CPU reserved) that owns the
published weight objects, so they outlive a learner crash."""

from __future__ import annotations

import ray

from afil_ray.loop.board import WeightBoard

WeightBoardActor = ray.remote(num_cpus=0)(WeightBoard)
