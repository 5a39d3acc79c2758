"""``afil-ray correct``: turn failed rollouts into successes by letting the task's demonstrator finish them.

For a failure with simulator snapshots, the scene is restored at a snapshot and the task's demonstrator (ManiSkill's
motion planner, LIBERO's scripted controller: afil_ray/demos/planner.py ``make_demonstrator``) plans from there; its
targets are replayed closed-loop in the policy's control mode (as demos are, see afil_ray/demos/planner.py). The
stored trajectory is the failure's own prefix up to the restore point followed by the planner's suffix, outcome
``corrected``, linked to the failure by ``parent_episode_id``.

Which snapshot: the search starts at the last snapshot (``backtrack``) or at ``fraction`` of the episode; if the
plan from there does not reach success within the task's episode limit it tries the earliest snapshot, then
bisects between the two for the latest restore point that works, so the correction keeps as much of the failed
behaviour as the planner allows.
(From late in a failure the planners often cannot finish: a cube pushed against the gripper, a peg half
turned.) A plan that succeeds but does not fit in the steps left also tells how far back to go: restore points
leaving fewer steps are skipped. Failures that no attempt corrects are counted by reason and recorded, so a
re-run skips them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.dataset as ds
from tqdm import tqdm

from afil_ray.config import Config, CorrectConfig, DemoConfig, EnvConfig
from afil_ray.demos.planner import HOLD_STEPS, make_demonstrator, single_cpu_env
from afil_ray.envs.checks import check_runnable
from afil_ray.envs.factory import make_vec_env
from afil_ray.process_pool import spawn_map
from afil_ray.replay.episode import Episode, table_to_episodes
from afil_ray.replay.ledger import AttemptLedger
from afil_ray.replay.store import ReplayStore
from afil_ray.run_id import new_run_id

log = logging.getLogger(__name__)
SOURCE = "correction"
HANDOVER_SOURCE = "handover"  # an episode the demonstrator took over when an alarm fired
_LEDGER_KIND = "corrections"  # failures the planner could not finish, under <store>/_meta/


@dataclass
class CorrectionResult:
    parent_id: str
    episode: Episode | None
    reason: str  # "ok" or why the failure was dropped
    restore_step: int | None = None
    attempts: int = 0
    seconds: float = 0.0


def restore_candidates(failure: Episode, cfg: CorrectConfig) -> list[tuple[int, bytes]]:
    """Snapshots to try, latest first, from the strategy's starting point back to the episode start."""
    pairs = sorted(zip(failure.snapshot_steps, failure.snapshots, strict=True), key=lambda p: -p[0])
    if cfg.strategy == "fraction":
        if not 0.0 <= cfg.fraction <= 1.0:
            raise ValueError(f"correct.fraction must be in [0, 1], got {cfg.fraction}")
        start = cfg.fraction * failure.length
        pairs = [p for p in pairs if p[0] <= start] or pairs[-1:]
    return pairs[::cfg.stride]


