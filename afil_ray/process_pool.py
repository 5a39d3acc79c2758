"""Simulator work spread over spawned processes: demo generation, correction and evaluation share this loop.

SAPIEN and torch state must not be forked, so workers are spawned and build their own simulator in an
initializer. Results come back in submission order (``ordered``, the default), so what callers write to the store,
and so what a seeded training run later samples, does not depend on which worker happened to finish first; a
killed run keeps everything written. A bounded number of results wait for a slower earlier one. A worker that
dies (a segfault or abort inside the simulator or the planner) breaks the whole pool; that becomes one
:class:`SimulatorCrash` that names the work in flight. Workers end with the process that spawned them, also when
it is killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
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
    ordered: bool = True,
) -> Iterator[tuple[Item, Result]]:
    """``(item, fn(item))`` in the order of ``items`` (``ordered``) or of completion, computed in ``workers``
    spawned processes.

    Items are pulled lazily: at most ``max_in_flight`` (default: all) are submitted and not yet yielded at once
    (results held back for order count), and only while ``submit_more(that number)`` says so (a caller that needs
    N good results stops feeding seeds early).
    ``fn`` must be picklable (a module-level function using the state its ``initializer`` built). When a worker
    dies, ``crash_message(item)`` (for one item in flight) heads the :class:`SimulatorCrash`.
    """
    source = iter(items)
    limit = max_in_flight or float("inf")
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_worker,
                             initargs=(os.getpid(), initializer, initargs)) as pool:
        in_flight: dict[Future, tuple[int, Item]] = {}
        held: dict[int, tuple[Item, Result]] = {}  # finished, waiting for an earlier item (ordered)
        submitted = yielded = 0
        try:
            while True:
                while (pending := len(in_flight) + len(held)) < limit and (
                        submit_more is None or submit_more(pending)):
                    item = next(source, _END)
                    if item is _END:
                        break
                    in_flight[pool.submit(fn, item)] = (submitted, item)
                    submitted += 1
                if not in_flight:  # (held is empty too: everything before the last yielded item has finished)
                    return
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=lambda f: in_flight[f][0]):
                    index, item = in_flight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool as e:
                        raise SimulatorCrash(crash_message(item)) from e
                    if not ordered:
                        yield item, result
                        continue
                    held[index] = (item, result)
                    while yielded in held:
                        yield held.pop(yielded)
                        yielded += 1
        finally:
            for fut in in_flight:
                fut.cancel()


_END: Any = object()
PARENT_POLL_S = 1.0


def _start_worker(parent: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    """A worker ends when the process that spawned it is gone: a driver killed by a signal runs no clean-up, and
    its workers would otherwise go on simulating for nobody (orphans holding the cores a re-run needs)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    initializer(*initargs)
