"""``afil-ray reproduce`` end to end at toy scale: every stage runs for real, a second call reuses them all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from afil_ray.cli import main
from afil_ray.config import ConfigError, load_config
from afil_ray.eval.report import ArmResult, EpisodeOutcome, build_report
from afil_ray.pipeline.pipeline import Pipeline
from afil_ray.pipeline.plan import CORRECTED_ARM
from afil_ray.pipeline.reports import summary_table
from afil_ray.policy.loading import load_start_policy
from afil_ray.replay.store import ReplayStore

TASK = "PullCube-v1"


def tiny_args(tmp: Path) -> list[str]:
    return [f"run_dir={tmp / 'run'}", f"replay.root={tmp / 'replay'}", f"env.task={TASK}", "env.num_envs=2",
            "env.backend=cpu", "env.cpu_vectorization=loop", "demos.num=3", "demos.workers=1",
            "policy.hidden_size=32", "policy.num_layers=1", "policy.head_width=32", "policy.head_depth=1",
            "policy.horizon=8", "sampler.steps=3", "sampler.execute_steps=8", "train.steps=20",
            "train.batch_size=16", "train.warmup_steps=2", "train.checkpoint_every=10", "train.device=cpu",
            "reproduce.harvest_seeds=3", "reproduce.harvest_runs=1", "reproduce.correction_steps=10",
            "reproduce.failure_head_steps=10", "reproduce.static_w=[0.05]", "reproduce.lams=[1.0,5.0]",
            "correct.workers=1", "eval.episodes=2", "eval.runs=1", "eval.seed_start=900", "reproduce.critic_arms=[]",
            "reproduce.branch_rule_arms=[]", "reproduce.outcome_arms=[]"]


# issue 22's stages: branches from the harvest, a critic on them, its arms beside the paper's
CRITIC_ARGS = ["reproduce.critic_arms=['rank:k=4', 'rank:k=4,pick=random']", "reproduce.critic_steps=10",
               "branches.per_state=2", "branches.states_per_episode=1", "reproduce.branch_rule_arms=['adaptive:lam=1']",
               "reproduce.outcome_arms=['outcome:w=2']"]


def test_summary_table_puts_both_paired_comparisons_in_one_row():
    def arm(name: str, wins: int) -> ArmResult:  # 20 episodes: the first `wins` succeed
        return ArmResult(name, TASK, [EpisodeOutcome(i, 0, i < wins, i < wins) for i in range(20)])

    results = [arm("success only", 10), arm(CORRECTED_ARM, 2), arm("static FIL w=0.05", 3),
               arm("adaptive FIL λ=1", 2)]
    vs_success = build_report(results, reference_arm="success only")
    vs_corrected = build_report(results[1:], reference_arm=CORRECTED_ARM)
    mean_w = {"success only": 0.0, "static FIL w=0.05": 0.05, "adaptive FIL λ=1": 0.00451}
    rows = summary_table(vs_success, vs_corrected, mean_w, {"success only": 60.0}).splitlines()[2:]
    cells = {row.split(" | ")[0].removeprefix("| "): row.strip("| ").split(" | ") for row in rows}
    assert list(cells) == ["success only", CORRECTED_ARM, "static FIL w=0.05", "adaptive FIL λ=1"]
    assert cells["success only"][1:] == ["10/20", "0.500 [0.299, 0.701]", "—", "—", "—", "0.600"]
    # 8 episodes lost, none gained: the interval excludes 0 (bold); against itself there is no comparison
    assert cells[CORRECTED_ARM][3:5] == ["**-0.400 [-0.600, -0.200], p=0.008**", "—"]
    # one episode gained over "+ correction": within noise, not bold; static w as given, adaptive to 4 places
    assert cells["static FIL w=0.05"][4:6] == ["+0.050 [+0.000, +0.150], p=1.000", "0.05"]
    assert cells["adaptive FIL λ=1"][4:] == ["+0.000 [+0.000, +0.000], p=1.000", "0.0045", "—"]
    alone = summary_table(vs_success, None).splitlines()  # no "+ correction" report, no mean w, no paper
    assert alone[0].endswith(f"| Δ vs {CORRECTED_ARM} |") and alone[1] == "|---|---|---|---|---|"
    assert [row.strip("| ").split(" | ")[4] for row in alone[2:]] == ["—"] * 4


@pytest.mark.timeout(900)
def test_reproduce_runs_every_stage_then_reuses_them(tmp_path, capsys):
    args = [*tiny_args(tmp_path), *CRITIC_ARGS]
    assert main(["reproduce", "--quiet", *args]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "run"
    stages = ["demos", "success_only", "harvest", "correct", "corrected", "dag", "outcome_head", "branch", "critic",
              "branch_heads", "eval"]
    for stage in stages:
        assert f"[{stage}] done" in out, stage
        assert (root / "stages" / f"{stage}.json").is_file()
    store = ReplayStore(str(tmp_path / "replay"))
    harvest = json.loads((root / "stages" / "harvest.json").read_text())["outputs"]
    assert harvest["episodes"] == 3 and harvest["failures"] >= 1  # 20 training steps: the policy fails
    correct = json.loads((root / "stages" / "correct.json").read_text())["outputs"]
    assert correct["tried"] == harvest["failures"] and correct["corrected_in_store"] >= 1
    corrected = store.read_episodes(task=TASK, outcome="corrected")
    failures = {e.episode_id for e in store.read_episodes(task=TASK, outcome="failure")}
    assert all(e.parent_episode_id in failures and e.success for e in corrected)
    results = json.loads((root / "results" / "report.json").read_text())
    arms = [a["arm"] for a in results["tasks"][TASK]["arms"]]
    assert arms == ["success only", "+ failure correction", "static FIL w=0.05", "adaptive FIL λ=1",
                    "adaptive FIL λ=5", "rank k=4", "rank k=4 pick=random", "outcome head: success only",
                    "outcome head: outcome-conditioned w=2", "branch heads: success only",
                    "branch heads: adaptive FIL λ=1"]
    # the branches start from harvested states (successes keep their snapshots for them), rolled out by the
    # corrected policy; the critic trained on them beside that policy's heads, and its arms ran on its checkpoint
    branch = json.loads((root / "stages" / "branch.json").read_text())["outputs"]
    assert branch["branches"] == 2 * branch["states"] > 0
    branches = store.read_episodes(task=TASK, outcome="branch")
    harvested = {e.episode_id for e in store.read_episodes(task=TASK) if e.source == "harvest"}
    assert len(branches) == branch["branches"] and {e.parent_episode_id for e in branches} <= harvested
    critic = json.loads((root / "stages" / "critic.json").read_text())["outputs"]
    assert critic["steps"] == 10 and critic["critic_rows"] > 0
    critic_policy = load_start_policy(critic["checkpoint"])
    corrected_policy = load_start_policy(json.loads((root / "stages" / "corrected.json").read_text())
                                         ["outputs"]["checkpoint"])
    assert critic_policy.critic is not None
    for name, tensor in corrected_policy.heads.success.state_dict().items():
        assert torch.equal(tensor, critic_policy.heads.success.state_dict()[name]), name  # rank samples from it
    assert list((root / "critic" / "eval").glob("*/episodes.json"))
    # the paper's heads on the branches' two outcomes: the failure head saw exactly the failed branches' chunks
    heads = json.loads((root / "stages" / "branch_heads.json").read_text())["outputs"]
    failed = [e for e in branches if not e.success]
    assert heads["failure_windows"] == sum(len(e.chunk_steps) for e in failed) > 0
    assert all(a["episodes"] == 2 for a in results["tasks"][TASK]["arms"])
    md = (root / "results" / "report.md").read_text()
    assert "paper (%)" in md and "| + failure correction |" in md and "Stage wall times" in md
    mean_w = results["mean_w"]  # from the evaluation's episodes: fixed for static arms, measured for adaptive
    assert mean_w["static FIL w=0.05"] == pytest.approx(0.05, abs=1e-6) and mean_w["success only"] == 0
    assert 0 <= mean_w["adaptive FIL λ=1"] <= mean_w["adaptive FIL λ=5"] <= 1
    # the sentence names the adaptive arms (picked by their sampler spec, not their label), 4 places, no zeros
    [sentence] = [line for line in md.splitlines() if line.startswith("Mean guidance weight applied by the adaptive")]
    assert "static" not in sentence and "adaptive FIL λ=1 " in sentence
    assert f"adaptive FIL λ=5 {mean_w['adaptive FIL λ=5']:.4f}".rstrip("0") in sentence
    summary = (root / "results" / "summary.md").read_text().splitlines()
    assert len(summary) == 2 + len(arms) and summary[4].startswith("| static FIL w=0.05 | ")
    # the +correction arm really is the fine-tuned policy: its checkpoint is the DAG's, trained from `corrected`
    dag = json.loads((root / "stages" / "dag.json").read_text())["outputs"]
    assert Path(dag["checkpoint"]).is_dir()

    # a second call reuses every stage (no training, no rollouts)
    assert main(["reproduce", "--quiet", *args]) == 0
    again = capsys.readouterr().out
    assert all(f"[{s}] cached" in again for s in stages) and "running" not in again

    # the failure-head study: variants train after the cached stages and are paired against + correction
    study = [*args, "reproduce.variants={rand: [policy.failure_head_init=random], "
                    "win: [data.failure_window=1000, reproduce.failure_head_steps=5]}",
             "reproduce.variant_arms=[static:w=0.05]", "reproduce.ood_tasks=[PullCubeDistractors-v1]"]
    assert main(["reproduce", "--quiet", *study]) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] cached" in out for s in stages)
    assert "[variant_rand] done" in out and "[variant_win] done" in out
    win = json.loads((root / "stages" / "variant_win.json").read_text())
    assert win["outputs"]["steps"] == 5 and win["settings"]["overrides"][0] == "data.failure_window=1000"
    # only corrected failures' chunks: fewer than the paper-rule head saw
    assert 0 < win["outputs"]["failure_windows"] <= dag["failure_windows"]
    study_report = json.loads((root / "results" / "variants" / "report.json").read_text())
    arms = {a["arm"]: a for a in study_report["tasks"][TASK]["arms"]}
    assert list(arms) == ["+ failure correction", "dag: static FIL w=0.05", "rand: static FIL w=0.05",
                          "win: static FIL w=0.05"]
    assert all(a["episodes"] == 2 for a in arms.values())
    assert "failure windows" in (root / "results" / "variants" / "report.md").read_text()
    # out of domain: the same arms on the distractor variant, on the same seeds
    ood = json.loads((root / "results" / "ood" / "PullCubeDistractors-v1" / "report.json").read_text())
    ood_arms = ood["tasks"]["PullCubeDistractors-v1"]["arms"]
    assert [a["arm"] for a in ood_arms] == ["success only", "+ failure correction", "static FIL w=0.05",
                                            "adaptive FIL λ=1"]
    assert all(a["episodes"] == 2 for a in ood_arms)
    ood_summary = (root / "results" / "ood" / "PullCubeDistractors-v1" / "summary.md").read_text().splitlines()
    assert len(ood_summary) == 2 + len(ood_arms) and "paper" not in ood_summary[0]
    assert list((root / "dag" / "eval").glob("PullCubeDistractors-v1-*/episodes.json"))
    # the training-seed spread: corrected + failure head re-trained with seed 1, evaluated paired
    assert main(["reproduce", "--quiet", *args, "reproduce.train_seeds=[1]"]) == 0
    out = capsys.readouterr().out
    assert "[seed1_corrected] done" in out and "[seed1_dag] done" in out
    assert all(f"[seed1_{s}] done" in out for s in ("outcome_head", "critic", "branch_heads"))  # issue 22's too
    seed1 = json.loads((root / "stages" / "seed1_corrected.json").read_text())
    assert seed1["settings"]["seed"] == 1 and seed1["outputs"]["run_dir"].endswith("seeds/1/corrected")
    spread = json.loads((root / "results" / "seeds" / "spread.json").read_text())
    assert list(spread["per_seed"]) == ["0", "1"]
    assert list(spread["per_seed"]["1"]) == ["+ failure correction", "static FIL w=0.05", "adaptive FIL λ=1",
                                             "rank k=4", "rank k=4 pick=random", "outcome head: success only",
                                             "outcome head: outcome-conditioned w=2", "branch heads: success only",
                                             "branch heads: adaptive FIL λ=1"]
    seed_arms = json.loads((root / "results" / "seeds" / "report.json").read_text())["tasks"][TASK]["arms"]
    assert [a["arm"] for a in seed_arms][:2] == ["success only", "seed 0: + failure correction"]
    assert all(a["episodes"] == 2 for a in seed_arms) and len(seed_arms) == 1 + 2 * 9
    assert "| mean ± sd |" in (root / "results" / "seeds" / "report.md").read_text()
    pooled = spread["over_seeds"]["success only"]["+ failure correction"]
    corrected_rates = [spread["per_seed"][s]["+ failure correction"] for s in ("0", "1")]
    assert pooled["seeds"] == 2 and pooled["arm_rate"] == pytest.approx(sum(corrected_rates) / 2)
    versus_rule = spread["over_seeds"]["adaptive FIL λ=1"]["rank k=4"]  # each seed's rank against its own paper rule
    assert versus_rule["reference_rate"] == pytest.approx(
        sum(spread["per_seed"][s]["adaptive FIL λ=1"] for s in ("0", "1")) / 2)
    assert (root / "results" / "seeds" / "spread.png").stat().st_size > 0
    # a different seed really trained something else
    main_ckpt = json.loads((root / "stages" / "corrected.json").read_text())["outputs"]["checkpoint"]
    main_weights = load_start_policy(main_ckpt).state_dict()
    seed_weights = load_start_policy(seed1["outputs"]["checkpoint"]).state_dict()
    assert any(not torch.equal(main_weights[k], seed_weights[k]) for k in main_weights)
    with pytest.raises(ConfigError, match=r"train_seeds=\[0\]"):
        Pipeline(load_config(None, [*args, "reproduce.train_seeds=[0]"]), progress=False).run()
    # a study variant given the seed treatment: re-trained with seed 1 next to seed 1's success head
    seeded_study = [*study, "reproduce.train_seeds=[1]", "reproduce.seed_variants=[win]"]
    assert main(["reproduce", "--quiet", *seeded_study]) == 0
    out = capsys.readouterr().out
    assert "[seed1_variant_win] done" in out and "[variant_win] cached" in out and "[seed1_dag] cached" in out
    sv = json.loads((root / "stages" / "seed1_variant_win.json").read_text())
    assert sv["settings"]["seed"] == 1 and sv["outputs"]["steps"] == 5
    assert sv["outputs"]["run_dir"].endswith("seeds/1/variants/win")
    win_weights = load_start_policy(win["outputs"]["checkpoint"]).state_dict()
    sv_weights = load_start_policy(sv["outputs"]["checkpoint"]).state_dict()
    seed1_success = load_start_policy(seed1["outputs"]["checkpoint"]).state_dict()
    success_keys = [k for k in sv_weights if k.startswith("success_head.")]
    assert success_keys and all(torch.equal(sv_weights[k], seed1_success[k]) for k in success_keys)
    assert any(not torch.equal(win_weights[k], sv_weights[k]) for k in success_keys)
    sv_spread = json.loads((root / "results" / "seed_variants" / "spread.json").read_text())
    assert list(sv_spread["per_seed"]) == ["0", "1"]
    assert list(sv_spread["per_seed"]["1"]) == ["+ failure correction", "win: static FIL w=0.05"]
    # each seed's "+ correction" is the one results/seeds/ evaluated, episode for episode
    assert sv_spread["per_seed"]["1"]["+ failure correction"] == spread["per_seed"]["1"]["+ failure correction"]
    assert sv_spread["per_seed"]["0"]["win: static FIL w=0.05"] == arms["win: static FIL w=0.05"]["rate"]
    assert (root / "results" / "seed_variants" / "spread.png").stat().st_size > 0
    with pytest.raises(ConfigError, match=r"seed_variants=\['nope'\].*unknown: nope"):
        Pipeline(load_config(None, [*seeded_study[:-1], "reproduce.seed_variants=[nope]"]), progress=False).run()

    with pytest.raises(ConfigError, match=r"reproduce\.variants\.bad: 'eval\.runs' cannot vary"):
        Pipeline(load_config(None, [*args, "reproduce.variants={bad: [eval.runs=5]}"]), progress=False).run()

    # changing a setting a completed stage depends on is an error that names the key
    cfg = load_config(None, [*args, "reproduce.harvest_runs=2"])
    with pytest.raises(ConfigError, match=r"reproduce\.harvest_runs"):
        Pipeline(cfg, progress=False).run()


@pytest.mark.slow  # a whole reproduction with its online arm: about 55 s; keeps the default suite under 15 min
@pytest.mark.timeout(900)
def test_online_arm_is_found_again_in_a_copied_run_dir(tmp_path, monkeypatch, capsys):
    """The online stage (a real local Ray loop) records its checkpoint under run_dir as given, like every other
    stage, although the driver hands Ray absolute paths: a run directory copied to another clone or disk
    re-reports every arm from its caches."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    monkeypatch.chdir(first)
    args = [*tiny_args(Path(".")), "reproduce.lams=[1.0]", "reproduce.online_s=15", "loop.num_rollout_actors=1",
            "loop.rollout_cpus=0.5", "loop.learner_cpus=0.5", "loop.min_failures=1", "loop.publish_every=5",
            "loop.checkpoint_every=5", "loop.round_s=2", "loop.eval_every_s=0"]
    assert main(["reproduce", "--quiet", *args]) == 0
    assert "[online] done" in capsys.readouterr().out
    online = json.loads(Path("run/stages/online.json").read_text())["outputs"]
    assert online["checkpoint"].startswith("run/online/") and Path(online["checkpoint"]).is_dir()
    assert online["summary"]["learner_step"] > 0
    arms = json.loads(Path("run/results/report.json").read_text())["tasks"][TASK]["arms"]
    assert arms[-1]["arm"] == "online loop, adaptive λ=1" and arms[-1]["episodes"] == 2

    shutil.copytree(first, second)
    shutil.rmtree(first)
    monkeypatch.chdir(second)
    assert main(["reproduce", "--quiet", *args]) == 0
    out = capsys.readouterr().out
    assert "[online] cached" in out and "running" not in out
    again = json.loads(Path("run/results/report.json").read_text())["tasks"][TASK]["arms"]
    assert [(a["arm"], a["rate"]) for a in again] == [(a["arm"], a["rate"]) for a in arms]


