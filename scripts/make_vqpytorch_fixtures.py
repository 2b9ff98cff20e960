#!/usr/bin/env python3
"""Fixtures from the real vector-quantize-pytorch, for vqx's interop and EMA tests.

Made with (and recorded in each file's safetensors metadata):
    torch 2.15.0 (the PyPI wheel, +cu132, run on the CPU), vector-quantize-pytorch 1.32.0, safetensors 0.8.0, numpy 2.4.6,
    Python 3.11.
Set up with:
    python3 -m venv /tmp/vqenv
    /tmp/vqenv/bin/pip install torch vector-quantize-pytorch safetensors numpy
    /tmp/vqenv/bin/python scripts/make_vqpytorch_fixtures.py

Builds a small EMA `VectorQuantize` (dim 16, 32 codes, decay 0.9, commitment weight 0.25,
no k-means init, no dead-code expiry, plain straight-through estimator instead of the default
rotation trick), runs it in training mode for 3 steps on fixed 64×16 batches, and writes:

tests/data/vqpytorch_ema.safetensors
    before.<key>       the state dict before training (`_codebook.embed` (1,32,16),
                       `_codebook.cluster_size` (1,32), `_codebook.embed_avg` (1,32,16),
                       `_codebook.initted` (bool scalar))
    batch.{i}          the input of step i, (64,16) f32 (fed as (1,64,16))
    indices.{i}        the indices returned at step i, (64,) int64
    quantize.{i}       the quantized output of step i, (64,16) f32
    loss.{i}           the returned loss (commitment term × 0.25), scalar f32
    upstream.{i}       a fixed gradient G of the output: the backward pass is run on
                       sum(quantize · G) + loss
    grad.{i}           the resulting gradient with respect to batch.{i}, (64,16) f32
    after.{i}.<key>    the state dict after step i
    eval.x, eval.indices   as in the state file below
tests/data/vqpytorch_cosine.safetensors
    the same keys (no eval.*) for 5 steps of the layer with use_cosine_sim=True (see `cosine`)
tests/data/vqpytorch_state.safetensors
    the final state dict alone (what users have: the `_codebook.*` keys), plus
    eval.x (40,16) f32 and eval.indices (40,) int64: the eval-mode quantization of a test
    batch by the final codebook.

The metadata of both files records the library versions and the constructor arguments.
The script also checks a plain numpy float32 re-implementation of the EMA step against the
library (docs/interop.md says what it does) and prints the largest difference.
"""

import json
import os
import platform
import sys

import numpy as np
import safetensors
import torch
import vector_quantize_pytorch
from safetensors.torch import save_file
from vector_quantize_pytorch import VectorQuantize

try:
    from importlib.metadata import version as pkg_version
except ImportError:  # pragma: no cover
    pkg_version = None

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")

DIM, K, STEPS, ROWS, EVAL_ROWS = 16, 32, 3, 64, 40
KWARGS = dict(
    dim=DIM,
    codebook_size=K,
    decay=0.9,
    commitment_weight=0.25,
    kmeans_init=False,
    threshold_ema_dead_code=0,
    rotation_trick=False,  # plain straight-through estimator (SPEC §2's default)
)


def versions():
    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    try:
        v["vector_quantize_pytorch"] = pkg_version("vector-quantize-pytorch")
    except Exception:
        v["vector_quantize_pytorch"] = getattr(vector_quantize_pytorch, "__version__", "unknown")
    return v


def state(vq, prefix=""):
    return {prefix + k: v.detach().clone().contiguous() for k, v in vq.state_dict().items()}


