"""The spawned-process loop shared by demo generation, correction and evaluation."""

from __future__ import annotations

import os
import time

import pytest

from afil_ray.process_pool import SimulatorCrash, spawn_map

_offset = 0


def _init(offset: int) -> None:
    global _offset
    _offset = offset


def _work(x: int) -> int:
    if x < 0:  # a slow item: the ones after it finish first
        time.sleep(1.0)
    if x == 13:
        os._exit(3)  # what a segfault in the simulator looks like to the pool: the worker is gone
    return x + _offset


def test_results_come_back_once_each_with_the_initializer_state():
    out = dict(spawn_map(_work, range(8), workers=2, initializer=_init, initargs=(100,),
                         crash_message=lambda x: f"item {x}", max_in_flight=3))
    assert out == {x: x + 100 for x in range(8)}


def test_items_are_pulled_lazily_while_submit_more_allows():
    pulled = []

    def items():
        for x in range(1000):
            pulled.append(x)
            yield x

    done = []
    for x, _ in spawn_map(_work, items(), workers=2, initializer=_init, initargs=(0,), crash_message=str,
                          max_in_flight=2, submit_more=lambda in_flight: len(done) + in_flight < 5):
        done.append(x)
    assert len(done) == 5 and len(pulled) <= 6  # never the whole (here: endless-like) source


def test_a_dead_worker_is_a_simulator_crash_naming_the_work():
    with pytest.raises(SimulatorCrash, match=r"died while on item \d+"):
        list(spawn_map(_work, [1, 13, 2], workers=2, initializer=_init, initargs=(0,),
                       crash_message=lambda x: f"a worker died while on item {x}"))


def test_results_come_back_in_item_order_however_the_workers_finish():
    """What callers write to the store must not depend on which worker was faster (seeded training reads it)."""
    items = [-1, 2, 3, 4, 5]
    ordered = [x for x, _ in spawn_map(_work, items, workers=2, initializer=_init, initargs=(0,), crash_message=str,
                                       max_in_flight=4)]
    assert ordered == items
    done = [x for x, _ in spawn_map(_work, items, workers=2, initializer=_init, initargs=(0,), crash_message=str,
                                    max_in_flight=4, ordered=False)]
    assert sorted(done) == sorted(items) and done[0] != -1  # the slow first item really finished later
