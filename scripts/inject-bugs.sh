#!/usr/bin/env bash
# scripts/inject-bugs.sh [--list] [--check] [--report] [--plain-only] [--all-sanitizers]
#                         [--no-baseline] [MUTATION...]
#
# What the emulated CUDA device (cuda-emu) catches: each named mutation below is a 1–2 line bug
# put into one kernels/*.cu (or .cuh) file of a copy of the repository (git archive of HEAD in
# target/inject/tree, so the working tree is never touched), and the plain emulator suite runs
# on it:
#     cargo test --release --test cuda -- --skip ::gpu --test-threads=1 --nocapture
# A test failure or a crash (an emulator error, an abort, a signal) counts as caught; the first
# failing test and its message are recorded. The mutations the plain build missed then run under
# the sanitizer builds (VQX_EMU_SANITIZE=address,undefined, then thread; see
# scripts/sanitize.sh), on the tests of the mutated kernel only (the `tests` field below: the
# full suite under TSan takes ~5 min per mutation). A control run of the unmutated copy comes
# first for every build kind (--no-baseline skips it).
#
# One CARGO_TARGET_DIR (target/inject/target) for every mutation and build kind: a mutation or
# a change of VQX_EMU_SANITIZE reruns build.rs (C++ recompiled) and recompiles the crate, the
# dependencies are built once. Results: target/inject/results.json and results.md (the table of
# docs/emulator.md); logs: target/inject/logs/MUTATION.KIND.log.
#
# --list prints the mutations, --check applies each to the copy and prints its diff (no build),
# --report rewrites results.md from results.json and the logs (no run). --all-sanitizers runs
# the sanitizer builds on the mutations the plain build caught too.
# Env: INJECT_TIMEOUT_S (per run, default 1200), VQX_EMU_STALL_S (default here 60).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import json, os, re, shutil, subprocess, sys, time

ROOT = os.getcwd()
WORK = os.path.join(ROOT, "target", "inject")
TREE = os.path.join(WORK, "tree")
TARGET = os.path.join(WORK, "target")
LOGS = os.path.join(WORK, "logs")
TIMEOUT = int(os.environ.get("INJECT_TIMEOUT_S", "1200"))

NEAREST = ["nearest_l2_matches_cpu::emu", "nearest_ties_go_to_smallest_index::emu"]
TC = ["nearest_tf32_bf16_match_cpu_l2::emu"]

