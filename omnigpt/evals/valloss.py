"""Validation loss (nats per token) and bits per byte, per corpus source, from a corpus directory's val split.

Bits per byte = (summed loss in nats / ln 2) / UTF-8 bytes of the text scored; it compares models with different
tokenizers. Local models score the shard tokens directly (packed rows, attention kept inside each document as in
training). The bytes come from the manifest (`bytes` of the val split), scaled by the fraction of the split's
tokens scored when `max_tokens` caps the pass. A model behind an API scores the decoded text of each document
(its own tokenization), so only its bits per byte are comparable.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def val_sources(corpus_dir: str | Path, sources: list[str] | None = None) -> list:
    from omnigpt.data.packing import ShardSource
    from omnigpt.data.shards import open_shards, read_manifest

    manifest = read_manifest(corpus_dir)
    names = [s for s, e in manifest["sources"].items() if "val" in e and e["val"]["tokens"] > 1 and (not sources or s in sources)]
    if not names:
        raise ValueError(f"{corpus_dir}: no source has a validation split")
    return [ShardSource(n, r) for n, r in open_shards(corpus_dir, "val", sources=names).items()]


@torch.no_grad()
def source_loss(model, source, *, seq_len: int = 256, batch_size: int = 16, max_tokens: int | None = None,
                device=None) -> tuple[float, int]:
    """(summed nats, number of targets) over one source's val documents in stored order."""
    from omnigpt.data.packing import IGNORE, eval_batches

    device = device or model.head_weight().device
    max_batches = None if max_tokens is None else max(1, -(-max_tokens // (seq_len * batch_size)))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(source, seq_len, batch_size, max_batches=max_batches):
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch.inputs, doc_ids_BT=batch.doc_ids, pos_BT=batch.pos).logits
        total += float(F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="sum"))
        count += int((batch.targets != IGNORE).sum())
    model.train(was_training)
    return total, count


def corpus_val_loss(model, corpus_dir: str | Path, *, seq_len: int = 256, batch_size: int = 16,
                    max_tokens: int | None = None, sources: list[str] | None = None) -> dict:
    """{"sources": {name: {"loss", "bpb", "tokens"}}, "loss": token-weighted mean, "bpb": over all bytes}."""
    from omnigpt.data.shards import read_manifest

    manifest = read_manifest(corpus_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if vocab > model.cfg.vocab_size:
        raise ValueError(f"the corpus tokenizer has {vocab} ids, the model's vocabulary only {model.cfg.vocab_size}")
    out, nats, targets, nbytes = {}, 0.0, 0, 0.0
    for src in val_sources(corpus_dir, sources):
        s, n = source_loss(model, src, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
        entry = manifest["sources"][src.name]["val"]
        b = entry["bytes"] * min(1.0, (n + 1) / max(1, entry["tokens"]))  # a full pass scores tokens - 1 targets
        out[src.name] = {"loss": s / max(n, 1), "bpb": s / math.log(2) / max(b, 1), "tokens": n}
        nats, targets, nbytes = nats + s, targets + n, nbytes + b
    return {"sources": out, "loss": nats / max(targets, 1), "bpb": nats / math.log(2) / max(nbytes, 1), "tokens": targets}


def api_val_bpb(lm, corpus_dir: str | Path, *, max_docs: int = 50, sources: list[str] | None = None) -> dict:
    """Bits per byte of a served model on the decoded text of (up to max_docs per source) val documents."""
    from omnigpt.data.shards import load_corpus_tokenizer

    tok = load_corpus_tokenizer(corpus_dir)
    out, nats, nbytes = {}, 0.0, 0
    for src in val_sources(corpus_dir, sources):
        s, b = 0.0, 0
        for i in range(min(len(src), max_docs)):
            ids = [int(t) for t in src.doc(i) if int(t) != int(tok.eot_id)]
            text = tok.decode(ids)
            if len(text) < 2:
                continue
            lp, _ = lm.text_logprob(text)
            s, b = s - lp, b + len(text.encode("utf-8"))
        out[src.name] = {"bpb": s / math.log(2) / max(b, 1), "bytes": b}
        nats, nbytes = nats + s, nbytes + b
    return {"sources": out, "bpb": nats / math.log(2) / max(nbytes, 1)}
