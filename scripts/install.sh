#!/usr/bin/env bash
# Install llava-kit and its stack into a virtual environment (default .venv), from scratch or on top.
#
#     ./scripts/install.sh            # then: .venv/bin/llava-kit demo
#
# torch is installed first at the pinned version and held there by constraints.txt for every later
# pip call (otherwise a dependency pulls the newest CUDA torch, several GB). Then torchvision is
# checked and, on a CPU-only torch with a CUDA-only torchvision, patched so that it imports
# (scripts/fix_torchvision.py explains why; it does nothing where torchvision works). Last, the system's
# chromium for the web chat's browser tests (scripts/install_browser.sh; skipped with a warning without apt).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "install: creating virtual environment $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# DeepSpeed compiles small C++ extensions at first use; keep them in one cache between runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"

echo "install: torch (pinned by constraints.txt)" >&2
"${PIP[@]}" install -q -c constraints.txt torch
echo "install: llava-kit with its dependencies" >&2
"${PIP[@]}" install -q -c constraints.txt -e ".[dev,deepspeed,webui]"
"$VENV/bin/python" scripts/fix_torchvision.py
./scripts/install_browser.sh
"$VENV/bin/python" -c "import llava_kit, transformers, peft, open_clip; print('install: ok, llava-kit', llava_kit.__version__)" >&2
