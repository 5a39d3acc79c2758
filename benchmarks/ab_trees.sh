#!/usr/bin/env bash
# Usage: benchmarks/ab_trees.sh TREE_A TREE_B OUT_DIR [--loop]
#
# Why: a change that should not move the hot paths (a redesign, a refactor) is checked by running the hot-path
# benchmarks of two checkouts side by side in one session, so machine noise hits both alike. Each benchmark runs
# A, B, B, A (each tree with its own benchmark script and library, one venv), and the outputs land in
# OUT_DIR/<bench>-<A|B>-<i>.md for the ratios to be read side by side. Sizes are reduced so that the whole run
# takes about 20 minutes on 2 cores; --loop adds the loop benchmark (one A and one B, about 4 minutes each;
# it needs loop.init_from in configs/quickstart.yaml: run `make run` first, or pass a checkpoint in LOOP_INIT).
#   git worktree add /tmp/before <commit>; benchmarks/ab_trees.sh /tmp/before . runs/ab
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2p' "$0" | sed 's/^# //' >&2; exit 2; }
A=$(cd "$1" && pwd) B=$(cd "$2" && pwd) OUT=$3 LOOP=${4:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
mkdir -p "$OUT"

bench() {  # TREE LABEL NAME ARGS...
  local tree=$1 label=$2 name=$3
  shift 3
  local i=1
  while [ -e "$OUT/$name-$label-$i.md" ]; do i=$((i + 1)); done
  echo "ab_trees: $name on $label ($tree)" >&2
  (cd "$tree" && PYTHONPATH="$tree" "$PY" "benchmarks/$name.py" "$@") > "$OUT/$name-$label-$i.md"
}

for round in A B B A; do
  tree=$A; [ "$round" = B ] && tree=$B
  bench "$tree" "$round" bench_env --steps 600 --rounds 2 --rgb-steps 20
  bench "$tree" "$round" bench_replay --write-episodes 256 --sample-episodes 1000 --repeats 3 --sample-repeats 100
  short=""  # older checkouts' bench_sampling has no --no-variants (it then prints its variants table too)
  grep -q -- "--no-variants" "$tree/benchmarks/bench_sampling.py" && short=--no-variants
  bench "$tree" "$round" bench_sampling --batches 1 64 --rounds 5 --budget 0.2 $short
done
if [ "$LOOP" = --loop ]; then
  for round in A B; do
    tree=$A; [ "$round" = B ] && tree=$B
    bench "$tree" "$round" bench_loop --seconds 30 --actors 1 ${LOOP_INIT:+loop.init_from=$LOOP_INIT}
  done
fi
echo "ab_trees: outputs in $OUT" >&2
