"""``afil-ray``: the command-line entrypoint.

Every command takes ``--config FILE`` plus dotlist overrides (``env.task=StackCube-v1``); a few frequent keys
also have flags (``--task``, ``--num``). Unknown keys are errors that name the key and the file.

The CLI composes: commands that may reach Ray take it from the composition root (``afil_ray.driver``) and hand it
to the Ray-free library as callables (the loop, the evaluation runner).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from afil_ray.config import Config, ConfigError, check_writable, load_config, save_resolved
from afil_ray.envs.checks import check_tasks, expand_suites_at, with_suites_expanded
from afil_ray.run_id import new_run_id


def _config(args: argparse.Namespace, extra: list[str]) -> Config:
    """The command's config, a whole benchmark suite in ``env.task`` expanded to its tasks (every command sees the
    task list); one run id per invocation (every task of ``demos --task a,b`` shares it)."""
    cfg = with_suites_expanded(load_config(args.config, list(args.overrides) + extra))
    if cfg.run_id is None:
        if getattr(args, "run_id", None) is None:
            args.run_id = new_run_id(args.command)
        cfg = dataclasses.replace(cfg, run_id=args.run_id)
    return cfg


def _checked_tasks(args: argparse.Namespace, cfg: Config, *, planner: bool = False) -> list[str]:
    """The tasks a per-task command runs: ``--task a,b`` (suite names expanded) or else ``env.task``, each checked
    (a one-line error naming the key that held it; with ``planner``, a demonstrator too)."""
    key = "--task" if args.task else "env.task"
    tasks = expand_suites_at(key, args.task.split(",")) if args.task else cfg.env.tasks
    check_tasks([(key, t) for t in tasks], planner=planner)
    return tasks


def _eval_runner(cfg: Config):
    """The composition root's evaluation runner when units are spread over workers (it imports Ray)."""
    if cfg.eval.workers <= 1:
        return None
    from afil_ray.driver import eval_runner

    return eval_runner


def cmd_demos(args: argparse.Namespace) -> int:
    from afil_ray.demos.generate import generate_demos
    from afil_ray.envs.checks import check_cameras
    from afil_ray.provenance import machine_facts
    from afil_ray.replay import ReplayStore, format_stats

    extra = [f"demos.num={args.num}"] if args.num is not None else []
    extra += [f"demos.workers={args.workers}"] if args.workers is not None else []
    base = _config(args, extra)
    # every task and the store's root before any worker starts or anything is written to the store
    tasks = _checked_tasks(args, base, planner=True)
    check_cameras(dataclasses.replace(base.env, task=tasks))
    check_writable("replay.root", base.replay.root)
    store = ReplayStore.from_config(base.replay)
    for task in tasks:
        cfg = _config(args, [*extra, f"env.task={task}"])
        run_dir = f"{cfg.replay.root}/_meta/runs/{cfg.run_id}-{task}"
        save_resolved(cfg, run_dir)
        report = generate_demos(cfg, store, progress=not args.quiet)
        print(report.summary())
        with open(f"{run_dir}/report.json", "w") as f:
            json.dump({**asdict(report), "failures": dict(report.failures), "machine": machine_facts()}, f, indent=1)
    print()
    print(format_stats(store))
    return 0


