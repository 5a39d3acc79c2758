"""Simulator work spread over spawned processes: demo generation, correction and evaluation share this loop.

SAPIEN and torch state must not be forked, so workers are spawned and build their own simulator in an
initializer. Results come back in completion order, so callers write each to the store as it arrives and a killed
run keeps everything finished. A worker that dies (a segfault or abort inside the simulator or the planner) breaks
the whole pool; that becomes one :class:`SimulatorCrash` that names the work in flight.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class SimulatorCrash(RuntimeError):
    """A worker process died (segfault or abort inside the simulator or planner)."""


def spawn_map(
    fn: Callable[[Item], Result],
    items: Iterable[Item],
    *,
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
    crash_message: Callable[[Item], str],
    max_in_flight: int | None = None,
    submit_more: Callable[[int], bool] | None = None,
) -> Iterator[tuple[Item, Result]]:
    """``(item, fn(item))`` in completion order, computed in ``workers`` spawned processes.

    Items are pulled lazily: at most ``max_in_flight`` (default: all) are submitted at once, and only while
    ``submit_more(number in flight)`` says so (a caller that needs N good results stops feeding seeds early).
    ``fn`` must be picklable (a module-level function using the state its ``initializer`` built). When a worker
    dies, ``crash_message(item)`` (for one item in flight) heads the :class:`SimulatorCrash`.
    """
    source = iter(items)
    limit = max_in_flight or float("inf")
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        in_flight: dict[Future, Item] = {}
        try:
            while True:
                while len(in_flight) < limit and (submit_more is None or submit_more(len(in_flight))):
                    item = next(source, _END)
                    if item is _END:
                        break
                    in_flight[pool.submit(fn, item)] = item
                if not in_flight:
                    return
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    item = in_flight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool as e:
                        raise SimulatorCrash(crash_message(item)) from e
                    yield item, result
        finally:
            for fut in in_flight:
                fut.cancel()


_END: Any = object()