@pytest.mark.slow  # 8 pools of 2 spawned simulator workers: about 8 min on 2 cores
@pytest.mark.timeout(1800)
def test_reproduce_from_scratch_twice_trains_identical_policies(tmp_path):
    """One command reproduces its numbers: two runs from scratch, with 2 workers per pool (so completion order
    varies), write the same store order and train bit-identical checkpoints, hence the same tables."""
    runs = []
    for name in ("a", "b"):
        args = [*tiny_args(tmp_path / name), "demos.num=4", "demos.workers=2", "demos.flush_every=1",
                "correct.workers=2", "reproduce.harvest_seeds=2", "reproduce.harvest_runs=2", "eval.workers=2",
                "reproduce.lams=[1.0]"]
        assert main(["reproduce", "--quiet", *args]) == 0
        runs.append(tmp_path / name / "run")
    for stage in ("success_only", "corrected", "dag"):
        ckpts = [json.loads((r / "stages" / f"{stage}.json").read_text())["outputs"]["checkpoint"] for r in runs]
        a, b = (load_start_policy(c).state_dict() for c in ckpts)
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    reports = [json.loads((r / "results" / "report.json").read_text()) for r in runs]
    assert reports[0] == reports[1]


def test_a_stage_recorded_before_a_key_existed_is_reused_while_the_key_keeps_its_default(tmp_path):
    """Adding a config key with a default that keeps the old behaviour must not invalidate finished stages; setting
    it to something else must."""
    from afil_ray.pipeline.stages import StageCache

    cache = StageCache(tmp_path)
    ran = []
    cache.run("harvest", lambda: ran.append(1) or {"n": 1}, {"train": {"steps": 5}})  # recorded without "new_key"
    defaults = {"train": {"steps": 20000, "new_key": 0.2}}
    assert cache.run("harvest", lambda: ran.append(2) or {}, {"train": {"steps": 5, "new_key": 0.2}},
                     defaults=defaults) == {"n": 1}
    with pytest.raises(ConfigError, match=r"train\.new_key"):
        cache.run("harvest", lambda: {}, {"train": {"steps": 5, "new_key": 0.5}}, defaults=defaults)
    with pytest.raises(ConfigError, match=r"train\.steps"):  # a recorded key still counts as before
        cache.run("harvest", lambda: {}, {"train": {"steps": 6, "new_key": 0.2}}, defaults=defaults)
    assert ran == [1]


