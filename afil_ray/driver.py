"""The composition root: the one library module that starts Ray and places the actors of ``actors/`` and
``learners/`` (the CLI is the only other one that knows them). Everything below it is Ray-free.

``afil-ray run`` (:class:`LoopDriver`) places the board, the learner, N rollout actors, M branch actors (issue 22's
matched-state branches, ``loop.num_branch_actors``) and the evaluator on Ray
and keeps them busy; :func:`eval_runner` places ``afil-ray eval``'s and the pipeline's evaluation units on Ray eval
actors when a cluster is attached (``afil_ray.eval.workers`` runs them in processes otherwise).

Every actor call is one bounded round (``loop.round_s``); the driver waits for whichever round ends first,
logs its report and starts that actor's next round. So the driver is the only place that writes TensorBoard,
stopping never interrupts a step (Ctrl-C or SIGTERM ends the rounds in flight, flushes the rollout writers,
checkpoints the learner and prints a summary), and a crashed actor costs one round: Ray restarts it
(``loop.max_restarts``), its constructor re-syncs the newest weights, and the driver starts its next round.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from tqdm import tqdm

from actors.branch import BranchActor
from actors.evaluator import EvalActor, EvalUnitActor
from actors.rollout import RolloutActor
from actors.weight_board import WeightBoardActor
from afil_ray.config import Config, ConfigError, check_writable, save_resolved
from afil_ray.envs.checks import (
    check_cameras,
    check_one_action_space,
    check_policy_fits,
    check_tasks,
    env_tasks,
    trained_tasks,
)
from afil_ray.eval.arms import Arm
from afil_ray.eval.workers import Unit, process_units
from afil_ray.loop.metrics import LoopMetrics
from afil_ray.policy.checkpoint import CheckpointError, load_policy
from afil_ray.policy.loading import resolve_checkpoint
from afil_ray.provenance import machine_facts
from afil_ray.replay.episode import Episode
from afil_ray.replay.store import ReplayStore
from afil_ray.run_id import with_run_id
from learners.learner import LearnerActor

log = logging.getLogger(__name__)


def _absolute(cfg: Config) -> Config:
    """Local Ray: actors may not share the driver's working directory, so local paths become absolute."""
    cfg = copy.deepcopy(cfg)
    for section, key in (("", "run_dir"), ("replay", "root"), ("loop", "init_from")):
        owner = getattr(cfg, section) if section else cfg
        value = getattr(owner, key)
        if value and "://" not in value:
            setattr(owner, key, str(Path(value).resolve()))
    return cfg


def check_loop_config(cfg: Config) -> None:
    """What the loop needs from its config, checked before Ray starts: a bad value costs one line, not a Ray
    start and actors that raise half a minute later."""
    # the rollout actors and the evaluator simulate them; with loop.handover the actors' demonstrators plan too
    check_tasks(env_tasks(cfg.env), planner=cfg.loop.handover)
    check_one_action_space(cfg.env)
    check_cameras(cfg.env)
    check_tasks(trained_tasks(cfg), simulate=False)  # the learner reads these from the store
    check_writable("run_dir", cfg.run_dir)  # the driver writes the config, TensorBoard and the summary there
    if not (cfg.loop.address or os.environ.get("RAY_ADDRESS")):  # a cluster's nodes may see other paths
        check_writable("replay.root", cfg.replay.root)
    if not cfg.loop.init_from:
        raise ConfigError("loop.init_from must name the success-only checkpoint the loop starts from "
                          "(train one with `afil-ray train`)")
    try:
        start = resolve_checkpoint(cfg.loop.init_from)
    except CheckpointError as e:
        raise CheckpointError(f"loop.init_from: {e}") from None
    check_policy_fits(load_policy(start), cfg.env, f"loop.init_from={cfg.loop.init_from}")


