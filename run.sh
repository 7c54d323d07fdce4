#!/usr/bin/env bash
# The two entry points of the README, each doing all set-up itself (idempotent):
#   ./run.sh demo [raymoll demo options]   the main job: the whole story on an embedded Ray, offline
#   ./run.sh test [pytest options]         the test suite
#   ./run.sh setup                         set-up only (cluster.yaml's nodes run this)
# Set-up: Debian packages with apt (root or sudo), a virtualenv at .venv, raymoll installed into it.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(python3 python3-venv python3-dev build-essential pkg-config
              libturbojpeg0-dev libopencv-dev dataset-fashion-mnist)
TORCH=(torch==2.14.1 torchvision==0.29.1)
EXTRA=(imagecorruptions==1.1.2)  # only its frost photos are used; installed without its deps

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

install_system() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
}

install_python() {
  [ -x .venv/bin/python ] || { echo "[setup] creating .venv"; python3 -m venv .venv; }
  # Reinstall only when the dependency list changed: the stamp is the hash of pyproject.toml.
  local stamp=.venv/.raymoll-setup
  local want; want=$(sha256sum pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing raymoll and its dependencies into .venv (first time: a few minutes)"
    .venv/bin/pip install -q "${TORCH[@]}"
    # timm: `evaluate --model timm:NAME`; tracking: run.tracker clients (all tested)
    .venv/bin/pip install -q -e ".[test,timm,tracking]"
    .venv/bin/pip install -q --no-deps "${EXTRA[@]}"
    echo "$want" > "$stamp"
  fi
}

install_system
install_python
export RAY_TRAIN_ENABLE_PRINT_PATCH=0

case "${1:-}" in
  demo) shift; exec .venv/bin/raymoll demo "$@" ;;
  test) shift; exec .venv/bin/python -m pytest "$@" ;;
  setup) echo "[setup] done: .venv/bin/raymoll is ready" ;;
  *) echo "usage: ./run.sh demo [options] | ./run.sh test [pytest options] | ./run.sh setup" >&2
     exit 2 ;;
esac