def test_reproduce_until_a_stage_stops_after_it(tmp_path, capsys):
    assert main(["reproduce", "--quiet", *tiny_args(tmp_path), "reproduce.until=success_only"]) == 0
    out = capsys.readouterr().out
    done = sorted(p.stem for p in (tmp_path / "run" / "stages").glob("*.json"))
    assert done == ["demos", "success_only"]
    assert "stopped after stage 'success_only' (reproduce.until)" in out
    assert not (tmp_path / "run" / "results").exists()
    assert main(["reproduce", "--quiet", *tiny_args(tmp_path), "reproduce.until=eval"]) == 2
    assert "reproduce.until must be one of demos, success_only" in capsys.readouterr().err

    # a stop after a harvest unit's episodes reached the store but before its ledger line: the rerun rolls the
    # unit out again, so its first copy must go (it used to stay, and the harvest counted it twice)
    args = [*tiny_args(tmp_path), "reproduce.until=harvest"]
    assert main(["reproduce", "--quiet", *args]) == 0
    store = ReplayStore(tmp_path / "replay")
    first = sorted(e.seed for e in store.read_episodes(TASK) if e.source == "harvest")
    assert len(first) == 3
    (tmp_path / "run" / "harvest" / "units.json").unlink()
    (tmp_path / "run" / "stages" / "harvest.json").unlink()
    assert main(["reproduce", "--quiet", *args]) == 0
    assert sorted(e.seed for e in store.read_episodes(TASK) if e.source == "harvest") == first
    assert json.loads((tmp_path / "run" / "stages" / "harvest.json").read_text())["outputs"]["episodes"] == 3

    # `signal` stops once the critic exists (what `afil-ray alarm` needs), before any evaluation
    critic_only = ["reproduce.critic_arms=['rank:k=4']", "reproduce.critic_steps=10", "branches.per_state=2",
                   "branches.states_per_episode=1"]
    assert main(["reproduce", "--quiet", *tiny_args(tmp_path), *critic_only, "reproduce.until=signal"]) == 0
    done = sorted(p.stem for p in (tmp_path / "run" / "stages").glob("*.json"))
    assert done == ["branch", "correct", "corrected", "critic", "dag", "demos", "harvest", "success_only"]
    assert "stopped after stage 'signal' (reproduce.until)" in capsys.readouterr().out