class Corrector:
    """A demonstrator and a replay scene for one task; ``correct(failure)`` returns a corrected episode or a
    reason."""

    def __init__(self, env_cfg: EnvConfig, correct_cfg: CorrectConfig, demo_cfg: DemoConfig) -> None:
        self.cfg = correct_cfg
        self.planner = make_demonstrator(env_cfg, demo_cfg, what="planner suffixes")
        self.limit = env_cfg.max_episode_steps or self.planner.spec.max_episode_steps
        try:
            self.env = make_vec_env(single_cpu_env(env_cfg, self.limit))
        except BaseException:
            self.planner.close()
            raise
        self.control_mode = env_cfg.control_mode

    def correct(self, failure: Episode) -> CorrectionResult:
        t0 = time.time()
        if failure.task != self.planner.spec.env_id:
            raise ValueError(f"episode {failure.episode_id} is a {failure.task} episode; this corrector is for "
                             f"{self.planner.spec.env_id}")
        if not failure.snapshots:
            return CorrectionResult(failure.episode_id, None, "no_snapshots", seconds=time.time() - t0)
        candidates = restore_candidates(failure, self.cfg)
        reasons: Counter = Counter()
        plans: dict[int, list[np.ndarray]] = {}  # candidate index -> a plan that succeeds and fits
        shortest_fit = 0  # steps a successful plan needed: restore points leaving fewer are not tried

        def works(i: int) -> bool:
            nonlocal shortest_fit
            step, blob = candidates[i]
            plan = self.planner.plan(int(failure.seed or 0), start_state=blob)
            if plan.reason != "ok":
                reasons[plan.reason.split(":")[0]] += 1
                return False
            if step + plan.first_success > self.limit:
                reasons["over_limit"] += 1
                shortest_fit = max(shortest_fit, plan.first_success)
                return False
            plans[i] = plan.targets
            return True

        # The latest snapshot first (a failure the planner can finish from its end keeps all of it), then the
        # earliest (if even that fails, the planner cannot solve this scene), then bisection between them for
        # the latest restore point that works: the later it is, the more of the failed behaviour the correction
        # keeps. (Bisection assumes earlier states are easier; where they are not it still returns a working
        # point whose next later snapshot failed.)
        attempts, last_bad, good = 0, -1, None
        for i in dict.fromkeys((0, len(candidates) - 1)):
            if attempts >= self.cfg.max_attempts or self.limit - candidates[i][0] < shortest_fit:
                continue
            attempts += 1
            if works(i):
                good = i
                break
            last_bad = i
        while good is not None and good - last_bad > 1 and attempts < self.cfg.max_attempts:
            mid = (good + last_bad) // 2
            if self.limit - candidates[mid][0] < shortest_fit:
                last_bad = mid
                continue
            attempts += 1
            if works(mid):
                good = mid
            else:
                last_bad = mid
        if good is not None:
            step, blob = candidates[good]
            episode = self._splice(failure, step, blob, plans[good])
            if episode is not None:
                episode.extra.update(restore_step=step, attempts=attempts, planner_steps=len(plans[good]))
                return CorrectionResult(failure.episode_id, episode, "ok", step, attempts, time.time() - t0)
            reasons["replay_failed"] += 1
        reason = reasons.most_common(1)[0][0] if reasons else "no_restore_point_fits"
        return CorrectionResult(failure.episode_id, None, reason, None, attempts, time.time() - t0)

    def handover(self, episode: Episode, step: int) -> tuple[bool, int | None, str]:
        """What handing ``episode`` to the demonstrator at ``step`` (an alarm's) would have given: (succeeded
        within the episode limit, the step it took over, reason); ``take_over`` says how."""
        taken, at, reason = self.take_over(episode, step)
        return taken is not None, at, reason

    def take_over(self, episode: Episode, step: int) -> tuple[Episode | None, int | None, str]:
        """Hand ``episode`` to the demonstrator at ``step``: it takes over at the last snapshot at or before
        ``step``, plans, and its plan is replayed in the policy's control mode (as a correction is). Returns the
        episode as it went with the hand-over (source ``handover``, linked to ``episode``; None unless it
        succeeded within the episode limit), the step it took over and the reason.

        In a simulator whose snapshots restore exactly this is the same computation as a hand-over during the
        episode: the demonstrator never sees what the policy did after the snapshot."""
        pairs = [(s, b) for s, b in zip(episode.snapshot_steps, episode.snapshots, strict=True) if s <= step]
        if not pairs:
            return None, None, "no_snapshot"
        at, blob = max(pairs, key=lambda p: p[0])
        plan = self.planner.plan(int(episode.seed or 0), start_state=blob)
        if plan.reason != "ok":
            return None, at, plan.reason.split(":")[0]
        if at + plan.first_success > self.limit:
            return None, at, "over_limit"
        taken = self._splice(episode, at, blob, plan.targets)
        if taken is None:
            return None, at, "replay_failed"
        taken.source = HANDOVER_SOURCE
        taken.extra.update(handover_step=at, alarm_step=int(step), parent_outcome=episode.outcome)
        return taken, at, "ok"

    def _splice(self, failure: Episode, step: int, blob: bytes, targets: list[np.ndarray]) -> Episode | None:
        """The failure's first ``step`` steps, then the plan replayed from the restored snapshot."""
        obs = {k: v[None] for k, v in self.env.restore(0, blob, step).items()}  # batched like step's obs
        every = self.env.snapshot_every
        suffix: dict[str, list] = {k: [] for k in ("state", "action", "reward", "success", "fail", "terminated",
                                                   "truncated")}
        images: dict[str, list[np.ndarray]] = {cam: [] for cam in self.env.cameras}
        snap_steps = [s for s in failure.snapshot_steps if s <= step]
        snaps = [b for s, b in zip(failure.snapshot_steps, failure.snapshots, strict=True) if s <= step]
        done = False
        for target in targets + [targets[-1]] * HOLD_STEPS:
            action = self.planner.action(self.env, target)
            res = self.env.step(action[None])
            suffix["state"].append(obs["state"][0].copy())
            for cam in images:
                images[cam].append(obs[f"rgb_{cam}"][0].copy())
            suffix["action"].append(action)
            for key in ("reward", "success", "fail", "terminated", "truncated"):
                suffix[key].append(getattr(res, key)[0])
            obs = res.obs
            if res.done[0]:
                done = True
                break
            if every and res.snapshots[0] is not None:
                snap_steps.append(int(res.elapsed_steps[0]))
                snaps.append(res.snapshots[0])
        if not any(suffix["success"]):
            return None
        if not done:  # the plan ended before the env terminated (only with env.ignore_terminations)
            suffix["truncated"][-1] = True
        n = len(failure.chunk_steps) - sum(s >= step for s in failure.chunk_steps)

        def head(arr: np.ndarray | None) -> np.ndarray | None:
            return None if arr is None or n == 0 else arr[:n]  # restored at step 0: no sampled chunk kept

        return Episode(
            task=failure.task, outcome="corrected", instruction=failure.instruction, seed=failure.seed,
            source=SOURCE, policy_version=failure.policy_version, sampler=failure.sampler,
            sampler_params=dict(failure.sampler_params), control_mode=self.control_mode, obs_mode=failure.obs_mode,
            state=np.concatenate([failure.state[:step], np.stack(suffix["state"])]),
            action=np.concatenate([failure.action[:step], np.stack(suffix["action"])]).astype(np.float32),
            reward=np.concatenate([failure.reward[:step], np.asarray(suffix["reward"], np.float32)]),
            step_success=np.concatenate([failure.step_success[:step], np.asarray(suffix["success"], bool)]),
            terminated=np.concatenate([failure.terminated[:step], np.asarray(suffix["terminated"], bool)]),
            truncated=np.concatenate([failure.truncated[:step], np.asarray(suffix["truncated"], bool)]),
            final_state=np.asarray(obs["state"][0], np.float32).copy(),
            images={cam: np.concatenate([failure.images[cam][:step], np.stack(v)]) for cam, v in images.items()},
            snapshot_steps=snap_steps, snapshots=snaps, chunk_steps=list(failure.chunk_steps[:n]),
            chunks=head(failure.chunks), chunk_w=head(failure.chunk_w), chunk_cos=head(failure.chunk_cos),
            parent_episode_id=failure.episode_id,
            # a task's fail condition ends the episode, so the failure's prefix never contains one
            extra={"fail_once": bool(any(suffix["fail"])), "success_at_end": bool(suffix["success"][-1])},
        )

    def close(self) -> None:
        self.planner.close()
        self.env.close()


