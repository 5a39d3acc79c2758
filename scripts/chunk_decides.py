"""Does the next chunk decide the outcome? K chunks x M continuations from open states of a run's harvest.

Issue 22's critics rank states (AUROC V 0.79-0.93) but not the chunks of one state (within-state AUROC 0.39-0.55).
This run tells apart the two readings of that (afil_ray/branches/decides.py): from open states of the harvest
(the critic's V between ``branches.open_low`` and ``open_high``), on initial states the critic held out, K first
chunks of the success head the critic's arms sample from, each continued M times with fresh noise. Resumable: each
state's record is appended to ``--out`` as it completes.

    .venv/bin/python scripts/chunk_decides.py runs/fs_LiftPegUpright --states 40 --chunks 4 --continuations 8
    .venv/bin/python scripts/chunk_decides.py runs/fs_LiftPegUpright --states 6 --repeat-check 8  # no drift?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from afil_ray.branches.decides import analyse, chunk_noise_seed, critic_chunk_scorer, read_records, rescore, run_decides
from afil_ray.branches.rollout import BranchJob, BranchRunner
from afil_ray.branches.states import BranchPoint, Scorer, critic_scorer, id_entropy, open_points
from afil_ray.config import BRANCH_PARENTS, Config, ConfigError, load_config
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.tasks import get_task
from afil_ray.pipeline.stages import with_updates
from afil_ray.policy.checkpoint import CheckpointError
from afil_ray.policy.loading import load_start_policy, resolve_checkpoint
from afil_ray.replay.chunks import origin_of
from afil_ray.replay.episode import table_to_episodes
from afil_ray.replay.outcomes import held_out
from afil_ray.replay.store import ReplayStore


def open_states(cfg: Config, store: ReplayStore, scorer: Scorer, count: int, seed: int, unseen_only: bool,
                at_step: int | None = None) -> list[BranchPoint]:
    """Up to ``count`` open states, one per harvested parent, parents in an order drawn from ``seed``; with
    ``at_step``, each parent's state at that step (when open), and one parent per initial state for step 0 (the
    runs of one seed start from the same state)."""
    bc, task = cfg.branches, cfg.env.tasks[0]
    if at_step is not None:
        bc = dataclasses.replace(bc, states_per_episode=None)
    limit = cfg.env.max_episode_steps or get_task(task).max_episode_steps
    parents = []
    for shard in store.list_shards(task=task, outcome=list(bc.from_outcomes)):
        table = store.read_checked(shard.path)
        for parent in table_to_episodes(table) if table is not None else ():
            origin = origin_of(parent.task, parent.seed, parent.parent_episode_id, parent.episode_id)
            if parent.snapshot_steps and (not unseen_only or held_out(origin, cfg.data.critic_holdout)):
                parents.append(parent)
    parents.sort(key=lambda p: id_entropy(f"{seed}:{p.episode_id}"))
    points: list[BranchPoint] = []
    initial_states: set[str] = set()
    for parent in parents:
        if len(points) >= count:
            break
        if at_step is None:
            points += open_points(parent, bc, scorer, limit=limit)[:1]
            continue
        origin = origin_of(parent.task, parent.seed, parent.parent_episode_id, parent.episode_id)
        if at_step == 0 and origin in initial_states:
            continue
        chosen = [p for p in open_points(parent, bc, scorer, limit=limit) if p.step == at_step]
        if chosen:
            points.append(chosen[0])
            initial_states.add(origin)
    return points


def stored_points(store: ReplayStore, task: str, groups: set[str]) -> list[BranchPoint]:
    """The states ``groups`` (parent id @ step) name, restorable, from the store's episodes."""
    wanted: dict[str, list[int]] = {}
    for group in groups:
        parent_id, step = group.rsplit("@", 1)
        wanted.setdefault(parent_id, []).append(int(step))
    points = []
    for shard in store.list_shards(task=task, outcome=list(BRANCH_PARENTS)):
        table = store.read_checked(shard.path)
        for parent in table_to_episodes(table) if table is not None else ():
            snaps = dict(zip(parent.snapshot_steps, parent.snapshots, strict=True))
            points += [BranchPoint(parent, s, snaps[s]) for s in wanted.get(parent.episode_id, []) if s in snaps]
    missing = groups - {p.group for p in points}
    if missing:
        raise SystemExit(f"{store.root}: no stored snapshot for the states {sorted(missing)[:3]} (of {len(missing)})")
    return points


def rescore_run(cfg: Config, out: Path, critic: Path, seed: int) -> None:
    """Score an earlier run's records with another critic (on the same first chunks), without new rollouts."""
    records = read_records(out)
    summary_file = out.with_suffix(".summary.json")
    if not records or not summary_file.is_file():
        raise SystemExit(f"{out}: no finished chunk-decides run to rescore (records and {summary_file.name})")
    try:
        sampled_by = load_start_policy(json.loads(summary_file.read_text())["checkpoint"]).eval()
        scorer_policy = load_start_policy(resolve_checkpoint(critic)).eval()
    except CheckpointError as error:
        raise SystemExit(str(error)) from None
    if scorer_policy.critic is None:
        raise SystemExit(f"{critic}: no success critic (train.mode=critic makes one)")
    points = stored_points(ReplayStore.from_config(cfg.replay), cfg.env.tasks[0], {r.group for r in records})
    rescored = rescore(records, points, sampled_by, critic_chunk_scorer(scorer_policy), cfg.sampler, seed)
    print(f"{out}, Q and V by {critic}:")
    for line in analyse(rescored, seed=seed).lines():
        print(line)