# name, file, what, [(old, new)], tests for the sanitizer runs. Each `old` must occur exactly
# once in the file; the edit must change it.
MUTATIONS = [
    ("nearest-no-barrier", "kernels/nearest.cu",
     "the __syncthreads() after staging a chunk removed",
     [("        store(buf);\n        __syncthreads();\n", "        store(buf);\n")], NEAREST),
    ("nearest-single-buffer", "kernels/nearest.cu",
     "single buffering: `buf ^= 1;` removed",
     [("        buf ^= 1;\n", "")], NEAREST),
    ("tc-a-fragment-swap", "kernels/nearest_tc.cu",
     "mma A fragment: a[1] and a[2] swapped",
     [("{r_lo[w0], r_hi[w0], r_lo[w0 + 4], r_hi[w0 + 4]}",
       "{r_lo[w0], r_lo[w0 + 4], r_hi[w0], r_hi[w0 + 4]}")], TC),
    ("tc-b-fragment-swap", "kernels/nearest_tc.cu",
     "mma B fragment: b0 and b1 swapped",
     [("                b[ni][0] = crow[w0];\n                b[ni][1] = crow[w0 + 4];\n",
       "                b[ni][0] = crow[w0 + 4];\n                b[ni][1] = crow[w0];\n")], TC),
    ("tc-bf16-halves", "kernels/nearest_tc.cu",
     "bf16 halves swapped: to_bf16x2(v[2j+1], v[2j])",
     [("to_bf16x2(v[2 * j], v[2 * j + 1])", "to_bf16x2(v[2 * j + 1], v[2 * j])")], TC),
    ("tie-merge-larger-index", "kernels/candidates.cuh",
     "merge_cand prefers the larger index on equal scores",
     [("(b.best == a.best && b.idx < a.idx)", "(b.best == a.best && b.idx > a.idx)")],
     NEAREST + TC),
    ("tie-epilogue-le", "kernels/candidates.cuh",
     "fold_score `s < bs` -> `s <= bs` (last of equal codes wins)",
     [("bi = (s < bs) ? kc : bi;", "bi = (s <= bs) ? kc : bi;")], NEAREST + TC),
    ("nearest-rows-guard", "kernels/nearest.cu",
     "loader reads rows beyond N (`r < rows_here` dropped)",
     [("xr[i] = (r < rows_here && col_ok) ?", "xr[i] = (col_ok) ?")], NEAREST),
    ("tc-rows-guard", "kernels/nearest_tc.cu",
     "loader reads rows beyond N (`lr < rows_here` -> true)",
     [("load_words<BF16>(xrow, lr < rows_here,", "load_words<BF16>(xrow, true,")], TC),
    ("nearest-codes-here-load", "kernels/nearest.cu",
     "off by one: the loader's codes_here is k - code0 + 1",
     [("const int codes_here = (int)min(k - code0, (long long)NEAREST_BN);",
       "const int codes_here = (int)min(k - code0 + 1, (long long)NEAREST_BN);")], NEAREST),
    ("nearest-codes-here-epilogue", "kernels/nearest.cu",
     "off by one: the epilogue's codes_here is k - code0 + 1",
     [("const int codes_here = (int)min(k - (long long)code0, (long long)NEAREST_BN);",
       "const int codes_here = (int)min(k - (long long)code0 + 1, (long long)NEAREST_BN);")],
     NEAREST),
    ("nearest-shuffle-skip-lane15", "kernels/nearest.cu",
     "the shuffle merge skipped for tx == 15",
     [("for (int off = 8; off > 0; off >>= 1) c =", "for (int off = 8; off > 0 && tx != 15; off >>= 1) c =")],
     NEAREST),
    ("tc-divergent-barrier", "kernels/nearest_tc.cu",
     "the final __syncthreads() only for tid < TC_BM",
     [("    __syncthreads();\n    // Then across the 4 code warps",
       "    if (tid < TC_BM) __syncthreads();\n    // Then across the 4 code warps")], TC),
    ("usage-plain-add", "kernels/usage.cu",
     "shared histogram: `atomicAdd(&hist[idx[i]], 1u)` -> `hist[idx[i]] += 1u`",
     [("atomicAdd(&hist[idx[i]], 1u);", "hist[idx[i]] += 1u;")], ["usage_matches_cpu::emu"]),
    ("usage-no-zero", "kernels/usage.cu",
     "the shared histogram is not zeroed",
     [("        for (unsigned int b = threadIdx.x; b < k; b += blockDim.x) hist[b] = 0u;\n", "")],
     ["usage_matches_cpu::emu"]),
    ("ema-plain-add", "kernels/ema.cu",
     "`atomicAdd(&sums[...], x[e])` -> plain `+=`",
     [("atomicAdd(&sums[(long long)code * d + col], x[e]);",
       "sums[(long long)code * d + col] += x[e];")], ["code_sums_fast_matches_cpu::emu"]),
    ("ema-sorted-counts-every-thread", "kernels/ema.cu",
     "sorted kernel: every thread writes counts[code] (not only thread 0)",
     [("        if (threadIdx.x == 0) counts[code] = (unsigned int)(end - begin);",
       "        counts[code] = (unsigned int)(end - begin);")],
     ["code_sums_deterministic_is_bit_identical::emu"]),
    # The grid-stride loop is written once (kernels/grid.cuh) for every element-wise kernel, so
    # these two break all of them; the sanitizer runs use gather's test.
    ("gather-stride-blockdim", "kernels/grid.cuh",
     "grid-stride loop with stride = blockDim.x",
     [("e##_stride = (long long)gridDim.x * blockDim.x,",
       "e##_stride = (long long)blockDim.x,")], ["gather_matches_cpu::emu"]),
    ("gather-start-no-blockidx", "kernels/grid.cuh",
     "grid-stride loop starting at threadIdx.x (blockIdx ignored)",
     [("e = (first) + (long long)blockIdx.x * blockDim.x + threadIdx.x;",
       "e = (first) + (long long)threadIdx.x;")], ["gather_matches_cpu::emu"]),
]
BY_NAME = {m[0]: m for m in MUTATIONS}
FILES = sorted({m[1] for m in MUTATIONS})

KINDS = {
    "plain": {},
    "address,undefined": {"VQX_EMU_SANITIZE": "address,undefined"},
    "thread": {"VQX_EMU_SANITIZE": "thread"},
}


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def runtime(lib):
    cxx = os.environ.get("CXX", "c++")
    return sh([cxx, f"-print-file-name={lib}"]).strip()