@dataclass
class CorrectionReport:
    task: str
    tried: int = 0
    corrected: int = 0
    skipped_before: int = 0  # failures corrected or dropped by an earlier run
    dropped: Counter = field(default_factory=Counter)
    restore_fraction: list[float] = field(default_factory=list)  # restore step / failure length, per correction
    attempts: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.task}: corrected {self.corrected} of {self.tried} failures tried in {self.seconds:.0f} s "
                 f"({self.skipped_before} handled by earlier runs)"]
        if self.corrected:
            fr, at = np.asarray(self.restore_fraction), np.asarray(self.attempts)
            lines.append(f"  restore point: median {np.median(fr):.2f} of the failure's length "
                         f"(min {fr.min():.2f}, max {fr.max():.2f}); planner runs per correction: mean {at.mean():.1f}")
        for reason, k in self.dropped.most_common():
            lines.append(f"  dropped {k}: {reason}")
        return "\n".join(lines)


def handled_failures(store: ReplayStore, task: str) -> set[str]:
    """Failures already corrected (a ``corrected`` child in the store) or recorded as dropped."""
    done = set(AttemptLedger(store, _LEDGER_KIND, task, key="parent").known())
    if store.list_shards(task=task, outcome="corrected"):
        flt = (ds.field("task") == task) & (ds.field("outcome") == "corrected")
        done |= set(store.dataset().to_table(columns=["parent_episode_id"], filter=flt)
                    ["parent_episode_id"].to_pylist())
    return done