class LoopDriver:
    def __init__(self, cfg: Config) -> None:
        check_loop_config(cfg)
        self.cfg = with_run_id(cfg, "run")
        self.stopping = False
        self.started_ray = False
        self.inflight: dict[Any, tuple[str, int]] = {}
        self.failures: dict[tuple[str, int], int] = {}
        self.retry_at: dict[tuple[str, int], float] = {}  # failed actors' next round, once Ray restarted them
        self.restarting: set[tuple[str, int]] = set()
        self.metrics: LoopMetrics | None = None
        self._previous_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ set-up

    def _init_ray(self) -> None:
        """Join the cluster that ``loop.address`` or ``RAY_ADDRESS`` names, or start a Ray of our own: never
        attach silently to some other Ray already running on the machine (what a bare ``ray.init()`` does)."""
        address = self.cfg.loop.address or os.environ.get("RAY_ADDRESS")
        if ray.is_initialized():
            return
        if address:
            ray.init(address=address, log_to_driver=True)
            print(f"afil-ray run {self.cfg.run_id}: joined the Ray cluster at {address} "
                  f"({_capacity(ray.cluster_resources())})", file=sys.stderr, flush=True)
        else:
            self.cfg = _absolute(self.cfg)
            quiet_local_ray()
            ray.init(address="local", num_cpus=self.cfg.loop.local_num_cpus, include_dashboard=False,
                     log_to_driver=True)
            self.started_ray = True
            print(f"afil-ray run {self.cfg.run_id}: started a local Ray for this run "
                  f"({_capacity(ray.cluster_resources())}); loop.address or RAY_ADDRESS joins a cluster instead",
                  file=sys.stderr, flush=True)

    def _options(self, cpus: float, gpus: float, restarts: int) -> dict[str, Any]:
        return {"num_cpus": cpus, "num_gpus": gpus, "max_restarts": restarts, "max_task_retries": 0}

    def start(self) -> None:
        self._init_ray()
        self._check_resources()
        # after ray.init (whose core worker installs its own SIGTERM handler, which aborts the process) and
        # before the actors are built, so a stop during their construction is clean too
        self._install_signals()
        cfg, lc = self.cfg, self.cfg.loop
        run_dir = Path(cfg.run_dir)
        save_resolved(cfg, run_dir)
        save_resolved(cfg, run_dir / "runs" / cfg.run_id)  # config.yaml above is the newest run's; this one stays
        (run_dir / "replay_store.txt").write_text(f"{cfg.replay.root}\n")
        # a folder per run: TensorBoard shows every run of a run_dir (env-step and version axes restart per run)
        self.metrics = LoopMetrics(run_dir / "tb" / cfg.run_id, rolling_window=lc.rolling_window)
        # actors find the board by name (a handle as a constructor argument would not survive their restart)
        board = f"afil-ray-board-{uuid.uuid4().hex[:12]}"
        self.board = WeightBoardActor.options(name=board).remote()
        self.learner = LearnerActor.options(**self._options(lc.learner_cpus, lc.learner_gpus, lc.max_restarts)
                                            ).remote(cfg, board)
        self.rollouts = [RolloutActor.options(**self._options(lc.rollout_cpus, lc.rollout_gpus, lc.max_restarts)
                                              ).remote(cfg, i, board) for i in range(lc.num_rollout_actors)]
        self.branchers = [BranchActor.options(**self._options(lc.branch_cpus, lc.branch_gpus, lc.max_restarts)
                                              ).remote(cfg, i, board) for i in range(lc.num_branch_actors)]
        self.evaluator = (EvalActor.options(**self._options(lc.eval_cpus, lc.eval_gpus, lc.max_restarts)
                                            ).remote(cfg, board) if lc.eval_every_s > 0 else None)
        self._wait_ready()

    def _demand(self) -> list[tuple[str, dict[str, float]]]:
        """(actor, {resource: amount}) for every actor the loop places."""
        lc = self.cfg.loop
        actors = [("learner", {"CPU": lc.learner_cpus, "GPU": lc.learner_gpus})]
        actors += [(f"rollout {i}", {"CPU": lc.rollout_cpus, "GPU": lc.rollout_gpus})
                   for i in range(lc.num_rollout_actors)]
        actors += [(f"branch {i}", {"CPU": lc.branch_cpus, "GPU": lc.branch_gpus})
                   for i in range(lc.num_branch_actors)]
        if lc.eval_every_s > 0:
            actors.append(("evaluator", {"CPU": lc.eval_cpus, "GPU": lc.eval_gpus}))
        return actors

    def _check_resources(self) -> None:
        """Fail within seconds, naming demand and capacity, when the loop's actors cannot all be placed: in total
        (the sum of loop.*_cpus/_gpus) or one actor on any single node. Ray would otherwise wait forever with a
        pending demand that the job log does not show. A local Ray never grows; a cluster may (its autoscaler),
        so there the check waits up to ``loop.resource_wait_s`` first."""
        deadline = time.monotonic() + (self.cfg.loop.resource_wait_s if not self.started_ray else 0.0)
        while True:
            problem = _placement_problem(self._demand(), ray.nodes())
            if problem is None:
                return
            if time.monotonic() >= deadline or self.stopping:
                where = "the local Ray" if self.started_ray else "the Ray cluster"
                hint = ("raise loop.local_num_cpus or lower them (fractions are allowed)" if self.started_ray else
                        "lower them (fractions are allowed), add nodes, or set loop.resource_wait_s for an "
                        "autoscaling cluster")
                raise ConfigError(f"{problem} on {where}; {hint}")
            log.warning("waiting for the cluster to grow: %s", problem)
            time.sleep(5.0)

    def _wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until every actor is constructed (simulators built, policy loaded): the budget starts after.
        A constructor that raises (bad checkpoint, missing assets) ends the run here with its message."""
        actors = {"learner 0": self.learner, **{f"rollout {i}": a for i, a in enumerate(self.rollouts)},
                  **{f"branch {i}": a for i, a in enumerate(self.branchers)}}
        if self.evaluator is not None:
            actors["eval 0"] = self.evaluator
        refs = {a.pid.remote(): name for name, a in actors.items()}
        t0 = time.monotonic()
        while refs and not self.stopping:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=10.0)
            for ref in ready:
                name = refs.pop(ref)
                try:
                    log.info("%s ready (pid %d)", name, ray.get(ref))
                except RayActorError as e:
                    raise RuntimeError(f"{name} actor could not start: {e}") from None
            if refs and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"actors not ready after {timeout_s:.0f} s (cluster resources?): "
                                   f"{sorted(refs.values())}")
            if refs:  # a user's log says why nothing happens yet once it takes long (no -v needed)
                waited = time.monotonic() - t0
                (log.warning if waited > 60 else log.info)(
                    "%.0f s: still waiting for %s to start (simulators and policy loading; `ray status` shows "
                    "pending resource demands)", waited, ", ".join(sorted(refs.values())))

    # ------------------------------------------------------------------ rounds

    def _submit(self, kind: str, index: int = 0) -> None:
        lc = self.cfg.loop
        if kind == "rollout":
            ref = self.rollouts[index].run.remote(lc.round_s)
        elif kind == "branch":
            ref = self.branchers[index].run.remote(lc.round_s)
        elif kind == "learner":
            ref = self.learner.train.remote(lc.round_s)
        else:
            ref = self.evaluator.evaluate_latest.remote()
        self.inflight[ref] = (kind, index)

    def _actor(self, kind: str, index: int) -> Any:
        return {"rollout": lambda: self.rollouts[index], "branch": lambda: self.branchers[index],
                "learner": lambda: self.learner, "eval": lambda: self.evaluator}[kind]()

    def _count_failure(self, key: tuple[str, int], error: BaseException) -> None:
        self.failures[key] = self.failures.get(key, 0) + 1
        self.metrics.actor_restarts += 1
        if self.failures[key] > self.cfg.loop.max_restarts:
            raise RuntimeError(f"{key[0]} actor {key[1]} failed more than loop.max_restarts="
                               f"{self.cfg.loop.max_restarts} times; last error: {error}") from None

    def _handle(self, ref: Any, kind: str, index: int) -> bool:
        """Log one finished round; False when the actor failed (the caller resubmits after a pause).

        An actor that died is restarted by Ray: the first failed call counts one restart, the calls that find
        it still restarting do not. A call that raised inside a live actor is logged with its remote traceback
        and the actor is restarted, so it rebuilds its state (simulator, policy) from scratch.
        """
        key = (kind, index)
        try:
            result = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            if isinstance(e, RayTaskError) and not isinstance(e, RayActorError):
                log.error("%s %d raised; restarting it:\n%s", kind, index, e)
                self._count_failure(key, e)
                ray.kill(self._actor(kind, index), no_restart=False)
                self.restarting.add(key)
            elif key not in self.restarting:
                log.error("%s %d died; Ray restarts it: %s", kind, index, str(e).strip().splitlines()[0])
                self._count_failure(key, e)
                self.restarting.add(key)
            return False
        self.restarting.discard(key)
        if kind == "rollout":
            self.metrics.rollout(result)
        elif kind == "branch":
            self.metrics.branch(result)
        elif kind == "learner":
            self.metrics.learner(result)
        elif result is not None:
            self.metrics.evaluation(result)
            log.info("eval of version %d: %s", result.version, result.success_rate)
        return True

    def _call_when_up(self, actor: Any, method: str, timeout_s: float) -> Any:
        """Call ``method`` once the actor answers (it may be mid-restart); raises after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(getattr(actor, method).remote(), timeout=max(1.0, deadline - time.monotonic()))
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _install_signals(self) -> None:
        def stop(signum: int, _frame: Any) -> None:
            if self.stopping:  # a second signal: stop waiting for rounds
                raise KeyboardInterrupt
            log.warning("%s: finishing the rounds in flight, then stopping", signal.Signals(signum).name)
            self.stopping = True

        self._previous_handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def run(self) -> dict[str, Any]:
        """Run until ``loop.duration_s`` (or ``loop.max_learner_steps``) or a stop signal; returns the summary."""
        try:
            if self.metrics is None:
                try:
                    self.start()
                except BaseException:
                    if self.started_ray:  # a local Ray we started must not outlive a failed start
                        ray.shutdown()
                    raise
            try:
                self._rounds()
            finally:
                summary = self.shutdown()
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
        return summary

    def _rounds(self) -> None:
        lc = self.cfg.loop
        start = time.monotonic()
        deadline = start + lc.duration_s
        for i in range(len(self.rollouts)):
            self._submit("rollout", i)
        for i in range(len(self.branchers)):
            self._submit("branch", i)
        self._submit("learner")
        next_eval = time.monotonic()
        with self._progress_bar() as bar:
            while not self.stopping and time.monotonic() < deadline:
                if lc.max_learner_steps is not None and self.metrics.learner_step >= lc.max_learner_steps:
                    break
                if self.evaluator is not None and time.monotonic() >= next_eval \
                        and "eval" not in {k for k, _ in self.inflight.values()}:
                    self._submit("eval")
                now = time.monotonic()
                for key in [k for k, at in self.retry_at.items() if at <= now]:
                    del self.retry_at[key]
                    self._submit(*key)
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0) if self.inflight else ([], [])
                for ref in ready:
                    kind, index = self.inflight.pop(ref)
                    ok = self._handle(ref, kind, index)
                    if kind == "eval":
                        next_eval = time.monotonic() + (lc.eval_every_s if ok else 1.0)
                    elif not ok:
                        self.retry_at[(kind, index)] = time.monotonic() + 1.0  # let Ray restart it first
                    elif not self.stopping:
                        self._submit(kind, index)
                bar.set_postfix(self.metrics.progress(), refresh=False)
                bar.update(min(bar.total, round(time.monotonic() - start)) - bar.n)  # drawn at most per mininterval

    def _progress_bar(self) -> tqdm | _LogLines:
        """Elapsed / budget with the loop's live figures: a bar redrawn in place on a terminal; in a job log (no
        terminal, where carriage returns would run the updates together) a line every 30 s and one at the end."""
        total = round(self.cfg.loop.duration_s)
        if sys.stderr.isatty():
            return tqdm(total=total, desc="afil-ray run", unit="s", dynamic_ncols=True, mininterval=1.0,
                        bar_format="{desc} {n_fmt}/{total_fmt} s |{bar}|{postfix}")
        return _LogLines(total, every_s=30.0)

    # ------------------------------------------------------------------ stop

    def shutdown(self) -> dict[str, Any]:
        """Let the rounds in flight end, flush the rollout writers, checkpoint the learner, print a summary."""
        lc = self.cfg.loop
        pending = list(self.inflight)
        if pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=2 * lc.round_s + 60)
            for ref in done:
                kind, index = self.inflight.pop(ref)
                try:
                    self._handle(ref, kind, index)
                except RuntimeError as e:
                    log.error("%s", e)
        summary = self.metrics.summary()
        steps = [(a, "close", f"rollout {i} writer flush") for i, a in enumerate(self.rollouts)]
        steps += [(a, "close", f"branch {i} simulators") for i, a in enumerate(self.branchers)]
        steps.append((self.learner, "stop", "learner checkpoint"))
        for actor, method, what in steps:
            try:
                result = self._call_when_up(actor, method, timeout_s=300)
                if method == "stop":
                    summary["final_checkpoint"] = result
            except Exception as e:  # report and go on: the other actors still need to stop cleanly
                log.error("%s failed: %s", what, e)
        summary["stopped_by_signal"] = self.stopping
        self._count_stored(summary)
        summary["machine"] = machine_facts()  # the driver's node: what decides the digits (docs/results.md)
        self.metrics.close()
        text = json.dumps(summary, indent=2) + "\n"
        (Path(self.cfg.run_dir) / "summary.json").write_text(text)  # the newest run's
        (Path(self.cfg.run_dir) / "runs" / self.cfg.run_id / "summary.json").write_text(text)
        if self.started_ray:
            ray.shutdown()
        return summary


    def _count_stored(self, summary: dict[str, Any]) -> None:
        """The summary's episode counts are what this run stored (its run id in the store), once the writers are
        closed; rounds report what they harvested, but a round whose actor was killed never reports, while the
        episodes it finished are already stored. The difference is kept as ``episodes_in_lost_rounds``."""
        summary["run_id"] = self.cfg.run_id
        reported = summary["episodes"]
        try:
            stored = ReplayStore.from_config(self.cfg.replay).episodes_of_run(self.cfg.run_id)
        except Exception as e:  # the summary must still be written; say why the store count is missing
            log.error("could not count this run's episodes in %s: %s", self.cfg.replay.root, e)
            return
        summary["episodes"], summary["episodes_reported"] = stored, reported
        # branch actors report their branches apart from the rollouts' outcomes; both are stored under this run id
        branched = summary.get("branches", {}).get("branches", 0)
        summary["episodes_in_lost_rounds"] = sum(stored.values()) - sum(reported.values()) - branched


