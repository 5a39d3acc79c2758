#!/usr/bin/env bash
# Usage: scripts/tb_screenshot.sh LOGDIR OUT.png [--tag-filter REGEX] [--width W --height H]
#
# Why: to commit a PNG of the live TensorBoard dashboards under docs/ (for example
#   scripts/tb_screenshot.sh runs/pullcube/tb docs/img/pullcube_scalars.png --tag-filter 'losses|train/'),
# without a desktop browser. Starts TensorBoard on a free localhost port, screenshots its
# Time Series page (scalar cards) with headless Chromium, stops TensorBoard again.
#
# - Installs the Debian packages `chromium` and `chromium-driver` if missing (apt; sudo when not root),
#   and Selenium (the `docs` extra of pyproject.toml) into .venv if missing.
# - TensorBoard's page is a JavaScript app, so scripts/tb_screenshot.py drives Chromium with Selenium
#   (through Debian's chromedriver; nothing is downloaded) and waits until the charts are drawn.
# - Width defaults to 1600 px; without --height the image is as tall as the dashboard (at most
#   6000 px), with every tag group expanded. --tag-filter (a regex on tag names, as in TensorBoard's
#   filter box) shows only the matching charts, in one grid.
# - If LOGDIR itself holds event files (TensorBoard would name that run "."), the run is shown
#   under the last two components of LOGDIR's path instead (runs/pullcube/tb -> "pullcube/tb").
set -euo pipefail

usage() { sed -n '2p' "$0" | sed 's/^# //' >&2; exit 2; }
die() { echo "tb_screenshot: $*" >&2; exit 1; }

[ $# -ge 2 ] || usage
LOGDIR=$1 OUT=$2
shift 2
TAG_FILTER="" WIDTH=1600 HEIGHT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag-filter) [ $# -ge 2 ] || usage; TAG_FILTER=$2; shift 2 ;;
    --width) [ $# -ge 2 ] || usage; WIDTH=$2; shift 2 ;;
    --height) [ $# -ge 2 ] || usage; HEIGHT=$2; shift 2 ;;
    -h | --help) usage ;;
    *) echo "tb_screenshot: unknown argument: $1" >&2; usage ;;
  esac
done
[[ $WIDTH =~ ^[0-9]+$ && $HEIGHT =~ ^[0-9]*$ ]] || die "--width and --height take pixel counts"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
TENSORBOARD=$ROOT/.venv/bin/tensorboard
[ -x "$TENSORBOARD" ] || die "no $TENSORBOARD; run scripts/setup.sh first"

[ -d "$LOGDIR" ] || die "LOGDIR $LOGDIR is not a directory"
LOGDIR=$(cd "$LOGDIR" && pwd)
if [ -z "$(find -L "$LOGDIR" -type f -name '*tfevents*' -print -quit)" ]; then
  die "no TensorBoard event files (*tfevents*) under $LOGDIR"
fi
case "$OUT" in *.png) ;; *) die "OUT must end in .png: $OUT" ;; esac
mkdir -p "$(dirname "$OUT")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "tb_screenshot: installing chromium and chromium-driver (apt)" >&2
  apt_install() { as_root apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; }
  apt_install || { as_root apt-get update >/dev/null && apt_install; } ||
    die "could not install the Debian packages chromium and chromium-driver"
fi
if ! "$PY" -c 'import selenium' 2>/dev/null; then
  echo "tb_screenshot: installing selenium (pip install -e '.[docs]')" >&2
  "$PY" -m pip install -q -e "$ROOT[docs]" 2> >(grep -v -e "is ignored: it is neither" -e "^\s*$" >&2) ||
    die "could not install the docs extra (selenium) into $ROOT/.venv"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tb_screenshot.XXXXXX")
TB_PID="" SHOT_PID=""
stop() {  # SIGTERM, then SIGKILL after 5 s
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 0
  kill "$1" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
cleanup() {
  stop "$SHOT_PID"  # the helper closes its Chromium on SIGTERM
  stop "$TB_PID"    # TensorBoard's data server exits with it (--die-after-stdin)
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

TB_LOGDIR=$LOGDIR
if [ -n "$(find "$LOGDIR" -maxdepth 1 -type f -name '*tfevents*' -print -quit)" ]; then
  run_name=$(basename "$(dirname "$LOGDIR")")/$(basename "$LOGDIR")
  mkdir -p "$WORK/logdir/$(dirname "$run_name")"
  ln -s "$LOGDIR" "$WORK/logdir/$run_name"
  TB_LOGDIR=$WORK/logdir
fi

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$TENSORBOARD" --logdir "$TB_LOGDIR" --host 127.0.0.1 --port "$PORT" >"$WORK/tensorboard.log" 2>&1 &
TB_PID=$!

start=$SECONDS
status=0
"$PY" "$ROOT/scripts/tb_screenshot.py" --base-url "http://127.0.0.1:$PORT/" --out "$OUT" \
  --width "$WIDTH" ${HEIGHT:+--height "$HEIGHT"} ${TAG_FILTER:+--tag-filter "$TAG_FILTER"} \
  --chromium-log "$WORK/chromium.log" --tensorboard-pid "$TB_PID" &
SHOT_PID=$!  # in the background, so that a signal to this script runs the trap at once
wait "$SHOT_PID" || status=$?
SHOT_PID=""
if [ "$status" != 0 ]; then
  if [ "$status" != 3 ]; then  # 3: --tag-filter matched no tag, the logs would not help
    for log in tensorboard chromium; do
      [ -s "$WORK/$log.log" ] && { echo "--- $log log (last lines):" >&2; tail -n 15 "$WORK/$log.log" >&2; }
    done
  fi
  exit "$status"
fi
echo "tb_screenshot: wrote $OUT in $((SECONDS - start))s" >&2
