#!/usr/bin/env python3
"""Real text embeddings for `vqx fit` measurements: WordNet 3.0 glosses embedded by WordLlama.

Not part of the build. Everything comes from package registries, nothing from a model hub:

* corpus: WordNet 3.0's synsets (Debian package `wordnet-base`, files /usr/share/wordnet/data.*):
  one text per synset, "lemma, lemma: gloss" (the gloss with its quoted usage examples),
  117,659 texts of real English, read in a fixed order (noun, verb, adj, adv; file order);
* model: WordLlama `l2_supercat`, 256-D, whose weights and tokenizer ship inside the PyPI wheel
  `wordllama==0.4.0.post1` (wordllama/weights/, wordllama/tokenizers/). Its own `WordLlama.load()`
  looks for the tokenizer under `tokenizer/` (singular) and then tries Hugging Face, so the
  script builds the inference object from the two bundled files itself.

Set up once and run:

    apt-get install -y wordnet-base
    python3 -m venv /tmp/embenv && /tmp/embenv/bin/pip install wordllama==0.4.0.post1
    /tmp/embenv/bin/python scripts/make_embeddings.py --out /work/data/embeddings.npy

The output is f32, N x 256, C order, each row L2-normalised (as sentence-embedding models
return them; `--no-norm` keeps the raw mean-pooled vectors). The run is deterministic: the
same inputs give the same bytes (the script prints the file's SHA-256).
"""
import argparse, hashlib, os, sys, time
from pathlib import Path

# The bundled files are all we use; make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

POS_FILES = ["data.noun", "data.verb", "data.adj", "data.adv"]


def wordnet_texts(wn_dir):
    """One text per synset: its lemmas (underscores as spaces, adjective markers dropped) and gloss."""
    texts = []
    for name in POS_FILES:
        path = Path(wn_dir) / name
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                head, sep, gloss = line.partition(" | ")
                if not sep:
                    raise ValueError(f"{path}: a synset line without a gloss: {line[:80]!r}")
                fields = head.split()
                w_cnt = int(fields[3], 16)
                words = [w.split("(")[0].replace("_", " ") for w in fields[4:4 + 2 * w_cnt:2]]
                texts.append(f"{', '.join(words)}: {gloss.strip()}")
    return texts


def load_wordllama():
    import wordllama
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from wordllama.inference import WordLlamaInference

    root = Path(wordllama.__file__).parent
    weights = root / "weights" / "l2_supercat_256.safetensors"
    tok = root / "tokenizers" / "l2_supercat_tokenizer_config.json"
    for p in (weights, tok):
        if not p.exists():
            sys.exit(f"{p} is missing: install wordllama==0.4.0.post1 (its wheel bundles it)")
    with safe_open(str(weights), framework="np", device="cpu") as f:
        table = f.get_tensor("embedding.weight")
    return WordLlamaInference(table, Tokenizer.from_file(str(tok))), weights, table.shape


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    ap.add_argument("--out", default="/work/data/embeddings.npy")
    ap.add_argument("--texts-out", help="also write the texts, one a line, in row order")
    ap.add_argument("--no-norm", action="store_true", help="keep the raw mean-pooled vectors")
    ap.add_argument("--limit", type=int, help="embed only the first N texts")
    args = ap.parse_args()

    t0 = time.perf_counter()
    texts = wordnet_texts(args.wordnet_dir)
    if args.limit:
        texts = texts[:args.limit]
    print(f"corpus: {len(texts)} WordNet synset texts from {args.wordnet_dir}, "
          f"{len(set(texts))} distinct; e.g. {texts[len(texts) // 2]!r}")

    model, weights, shape = load_wordllama()
    print(f"model: WordLlama l2_supercat {shape[1]}-D ({shape[0]} tokens), {weights}")
    # A fixed batch size: padding is masked out, but keep the arithmetic order fixed anyway.
    x = model.embed(texts, norm=not args.no_norm, batch_size=64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        sys.exit(f"{len(bad)} rows are not finite (e.g. text {bad[0]}: {texts[bad[0]]!r})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x)
    if args.texts_out:
        Path(args.texts_out).write_text("".join(t.replace("\n", " ") + "\n" for t in texts),
                                        encoding="utf-8")
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    norms = np.linalg.norm(x, axis=1)
    print(f"wrote {out}: {x.shape[0]} x {x.shape[1]} f32, row norms {norms.min():.4f}..{norms.max():.4f}, "
          f"{len(np.unique(x, axis=0))} distinct rows, sha256 {digest}, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
