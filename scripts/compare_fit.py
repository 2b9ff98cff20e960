#!/usr/bin/env python3
"""`vqx fit` vs FAISS k-means on the same vectors, side by side in one run (issue 13).

Not part of the build: FAISS is only the peer. Set up once with
    python3 -m venv /tmp/faissenv && /tmp/faissenv/bin/pip install faiss-cpu numpy safetensors
and run (after `cargo build --release` and scripts/make_embeddings.py)
    /tmp/faissenv/bin/python scripts/compare_fit.py --input /work/data/embeddings.npy \
        [--rows N] [--ks 256,1024,4096] [--rounds 3] [--vqx-args "--steps 25 ..."] [--json OUT]

For each K both engines run as child processes on the same .npy file and are timed whole, from
the process's start to its exit: interpreter or binary start, reading the .npy, initialisation,
training, writing the result. The engines alternate within each round (the order flips every
round) so the machine's noise hits both alike; the table reports medians over the rounds.

* FAISS: `faiss.Kmeans(d, K, niter=25, seed=SEED).train(x)` with FAISS's other defaults (so
  it trains on a sample of 256·K rows when N is larger, as a user calling it plainly gets);
  the child saves the centroids.
* vqx: `vqx fit --input X --codebook-size K --output CKPT.safetensors` plus --vqx-args
  (default: the issue's `--steps 25 --batch-size N --init kmeans`); the codebook is read back
  from the checkpoint's `codebook` tensor.

Both are then scored the same way, here: the mean over all N rows of the squared L2 distance
to the nearest centroid, in f64. The nearest centroid is found with an f32 matmul, keeping
every code whose f32 score lies within a bound of f32 rounding error of the row's best, and
each candidate's distance is recomputed exactly in f64 as sum((x - c)^2); so the minimum is
the exact one. The first block is also checked against a plain f64 computation.

Besides the whole-process time, the last column gives when vqx first held a codebook as good
as FAISS's: vqx writes per-pass metrics (`--metrics`), each pass's error is that of the
codebook the pass started from, so the first full pass whose error is at most FAISS's leaves a
codebook at least that good; the column is the whole-process time less the passes after it
(what `vqx fit --max-passes P` with that P would take). It is not the issue's measure, which
is the whole time of a run stopped by vqx's own rule (`--tol`).
"""
import argparse, json, os, shlex, statistics, subprocess, sys, tempfile, time

# The parent scores each codebook with numpy between the timed runs, and OpenBLAS's worker
# threads spin on for a while after every call, on the cores the next timed child then runs
# on (measured on 2 cores: `vqx fit` on 20,000 rows took 30-50 ms longer right after a matmul
# than after a pause). So the parent's BLAS runs on its own thread (no workers to spin), and
# the children get the environment as it was.
CHILD_ENV = dict(os.environ)
if "--faiss-child" not in sys.argv:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

import numpy as np

SEED = 1234
F32_EPS = float(np.finfo(np.float32).eps)


def nearest_sq_dist(x, c, block=2048):
    """Exact (f64) squared distance of each row of x to its nearest row of c."""
    c64 = c.astype(np.float64)
    c32 = np.ascontiguousarray(c, dtype=np.float32)
    cn = (c64 * c64).sum(1)
    cn32 = cn.astype(np.float32)
    cmax = float(np.sqrt(cn.max()))
    d = x.shape[1]
    out = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], block):
        xb = np.ascontiguousarray(x[s:s + block], dtype=np.float32)
        xb64 = xb.astype(np.float64)
        # Score ||c||² − 2 x·c, whose argmin is the nearest code. Its f32 error is at most
        # about (d + 2)·ε·(2‖x‖‖c‖ + ‖c‖²) (the dot product's worst-case bound, plus the
        # norm); codes within twice that of the best are candidates for the true minimum.
        scores = cn32[None, :] - 2.0 * (xb @ c32.T)
        xn = np.sqrt((xb64 * xb64).sum(1))
        bound = (d + 2) * F32_EPS * (2.0 * xn * cmax + cmax * cmax)
        best = scores.min(1).astype(np.float64)
        rows, cols = np.nonzero(scores <= (best + 2.0 * bound + 1e-30)[:, None])
        diff = xb64[rows] - c64[cols]
        dist = np.einsum("ij,ij->i", diff, diff)
        # np.nonzero lists the candidates row by row, each row at least once (its f32 best).
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        out[s:s + xb.shape[0]] = np.minimum.reduceat(dist, starts)
        if s == 0:
            ref = plain_f64(xb64[:256], c64)
            if not np.allclose(out[:len(ref)], ref, rtol=1e-12, atol=1e-12):
                raise AssertionError("candidate search disagrees with the plain f64 computation")
    return out