def repeat_check(runner: BranchRunner, points: list[BranchPoint], copies: int, seed: int) -> None:
    """Run each state's first chunk with the same later noise ``copies`` times on the reused env: if the restore
    left the simulator's history behind, the copies would drift apart, and the continuations' spread would be
    partly the simulator's rather than their noise's."""
    jobs = [BranchJob(p, 0, first_noise_seed=chunk_noise_seed(p.parent.episode_id, p.step, 0, seed))
            for p in points for _ in range(copies)]
    runs: dict[str, list] = {}
    for branch in tqdm(runner.run(jobs), total=len(jobs), desc="same branch again", unit="branch"):
        runs.setdefault(str(branch.branch_group), []).append(branch)
    drifted = 0
    for group, branches in runs.items():
        first = branches[0]
        same = [b.state.shape == first.state.shape and bool(np.array_equal(b.state, first.state))
                and b.success == first.success for b in branches[1:]]
        drifted += not all(same)
        print(f"{group}: {sum(same) + 1}/{len(branches)} copies identical to the first, length {len(first.state)}, "
              f"{'success' if first.success else 'failure'}")
    print(f"{len(runs)} states x {copies} copies: {drifted} states whose copies differ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a reproduce run (config.yaml, replay/, the critic stage)")
    parser.add_argument("--checkpoint", type=Path, help="a critic checkpoint (default: <run_dir>/critic)")
    parser.add_argument("--states", type=int, default=40)
    parser.add_argument("--chunks", type=int, default=4, help="K: first chunks per state")
    parser.add_argument("--continuations", type=int, default=8, help="M: continuations per chunk")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-states", action="store_true", help="also initial states the critic trained on")
    parser.add_argument("--at-step", type=int, help="only states at this step (0: the initial states)")
    parser.add_argument("--out", type=Path, help="records (default: <run_dir>/decides/K<k>xM<m>.jsonl)")
    parser.add_argument("--repeat-check", type=int, metavar="N", help="instead: run each state's first branch N "
                        "times with the same noise on the reused env and report whether the copies are identical")
    parser.add_argument("--rescore", type=Path, help="score the records in --out with this critic checkpoint instead "
                        "(no new rollouts)")
    args = parser.parse_args()
    if args.repeat_check is not None and args.repeat_check < 2:
        raise SystemExit(f"--repeat-check {args.repeat_check}: needs at least 2 copies to compare")
    try:
        cfg = load_config(args.run_dir / "config.yaml", [f"env.num_envs={args.num_envs}"])
        cfg = with_updates(cfg, sampler={"kind": "success_only"})
        checkpoint = resolve_checkpoint(args.checkpoint or args.run_dir / "critic")
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from None
    policy = load_start_policy(checkpoint).eval()
    if policy.critic is None:
        raise SystemExit(f"{checkpoint}: no success critic (train.mode=critic makes one)")
    at = "" if args.at_step is None else f"-step{args.at_step}"
    out = args.out or args.run_dir / "decides" / f"K{args.chunks}xM{args.continuations}{at}.jsonl"
    if args.rescore is not None:
        rescore_run(cfg, out, args.rescore, args.seed)
        return
    store = ReplayStore.from_config(cfg.replay)
    points = open_states(cfg, store, critic_scorer(policy.v), args.states, args.seed, not args.all_states,
                         args.at_step)
    print(f"{cfg.env.tasks[0]}: {len(points)} open states (V in [{cfg.branches.open_low}, {cfg.branches.open_high}]"
          f"{'' if args.all_states else ', initial states the critic held out'}); {checkpoint}")
    if not points:
        raise SystemExit("no open states: widen branches.open_low/open_high in the run's config, or --all-states")
    env = make_vec_env(cfg.env)
    if args.repeat_check:
        try:
            repeat_check(BranchRunner(env, policy, cfg.sampler, seed=args.seed), points, args.repeat_check, args.seed)
        finally:
            env.close()
        return
    size = args.chunks * args.continuations
    done = {r.group for r in read_records(out)}
    bar = tqdm(total=len(points) * size, initial=sum(p.group in done for p in points) * size,
               desc="chunk x continuation", unit="branch", dynamic_ncols=True)
    try:
        runner = BranchRunner(env, policy, cfg.sampler, seed=args.seed, extra={"checkpoint": str(checkpoint)})
        records = run_decides(runner, points, args.chunks, args.continuations, out, critic_chunk_scorer(policy),
                              seed=args.seed, on_branch=lambda _: bar.update(1))
    finally:
        bar.close()
        env.close()
    result = analyse(records, seed=args.seed)
    for line in result.lines():
        print(line)
    summary = {**asdict(result), "checkpoint": str(checkpoint), "open_states_v": [r.v for r in records],
               "parent_failures": int(np.sum([r.parent_outcome == "failure" for r in records]))}
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