def kind_env(kind):
    env = dict(os.environ)
    env.pop("VQX_EMU_SANITIZE", None)
    env.update(KINDS[kind])
    env["CARGO_TARGET_DIR"] = TARGET
    env.setdefault("VQX_EMU_STALL_S", "60")
    # The same options as scripts/sanitize.sh.
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0:symbolize=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env["TSAN_OPTIONS"] = "halt_on_error=1:ignore_interceptors_accesses=1:second_deadlock_stack=1"
    libs = {"address,undefined": ["libasan.so", "libubsan.so"], "thread": ["libtsan.so"]}.get(kind)
    if libs:
        pre = ":".join(runtime(l) for l in libs)
        env["CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER"] = f"env LD_PRELOAD={pre}"
    return env


def prepare_tree():
    """A fresh copy of HEAD's tracked files (kept between runs so that its path, and with it
    the crate's fingerprints in TARGET, stays the same)."""
    head = sh(["git", "rev-parse", "HEAD"]).strip()
    if os.path.isdir(TREE):
        shutil.rmtree(TREE)
    os.makedirs(TREE)
    archive = subprocess.Popen(["git", "archive", "HEAD"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", TREE], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        sys.exit("git archive HEAD failed")
    pristine = {f: open(os.path.join(TREE, f)).read() for f in FILES}
    return head, pristine


def restore(pristine):
    for f, text in pristine.items():
        p = os.path.join(TREE, f)
        if open(p).read() != text:
            with open(p, "w") as fh:
                fh.write(text)


def apply(m, pristine):
    name, f, _, edits, _ = m
    text = pristine[f]
    for old, new in edits:
        n = text.count(old)
        assert n == 1, f"{name}: {old!r} occurs {n} times in {f} (want exactly 1)"
        text = text.replace(old, new)
    assert text != pristine[f], f"{name}: the mutation did not change {f}"
    with open(os.path.join(TREE, f), "w") as fh:
        fh.write(text)
    diff = subprocess.run(["diff", "-u", "--label", f"a/{f}", "--label", f"b/{f}", "-",
                           os.path.join(TREE, f)], input=pristine[f], text=True,
                          capture_output=True).stdout
    return diff


def summarize(out, rc):
    """(caught, how) from the output of one cargo test run (libtest with --test-threads=1
    --nocapture: each test's panic message is printed when it happens, so a later crash does
    not lose it)."""
    lines = out.splitlines()

    def short(s, n=240):
        s = re.sub(r"/\S*/(kernels|emu|tests|src)/", r"\1/", s.strip())
        return s if len(s) <= n else s[: n - 1] + "…"

    if "error: could not compile" in out or re.search(r"^error\[E", out, re.M):
        return None, "build failed: " + short(next((l for l in lines if l.startswith("error")), ""))
    san = next((l for l in lines if l.startswith("SUMMARY: ") and "Sanitizer" in l), None)
    ub = next((l for l in lines if "runtime error:" in l), None)
    watchdog = next((l for l in lines if l.startswith("vqx cuda-emu:")), None)
    failed, msgs, current, done = [], {}, None, True
    for i, l in enumerate(lines):
        m = re.match(r"^test (\S+) \.\.\. ?(.*)$", l)
        if m:
            # With --nocapture the verdict may follow the test's own output on later lines; a
            # crash leaves the line open (cargo then appends its "error: test failed").
            current, rest = m.group(1), m.group(2).strip()
            done = rest in ("ok", "FAILED") or rest.startswith("ignored")
            if rest == "FAILED":
                failed.append(current)
            continue
        if l.strip() in ("ok", "FAILED") and current and not done:
            done = True
            if l.strip() == "FAILED":
                failed.append(current)
            continue
        m = re.match(r"^thread '([^']+)'(?: \(\d+\))? panicked at .*:$", l)
        if m:
            name = m.group(1) if m.group(1) != "main" else current
            msg = next((x for x in lines[i + 1:i + 4] if x.strip()), "")
            msgs.setdefault(name, msg)
            if current:
                msgs.setdefault(current, msg)
    for t in failed:
        if t not in msgs:
            k = next((k for k, l in enumerate(lines) if l.startswith(f"---- {t} stdout ----")), None)
            if k is not None:
                msgs[t] = next((x for x in lines[k + 1:] if x.strip() and "panicked at" not in x), "")
    crash = None
    if rc != 0 and not re.search(r"^test result: FAILED", out, re.M):
        sig = next((l for l in lines if "process didn't exit successfully" in l), "")
        m = re.search(r"\((signal: \d+, [A-Z]+|exit status: \d+)", sig)
        what = "timeout" if rc == 124 else (m.group(1) if m else f"exit {rc}")
        crash = f"crash ({what}) in {current if not done else '?'}"
        if watchdog:
            crash += f": {short(watchdog)}"
    if san or ub:
        where = next((l for l in lines if re.search(r"kernels/\S+\.cuh?:\d+", l)), "")
        m = re.search(r"(kernels/\S+\.cuh?:\d+)", where)
        msg = short(ub) if ub else short(san)
        if m and m.group(1) not in msg:
            msg += f" (first kernel frame {m.group(1)})"
        return True, f"{current or '?'}: {msg}"
    if failed:
        # The first failing kernel test (`::emu`), else the first failing test.
        t = next((t for t in failed if t.endswith("::emu")), failed[0])
        others = [f.removesuffix("::emu") for f in failed if f != t]
        msg = msgs.get(t, "").strip().removeprefix("assertion `left == right` failed: ")
        m = re.search(r'msg: "(.*)" \}', msg)  # the emulator's error inside Error::Cuda
        if m:
            msg = "emulator: " + m.group(1)
        how = f"{t}: {short(msg.removeprefix(t + ': '), 170)}"
        if others:
            how += f" (+{len(others)} more failing tests)"
        if crash:
            how += f"; then {crash}"
        return True, how
    if crash:
        return True, crash
    if rc != 0:
        return True, f"exit {rc}"
    return False, "all tests passed"


def run(kind, tests, log):
    env = kind_env(kind)
    t0 = time.time()
    build = subprocess.run(["cargo", "test", "--release", "--test", "cuda", "--no-run"],
                           cwd=TREE, env=env, text=True, capture_output=True)
    t1 = time.time()
    cmd = ["timeout", str(TIMEOUT), "cargo", "test", "--release", "--test", "cuda", "--",
           "--skip", "::gpu", "--test-threads=1", "--nocapture"] + list(tests)
    if build.returncode != 0:
        with open(log, "w") as fh:
            fh.write(build.stdout + build.stderr)
        return None, "build failed (see log)", t1 - t0, 0.0
    p = subprocess.run(cmd, cwd=TREE, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    t2 = time.time()
    with open(log, "w") as fh:
        fh.write(f"$ VQX_EMU_SANITIZE={env.get('VQX_EMU_SANITIZE', '')} {' '.join(cmd)}\n")
        fh.write(p.stdout)
        fh.write(f"\n# inject-bugs: rc={p.returncode} build_s={t1 - t0:.0f} test_s={t2 - t1:.0f}\n")
    caught, how = summarize(p.stdout, p.returncode)
    return caught, how, t1 - t0, t2 - t1


def main(argv):
    plain_only = "--plain-only" in argv
    all_san = "--all-sanitizers" in argv
    baseline = "--no-baseline" not in argv
    names = [a for a in argv if not a.startswith("--")]
    if "--list" in argv:
        for m in MUTATIONS:
            print(f"{m[0]:32} {m[1]:24} {m[2]}")
        return 0
    for n in names:
        if n not in BY_NAME:
            sys.exit(f"unknown mutation {n} (--list)")
    chosen = [BY_NAME[n] for n in names] if names else MUTATIONS
    os.makedirs(LOGS, exist_ok=True)
    head, pristine = prepare_tree()
    # Every mutation applies to HEAD before anything runs.
    for m in chosen:
        apply(m, pristine)
    restore(pristine)
    if "--check" in argv:
        for m in chosen:
            print(apply(m, pristine))
            restore(pristine)
        return 0
    results = {"commit": head, "date": time.strftime("%Y-%m-%d"), "runs": {}, "mutations": []}

    def record(name, kind, caught, how, tb, tt):
        word = {True: "CAUGHT", False: "missed", None: "ERROR"}[caught]
        if name == "baseline":
            word = {True: "FAILS", False: "clean", None: "ERROR"}[caught]
        print(f"  {kind:18} {word:7}"
              f" build {tb:5.0f} s, tests {tt:5.0f} s  {how}", flush=True)
        return {"caught": caught, "how": how, "build_s": round(tb), "test_s": round(tt)}

    def control(kind, tests):
        """The unmutated copy under `kind`: it must pass, or the results mean nothing."""
        if not baseline:
            return True
        print(f"baseline (unmutated HEAD {head[:10]}), {kind}:", flush=True)
        caught, how, tb, tt = run(kind, tests, os.path.join(LOGS, f"baseline.{kind}.log"))
        results["runs"][f"baseline.{kind}"] = record("baseline", kind, caught, how, tb, tt)
        if caught is not False:
            print(f"the unmutated copy fails under {kind}: fix that first", file=sys.stderr)
            return False
        return True

    if not control("plain", []):
        return 1
    rows = []
    for m in chosen:
        name, f, what, _, san_tests = m
        print(f"{name} ({f}: {what})", flush=True)
        diff = apply(m, pristine)
        caught, how, tb, tt = run("plain", [], os.path.join(LOGS, f"{name}.plain.log"))
        row = {"name": name, "file": f, "what": what, "diff": diff,
               "plain": record(name, "plain", caught, how, tb, tt)}
        rows.append(row)
        restore(pristine)
    missed = [r for r in rows if r["plain"]["caught"] is False or all_san]
    if not plain_only and missed:
        for kind in ["address,undefined", "thread"]:
            if not control(kind, sorted({t for r in missed for t in BY_NAME[r["name"]][4]})):
                return 1
            for row in missed:
                m = BY_NAME[row["name"]]
                print(f"{row['name']} under {kind} ({' '.join(m[4])}):", flush=True)
                apply(m, pristine)
                caught, how, tb, tt = run(kind, m[4], os.path.join(LOGS, f"{row['name']}.{kind}.log"))
                row[kind] = record(row["name"], kind, caught, how, tb, tt)
                row[kind]["tests"] = m[4]
                restore(pristine)
    # A run of some mutations updates their rows of an earlier full run.
    path = os.path.join(WORK, "results.json")
    if names and os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)
        fresh = {r["name"]: r for r in rows}
        prev = {r["name"]: r for r in old.get("mutations", [])}
        prev.update(fresh)
        rows = [prev[m[0]] for m in MUTATIONS if m[0] in prev]
        old["runs"].update(results["runs"])
        results["runs"] = old["runs"]
        if old.get("commit") != head:
            results["commit"] = f"{old.get('commit')} (rerun of {', '.join(names)} at {head})"
    results["mutations"] = rows
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    write_report(results)
    return 0


def log_rc(text):
    """The exit status of a run from its log (trailer, else cargo's own lines)."""
    m = re.search(r"^# inject-bugs: rc=(\d+)", text, re.M)
    if m:
        return int(m.group(1))
    if "error: test failed" in text or "process didn't exit successfully" in text:
        return 101
    return 0 if re.search(r"^test result: ok\.", text, re.M) else 124


def reparse(results):
    """results.json's verdicts recomputed from the logs (after a change to summarize())."""
    for row in results["mutations"]:
        for kind in KINDS:
            r = row.get(kind)
            log = os.path.join(LOGS, f"{row['name']}.{kind}.log")
            if r is None or not os.path.exists(log):
                continue
            text = open(log).read()
            r["caught"], r["how"] = summarize(text, log_rc(text))
    return results


def write_report(results):
    rows = results["mutations"]

    def cell(r):
        if r is None:
            return "—"
        mark = {True: "**caught**", False: "missed", None: "error"}[r["caught"]]
        return f"{mark}: {r['how']}".replace("|", "\\|")
    md = ["| mutation | file | change | plain | ASan+UBSan | TSan |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| `{r['name']}` | {r['file']} | {r['what'].replace('|', '/')} | {cell(r['plain'])}"
                  f" | {cell(r.get('address,undefined'))} | {cell(r.get('thread'))} |")
    plain = sum(1 for r in rows if r["plain"]["caught"])
    san = sum(1 for r in rows if not r["plain"]["caught"] and
              (r.get("address,undefined", {}).get("caught") or r.get("thread", {}).get("caught")))
    md.append("")
    md.append(f"{len(rows)} mutations: plain build caught {plain}; of the {len(rows) - plain} it "
              f"missed, the sanitizer builds caught {san}.")
    with open(os.path.join(WORK, "results.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))


if "--report" in sys.argv[1:]:
    # Only the table again, from target/inject/results.json and the logs.
    with open(os.path.join(WORK, "results.json")) as fh:
        res = reparse(json.load(fh))
    with open(os.path.join(WORK, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    write_report(res)
    sys.exit(0)
sys.exit(main(sys.argv[1:]))
PY
