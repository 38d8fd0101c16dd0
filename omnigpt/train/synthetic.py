"""A small synthetic token corpus in the real shard format: tests and smoke runs of the trainer without sources.

Documents come from a per-source random first-order Markov chain over a few hundred ids (so there is something to
learn: the loss falls well below log(vocab)), each ending in EOT, written with `omnigpt.data.shards.ShardWriter`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from omnigpt.data.shards import ShardWriter, token_dtype, write_manifest


def markov_docs(n_docs: int, vocab: int, seed: int, min_len: int = 4, max_len: int = 80) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Each id has 3 likely successors: a peaked transition table.
    succ = rng.integers(1, vocab, size=(vocab, 3))
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(min_len, max_len))
        t = int(rng.integers(1, vocab))
        doc = [t]
        for _ in range(n - 1):
            t = int(succ[t, rng.integers(0, 3)]) if rng.random() < 0.9 else int(rng.integers(1, vocab))
            doc.append(t)
        docs.append(doc)
    return docs


def write_synthetic_corpus(out_dir: str | Path, sources: dict[str, int] | None = None, vocab: int = 256, eot_id: int = 0,
                           val_docs: int = 8, seed: int = 0) -> dict:
    """Write `<name>.train/.val` shards for each {name: train documents} and a manifest; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = sources or {"alpha": 200, "beta": 100}
    dtype = token_dtype(vocab)
    entries = {}
    for k, (name, n) in enumerate(sources.items()):
        docs = markov_docs(n + val_docs, vocab, seed=seed * 1000 + k)
        entries[name] = {}
        for split, part in (("train", docs[:n]), ("val", docs[n:])):
            w = ShardWriter(out / f"{name}.{split}", dtype, eot_id)
            for d in part:
                w.add(d, nbytes=len(d))
            entries[name][split] = w.close()
    manifest = {
        "format": 1,
        "tokenizer": {"spec": "synthetic", "vocab_size": vocab, "eot_id": eot_id, "sha256": f"synthetic-{vocab}"},
        "dtype": str(dtype),
        "sources": entries,
        "totals": {s: {k: sum(e[s][k] for e in entries.values()) for k in ("documents", "bytes", "tokens")} for s in ("train", "val")},
    }
    write_manifest(out, manifest)
    return manifest
