#!/usr/bin/env bash
# Installs what the tests need (CPU torch first, then deepspeed without compiled ops, then
# this package with lmms-eval) and runs the whole suite. Safe to rerun: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
$PIP "torch==2.13.0"
# torch named again: lmms-eval needs torchvision, and left free pip takes the newest (0.29.1) and
# upgrades torch to 2.14.1, a CUDA build with ~15 nvidia-* wheels.
DS_BUILD_OPS=0 $PIP -e ".[test,lmms]" "torch==2.13.0"
# That leaves PyPI's torchvision 0.28.0, a CUDA build: beside a CPU torch its import fails, and
# transformers' CLIP models and diffusers with it. Nothing of ours or of lmms-eval's core needs
# it, so a machine where it cannot be imported goes without (pip check then names it missing).
python -c "import torchvision" 2>/dev/null || python -m pip uninstall -y -q torchvision
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/megatron_vl_torch_extensions}"
exec python -m pytest -q "$@"
