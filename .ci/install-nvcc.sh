#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into a virtual environment (no GPU and no CUDA toolkit needed) and
# prints the path of nvcc on the last line of stdout.
#
#   .ci/install-nvcc.sh [VENV_DIR]        (default: .venv-nvcc, git-ignored)
#
# Idempotent: when VENV_DIR already holds an nvcc that reports release 13.0 nothing is installed.
# Every package is pinned to 13.0: mixed versions make ptxas fail ("Unsupported .version"), and PTX
# from a newer nvcc does not load on a CUDA 13.0 driver (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
set -euo pipefail

venv="${1:-.venv-nvcc}"
python="${PYTHON:-python3}"

find_nvcc() {
    # The wheel puts nvcc under site-packages/nvidia/cu13/bin; the python version varies.
    local f
    for f in "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
        if [ -x "$f" ]; then
            echo "$f"
            return 0
        fi
    done
    return 1
}

is_13_0() {
    "$1" --version 2>/dev/null | grep -q "release 13\.0"
}

if nvcc="$(find_nvcc)" && is_13_0 "$nvcc"; then
    echo "nvcc 13.0 already installed in $venv" >&2
else
    if [ ! -x "$venv/bin/pip" ]; then
        "$python" -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet \
        "nvidia-cuda-nvcc==13.0.*" \
        "nvidia-nvvm==13.0.*" \
        "nvidia-cuda-crt==13.0.*" \
        "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" >&2
    nvcc="$(find_nvcc)" || { echo "install-nvcc: nvcc not found in $venv after install" >&2; exit 1; }
    if ! is_13_0 "$nvcc"; then
        echo "install-nvcc: $nvcc is not release 13.0:" >&2
        "$nvcc" --version >&2
        exit 1
    fi
fi
"$nvcc" --version | tail -n 2 >&2
# Absolute path, so the caller can export NVCC from it.
echo "$(cd "$(dirname "$nvcc")" && pwd)/nvcc"
