#!/usr/bin/env bash
# scripts/sanitize.sh [address|undefined|address,undefined|thread|all] [-- TEST ARGS...]
#
# Builds the emulated CUDA device (cuda-emu) with a sanitizer and runs the kernel tests on it:
# every kernels/*.cu (and emu/runtime.cpp, except under TSan) compiled with -fsanitize=KIND by
# build.rs (VQX_EMU_SANITIZE), then the device tests (`--test cuda --test device ...`, see
# SANITIZE_TESTS below) with `-- --skip ::gpu`.
# Only the C++ is instrumented; the Rust code (tests, launch layer, CPU twins) is not.
#
#   all (default)      address, undefined and thread, one after another
#   address            AddressSanitizer: out-of-bounds device buffers (each is its own heap
#                      allocation of exactly its size), past the dynamic shared memory a launch
#                      asked for, fiber stacks (the runtime tells ASan about every fiber switch)
#   undefined          UBSan: misaligned float4/uint4 loads, signed overflow, bad shifts, ...
#   address,undefined  both in one build (what scripts/inject-bugs.sh uses)
#   thread             ThreadSanitizer: each CUDA thread is a TSan fiber, __syncthreads and the
#                      warp collectives are release/acquire; races between threads of a block
#                      between barriers and between blocks on different OS threads are reported
#
# Each kind builds into its own CARGO_TARGET_DIR (target/sanitize-KIND) so that normal builds
# are not invalidated; the first build of a kind compiles every dependency (minutes), later ones
# only the emulator and the crate. Arguments after `--` replace the test arguments (default:
# `--skip ::gpu`), e.g. `scripts/sanitize.sh thread -- nearest_l2`. Env:
#   SANITIZE_TESTS   cargo test target selection (default: every device test file)
#   ASAN_OPTIONS, UBSAN_OPTIONS, TSAN_OPTIONS   appended to this script's defaults
#
# Prints one summary line per kind and exits non-zero when any kind failed. Logs:
# target/sanitize-KIND/sanitize.log.
set -uo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

kinds_arg=${1:-all}
shift || true
test_args=(--skip ::gpu)
if [[ ${1:-} == -- ]]; then
    shift
    test_args=("$@")
fi
read -r -a test_sel <<<"${SANITIZE_TESTS:---test cuda --test device --test device_sort --test device_step --test device_quantizer --test device_mlp --test device_optim --test train_device}"

case $kinds_arg in
    all) kinds=(address undefined thread) ;;
    address | undefined | thread | address,undefined | undefined,address) kinds=("$kinds_arg") ;;
    *)
        echo "usage: $0 [address|undefined|address,undefined|thread|all] [-- TEST ARGS...]" >&2
        exit 2
        ;;
esac

cxx=${CXX:-c++}
runtime_of() { # the shared runtime library of one sanitizer
    local lib
    case $1 in
        address) lib=libasan.so ;;
        undefined) lib=libubsan.so ;;
        thread) lib=libtsan.so ;;
    esac
    "$cxx" -print-file-name="$lib"
}

# Defaults: stop at the first report; Rust's allocations are not the subject (no leak check).
asan_opts="detect_leaks=0:halt_on_error=1:abort_on_error=0:symbolize=1"
ubsan_opts="print_stacktrace=1:halt_on_error=1"
# ignore_interceptors_accesses: the Rust side is not instrumented, so its synchronisation
# (futexes, atomics) is invisible to TSan, while its malloc/free/memcpy go through TSan's
# interceptors: without this every rayon job and Box drop is a "race". The instrumented C++
# (kernels) is checked in full, and mutexes/thread creation are still tracked.
tsan_opts="halt_on_error=1:ignore_interceptors_accesses=1:second_deadlock_stack=1"
user_asan=${ASAN_OPTIONS:-} user_ubsan=${UBSAN_OPTIONS:-} user_tsan=${TSAN_OPTIONS:-}

summaries=()
status=0
for kind in "${kinds[@]}"; do
    dir_kind=${kind//,/-}
    target="$root/target/sanitize-$dir_kind"
    mkdir -p "$target"
    log="$target/sanitize.log"
    : >"$log"
    preload=""
    IFS=, read -r -a parts <<<"$kind"
    for p in "${parts[@]}"; do
        preload="${preload:+$preload }$(runtime_of "$p")"
    done
    # A runner: the test executable (and the vqx binary a test spawns: LD_PRELOAD is inherited)
    # gets the runtime preloaded, ahead of libc, whatever the link order.
    runner="env LD_PRELOAD=${preload// /:}"
    export VQX_EMU_SANITIZE=$kind CARGO_TARGET_DIR=$target
    export ASAN_OPTIONS="$asan_opts${user_asan:+:$user_asan}"
    export UBSAN_OPTIONS="$ubsan_opts${user_ubsan:+:$user_ubsan}"
    export TSAN_OPTIONS="$tsan_opts${user_tsan:+:$user_tsan}"

    echo "== sanitize $kind: building (CARGO_TARGET_DIR=target/sanitize-$dir_kind)" | tee -a "$log"
    t0=$(date +%s)
    if ! cargo test --release "${test_sel[@]}" --no-run >>"$log" 2>&1; then
        t1=$(date +%s)
        line="sanitize $kind: BUILD FAILED after $((t1 - t0)) s (see $log)"
        tail -20 "$log"
        summaries+=("$line")
        status=1
        continue
    fi
    t1=$(date +%s)
    echo "== sanitize $kind: cargo test --release ${test_sel[*]} -- ${test_args[*]}" | tee -a "$log"
    run() {
        CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$1" \
            cargo test --release "${test_sel[@]}" -- "${test_args[@]}" >>"$log" 2>&1
    }
    run "$runner"
    rc=$?
    if [[ $kind == thread && $rc != 0 ]] && grep -q "unexpected memory mapping" "$log"; then
        # Older TSan runtimes cannot cope with the kernel's mmap randomisation.
        echo "== sanitize $kind: TSan refused the memory layout; again under setarch -R" | tee -a "$log"
        run "setarch $(uname -m) -R $runner"
        rc=$?
    fi
    t2=$(date +%s)
    results=$(grep -E "^test result:" "$log" | tail -1)
    passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$results")
    report=$(grep -m1 -E "^SUMMARY: [A-Za-z]+Sanitizer|runtime error:|ERROR: AddressSanitizer|WARNING: ThreadSanitizer" "$log")
    if [[ $rc == 0 && -z $report ]]; then
        line="sanitize $kind: PASS (${passed:-?} tests passed; build $((t1 - t0)) s, tests $((t2 - t1)) s)"
    else
        status=1
        failed=$(grep -m1 -E "^test .* FAILED$|^---- .* stdout ----" "$log")
        line="sanitize $kind: FAIL (exit $rc; build $((t1 - t0)) s, tests $((t2 - t1)) s): ${report:-${failed:-see $log}}"
    fi
    echo "$line" | tee -a "$log"
    summaries+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summaries[@]}"
exit $status