def plain_f64(x64, c64):
    """Nearest squared distance by brute force in f64, for the self-check."""
    best = np.full(x64.shape[0], np.inf)
    for s in range(0, c64.shape[0], 256):
        cb = c64[s:s + 256]
        best = np.minimum(best, ((x64[:, None, :] - cb[None, :, :]) ** 2).sum(-1).min(1))
    return best


def faiss_child(xpath, k, niter, seed, out):
    """Runs in the child process: everything FAISS's whole time covers."""
    import faiss
    x = np.load(xpath)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed)
    km.train(x)
    np.save(out, km.centroids)
    # FAISS's own objective: the sum of squared distances over the rows it trained on.
    json.dump(dict(obj=float(km.obj[-1]), faiss=faiss.__version__,
                   threads=faiss.omp_get_max_threads(),
                   trained_rows=min(x.shape[0], k * km.cp.max_points_per_centroid)),
              open(out + ".json", "w"))


def run_timed(cmd, log, timeout):
    """Wall seconds and CPU seconds (user + sys) of one child process, from spawn to exit.

    The CPU time tells a slow run on a busy machine (wall >> CPU / cores) from a slow engine.
    (Its ru_maxrss is not reported: Linux carries the forking parent's peak across exec.)
    """
    with open(log, "w") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=CHILD_ENV)
        while True:
            # os.wait4, not p.wait: it also returns the child's own resource usage.
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                p.kill()
                os.wait4(p.pid, 0)
                raise SystemExit(f"timed out after {timeout} s: {shlex.join(cmd)}")
            time.sleep(0.002)
        wall = time.perf_counter() - t0
    p.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"exit {code}: {shlex.join(cmd)}\n{open(log).read()[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime


