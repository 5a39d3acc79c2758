#!/usr/bin/env bash
# Issue 23's measurements (afil_ray/detect/) as resumable runs, on the reproductions scripts/failure_signal.sh
# makes (runs/fs_<task>; the alarm needs its stages up to the critic and the dag, the explainer its success-only
# and corrected policies; OVERRIDES="reproduce.until=signal reproduce.train_seeds=[]" scripts/failure_signal.sh
# <task> makes only the alarm's, in 35 min on PullCube):
#   scripts/detect_study.sh alarm PullCube-v1     # the runtime alarm on fresh rollouts -> runs/fs_PullCube/detect/alarm.md
#                                                 # (overrides after the task: detect.combiner=logistic ...)
#   scripts/detect_study.sh explain PullCube-v1   # ARMOR's ablation rows at sparse:dense 2 and 30 -> .../detect/explain.md
#   scripts/detect_study.sh transfer              # cross-task: one state policy for PushCube and PullCube (20 demos
#                                                 # each, 5,000 steps), the detector trained on PushCube's rollouts and
#                                                 # measured on PullCube's -> runs/detect_transfer/detect/explain.md
# Every step keeps its outputs (rollouts, scores, stages), so the same command goes on after a stop.
set -euo pipefail
cd "$(dirname "$0")/.."
AFIL=${AFIL:-.venv/bin/afil-ray}
what=${1:?alarm, explain or transfer}

case "$what" in
  alarm)
    run="runs/fs_${2:?task}"; run="${run%-v1}"
    "$AFIL" alarm --config "$run/config.yaml" detect.alarm_seeds=300 "${@:3}"
    ;;
  explain)
    run="runs/fs_${2:?task}"; run="${run%-v1}"
    "$AFIL" explain --config "$run/config.yaml" --study "${@:3}"
    ;;
  transfer)
    run=runs/detect_transfer
    "$AFIL" reproduce --config configs/reproduce.yaml "env.task=[PushCube-v1,PullCube-v1]" run_dir="$run" \
      replay.root="$run/replay" demos.num=20 train.steps=5000 reproduce.until=success_only \
      "reproduce.train_seeds=[]" "reproduce.variants={}" "reproduce.seed_variants=[]"  # one-task studies
    "$AFIL" explain --config "$run/config.yaml" --study detect.transfer_to=PullCube-v1 \
      "detect.collect_policies=[success_only@1000,success_only@2000,success_only@3000,success_only@4000,success_only]" \
      "detect.study_recipes=[multitask,armor]" "detect.study_ratios=[2.0]"
    ;;
  *) echo "unknown study $what (alarm, explain or transfer)" >&2; exit 2 ;;
esac
