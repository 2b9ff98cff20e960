#!/usr/bin/env python3
"""CPU nearest-code search, vqx vs FAISS IndexFlatL2.search(x, 1), side by side in one run.

Not part of the build: FAISS is only the peer. Set up once with
    python3 -m venv /tmp/faissenv && /tmp/faissenv/bin/pip install faiss-cpu numpy
and run (after `cargo build --release`)
    /tmp/faissenv/bin/python scripts/compare_faiss.py [--vqx target/release/vqx] [--rounds 3]

For each shape both engines run on the same .npy files, alternating over several rounds so the
machine's noise hits both alike; the table reports medians and the ratio. vqx's time is its
`nearest` primitive alone, read from `vqx bench --input/--codebook --json`, which times the
same call FAISS makes (search of an in-memory matrix), not file I/O. Then the indices are
compared and every disagreement is settled with an exact f64 distance.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

import faiss
import numpy as np

# (N, D, K, shift): shift moves every value by a constant, so that ||x||² dwarfs the gaps
# between codes: the case where the expanded form ||x||² − 2x·c + ||c||² in f32 loses the
# winner and only a recheck can recover it.
SHAPES = [(65_536, 256, 4_096, 0.0), (65_536, 64, 1_024, 0.0), (65_536, 64, 1_024, 8.0)]


def time_faiss(x, c, reps):
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    index.search(x[:1024], 1)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _, i = index.search(x, 1)
        times.append(time.perf_counter() - t)
    return statistics.median(times), i[:, 0]


def time_vqx(vqx, xpath, cpath, reps, kernel="auto"):
    out = subprocess.run(
        [vqx, "bench", "--input", xpath, "--codebook", cpath, "--device", "cpu",
         "--cpu-kernel", kernel, "--reps", str(reps), "--json"],
        check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    prim = {p["name"]: p for p in report["results"][0]["primitives"]}
    return prim["nearest"]["ms"] / 1e3, report


def exact_d2(x, c):
    d = x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None, :, :]
    return (d * d).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vqx", default="target/release/vqx")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, d, k, shift in SHAPES:
            rng = np.random.default_rng(1234 + d)
            x = rng.standard_normal((n, d), dtype=np.float32) + np.float32(shift)
            c = rng.standard_normal((k, d), dtype=np.float32) + np.float32(shift)
            xp, cp, ip = (os.path.join(tmp, f) for f in ("x.npy", "c.npy", "i.npy"))
            np.save(xp, x)
            np.save(cp, c)
            tf, tv, tp = [], [], []
            for _ in range(args.rounds):
                t, fi = time_faiss(x, c, args.reps)
                tf.append(t)
                t, report = time_vqx(args.vqx, xp, cp, args.reps)
                tv.append(t)
                t, _ = time_vqx(args.vqx, xp, cp, args.reps, "portable")
                tp.append(t)
            subprocess.run([args.vqx, "quantize", "--codebook", cp, "--input", xp,
                            "--output", ip, "--device", "cpu"], check=True, capture_output=True)
            vi = np.load(ip)
            diff = np.nonzero(vi != fi)[0]
            vqx_right = faiss_right = ties = 0
            for r in diff:
                dd = exact_d2(x[r:r + 1], c)[0]
                dv, dfa = dd[vi[r]], dd[fi[r]]
                if dv < dfa:
                    vqx_right += 1
                elif dfa < dv:
                    faiss_right += 1
                else:
                    ties += 1
            flops = 2.0 * n * d * k
            row = dict(n=n, d=d, k=k, shift=shift, faiss_ms=1e3 * statistics.median(tf),
                       vqx_ms=1e3 * statistics.median(tv),
                       vqx_portable_ms=1e3 * statistics.median(tp),
                       vqx_backend=report["backend_description"],
                       faiss_gflops=flops / statistics.median(tf) / 1e9,
                       vqx_gflops=flops / statistics.median(tv) / 1e9,
                       disagreements=len(diff), vqx_exact_on=vqx_right,
                       faiss_exact_on=faiss_right, true_ties=ties)
            row["speedup"] = row["faiss_ms"] / row["vqx_ms"]
            rows.append(row)
    print(f"{'shape':>34} {'faiss ms':>9} {'vqx ms':>9} {'faiss GF/s':>10} {'vqx GF/s':>9} "
          f"{'vqx/faiss':>9} {'portable ms':>11} {'port/faiss':>10}  "
          f"disagreements (vqx right / faiss right / tie)")
    for r in rows:
        print(f"{'N=%d D=%d K=%d shift=%g' % (r['n'], r['d'], r['k'], r['shift']):>34} {r['faiss_ms']:9.1f} "
              f"{r['vqx_ms']:9.1f} {r['faiss_gflops']:10.1f} {r['vqx_gflops']:9.1f} "
              f"{r['speedup']:8.2f}x {r['vqx_portable_ms']:11.1f} "
              f"{r['faiss_ms'] / r['vqx_portable_ms']:9.2f}x  {r['disagreements']} ({r['vqx_exact_on']} / "
              f"{r['faiss_exact_on']} / {r['true_ties']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(faiss=faiss.__version__, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
