#!/usr/bin/env bash
# Install vLLM 0.33.0 for the adapter tests into a venv that already has CPU torch, without the
# multi-GB CUDA stack (docs/testing.md). Idempotent; skips when vllm 0.33.0 is already there.
# If vLLM cannot be installed here, the tests under tests/vllm skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
py="$VENV/bin/python"
if "$py" -c 'import importlib.metadata as m, sys; sys.exit(m.version("vllm") != "0.33.0")' 2>/dev/null; then
  exit 0
fi
pip_() { "$py" -m pip install -q --disable-pip-version-check "$@"; }
if pip_ -r requirements/vllm-min.txt && pip_ --no-deps xgrammar==0.2.8 vllm==0.33.0; then
  echo "vLLM 0.33.0 installed (minimal set) into $VENV"
else
  echo "WARNING: vLLM could not be installed; tests/vllm will skip with the reason" >&2
fi