def _capacity(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0.0):g} CPU, {resources.get('GPU', 0.0):g} GPU"


def _placement_problem(actors: list[tuple[str, dict[str, float]]], nodes: list[dict[str, Any]]) -> str | None:
    """Why ``actors`` cannot all be placed on ``nodes`` (``ray.nodes()``), or None. Checks the totals and that
    each actor fits on some node; Ray's own packing may still queue an actor behind others, never forever."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    for kind in ("CPU", "GPU"):
        wanted = sum(d[kind] for _, d in actors)
        have = sum(r.get(kind, 0.0) for r in alive)
        if wanted > have + 1e-9:
            return (f"the loop's actors ask for {wanted:g} {kind} in all (loop.learner_{kind.lower()}s + "
                    f"loop.num_rollout_actors x loop.rollout_{kind.lower()}s + loop.eval_{kind.lower()}s when the "
                    f"evaluator runs) but there are {have:g}")
    for name, demand in actors:
        if not any(all(r.get(k, 0.0) + 1e-9 >= v for k, v in demand.items() if v > 0) for r in alive):
            biggest = max(alive, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
            return (f"the {name} actor asks for {_capacity(demand)} but no node has that much (the largest: "
                    f"{_capacity(biggest)})")
    return None


class _LogLines:
    """The progress bar's interface for a log: ``afil-ray run 30/300 s, env_steps/s=..., ...`` lines."""

    def __init__(self, total: int, every_s: float) -> None:
        self.total, self.n, self.every_s = total, 0, every_s
        self.postfix: dict[str, str] = {}
        self._last = time.monotonic()
        self._printed: str | None = None

    def __enter__(self) -> _LogLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self._print()

    def set_postfix(self, postfix: dict[str, str], refresh: bool = False) -> None:
        self.postfix = postfix

    def update(self, n: int) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.every_s:
            self._print()

    def _print(self) -> None:
        self._last = time.monotonic()
        figures = "".join(f", {k}={v}" for k, v in self.postfix.items())
        line = f"afil-ray run {self.n}/{self.total} s{figures}"
        if line != self._printed:  # the closing line only when something changed since the last
            print(line, file=sys.stderr, flush=True)
            self._printed = line


