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


def _pid_then_sleep(directory: str) -> None:
    with open(os.path.join(directory, f"{os.getpid()}.pid"), "w") as f:
        f.write("running")
    time.sleep(120)


def test_workers_end_when_their_driver_is_killed(tmp_path):
    """A driver killed by a signal runs no clean-up: its workers notice and exit instead of simulating on."""
    import signal
    import subprocess
    import sys

    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from afil_ray.process_pool import spawn_map\n"
              "from test_process_pool import _init, _pid_then_sleep\n"
              "list(spawn_map(_pid_then_sleep, [sys.argv[2]] * 2, workers=2, initializer=_init, initargs=(0,),"
              " crash_message=str))\n")
    driver = subprocess.Popen([sys.executable, "-c", script, os.path.dirname(__file__), str(tmp_path)])
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as gone
            return f.read().split(")")[-1].split()[0] != "Z"

    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)
