"""The weight board: which weight version is newest, and where its packet lives.

One small object that everyone asks and only the learner writes. It holds a handle to the packet (a Ray
``ObjectRef`` on a cluster, the packet itself in-process), never one copy per reader. Versions only go up: a
publish that does not advance the version is refused, so a restarted learner can never move actors backwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from afil_ray.loop.weights import WeightPacket


class StaleVersionError(ValueError):
    """A publish with a version that is not newer than the board's."""


@dataclass
class Publication:
    version: int
    learner_step: int
    nbytes: int
    published_at: float
    components: tuple[str, ...]


class WeightBoard:
    """Newest version and a handle to its packet; ``history`` keeps what was published (not the weights)."""

    def __init__(self) -> None:
        self.version = 0  # 0: the starting checkpoint, which every actor loads itself
        self.handle: Any = None
        self.history: list[Publication] = []

    def publish(self, version: int, handle: Any, learner_step: int, nbytes: int,
                components: tuple[str, ...]) -> int:
        if version <= self.version:
            raise StaleVersionError(f"weight version {version} is not newer than the board's {self.version}")
        self.version, self.handle = version, handle
        self.history.append(Publication(version, learner_step, nbytes, time.time(), tuple(components)))
        return version

    def latest(self) -> tuple[int, Any]:
        """(version, handle); the handle is None until the first publish."""
        return self.version, self.handle

    def latest_version(self) -> int:
        return self.version

    def publications(self) -> list[Publication]:
        return list(self.history)


class WeightSource(Protocol):
    """How a rollout or eval worker learns of newer weights."""

    def poll(self, current: int, block: bool = False) -> WeightPacket | None:
        """A packet newer than ``current`` if one is known; without ``block`` it never waits on the network."""
        ...

    def latest_version(self) -> int:
        """The newest version published so far (for staleness)."""
        ...


class LocalWeightSource:
    """Reads a :class:`WeightBoard` in the same process (tests, single-process runs)."""

    def __init__(self, board: WeightBoard) -> None:
        self.board = board

    def poll(self, current: int, block: bool = False) -> WeightPacket | None:
        version, packet = self.board.latest()
        return packet if version > current and packet is not None else None

    def latest_version(self) -> int:
        return self.board.version