def cmd_correct(args: argparse.Namespace) -> int:
    from afil_ray.correction import correct_failures
    from afil_ray.replay import ReplayStore, format_stats

    extra = [f"correct.max_failures={args.max}"] if args.max is not None else []
    extra += [f"correct.workers={args.workers}"] if args.workers is not None else []
    base = _config(args, extra)
    tasks = _checked_tasks(args, base, planner=True)
    check_writable("replay.root", base.replay.root)
    store = ReplayStore.from_config(base.replay)
    for task in tasks:
        cfg = _config(args, [*extra, f"env.task={task}"])
        report = correct_failures(cfg, store, progress=not args.quiet)
        print(report.summary())
    print()
    print(format_stats(store))
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    from afil_ray.branches import branch_task, critic_scorer
    from afil_ray.envs.checks import check_policy_fits
    from afil_ray.policy.checkpoint import CheckpointError, load_policy
    from afil_ray.policy.loading import latest_checkpoint, resolve_checkpoint
    from afil_ray.replay import ReplayStore

    extra = [f"branches.max_states={args.max}"] if args.max is not None else []
    base = _config(args, extra)
    tasks = _checked_tasks(args, base)
    check_writable("replay.root", base.replay.root)
    ckpt = base.branches.checkpoint
    path = resolve_checkpoint(ckpt) if ckpt else latest_checkpoint(base.run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {base.run_dir}/checkpoints; train first or set branches.checkpoint")
    policy = load_policy(path)
    check_policy_fits(policy, dataclasses.replace(base.env, task=tasks), f"checkpoint {path}")
    store = ReplayStore.from_config(base.replay)
    # a policy trained with a success critic picks open states by its V (branches.open_low..open_high)
    scorer = critic_scorer(policy.v) if getattr(policy, "critic", None) is not None else None
    for task in tasks:
        cfg = _config(args, [*extra, f"env.task={task}"])
        report = branch_task(cfg, policy, store, scorer=scorer, progress=not args.quiet,
                             extra={"checkpoint": str(path)})
        print(report.summary())
    return 0


def cmd_replay_stats(args: argparse.Namespace) -> int:
    from afil_ray.replay import ReplayStore, format_stats

    if "://" not in args.root and not Path(args.root).is_dir():
        print(f"afil-ray: no replay store at {args.root} (no such directory)", file=sys.stderr)
        return 1
    store = ReplayStore(args.root)
    corrupt = []
    if args.verify:
        shards = len(store.list_shards())
        corrupt = store.verify()
        for bad in corrupt:
            print(f"quarantined corrupt shard {bad.path}: {bad.reason}", file=sys.stderr)
        print(f"verified {shards} shards: " + (f"{len(corrupt)} corrupt (quarantined), {shards - len(corrupt)} "
                                               f"readable" if corrupt else "every one reads back intact"))
    print(format_stats(store))
    return 1 if corrupt else 0  # like fsck: a script can tell a damaged store from a clean one


def cmd_train(args: argparse.Namespace) -> int:
    from afil_ray.envs.checks import trained_tasks

    cfg = _config(args, [])  # bad input fails before torch is imported
    check_tasks(trained_tasks(cfg), simulate=False)  # training reads the store; it simulates nothing
    check_writable("run_dir", cfg.run_dir)
    from afil_ray.train import Trainer

    trainer = Trainer(cfg, progress=not args.quiet)
    final = trainer.run()
    print(f"trained {cfg.train.mode} to step {trainer.step}; checkpoint {final}; TensorBoard logs {cfg.run_dir}/tb")
    if cfg.train.mode == "critic":  # how well it ranks chunks on states it never saw, one line per task
        report = trainer.evaluate_critic(final)
        for line in report.lines():
            print(line)
        print(f"critic evaluation (held-out fraction {report.holdout}): {final}/critic_eval.json")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:

    from afil_ray.envs.checks import check_cameras, check_one_action_space, check_policy_fits, env_tasks
    from afil_ray.eval.protocol import evaluate_arms, resolve_arms, write_evaluation
    from afil_ray.policy.checkpoint import CheckpointError, load_policy
    from afil_ray.policy.loading import latest_checkpoint

    extra = [f"eval.episodes={args.episodes}"] if args.episodes is not None else []
    extra += [f"eval.runs={args.runs}"] if args.runs is not None else []
    cfg = _config(args, extra)
    check_tasks(env_tasks(cfg.env))
    check_one_action_space(cfg.env)
    check_cameras(cfg.env)
    check_writable("run_dir", cfg.run_dir)
    arms = resolve_arms(cfg)  # bad arm specs fail before anything is loaded
    path = Path(cfg.eval.checkpoint) if cfg.eval.checkpoint else latest_checkpoint(cfg.run_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint in {cfg.run_dir}/checkpoints; train first or set eval.checkpoint")
    policy = load_policy(path)
    check_policy_fits(policy, cfg.env, f"checkpoint {path}")
    results = evaluate_arms(cfg, policy, progress=not args.quiet, arms=arms, runner=_eval_runner(cfg))
    s0, n, runs = cfg.eval.seed_start, cfg.eval.episodes, cfg.eval.runs
    for result in results:
        print(f"{result.summary()}  (checkpoint {path}, seeds {s0}..{s0 + n - 1} x {runs} runs, "
              f"metric {cfg.eval.metric})")
    _, paths = write_evaluation(cfg, results, arms, path)
    print()
    print(paths["md"].read_text(), end="")
    print(f"report: {paths['md'].parent}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:

    from afil_ray.pipeline.pipeline import Pipeline

    cfg = _config(args, [])
    run_loop = None
    if cfg.reproduce.online_s > 0:
        from afil_ray.driver import run_loop
    outputs = Pipeline(cfg, progress=not args.quiet, runner=_eval_runner(cfg), run_loop=run_loop).run()
    if outputs["report"] is None:
        print(f"stopped after stage {outputs['stopped_after']!r} (reproduce.until): {cfg.run_dir}/stages/")
        return 0
    print()
    print(Path(outputs["report"]).read_text(), end="")
    print(f"results: {outputs['report']}")
    return 0


def cmd_alarm(args: argparse.Namespace) -> int:
    from afil_ray.detect.study import OUTPUT_DIR, alarm_study

    cfg = _config(args, [])
    alarm_study(cfg, progress=not args.quiet, handover=not args.no_handover)
    report = Path(cfg.run_dir) / OUTPUT_DIR / "alarm.md"
    print(report.read_text(), end="")
    print(f"results: {report}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from afil_ray.detect.explain import DETECT_DIR, explain_episodes, explainer_study
    from afil_ray.replay import ReplayStore

    cfg = _config(args, [])
    if args.study:
        explainer_study(cfg, progress=not args.quiet)
        report = Path(cfg.run_dir) / DETECT_DIR / "explain.md"
        print(report.read_text(), end="")
        print(f"results: {report}")
        return 0
    store = ReplayStore.from_config(cfg.replay)
    episodes = store.read_episodes(cfg.env.tasks, args.outcome.split(",") if args.outcome else None)
    if args.episode:
        wanted = set(args.episode)
        episodes = [e for e in episodes if e.episode_id in wanted]
        missing = wanted - {e.episode_id for e in episodes}
        if missing:
            raise ConfigError(f"--episode: no episode {sorted(missing)[0]} of {', '.join(cfg.env.tasks)} in "
                              f"replay.root={cfg.replay.root}")
    table = explain_episodes(cfg, episodes, progress=not args.quiet)
    for row in table.to_pylist():
        verdict = "failure" if row["detected_failure"] else "success"
        print(f"{row['episode_id']}  {verdict} (p={row['failure_probability']:.2f})  {row['explanation']}")
    print(f"{table.num_rows} answers written into {cfg.replay.root}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    extra = [f"loop.duration_s={args.duration}"] if args.duration is not None else []
    cfg = _config(args, extra)  # a bad value fails before Ray and torch are imported
    from afil_ray.driver import LoopDriver  # its checks (tasks, paths, init_from) run before Ray starts

    summary = LoopDriver(cfg).run()
    print(json.dumps(summary, indent=2))
    print(f"run directory {cfg.run_dir}: TensorBoard `tensorboard --logdir {cfg.run_dir}/tb`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afil-ray", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config file (see configs/)")
        sp.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. env.task=PullCube-v1")

    d = sub.add_parser("demos", help="generate demonstrations (motion planner; LIBERO: scripted) into the replay store")
    with_config(d)
    d.add_argument("--task", help="task id or suite, or several separated by commas (default: env.task)")
    d.add_argument("--num", type=int, help="demos wanted per task in the store (demos.num)")
    d.add_argument("--workers", type=int, help="planner processes (demos.workers)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demos)

    c = sub.add_parser("correct", help="finish failed rollouts with the task's demonstrator; store them as corrected")
    with_config(c)
    c.add_argument("--task", help="task id or suite, or several separated by commas (default: env.task)")
    c.add_argument("--max", type=int, help="failures to try per task (correct.max_failures)")
    c.add_argument("--workers", type=int, help="planner processes (correct.workers)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_correct)

    b = sub.add_parser("branch", help="matched-state branches: K rollouts with fresh noise from restored states of "
                                      "stored rollouts, into the replay store (branches.*)")
    with_config(b)
    b.add_argument("--task", help="task id or suite, or several separated by commas (default: env.task)")
    b.add_argument("--max", type=int, help="states to branch per task, resumed ones included (branches.max_states)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_branch)

    t = sub.add_parser("train", help="train the policy from the replay store (train.mode, replay.root); "
                                     "train.mode=critic ends with the critic's held-out evaluation")
    with_config(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="paired evaluation of sampler arms (eval.arms) on fresh seeds x runs")
    with_config(e)
    e.add_argument("--episodes", type=int, help="initial states, seeds eval.seed_start.. (eval.episodes)")
    e.add_argument("--runs", type=int, help="noise draws per initial state (eval.runs)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    rp = sub.add_parser("reproduce", help="the paper's pipeline for env.task as cached stages (reproduce.*)")
    with_config(rp)
    rp.add_argument("--quiet", action="store_true", help="no progress bars")
    rp.set_defaults(func=cmd_reproduce)

    a = sub.add_parser("alarm", help="the runtime failure alarm on a reproduction's harvest: each signal "
                                     "(detect.signals) and their combination, early AUROC, failures flagged before "
                                     "their point of no return, and the failures' causes")
    with_config(a)
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--no-handover", action="store_true",
                   help="the alarms alone, without planning a hand-over at each (the slow part on long tasks)")
    a.set_defaults(func=cmd_alarm)

    x = sub.add_parser("explain", help="ARMOR's detector-explainer on a reproduction: whether episodes failed and "
                                       "why, in words, written into the store (detect.*); --study: its ablation")
    with_config(x)
    x.add_argument("--episode", action="append", help="an episode id to explain (repeatable; default: all)")
    x.add_argument("--outcome", help="partitions to explain, separated by commas (default: all)")
    x.add_argument("--study", action="store_true", help="ARMOR's ablation rows at detect.study_ratios instead")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.set_defaults(func=cmd_explain)

    u = sub.add_parser("run", help="the harvest-learn loop on Ray (local Ray unless RAY_ADDRESS/loop.address)")
    with_config(u)
    u.add_argument("--duration", type=float, help="seconds to run (loop.duration_s)")
    u.set_defaults(func=cmd_run)

    r = sub.add_parser("replay", help="inspect a replay store")
    rsub = r.add_subparsers(dest="replay_command", required=True)
    st = rsub.add_parser("stats", help="episodes, steps and bytes per task and outcome")
    st.add_argument("root", help="replay store root (path or URI)")
    st.add_argument("--verify", action="store_true", help="read every shard; quarantine corrupt ones")
    st.set_defaults(func=cmd_replay_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"afil-ray: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a known failure class gets one clear line instead of a traceback
        if type(e).__name__ in ("CheckpointError", "AssetsMissingError", "SimulatorCrash"):
            print(f"afil-ray: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("afil-ray: interrupted; everything flushed so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
