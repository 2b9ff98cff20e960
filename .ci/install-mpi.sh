#!/usr/bin/env bash
# Installs what the cargo features `mpi` and `nccl` need to build and test: OpenMPI (headers,
# library, mpirun) and libclang (rsmpi's bindgen). Debian/Ubuntu, apt-get; as root or with sudo.
#
#   .ci/install-mpi.sh
#
# Idempotent: nothing is installed when mpirun, the MPI headers (mpicc --showme works) and
# libclang are already present. NCCL needs nothing more to build: cudarc loads libcuda and
# libnccl at run time.
set -euo pipefail

have_libclang() {
    # bindgen finds libclang.so (any version) through ldconfig or LIBCLANG_PATH.
    [ -n "${LIBCLANG_PATH:-}" ] && ls "$LIBCLANG_PATH"/libclang*.so* >/dev/null 2>&1 && return 0
    ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'
}

have_mpi() {
    command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 \
        && mpicc --showme:compile >/dev/null 2>&1
}

if have_mpi && have_libclang; then
    echo "MPI and libclang already installed: $(mpirun --version 2>/dev/null | head -n 1)" >&2
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-mpi: not root and no sudo" >&2; exit 1; }
    sudo="sudo"
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    libopenmpi-dev openmpi-bin libclang-dev >&2
have_mpi || { echo "install-mpi: mpirun or mpicc still missing after install" >&2; exit 1; }
have_libclang || { echo "install-mpi: libclang still missing after install" >&2; exit 1; }
echo "installed: $(mpirun --version | head -n 1)" >&2
