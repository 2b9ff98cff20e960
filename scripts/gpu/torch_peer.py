#!/usr/bin/env python3
"""PyTorch peer of `vqx bench --device cuda`: nearest-code search the way PyTorch users write it.

Two forms, on the SPEC §7 shapes, timed with CUDA events (median of --reps after one warm-up):
  cdist_f32     torch.cdist(x, C).argmin(1) in f32 (TF32 disabled, so exact-f32 like vqx);
  mm_bf16       ||c||² − 2·x·Cᵀ with x, C in bf16 (tensor cores, f32 product where torch.mm
                takes out_dtype), ||c||² in f32 added afterwards, then argmin.
N is processed in chunks whenever the N×K score matrix (plus temporaries) would not fit in a
quarter of the free GPU memory; the time reported covers all chunks. The agreement of mm_bf16's
argmin with cdist_f32's is reported on the first chunk.

    python3 scripts/gpu/torch_peer.py [--reps 5] [--json out.json] [--shapes N,D,K ...]
"""

import argparse
import json
import statistics
import sys

SHAPES = [(1_048_576, 256, 4096), (262_144, 128, 4096), (65_536, 64, 1024), (262_144, 8, 16_384)]


def parse_shape(s):
    n, d, k = (int(v) for v in s.split(","))
    return (n, d, k)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--shapes", nargs="*", type=parse_shape, default=SHAPES, help="N,D,K triples")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("torch_peer: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(args.seed)

    # bf16 operands with an f32 product (tensor cores accumulate in f32): torch.mm(out_dtype=)
    # where this PyTorch has it, else the bf16 product widened afterwards (8 fewer mantissa bits).
    a = torch.ones(2, 2, device=dev, dtype=torch.bfloat16)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        mm_out = "f32 (torch.mm out_dtype)"

        def mm_f32(xs, cs):
            return torch.mm(xs, cs, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        mm_out = "bf16, widened to f32 (no torch.mm out_dtype in this PyTorch)"

        def mm_f32(xs, cs):
            return torch.mm(xs, cs).float()

    def time_ms(fn):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(1, args.reps)):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    results = []
    for n, d, k in args.shapes:
        x = torch.randn(n, d, device=dev, generator=gen)
        c = torch.randn(k, d, device=dev, generator=gen)
        free, _total = torch.cuda.mem_get_info()
        # cdist output (f32) + two same-sized temporaries per row of the chunk.
        per_row = k * 4 * 3
        chunk = max(1, min(n, (free // 4) // per_row))
        out = torch.empty(n, dtype=torch.int64, device=dev)

        def cdist_f32():
            for s in range(0, n, chunk):
                torch.argmin(torch.cdist(x[s : s + chunk], c), dim=1, out=out[s : s + chunk])

        xb, cb = x.to(torch.bfloat16), c.to(torch.bfloat16)
        cn = (c * c).sum(dim=1)  # ||c||² in f32, kept out of the bf16 operands

        def mm_bf16():
            for s in range(0, n, chunk):
                scores = mm_f32(xb[s : s + chunk], cb.t()).mul_(-2.0).add_(cn)
                torch.argmin(scores, dim=1, out=out[s : s + chunk])

        flops = 2.0 * n * k * d
        row = {"n": n, "d": d, "k": k, "chunk_rows": chunk, "flops": flops}
        for name, fn in (("cdist_f32", cdist_f32), ("mm_bf16", mm_bf16)):
            try:
                ms = time_ms(fn)
                row[name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
            except RuntimeError as e:  # out of memory and the like: report, go on
                row[name] = {"error": str(e).splitlines()[0]}
                torch.cuda.empty_cache()
        # Agreement of the bf16 form with exact f32 on the first chunk.
        m = min(n, chunk)
        ref = torch.cdist(x[:m], c).argmin(dim=1)
        got = mm_f32(xb[:m], cb.t()).mul_(-2.0).add_(cn).argmin(dim=1)
        row["mm_bf16_agreement"] = (ref == got).float().mean().item()
        results.append(row)
        del x, c, xb, cb, out
        torch.cuda.empty_cache()

    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timed_with": "CUDA events, median of reps after one warm-up, all chunks included",
        "tf32": False,
        "mm_bf16_product": mm_out,
        "results": results,
    }

    def cell(r, key):
        v = r[key]
        return f'{v["ms"]:10.3f} {v["tflops"]:7.1f}' if "ms" in v else f'{"error":>18}'

    print(f'{report["device"]}, torch {report["torch"]}, CUDA {report["cuda"]}')
    print(f'{"N":>9} {"D":>5} {"K":>6} {"chunk":>8} | {"cdist f32 ms":>10} {"TF/s":>7} | '
          f'{"bf16 mm ms":>10} {"TF/s":>7} | bf16=f32')
    for r in results:
        print(f'{r["n"]:>9} {r["d"]:>5} {r["k"]:>6} {r["chunk_rows"]:>8} | {cell(r, "cdist_f32")} | '
              f'{cell(r, "mm_bf16")} | {r["mm_bf16_agreement"]:.4f}')
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