def fma(a, b, c):
    """a·b + c rounded once to float32 (exact in float64 for float32 inputs)."""
    return (np.float64(a) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def numpy_ema_step(embed, cluster_size, embed_avg, x, decay, eps):
    """One training step of vq-pytorch's EMA codebook in numpy float32 (H = 1 squeezed).

    Written to reproduce the library bit for bit at these sizes: torch.lerp_ with a weight below
    0.5 computes fma(w, new - old, old); the sums over rows and over codes are plain sequential
    float32 sums (true of torch's CPU kernels at 64 rows and 32 codes, not promised beyond).
    """
    f32 = np.float32
    # assignment with the OLD codebook: argmax of -sqrt(clamp(|x|² + |c|² - 2 x·c, 1e-8))
    x2 = (x * x).sum(-1, keepdims=True)
    c2 = (embed * embed).sum(-1)[None, :]
    d = np.sqrt(np.maximum(x2 + c2 - f32(2) * (x @ embed.T), f32(1e-8)))
    idx = np.argmax(-d, axis=-1)  # first maximum on ties, like torch.argmax
    q = embed[idx]
    n = np.zeros(embed.shape[0], dtype=f32)
    s = np.zeros_like(embed)
    for row, k in enumerate(idx):  # in row order, one float32 add at a time
        n[k] += f32(1)
        s[k] += x[row]
    w = f32(1.0 - decay)  # Python computes 1 - decay in double; torch rounds it to float32
    cluster_size = fma(w, n - cluster_size, cluster_size)
    embed_avg = fma(w, s - embed_avg, embed_avg)
    total = f32(0)
    for v in cluster_size:
        total = f32(total + v)
    smoothed = (cluster_size + f32(eps)) / (total + f32(len(cluster_size) * eps)) * total
    embed = embed_avg / smoothed[:, None]
    out = x + (q - x)  # the straight-through output's value, rounded as torch rounds it
    return idx, out, embed, cluster_size, embed_avg


def metadata(generator, kwargs, data_seed):
    """A fixture's safetensors metadata: versions, constructor arguments and seeds."""
    return {
        "generator": generator,
        "versions": json.dumps(versions()),
        "vector_quantize_kwargs": json.dumps(kwargs),
        "torch_seed": "0",
        "data_seed": str(data_seed),
    }


def train_step(vq, fx, i, b, g):
    """Training step i of `vq` on batch b, backward on sum(output · g) + loss; records the
    step's keys in fx and returns (output, indices)."""
    x = b.clone().unsqueeze(0).requires_grad_(True)
    quantize, indices, loss = vq(x)
    (quantize * g.unsqueeze(0)).sum().add(loss).backward()
    fx[f"batch.{i}"] = b.contiguous()
    fx[f"indices.{i}"] = indices[0].to(torch.int64).contiguous()
    fx[f"quantize.{i}"] = quantize[0].detach().contiguous()
    fx[f"loss.{i}"] = loss.detach().reshape(()).contiguous()
    fx[f"upstream.{i}"] = g.contiguous()
    fx[f"grad.{i}"] = x.grad[0].contiguous()
    fx.update(state(vq, f"after.{i}."))
    return quantize, indices


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    vq = VectorQuantize(**KWARGS)
    vq.train()

    gen = torch.Generator().manual_seed(1234)
    # Inputs at the scale of the kaiming-uniform codebook (|c_kj| <= sqrt(6/(K·D)) ≈ 0.108), so
    # that several codes are used and others are not (their counts decay, smoothing matters).
    batches = [torch.randn(ROWS, DIM, generator=gen) * 0.08 for _ in range(STEPS)]
    upstreams = [torch.randn(ROWS, DIM, generator=gen) for _ in range(STEPS)]

    fx = state(vq, "before.")
    worst = 0.0
    for i, (b, g) in enumerate(zip(batches, upstreams)):
        before = {k: v.numpy()[0] if v.ndim > 1 else v.numpy() for k, v in state(vq).items()}
        quantize, indices = train_step(vq, fx, i, b, g)

        # the numpy re-implementation, from the state before this step
        idx, q, emb, cs, ea = numpy_ema_step(
            before["_codebook.embed"], before["_codebook.cluster_size"],
            before["_codebook.embed_avg"], b.numpy(), KWARGS["decay"], 1e-5)
        assert (idx == indices[0].numpy()).all(), f"step {i}: numpy indices differ"
        after = state(vq)
        for name, mine in [("embed", emb), ("cluster_size", cs), ("embed_avg", ea)]:
            theirs = after[f"_codebook.{name}"].numpy()[0]
            worst = max(worst, float(np.abs(theirs - mine).max()))
        worst = max(worst, float(np.abs(quantize[0].detach().numpy() - q).max()))
    # 0 means bit for bit: indices, output, counts, sums and codebook after every step
    print(f"numpy float32 re-implementation vs vq-pytorch: max |diff| over 3 steps = {worst:.3g}")

    vq.eval()
    eval_x = torch.randn(EVAL_ROWS, DIM, generator=gen) * 0.08
    with torch.no_grad():
        _, eval_idx, _ = vq(eval_x.unsqueeze(0))
    fx["eval.x"] = eval_x.contiguous()
    fx["eval.indices"] = eval_idx[0].to(torch.int64).contiguous()

    meta = metadata("scripts/make_vqpytorch_fixtures.py", KWARGS, 1234)
    os.makedirs(OUT, exist_ok=True)
    save_file(fx, os.path.join(OUT, "vqpytorch_ema.safetensors"), metadata=meta)
    final = state(vq)
    final["eval.x"] = fx["eval.x"]
    final["eval.indices"] = fx["eval.indices"]
    save_file(final, os.path.join(OUT, "vqpytorch_state.safetensors"), metadata=meta)
    for name in ["vqpytorch_ema.safetensors", "vqpytorch_state.safetensors"]:
        p = os.path.join(OUT, name)
        print(f"{p}: {os.path.getsize(p)} bytes")
    print("state dict keys:", sorted(state(vq)))
    print("usage per step:", [np.bincount(fx[f"indices.{i}"].numpy(), minlength=K).tolist() for i in range(STEPS)])
    print("versions:", versions())
    cosine()


COSINE_STEPS = 5
COSINE_KWARGS = dict(KWARGS, use_cosine_sim=True)


def cosine():
    """The cosine fixture: the same layer with `use_cosine_sim=True`, 5 training steps.

    tests/data/vqpytorch_cosine.safetensors has the layout of vqpytorch_ema.safetensors (before.*,
    batch.{i}, indices.{i}, quantize.{i}, loss.{i}, upstream.{i}, grad.{i}, after.{i}.*; no eval
    keys). The rows' norms vary (0.02 to 2), so that summing raw rows into the EMA statistics
    (vqx before it followed the library) and summing the normalised rows (the library, spherical
    k-means) give different codebooks.
    """
    torch.manual_seed(0)
    vq = VectorQuantize(**COSINE_KWARGS)
    vq.train()
    gen = torch.Generator().manual_seed(4321)
    # Clustered directions (8 centres in 16-D) so that codes are shared by several rows.
    centres = torch.randn(8, DIM, generator=gen)
    fx = state(vq, "before.")
    for i in range(COSINE_STEPS):
        pick = torch.randint(0, 8, (ROWS,), generator=gen)
        rows = centres[pick] + 0.6 * torch.randn(ROWS, DIM, generator=gen)
        scale = torch.exp(torch.empty(ROWS, 1).uniform_(np.log(0.02), np.log(2.0), generator=gen))
        b = (rows * scale).contiguous()
        g = torch.randn(ROWS, DIM, generator=gen)
        train_step(vq, fx, i, b, g)
    meta = metadata("scripts/make_vqpytorch_fixtures.py (cosine)", COSINE_KWARGS, 4321)
    p = os.path.join(OUT, "vqpytorch_cosine.safetensors")
    save_file(fx, p, metadata=meta)
    print(f"{p}: {os.path.getsize(p)} bytes")
    print("cosine usage per step:", [np.bincount(fx[f"indices.{i}"].numpy(), minlength=K).tolist() for i in range(COSINE_STEPS)])


if __name__ == "__main__":
    sys.exit(main())
