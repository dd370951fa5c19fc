#!/usr/bin/env bash
# Set up semask_fast on a fresh machine and run the main job:
#   install (torch 2.14.1 from this machine's local wheel store, the package
#   editable with its test and export extras), then `info` (what can run here and why
#   not), `check` (every available backend against the reference) and
#   `bench --quick` (this machine's fastest CPU backend beside the best peer,
#   Swin-T stage 1 window attention, under a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.14.1" -e ".[test,export]"
# torch's extension builder looks for the CUDA toolkit in CUDA_HOME.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
python -m semask_fast info
python -m semask_fast check
python -m semask_fast bench --quick
