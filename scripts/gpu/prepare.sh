#!/usr/bin/env bash
# Run HERE (no GPU needed) before a GPU session: builds vqx with the CUDA kernels compiled in and
# packs what scripts/gpu/run.sh needs into gpu-out/ (git-ignored), which the device tool carries.
#
#   scripts/gpu/prepare.sh      # nvcc from $NVCC, else installed by .ci/install-nvcc.sh;
#                               # honours CARGO_TARGET_DIR (e.g. a separate dir for nvcc builds)
#
# gpu-out/ holds: vqx, tests/<test binaries> (debug info stripped to fit the 64 MiB carry
# limit), manifest.txt (commit, nvcc, binaries).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -z "${NVCC:-}" ]; then
    NVCC="$(.ci/install-nvcc.sh | tail -n 1)"
fi
export NVCC
export VQX_REQUIRE_NVCC=1   # a missing nvcc or a failed kernel compile is an error, not a warning

cargo build --release --bin vqx
json="$(mktemp)"
trap 'rm -f "$json"' EXIT
cargo test --release --no-run --message-format=json >"$json"

rm -rf gpu-out
mkdir -p gpu-out/tests
cp "${CARGO_TARGET_DIR:-target}/release/vqx" gpu-out/vqx
# Test executables: compiler artifacts built as tests (unit tests of the lib and bin, tests/*.rs).
python3 - "$json" <<'PY'
import json, shutil, sys, os
seen = set()
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m.get("profile", {}).get("test"):
        continue
    exe = m["executable"]
    kinds = "-".join(m["target"]["kind"])
    name = f'{kinds}-{m["target"]["name"]}'
    if name in seen:
        continue
    seen.add(name)
    shutil.copy2(exe, os.path.join("gpu-out", "tests", name))
    print(f"packed {name} <- {exe}")
PY

strip_tool="$(command -v strip || true)"
if [ -n "$strip_tool" ]; then
    "$strip_tool" --strip-debug gpu-out/vqx gpu-out/tests/*
fi

# Where the test binaries expect the crate and the vqx binary (env!("CARGO_MANIFEST_DIR"),
# env!("CARGO_BIN_EXE_vqx") are compiled in as absolute paths): run.sh recreates them.
echo "$PWD" >gpu-out/manifest_dir
(cd "${CARGO_TARGET_DIR:-target}" && echo "$PWD/release/vqx") >gpu-out/bin_path

{
    echo "commit: $(git rev-parse HEAD)$(git diff --quiet || echo ' (dirty tree)')"
    echo "nvcc: $NVCC"
    "$NVCC" --version | tail -n 2
    echo "binaries:"
    ls -l gpu-out/vqx gpu-out/tests/
} >gpu-out/manifest.txt
cat gpu-out/manifest.txt
du -sh gpu-out
