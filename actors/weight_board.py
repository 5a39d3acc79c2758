"""Ray shell of :class:`afil_ray.loop.board.WeightBoard`, and how the learner and the workers talk to it.

The board is a tiny actor (no CPU reserved) and it owns the weights: the learner sends each version's packet to
the board, which ``ray.put``s it itself and hands out only that reference; every reader fetches the one object
(zero-copy for readers on the same node). Ray frees an object when its owner dies and Ray 2.56 removed
``ray.put(_owner=...)``, so a packet the learner put would die with the learner (issue 19: an evaluator fell back
to the starting weights after a learner kill); owned by the board, every published version outlives its learner.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import ObjectLostError, OwnerDiedError

from afil_ray.loop.board import WeightBoard
from afil_ray.loop.weights import WeightPacket

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class WeightBoardActor(WeightBoard):
    def publish_packet(self, packet: WeightPacket) -> int:
        """Publish ``packet`` as an object this actor owns (the sender may die; the version stays readable)."""
        return self.publish(packet.version, [ray.put(packet)], packet.learner_step, packet.nbytes,
                            tuple(packet.components))


def board_named(name: str) -> Any:
    """The run's board, looked up by name inside an actor's constructor (also after a restart). Actors get the
    name, not the handle: a handle as a constructor argument is an object-store reference that Ray cannot restore
    on restart (ray-project/ray#53727), and it says so with an error-level line."""
    return ray.get_actor(name)


def ray_publisher(board: Any):
    """``publish(packet)`` for :class:`~afil_ray.loop.learner.OnlineLearner`: the packet goes to the board, which
    owns it from then on; returns once the board has it."""

    def publish(packet: WeightPacket) -> None:
        ray.get(board.publish_packet.remote(packet))

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
        except (OwnerDiedError, ObjectLostError) as e:  # only if the board itself died (it owns the packets)
            log.warning("weight version %d is gone (%s); keeping version %d", version, type(e).__name__, current)
            return None

    def latest_version(self) -> int:
        return self._latest