def read_codebook(path, k, d):
    from safetensors import safe_open
    with safe_open(path, framework="np") as f:
        keys = list(f.keys())
        names = [n for n in keys if n == "codebook" or n.endswith(".codebook")]
        if not names:
            names = [n for n in keys if f.get_slice(n).get_shape() == [k, d]]
        if not names:
            raise SystemExit(f"{path}: no {k}x{d} codebook among {keys}")
        c = f.get_tensor(names[0])
    if c.shape != (k, d):
        raise SystemExit(f"{path}: codebook {names[0]} is {c.shape}, expected {(k, d)}")
    return c


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default="/work/data/embeddings.npy")
    ap.add_argument("--rows", type=int, help="use only the first N rows")
    ap.add_argument("--ks", default="256,1024,4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--niter", type=int, default=25, help="FAISS k-means iterations")
    ap.add_argument("--vqx", default="target/release/vqx")
    ap.add_argument("--vqx-args", default="--steps 25 --batch-size {N} --init kmeans",
                    help="extra `vqx fit` arguments; {N} is replaced by the row count")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--faiss-child", nargs=4, metavar=("X", "K", "NITER", "OUT"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.faiss_child:
        xp, k, niter, out = args.faiss_child
        faiss_child(xp, int(k), int(niter), SEED, out)
        return 0

    vqx = os.path.abspath(args.vqx)
    ks = [int(k) for k in args.ks.split(",")]
    x = np.load(args.input, mmap_mode="r")
    if x.ndim != 2 or x.dtype != np.float32:
        raise SystemExit(f"{args.input}: need an N x D f32 matrix, got {x.shape} {x.dtype}")
    n = min(args.rows or x.shape[0], x.shape[0])
    d = x.shape[1]
    vqx_args = shlex.split(args.vqx_args.replace("{N}", str(n)))
    info = dict(input=os.path.abspath(args.input), n=n, d=d, rounds=args.rounds,
                niter=args.niter, vqx_args=vqx_args, seed=SEED, machine=machine())
    print(f"{n} x {d} rows of {args.input}; {info['machine']['cores']} cores, "
          f"{info['machine']['cpu']}; vqx fit {shlex.join(vqx_args)}; "
          f"faiss.Kmeans(niter={args.niter}, seed={SEED}); {args.rounds} rounds", flush=True)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # Both engines read the same file: the first n rows, written once, outside the timing.
        xpath = args.input
        if n < x.shape[0]:
            xpath = os.path.join(tmp, "x.npy")
            np.save(xpath, np.ascontiguousarray(x[:n]))
        xs = np.ascontiguousarray(np.load(xpath))
        for k in ks:
            runs = dict(faiss=[], vqx=[])
            for r in range(args.rounds):
                order = ("faiss", "vqx") if r % 2 == 0 else ("vqx", "faiss")
                for eng in order:
                    if eng == "faiss":
                        out = os.path.join(tmp, f"faiss-{k}-{r}.npy")
                        cmd = [sys.executable, os.path.abspath(__file__), "--faiss-child",
                               xpath, str(k), str(args.niter), out]
                        wall, cpu = run_timed(cmd, out + ".log", args.timeout)
                        c = np.load(out)
                        extra = json.load(open(out + ".json"))
                    else:
                        out = os.path.join(tmp, f"vqx-{k}-{r}.safetensors")
                        cmd = [vqx, "fit", "--input", xpath, "--codebook-size", str(k),
                               "--output", out, "--metrics", out + ".jsonl", *vqx_args]
                        wall, cpu = run_timed(cmd, out + ".log", args.timeout)
                        c = read_codebook(out, k, d)
                        passes = [json.loads(l) for l in open(out + ".jsonl") if l.strip()]
                        extra = dict(log=open(out + ".log").read().strip()[-400:],
                                     passes=[dict(pass_=p.get("pass"), sample=p.get("sample"),
                                                  error=p.get("error"),
                                                  elapsed_s=p.get("elapsed_s"))
                                             for p in passes if "error" in p])
                    err = float(nearest_sq_dist(xs, c).mean())
                    runs[eng].append(dict(round=r, seconds=wall, cpu_seconds=cpu, error=err,
                                          **extra))
                    print(f"  K={k} round {r} {eng:5}: {wall:8.2f} s wall, {cpu:8.2f} s CPU, "
                          f"error {err:.6f}", flush=True)
                    # Written after every run, so a run cut short still leaves its numbers.
                    save(args.json, info, results + [dict(k=k, runs=runs, partial=True)])
            row = dict(k=k, runs=runs)
            for eng in ("faiss", "vqx"):
                row[f"{eng}_seconds"] = statistics.median(u["seconds"] for u in runs[eng])
                row[f"{eng}_cpu_seconds"] = statistics.median(u["cpu_seconds"] for u in runs[eng])
                row[f"{eng}_error"] = statistics.median(u["error"] for u in runs[eng])
            # When vqx first held a codebook as good as FAISS's: a pass's error is that of the
            # codebook it started from, so at the end of the first full pass whose error is at
            # most FAISS's, the codebook it leaves is at least as good. The time is the whole
            # process's, less the passes after that one.
            reach = []
            for u in runs["vqx"]:
                full = [p for p in u.get("passes", []) if not p["sample"]]
                hit = next((p for p in full if p["error"] <= row["faiss_error"]), None)
                if hit is not None and full:
                    reach.append(u["seconds"] - (full[-1]["elapsed_s"] - hit["elapsed_s"]))
            row["vqx_seconds_to_faiss_error"] = statistics.median(reach) if reach else None
            row["error_ratio"] = row["vqx_error"] / row["faiss_error"]
            row["time_ratio"] = row["vqx_seconds"] / row["faiss_seconds"]
            row["meets_issue_13"] = row["error_ratio"] <= 1.0 and row["time_ratio"] <= 0.5
            results.append(row)

    print()
    print(f"{'K':>5} {'error vqx':>10} {'error FAISS':>11} {'vqx/FAISS':>9} "
          f"{'time vqx s':>10} {'time FAISS s':>12} {'vqx/FAISS':>9}  issue 13 (err<=1, time<=0.5)"
          f"  vqx s to FAISS's error (ratio)")
    for r in results:
        t = r["vqx_seconds_to_faiss_error"]
        reach = "never" if t is None else f"{t:.2f} ({t / r['faiss_seconds']:.3f})"
        print(f"{r['k']:>5} {r['vqx_error']:10.5f} {r['faiss_error']:11.5f} {r['error_ratio']:9.4f} "
              f"{r['vqx_seconds']:10.2f} {r['faiss_seconds']:12.2f} {r['time_ratio']:9.3f}  "
              f"{'met' if r['meets_issue_13'] else 'not met':29}  {reach}")
    save(args.json, info, results)
    return 0


def save(path, info, results):
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(dict(info, results=results), f, indent=2)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