def quiet_local_ray() -> None:
    """A Ray this process starts for itself: its token-authentication notice (auth stays on) is not news to the
    user (the actors quiet the simulators' per-process notices themselves)."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def run_loop(cfg: Config) -> dict[str, Any]:
    """The harvest-learn loop for ``cfg`` until its budget or a stop signal; returns the summary."""
    return LoopDriver(cfg).run()


def eval_runner(cfg: Config, policy: torch.nn.Module, arms: list[Arm], units: list[Unit],
                workers: int, keep_snapshots: bool) -> Iterator[tuple[Unit, list[Episode]]]:
    """A ``UnitRunner`` for evaluation (``afil_ray.eval.workers``): Ray eval actors when ``eval.backend`` is
    ``ray``, or ``auto`` with a Ray cluster attached (``RAY_ADDRESS`` set or Ray initialised); processes else.
    Each actor serves units of any task of ``cfg.env.task`` (one env at a time), so all tasks' units keep every
    actor busy."""
    backend = cfg.eval.backend
    if backend == "auto":
        backend = "ray" if ray.is_initialized() or os.environ.get("RAY_ADDRESS") else "processes"
    if backend == "processes":
        yield from process_units(cfg, policy, arms, units, workers, keep_snapshots)
        return
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            quiet_local_ray()
        # "local": a Ray of our own, not whatever cluster happens to run on this machine
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=True)
    threads = max(1, int(cfg.eval.worker_cpus))
    policy_ref = ray.put(policy)
    actors = [EvalUnitActor.options(num_cpus=cfg.eval.worker_cpus, num_gpus=cfg.eval.worker_gpus)
              .remote(cfg, policy_ref, threads) for _ in range(workers)]
    pending = list(units)
    in_flight: dict[ray.ObjectRef, tuple[Unit, int]] = {}
    last_task: dict[int, str] = {}  # actor index -> the task whose env it holds

    def submit(k: int) -> None:
        """Actor ``k``'s next unit: a pending one of the task it holds the env of, else the next in (task-major)
        order, so that an actor rebuilds its env (ten processes for a LIBERO task) only when it must."""
        if pending:
            mine = next((i for i, u in enumerate(pending) if u[0] == last_task.get(k)), 0)
            unit = pending.pop(mine)
            task, arm, run = unit
            last_task[k] = task
            in_flight[actors[k].run.remote(task, arms[arm], run, keep_snapshots)] = (unit, k)

    held: dict[Unit, list[Episode]] = {}  # finished before an earlier unit
    order = iter(units)
    next_unit = next(order, None)
    try:
        for k in range(len(actors)):
            submit(k)
        while in_flight:
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            unit, k = in_flight.pop(done)
            submit(k)
            held[unit] = ray.get(done)
            while next_unit is not None and next_unit in held:
                yield next_unit, held.pop(next_unit)
                next_unit = next(order, None)
    finally:
        for actor in actors:
            ray.kill(actor)
