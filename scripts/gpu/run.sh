#!/usr/bin/env bash
# Run ON a lent GPU machine, from the repository root, with gpu-out/ (from scripts/gpu/prepare.sh)
# carried along. No Rust toolchain is needed there. Results go under $OUT (the device tool's
# folder that comes back), or ./gpu-results when OUT is unset.
#
#   1. environment: nvidia-smi, libcuda, `vqx info --json`;
#   2. every test binary with VQX_REQUIRE_GPU=1 (a missing device fails instead of skipping);
#   3. `vqx bench --device cuda --json` on the SPEC §7 shapes, L2 and cosine; then per precision
#      (exact, tf32, bf16: issue 6) kernel and end-to-end times with the recheck, on random and
#      clustered data;
#   4. the PyTorch peer (torch.cdist + argmin in f32, and the bf16 expanded matmul form).
# Each step is logged and its exit status recorded in $OUT/summary.txt; a failing step does not
# stop the later ones.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"

step() { # step NAME LOGFILE TIMEOUT_S CMD...
    local name="$1" log="$2" limit="$3"
    shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    echo "$name rc=$rc ($((SECONDS - t0)) s) log=$(basename "$log")" | tee -a "$summary"
    return 0
}

{
    date -u
    nvidia-smi || true
    echo "--- libcuda"
    ldconfig -p | grep libcuda || echo "libcuda NOT in the ldconfig cache"
    echo "--- manifest"
    cat gpu-out/manifest.txt 2>/dev/null || echo "gpu-out/manifest.txt missing: run scripts/gpu/prepare.sh"
} >"$OUT/env.txt" 2>&1

# The test binaries name the crate directory and the vqx binary by the absolute paths they had
# where they were built; recreate both here (a disposable machine) so path-based tests can run.
if [ -f gpu-out/manifest_dir ]; then
    built_dir="$(cat gpu-out/manifest_dir)"
    if [ ! -e "$built_dir" ] && [ "$built_dir" != "$PWD" ]; then
        mkdir -p "$(dirname "$built_dir")" 2>/dev/null && ln -s "$PWD" "$built_dir" 2>/dev/null ||
            echo "note: could not link $built_dir -> $PWD (path-based tests may fail)" >>"$summary"
    fi
fi
if [ -f gpu-out/bin_path ]; then
    bin_path="$(cat gpu-out/bin_path)"
    if [ ! -x "$bin_path" ]; then
        mkdir -p "$(dirname "$bin_path")" 2>/dev/null && cp gpu-out/vqx "$bin_path" 2>/dev/null ||
            echo "note: could not place vqx at $bin_path (CLI tests may fail)" >>"$summary"
    fi
fi

step info "$OUT/info.json" 60 gpu-out/vqx info --json

for t in gpu-out/tests/*; do
    [ -x "$t" ] || continue
    name="$(basename "$t")"
    VQX_REQUIRE_GPU=1 step "test:$name" "$OUT/test-$name.txt" 300 "$t"
done

step bench-l2 "$OUT/bench-cuda-l2.log" 300 \
    gpu-out/vqx bench --device cuda --json --output "$OUT/bench-cuda-l2.json"
step bench-cosine "$OUT/bench-cuda-cosine.log" 300 \
    gpu-out/vqx bench --device cuda --metric cosine --json --output "$OUT/bench-cuda-cosine.json"

# Issue 6: the tensor-core kernels. Kernel time (CUDA events) and `nearest` end to end with
# its exact recheck, per precision, on SPEC §7's shapes with N capped at 65,536 (on uniform
# random data bf16 rechecks 37-81% of rows on the host, tf32 4-15%: docs/gpu.md), then on
# clustered data (codes + noise, like a trained codebook: ~0% rechecked).
for shape in "65536 256 4096" "65536 128 4096" "65536 64 1024" "65536 8 16384"; do
    set -- $shape
    for p in exact tf32 bf16; do
        step "bench-$p-$1x$2x$3" "$OUT/bench-$p-$1x$2x$3.log" 300 \
            gpu-out/vqx bench --device cuda --precision "$p" --n "$1" --dim "$2" \
            --codebook-size "$3" --reps 3 --json --output "$OUT/bench-$p-$1x$2x$3.json"
    done
done
step clustered-data "$OUT/clustered-data.log" 120 python3 - "$OUT" <<'PY'
import sys, numpy as np
out = sys.argv[1]
rng = np.random.default_rng(7)
c = rng.uniform(-1, 1, (4096, 256)).astype(np.float32)
x = c[rng.integers(0, 4096, 262144)] + rng.uniform(-0.1, 0.1, (262144, 256)).astype(np.float32)
np.save(f"{out}/clustered_c.npy", c)
np.save(f"{out}/clustered_x.npy", x.astype(np.float32))
PY
for p in exact tf32 bf16; do
    step "bench-$p-clustered" "$OUT/bench-$p-clustered.log" 300 \
        gpu-out/vqx bench --device cuda --precision "$p" --input "$OUT/clustered_x.npy" \
        --codebook "$OUT/clustered_c.npy" --reps 3 --json --output "$OUT/bench-$p-clustered.json"
done
rm -f "$OUT/clustered_x.npy" "$OUT/clustered_c.npy"

step torch-peer "$OUT/torch_peer.log" 300 \
    python3 scripts/gpu/torch_peer.py --json "$OUT/torch_peer.json"

echo "--- summary"
cat "$summary"
