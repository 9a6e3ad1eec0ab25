#!/usr/bin/env bash
# Idempotent setup for ndc: a virtual environment with the CPU build of torch
# 2.13.0 installed first (a bare `torch` requirement would pull a multi-GB CUDA
# build), then ndc with its test extras and the two pitch estimators of examples/pitch.py, then Debian's
# Fashion-MNIST package.
# NDC_VENV picks the environment's folder (default: .venv in the checkout).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NDC_VENV:-$root/.venv}"
stamp="$venv/.ndc-installed"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "ndc setup: installing torch==2.13.0 and ndc[test] into $venv" >&2
  "$venv/bin/python" -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -m pip install -q -e "$root[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # two real pretrained teachers for examples/pitch.py and its tests: their networks need only torch, and their
  # declared dependencies (audio I/O) would pull other torch builds, hence --no-deps
  "$venv/bin/python" -m pip install -q --no-deps torchcrepe==0.0.24 pesto-pitch==2.0.1 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -c "import torch, ndc, onnxruntime" >/dev/null
  touch "$stamp"
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  sudo=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo="sudo"; fi
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "ndc setup: installing Debian's dataset-fashion-mnist" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "ndc setup: Fashion-MNIST is not installed and apt-get needs root; tests that need it are skipped" >&2
  fi
fi
