#!/usr/bin/env python3
"""`vqx train` against PyTorch + vector-quantize-pytorch on the CPU: step time, side by side.

The same MLP VQ-VAE both ways: encoder Linear(D, h1) GELU(tanh) ... Linear(., code_dim), a
vector quantizer (K codes, EMA codebook with decay 0.99, commitment weight 0.25; vqx seeds
its codebook from the first batch, vector-quantize-pytorch starts from random codes), the mirrored decoder; loss = MSE(reconstruction) + commitment;
AdamW (betas 0.9, 0.95, weight decay 0.05 on the linear weights only), global-norm clipping
at 1.0, linear warm-up then cosine learning rate; batches drawn from a Gaussian-mixture data set
of 16384 rows. Both sides run on the same number of threads (torch.set_num_threads and
RAYON_NUM_THREADS), --threads 1 --threads 2 for both counts.

Timing: PyTorch's mean wall time per step over --steps steps after --warmup untimed ones;
vqx's mean `step_seconds` from its metrics.jsonl over the same steps (the first --warmup
left out), next to summary.json's `mean_step_ms` (which leaves out only the first step).

torch and vector-quantize-pytorch are not project dependencies: install them in a venv, e.g.

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch vector-quantize-pytorch numpy
    cargo build --release
    /tmp/torchenv/bin/python scripts/compare_train.py --hidden 256,256 --hidden 1024,1024

Prints a Markdown table; --json writes the numbers too.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vqx", default="target/release/vqx", help="the vqx binary")
    p.add_argument("--hidden", action="append", help="hidden widths, e.g. 256,256 (repeatable)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--code-dim", type=int, default=8)
    p.add_argument("--codebook-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--steps", type=int, default=150, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    p.add_argument("--threads", type=int, action="append", help="threads per side (repeatable; default 2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=1, help="runs per side; the best is kept")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args()


def gmm(rows, dim, components=64, std=0.1, seed=0):
    """A Gaussian mixture like `--synthetic gmm` (same shape and scale, not the same numbers)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(components, dim, generator=g)
    which = torch.randint(0, components, (rows,), generator=g)
    return centres[which] + std * torch.randn(rows, dim, generator=g)


def torch_ms_per_step(args, hidden, threads):
    import torch
    from torch import nn
    from vector_quantize_pytorch import VectorQuantize

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def mlp(dims):
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU(approximate="tanh"))
        return nn.Sequential(*layers)

    enc = mlp([args.dim, *hidden, args.code_dim])
    dec = mlp([args.code_dim, *reversed(hidden), args.dim])
    vq = VectorQuantize(
        dim=args.code_dim,
        codebook_size=args.codebook_size,
        decay=0.99,
        commitment_weight=0.25,
    )
    params = list(enc.parameters()) + list(dec.parameters())
    decay = [p for p in params if p.dim() == 2]
    no_decay = [p for p in params if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    total = args.warmup + args.steps
    warm = max(1, total // 20)

    def lr_factor(step):
        if step < warm:
            return (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total - warm - 1))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    data = gmm(args.rows, args.dim)
    enc.train(), dec.train(), vq.train()
    perm = torch.randperm(args.rows)
    at = 0
    times = []
    for step in range(total):
        t0 = time.perf_counter()
        if at + args.batch_size > args.rows:
            perm, at = torch.randperm(args.rows), 0
        x = data[perm[at : at + args.batch_size]]
        at += args.batch_size
        e = enc(x)
        q, _, commit = vq(e)
        y = dec(q)
        loss = nn.functional.mse_loss(y, x) + commit.sum()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    return 1e3 * sum(timed) / len(timed), loss.item()


def vqx_ms_per_step(args, hidden, threads):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        cmd = [
            args.vqx,
            "train",
            "--synthetic",
            f"gmm:dim={args.dim}",
            "--rows",
            str(args.rows),
            "--hidden",
            ",".join(map(str, hidden)),
            "--code-dim",
            str(args.code_dim),
            "--codebook-size",
            str(args.codebook_size),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.warmup + args.steps),
            "--lr",
            str(args.lr),
            "--device",
            "cpu",
            "--eval-every",
            "0",
            "--checkpoint-every",
            "0",
            "--output",
            out,
        ]
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        steps = []
        with open(os.path.join(out, "metrics.jsonl")) as f:
            for line in f:
                m = json.loads(line)
                if "step_seconds" in m:
                    steps.append(m)
        timed = steps[args.warmup :]
        ms = 1e3 * sum(m["step_seconds"] for m in timed) / len(timed)
        phases = {}
        for m in timed:
            for k, v in (m.get("phases") or {}).items():
                phases[k] = phases.get(k, 0.0) + 1e3 * v / len(timed)
        return ms, summary["mean_step_ms"], phases, steps[-1]["loss"]


def main():
    args = parse_args()
    hiddens = [tuple(int(w) for w in h.split(",")) for h in (args.hidden or ["256,256"])]
    if not os.path.exists(args.vqx):
        sys.exit(f"{args.vqx} not found: cargo build --release first, or pass --vqx")
    import torch

    threads = args.threads or [2]
    rows = []
    for n in threads:
        for hidden in hiddens:
            # Alternate the two sides, keep each one's best run (the machine may be shared).
            t, v = None, None
            for _ in range(args.repeats):
                r = torch_ms_per_step(args, hidden, n)
                t = r if t is None or r[0] < t[0] else t
                r = vqx_ms_per_step(args, hidden, n)
                v = r if v is None or r[0] < v[0] else v
            rows.append(
                {
                    "threads": n,
                    "hidden": list(hidden),
                    "torch_ms": t[0],
                    "torch_last_loss": t[1],
                    "vqx_ms": v[0],
                    "vqx_summary_mean_ms": v[1],
                    "vqx_phases_ms": v[2],
                    "vqx_last_loss": v[3],
                    "speedup": t[0] / v[0],
                }
            )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"D = {args.dim}, code dim {args.code_dim}, K = {args.codebook_size}, batch "
        f"{args.batch_size}, {args.steps} timed steps after {args.warmup}, best of "
        f"{args.repeats}; torch {torch.__version__}; load average {load:.1f} at the end"
    )
    print()
    print(
        "| threads | hidden | PyTorch + vector-quantize-pytorch ms/step | vqx train ms/step "
        "| vqx speed-up |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        h = "-".join(map(str, r["hidden"]))
        print(
            f"| {r['threads']} | {h} | {r['torch_ms']:.2f} | {r['vqx_ms']:.2f} "
            f"| {r['speedup']:.2f}x |"
        )
    print()
    for r in rows:
        h = "-".join(map(str, r["hidden"]))
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["vqx_phases_ms"].items()))
        print(f"vqx phases, {r['threads']} threads, {h} (ms/step): {parts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
