#!/usr/bin/env bash
# Installs what the tests need (CPU torch first, then deepspeed without compiled ops, then
# this package) and runs the whole suite. Safe to rerun: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
$PIP "torch==2.13.0"
DS_BUILD_OPS=0 $PIP -e ".[test]"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/megatron_vl_torch_extensions}"
exec python -m pytest -q "$@"