def pending_failures(store: ReplayStore, task: str, handled: set[str],
                     limit: int | None = None) -> tuple[int, dict[str, int], Iterator[Episode]]:
    """Failures of ``task`` not in ``handled``: (how many were skipped, {id: length} of those to do, the episodes).

    The ids come from a narrow column read; the episodes (snapshots and all, the bulk of the store) are read
    one shard at a time as the iterator is consumed, so memory follows the work in flight, not the store."""
    shards = store.list_shards(task=task, outcome="failure")
    todo: dict[str, int] = {}
    skipped, wanted = 0, []  # wanted: the shards holding failures to do
    for shard in shards:
        table = store.read_checked(shard.path, ["episode_id", "length"], verify=False)
        if table is None:  # gone, or damaged and now quarantined
            continue
        for eid, length in zip(table["episode_id"].to_pylist(), table["length"].to_pylist(), strict=True):
            if eid in handled:
                skipped += 1
            elif limit is None or len(todo) < limit:
                todo[eid] = length
                if not wanted or wanted[-1] is not shard:
                    wanted.append(shard)

    def episodes() -> Iterator[Episode]:
        for shard in wanted:
            table = store.read_checked(shard.path)
            for ep in table_to_episodes(table) if table is not None else ():
                if ep.episode_id in todo:
                    yield ep

    return skipped, todo, episodes()


def correct_failures(cfg: Config, store: ReplayStore | None = None, progress: bool = True) -> CorrectionReport:
    """Correct every failure of ``cfg.env.task`` in the store not handled before (up to correct.max_failures)."""
    check_runnable("env.task", cfg.env.task, planner=True)  # here, not as a worker that dies
    store = store or ReplayStore.from_config(cfg.replay)
    task = cfg.env.task
    report = CorrectionReport(task=task)
    report.skipped_before, lengths, todo = pending_failures(store, task, handled_failures(store, task),
                                                            cfg.correct.max_failures)
    ledger = AttemptLedger(store, _LEDGER_KIND, task, key="parent")
    t0 = time.time()
    bar = tqdm(total=len(lengths), desc=f"correct {task}", unit="failure", disable=not progress, dynamic_ncols=True)
    writer = store.writer(run_id=cfg.run_id or new_run_id("correct"))
    try:
        for result in _results(cfg, todo, len(lengths)):
            report.tried += 1
            if result.episode is not None:
                writer.add(result.episode)
                report.corrected += 1
                report.restore_fraction.append(result.restore_step / lengths[result.parent_id])
                report.attempts.append(result.attempts)
            else:
                report.dropped[result.reason] += 1
                ledger.add({"parent": result.parent_id, "reason": result.reason, "attempts": result.attempts})
            if report.tried % 16 == 0:
                writer.flush()
                ledger.save()
            bar.update(1)
            bar.set_postfix(corrected=report.corrected)
    finally:
        ledger.save()  # first: a failing store write must not lose the record of what was dropped
        writer.close()
        bar.close()
        report.seconds = time.time() - t0
    return report


_worker: Corrector | None = None


def _worker_init(cfg: Config) -> None:
    global _worker
    _worker = Corrector(cfg.env, cfg.correct, cfg.demos)


def _worker_correct(failure: Episode) -> CorrectionResult:
    assert _worker is not None
    return _worker.correct(failure)


def _results(cfg: Config, todo: Iterator[Episode], count: int) -> Iterator[CorrectionResult]:
    if not count:
        return
    workers = max(1, min(cfg.correct.workers, count))
    if workers == 1:
        corrector = Corrector(cfg.env, cfg.correct, cfg.demos)
        try:
            yield from (corrector.correct(ep) for ep in todo)
        finally:
            corrector.close()
        return
    def crash(failure: Episode) -> str:
        return (f"a correction worker for {cfg.env.task} died while correcting failure {failure.episode_id} or "
                f"another in flight (a simulator or planner crash). Corrections written so far are kept; re-run "
                f"the same command to resume.")

    for _, result in spawn_map(_worker_correct, todo, workers=workers, initializer=_worker_init, initargs=(cfg,),
                               crash_message=crash, max_in_flight=2 * workers):
        yield result
