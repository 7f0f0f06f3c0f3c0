#!/usr/bin/env bash
# Prepare .venv for `make bench` (ectransfer + CPU torch) or `make test` (everything the tests
# need: Debian redis-server and libibverbs1, the backends' clients, moto, Mooncake, NIXL, vLLM).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}
PY=${PY:-python3}
VENV=${VENV:-.venv}
pip_() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }

if [ "$what" = test ]; then
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  [ -e /usr/lib/x86_64-linux-gnu/libibverbs.so.1 ] || ldconfig -p | grep -q libibverbs.so.1 || missing+=(libibverbs1)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# CPU torch first: a bare "torch" requirement would pull a multi-GB CUDA build, and nixl
# declares torch as a dependency.
"$VENV/bin/python" -c 'import torch' 2>/dev/null || pip_ 'torch==2.13.0'

if [ "$what" = bench ]; then
  pip_ -e '.[bench]'
  exit 0
fi

pip_ -e '.[dev,redis,s3,mooncake-cpu,nixl,bench]' 'botocore>=1.43.115,<1.43.118'
if [ -f requirements/vllm-min.txt ]; then
  bash scripts/install-vllm.sh "$VENV"
fi
