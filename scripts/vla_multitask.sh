#!/usr/bin/env bash
# Issue 20's experiment as resumable stages: one image-and-language policy for five ManiSkill tasks
# (configs/vla_cpu.yaml) and, for pairing, a state policy per task trained on the same demo seeds.
# Every stage skips what is done (demos count the store, training resumes from its newest checkpoint,
# an evaluation with a report is not run again), so after a stop the same command goes on.
#   scripts/vla_multitask.sh image      # demos, training, the four evaluation arms
#   scripts/vla_multitask.sh state      # per task: state demos, training, evaluation on the same seeds
#                                       # (STATE_TASKS="PushCube-v1 ..." for some of them)
#   scripts/vla_multitask.sh alone      # the image policy trained on one task at a time (ALONE_TASKS)
#   scripts/vla_multitask.sh compare    # per-task and pooled tables (docs/results.md)
#   scripts/vla_multitask.sh reproduce  # the paper's arms on the image policy, per task and pooled
# OVERRIDES="policy.vision_stride=32 ..." RUN=runs/other scripts/vla_multitask.sh image: a variant of the image
# policy in its own run directory, trained on the demos in REPLAY (default $RUN/replay); ARMS="[...]" the arms
# `image` evaluates (default: success only and the three probes); `reproduce` always
# uses $RUN/replay, which must hold its own copy of the demos.
set -euo pipefail
cd "$(dirname "$0")/.."
AFIL=${AFIL:-.venv/bin/afil-ray}
RUN=${RUN:-runs/vla_cpu}
STATE=${STATE:-runs/vla_state}
REPLAY=${REPLAY:-$RUN/replay}
read -ra OVERRIDES <<< "${OVERRIDES:-}"  # extra dotlist overrides of configs/vla_cpu.yaml
EPISODES=${EPISODES:-10}  # per task and arm for the image policy (four arms x five tasks of rendering)
STATE_EPISODES=${STATE_EPISODES:-20}  # per task for the state policies; compare pairs the seeds both have
TASKS=(PushCube-v1 PullCube-v1 PickCube-v1 StackCube-v1 LiftPegUpright-v1)
ARMS="eval.arms=${ARMS:-[success_only,success_only@blank_cameras,success_only@other_instruction,success_only@heldout_phrasing]}"

evaluated() { compgen -G "$1/eval/*/report.json" > /dev/null; }

image() {  # trained where the reproduction's success-only stage looks, so `reproduce` reuses it
  local o=(run_dir="$RUN/success_only" replay.root="$REPLAY" eval.episodes="$EPISODES" "${OVERRIDES[@]}")
  "$AFIL" demos --config configs/vla_cpu.yaml "${o[@]}"
  "$AFIL" train --config configs/vla_cpu.yaml "${o[@]}"
  evaluated "$RUN/success_only" || "$AFIL" eval --config configs/vla_cpu.yaml "${o[@]}" "$ARMS"
}

reproduce() {
  # its own store: the harvest and the corrections are written there, beside a copy of the demos
  "$AFIL" reproduce --config configs/vla_cpu.yaml run_dir="$RUN" replay.root="$RUN/replay" \
    eval.episodes="$EPISODES" "${OVERRIDES[@]}"
}

alone() {  # the image policy on one task at a time, with a state policy's budget (40 demos, 2,000 steps)
  local t o
  for t in ${ALONE_TASKS:-PushCube-v1 LiftPegUpright-v1}; do
    o=("env.task=[$t]" run_dir="$RUN/alone/$t" replay.root="$REPLAY" train.steps=2000 train.num_threads=1
       eval.episodes="$EPISODES" eval.workers=1 "${OVERRIDES[@]}")
    "$AFIL" train --config configs/vla_cpu.yaml "${o[@]}"
    evaluated "$RUN/alone/$t" || "$AFIL" eval --config configs/vla_cpu.yaml "${o[@]}"
  done
}

state() {  # 2,000 steps each on one task: what the image policy gets per task of 10,000 steps with
  # train.balance=tasks (its 8,000 default steps, uniform over stored steps, give PushCube 13%, LiftPeg 36%)
  local t o
  for t in ${STATE_TASKS:-${TASKS[*]}}; do
    o=(env.task="$t" run_dir="$STATE/$t" replay.root="$STATE/replay" demos.num=40 train.steps=2000
       train.num_threads=1 eval.episodes="$STATE_EPISODES" eval.runs=1)
    "$AFIL" demos --config configs/state_cpu.yaml "${o[@]}"
    "$AFIL" train --config configs/state_cpu.yaml "${o[@]}"
    evaluated "$STATE/$t" || "$AFIL" eval --config configs/state_cpu.yaml "${o[@]}"
  done
}

compare() {  # the single-task image policies of `alone` join as variants where they exist
  local f t variants=()
  for f in "$RUN"/alone/*/eval/*/episodes.json; do
    [[ -e $f ]] || continue
    t=${f#"$RUN"/alone/}; variants+=(--variant "${t%%/*} alone=$f")
  done
  local probes  # the evaluation with the probe arms (the run directory may hold other evaluations too)
  probes=$(grep -l "success_only@blank_cameras" "$RUN"/success_only/eval/*/episodes.json | tail -n 1)
  .venv/bin/python scripts/compare_multitask.py --image "$probes" \
    --state "$STATE"/*/eval/*/episodes.json "${variants[@]}"
}

for stage in "$@"; do "$stage"; done
