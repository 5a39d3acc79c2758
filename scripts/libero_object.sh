#!/usr/bin/env bash
# Issue 21's LIBERO-Object experiment as resumable stages (configs/libero_object_cpu.yaml). Every stage skips what
# is done (demos count the store, training resumes from its newest checkpoint, an evaluation with a report is not
# run again), so after a stop the same command goes on; a fresh machine needs every stage again (about 90 minutes
# for `policy` on 2 cores: demos 35 min, encoding the stored frames and 8,000 steps 45 min, evaluation 10 min).
#   scripts/libero_object.sh policy     # scripted demos with both cameras, training, the reduced protocol (10 x 1)
#   scripts/libero_object.sh loop       # the harvest-learn loop on LIBERO actors from that policy (loop.duration_s)
#   scripts/libero_object.sh bench      # the loop's env steps/s against the in-process rollout (docs/benchmarks.md)
#   scripts/libero_object.sh reproduce  # the paper's arms on that policy, per task and pooled (about 110 min:
#                                       # harvest 35, correction 15, fine-tune 24, failure head 4, online 7, eval 24) over the suite
# OVERRIDES="eval.episodes=5 ..." adds dotlist overrides to every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
AFIL=${AFIL:-.venv/bin/afil-ray}
CONFIG=configs/libero_object_cpu.yaml
RUN=${RUN:-runs/libero_object_cpu}
read -ra OVERRIDES <<< "${OVERRIDES:-}"
export MUJOCO_GL=${MUJOCO_GL:-egl}

evaluated() { compgen -G "$1/eval/*/report.json" > /dev/null; }

policy() {  # trained where the reproduction's success-only stage and loop.init_from look
  local o=(run_dir="$RUN/success_only" replay.root="$RUN/replay" "${OVERRIDES[@]}")
  "$AFIL" demos --config "$CONFIG" "${o[@]}"
  "$AFIL" train --config "$CONFIG" "${o[@]}"
  evaluated "$RUN/success_only" || "$AFIL" eval --config "$CONFIG" "${o[@]}"
}

loop() {
  "$AFIL" run --config "$CONFIG" run_dir="$RUN/loop" replay.root="$RUN/replay" \
    loop.init_from="$RUN/success_only" "${OVERRIDES[@]}"
}

bench() {
  .venv/bin/python benchmarks/bench_loop.py --config "$CONFIG" --seconds "${SECONDS_PER_BLOCK:-60}" --actors 1 \
    replay.root="$RUN/bench_loop/replay" loop.init_from="$RUN/success_only" "${OVERRIDES[@]}"
}

reproduce() {
  "$AFIL" reproduce --config "$CONFIG" run_dir="$RUN" replay.root="$RUN/replay" "${OVERRIDES[@]}"
}

for stage in "${@:-policy}"; do
  case "$stage" in
    policy|loop|bench|reproduce) "$stage" ;;
    *) echo "usage: $0 [policy|loop|bench|reproduce]..." >&2; exit 2 ;;
  esac
done
