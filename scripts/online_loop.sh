#!/usr/bin/env bash
# Issue 22's online figure: two harvest-learn loops started from the same success-only checkpoint, each for
# DURATION_S (default 1200) of wall time on a local Ray, one learning a critic from the branches its branch actor
# adds and sampling with rank:k=8 by it, the other learning the paper's failure head and sampling with its adaptive
# rule; then both final policies evaluated on the same seeds x runs (each beside its unchanged success head, so the
# two evaluations pair through it), and their rolling success rates in one figure.
#   scripts/online_loop.sh PullCube-v1   # needs runs/fs_PullCube's success_only stage (scripts/failure_signal.sh)
# Results: runs/online_<task>/{rank,rule}/ (TensorBoard under tb/, summary.json, eval/), the figure
# docs/figures/online_<task>.png and the paired table runs/online_<task>/paired.md. A finished loop is not run again
# (its summary.json holds its final checkpoint); OVERRIDES="..." adds dotlist overrides to both loops.
set -euo pipefail
cd "$(dirname "$0")/.."
AFIL=${AFIL:-.venv/bin/afil-ray}
PY=${PY:-.venv/bin/python}
task=${1:?task, e.g. PullCube-v1}
name=${task%-v1}
source_run="runs/fs_${name}"
out="runs/online_${name}"
start=$(ls -d "$source_run"/success_only/checkpoints/step_* 2>/dev/null | sort | tail -1 || true)
if [[ -z "$start" ]]; then
  echo "$source_run has no success_only checkpoint: make it first with" \
    "OVERRIDES=reproduce.until=success_only scripts/failure_signal.sh $task" >&2
  exit 2
fi
read -ra OVERRIDES <<< "${OVERRIDES:-}"
common=(--config "$source_run/config.yaml" loop.init_from="$start" loop.duration_s="${DURATION_S:-1200}"
        loop.eval_every_s=0 loop.local_num_cpus=3 run_id=null "${OVERRIDES[@]}")  # each loop its own run id

loop() {  # label, then the loop's own overrides
  local label=$1; shift
  local dir="$out/$label"
  if [[ ! -f "$dir/summary.json" ]]; then
    "$AFIL" run "${common[@]}" run_dir="$dir" replay.root="$dir/replay" "$@"
  fi
}
loop rank loop.learner_mode=critic policy.critic=true sampler.kind=rank loop.num_branch_actors=1 \
  loop.keep_success_snapshots=true
loop rule loop.learner_mode=failure_head sampler.kind=adaptive

final() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['final_checkpoint'])" "$out/$1/summary.json"; }
evaluate() {  # label, arms
  local dir="$out/$1"
  if [[ ! -f "$dir/eval/done" ]]; then
    "$AFIL" eval --config "$dir/config.yaml" eval.checkpoint="$(final "$1")" "eval.arms=$2" \
      eval.episodes="${EVAL_EPISODES:-50}" eval.runs="${EVAL_RUNS:-3}"
    touch "$dir/eval/done"
  fi
}
evaluate rank "[success_only,rank:k=8]"
evaluate rule "[success_only,adaptive:lam=1]"
episodes() { ls -t "$out/$1"/eval/*/episodes.json | head -1; }
"$PY" scripts/compare_evals.py --arm "success only (the start)" "$(episodes rank)" success_only \
  --arm "rank k=8, critic learned online" "$(episodes rank)" rank:k=8 \
  --arm "the paper's rule, learned online" "$(episodes rule)" adaptive:lam=1 > "$out/paired.md"
"$PY" scripts/plot_loop_curves.py --run "rank k=8, critic learned online=$out/rank/tb" \
  --run "the paper's rule=$out/rule/tb" --out "docs/figures/online_${name}.png"
cat "$out/paired.md"
