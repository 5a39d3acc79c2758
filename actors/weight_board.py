"""Ray shell of :class:`afil_ray.loop.board.WeightBoard`, and how the learner and the workers talk to it.

The board is a tiny actor (no CPU reserved). The learner ``ray.put``s each version once and the board holds only
its reference; every reader fetches that one object (zero-copy for readers on the same node). The object is owned
by the learner (Ray 2.56 removed ``ray.put(_owner=...)``), so a learner crash loses its newest packet: readers
then keep the weights they have until the restarted learner publishes the next version.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError

from afil_ray.loop.board import WeightBoard
from afil_ray.loop.weights import WeightPacket

log = logging.getLogger(__name__)

WeightBoardActor = ray.remote(num_cpus=0)(WeightBoard)


def board_named(name: str) -> Any:
    """The run's board, looked up by name inside an actor's constructor (also after a restart). Actors get the
    name, not the handle: a handle as a constructor argument is an object-store reference that Ray cannot restore
    on restart (ray-project/ray#53727), and it says so with an error-level line."""
    return ray.get_actor(name)


def ray_publisher(board: Any):
    """``publish(packet)`` for :class:`~afil_ray.loop.learner.OnlineLearner`: one put, one board update."""

    def publish(packet: WeightPacket) -> None:
        ref = ray.put(packet)
        ray.get(board.publish.remote(packet.version, [ref], packet.learner_step, packet.nbytes,
                                     tuple(packet.components)))

    return publish


class BoardWeightSource:
    """A worker's view of the board actor: one outstanding ``latest`` query at a time, checked without waiting."""

    def __init__(self, board: Any) -> None:
        self.board = board
        self._pending: Any = None
        self._latest = 0

    def poll(self, current: int, block: bool = False) -> WeightPacket | None:
        if self._pending is None:
            self._pending = self.board.latest.remote()
        ready, _ = ray.wait([self._pending], timeout=None if block else 0)
        if not ready:
            return None
        version, handle = ray.get(self._pending)
        self._pending = None
        self._latest = max(self._latest, version)
        if version <= current or handle is None:
            return None
        try:
            return ray.get(handle[0])
        except (OwnerDiedError, ObjectLostError) as e:  # the learner died after publishing; wait for the next
            log.warning("weight version %d is gone with its learner (%s); keeping version %d", version,
                        type(e).__name__, current)
            return None

    def latest_version(self) -> int:
        return self._latest
