#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (root, apt and pip reachable).
#
# Why each step exists:
#  - SAPIEN (ManiSkill's renderer) needs Vulkan 1.2 features that Debian 12's Mesa 22.3 lavapipe lacks
#    (descriptorBindingPartiallyBound); Mesa 25.x from bookworm-backports has them.
#  - torch is installed first, pinned to the CPU build the machine provides, so that no dependency
#    pulls the multi-GB CUDA wheels. On GPU clusters set AFIL_TORCH_SPEC (for example "torch").
#  - numpy<2 is pinned by the project because mplib 0.1.1 (ManiSkill's motion planner) segfaults with numpy 2.
# A stamp file keyed on the inputs makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${AFIL_VENV:-.venv}
TORCH_SPEC=${AFIL_TORCH_SPEC:-torch==2.13.0}
PY=${AFIL_PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_setup() {
  local stamp=/var/lib/afil-ray-apt.stamp
  local pkgs="libvulkan1 libgl1 libglib2.0-0 libegl1"
  if [ -f "$stamp" ] && dpkg -s $pkgs mesa-vulkan-drivers >/dev/null 2>&1; then return; fi
  if ! command -v apt-get >/dev/null; then
    echo "setup: no apt-get; install Vulkan (Mesa >= 23) and libGL by hand" >&2; return
  fi
  local src=/etc/apt/sources.list.d/debian.sources
  local bp=/etc/apt/sources.list.d/afil-bookworm-backports.sources
  if [ ! -f "$bp" ] && [ -f "$src" ]; then
    # Reuse the URI of the Debian source already configured (mirror-agnostic: no host name in the repo).
    local uri
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$src")
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$uri" | as_root tee "$bp" >/dev/null
  fi
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends $pkgs
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
    -t bookworm-backports mesa-vulkan-drivers
  as_root touch "$stamp"
}

# pip, quiet; drops the per-package notes some machines print for configured-but-absent local indexes.
pip_install() {
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v -e "is ignored: it is neither" -e "^\s*$" >&2)
}

venv_setup() {
  local want
  want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
  if [ -f "$VENV/.afil-stamp" ] && [ "$(cat "$VENV/.afil-stamp")" = "$want" ]; then return; fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  pip_install --upgrade pip
  pip_install "$TORCH_SPEC"
  pip_install -e ".[dev,libero]"
  echo "$want" > "$VENV/.afil-stamp"
}

apt_setup
venv_setup
