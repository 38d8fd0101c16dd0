"""Build a pretraining corpus end to end:

    sources ─▶ clean ─▶ exact + near dedup ─▶ train/val split ─▶ tokenizer (given, or trained on a
    sample) ─▶ token shards ─▶ manifest.json

Cleaning and MinHash run in worker processes (the costly, per-document part); dedup and the split
are global and cheap; tokenization uses the tokenizer's own parallel batch encoder. Documents of
earlier sources win ties, so the order of `sources` is part of the corpus definition.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from omnigpt.data import clean
from omnigpt.data.shards import FORMAT_VERSION, MANIFEST, ShardWriter, read_manifest, token_dtype, tokenizer_info, write_manifest
from omnigpt.data.sources import Source, folder_source, get_sources

SPLITS = ("train", "val")


@dataclass
class BuildSettings:
    val_fraction: float = 0.005
    min_val_docs: int = 4  # per source (at most half of it), so every source has a validation loss
    near_dup_threshold: float = 0.8  # estimated Jaccard of 5-word shingle sets
    num_perm: int = 128
    bands: int = 16
    shingle: int = 5
    max_docs_per_source: int | None = None  # the first N raw documents of each source (quick builds)
    tokenizer_sample_bytes: int = 40_000_000  # text given to BPE training for "train:N", split over sources
    chunk_docs: int = 2000  # documents per worker task...
    chunk_chars: int = 1_000_000  # ...or characters


@dataclass
class SourceDocs:
    """One source's documents after cleaning, with their dedup keys and MinHash signatures."""
    source: Source
    texts: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    sig: np.ndarray | None = None
    read: int = 0  # raw documents read
    empty: int = 0  # empty after cleaning
    exact_dups: int = 0
    near_dups: int = 0
    val: np.ndarray | None = None  # per kept document


def workers_available() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _prepare_chunk(args: tuple[list[str], str, int, int]) -> tuple[int, list[str], list[bytes], np.ndarray]:
    """Worker: clean a chunk of raw documents, drop the empty ones, key and sign the rest."""
    raw, markup, num_perm, shingle = args
    texts = [t for t in (clean.clean_document(r, markup) for r in raw) if t.strip()]
    sig = clean.minhash_signatures(texts, num_perm=num_perm, shingle=shingle)
    return len(raw), texts, [clean.doc_key(t) for t in texts], sig


def _chunks(docs: Iterator[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Worker tasks: at most max_docs documents or about max_chars characters (a few long documents,
    such as whole plays, still spread over the workers)."""
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if len(chunk) >= max_docs or size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def prepare_source(source: Source, settings: BuildSettings, mapper: Callable = map) -> SourceDocs:
    """Read, clean, key and sign one source (`mapper`: `map`, or a process pool's `map`)."""
    out = SourceDocs(source)
    docs = islice(source.read(), settings.max_docs_per_source)
    tasks = ((c, source.markup, settings.num_perm, settings.shingle)
             for c in _chunks(docs, settings.chunk_docs, settings.chunk_chars))
    sigs = [np.zeros((0, settings.num_perm), np.uint32)]
    with tqdm(desc=f"clean {source.name}", unit=" docs", file=sys.stderr, leave=False, mininterval=2) as bar:
        for n_raw, texts, keys, sig in mapper(_prepare_chunk, tasks):
            out.read += n_raw
            out.empty += n_raw - len(texts)
            out.texts += texts
            out.keys += keys
            sigs.append(sig)
            bar.update(n_raw)
    out.sig = np.concatenate(sigs)
    return out


def dedup_and_split(prepared: list[SourceDocs], settings: BuildSettings) -> None:
    """Drop exact and near duplicates across all sources (earlier copy wins), then split each
    source into train/val. Updates `prepared` in place."""
    keys = [k for p in prepared for k in p.keys]
    exact = clean.exact_duplicates(keys)
    near = clean.near_duplicates(np.concatenate([p.sig for p in prepared]), bands=settings.bands,
                                 threshold=settings.near_dup_threshold, skip=exact)
    start = 0
    for p in prepared:
        stop = start + len(p.texts)
        e, n = exact[start:stop], near[start:stop]
        keep = ~(e | n)
        p.exact_dups, p.near_dups = int(e.sum()), int((n & ~e).sum())
        p.texts = [t for t, k in zip(p.texts, keep) if k]
        p.keys = [key for key, k in zip(p.keys, keep) if k]
        p.sig = None  # no longer needed; frees N x num_perm
        p.val = clean.val_mask(p.keys, settings.val_fraction, settings.min_val_docs)
        start = stop


def train_tokenizer(prepared: list[SourceDocs], vocab_size: int, out_dir: Path, sample_bytes: int, log=print):
    """Byte-level BPE trained on a sample of the *training* documents (never validation text), an
    equal byte budget per source so that the big dictionaries do not own the vocabulary; documents
    are taken in hash order, a deterministic pseudo-random sample. Saved to out_dir/tokenizer."""
    from omnigpt.tokenizer.text import train_bpe

    budget = sample_bytes // max(len(prepared), 1)
    with tempfile.TemporaryDirectory() as tmp:
        files, total = [], 0
        for i, p in enumerate(prepared):
            train = [j for j in np.argsort(p.keys) if not p.val[j]] if p.keys else []
            path, used = Path(tmp, f"{i}.txt"), 0
            with path.open("w", encoding="utf-8") as f:
                for j in train:
                    if used >= budget:
                        break
                    f.write(p.texts[j] + "\n\n")
                    used += len(p.texts[j].encode()) + 2
            if used:
                files.append(str(path))
                total += used
        log(f"training a byte-level BPE of vocab {vocab_size} on {total / 1e6:.1f} MB of training text")
        t0 = time.time()
        tok = train_bpe(files, vocab_size)
    tok.save(str(out_dir / "tokenizer"))
    log(f"tokenizer trained in {time.time() - t0:.1f}s, saved to {out_dir / 'tokenizer'}")
    return tok


def parse_tokenizer_spec(spec: str):
    """Check the --tokenizer spec before the long cleaning stage: returns the vocab size to train
    ("train:N") or the loaded tokenizer."""
    from omnigpt.tokenizer.text import N_SPECIAL, load_tokenizer

    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"--tokenizer {spec}: expected train:N with N an integer vocab size") from None
        if vocab < 256 + N_SPECIAL + 1:
            raise ValueError(f"--tokenizer {spec}: the vocab must exceed 256 bytes + {N_SPECIAL} special tokens")
        return vocab
    return load_tokenizer(spec)


def write_shards(prepared: list[SourceDocs], tok, out_dir: Path, workers: int) -> dict:
    """Tokenize every source's train and val documents into shards; returns the manifest's
    per-source entries."""
    dtype = token_dtype(max(tok.vocab_size, tok.eot_id + 1))
    total = sum(len(t.encode()) for p in prepared for t in p.texts)
    entries = {}
    with tqdm(total=total, desc="tokenize", unit="B", unit_scale=True, file=sys.stderr, mininterval=2) as bar:
        for p in prepared:
            entry = {"markup": p.source.markup, "read": p.read, "empty": p.empty,
                     "exact_dups": p.exact_dups, "near_dups": p.near_dups}
            for split in SPLITS:
                want_val = split == "val"
                texts = [t for t, v in zip(p.texts, p.val) if v == want_val]
                writer = ShardWriter(out_dir / f"{p.source.name}.{split}", dtype, tok.eot_id)
                for batch in _chunks(iter(texts), 1024, 4_000_000):
                    nbytes = [len(t.encode()) for t in batch]
                    for n, ids in zip(nbytes, tok.encode_batch(batch, num_threads=workers)):
                        writer.add(ids, n)
                    bar.update(sum(nbytes))
                entry[split] = writer.close()
            entries[p.source.name] = entry
    return entries


def _remove_old_shards(out_dir: Path) -> None:
    """A rebuild replaces the previous corpus: its manifest goes first (so the directory never
    claims shards it no longer has), then the shard files it listed."""
    if not (out_dir / MANIFEST).exists():
        return
    try:
        old = read_manifest(out_dir)
    except ValueError:
        return
    (out_dir / MANIFEST).unlink()
    for entry in old.get("sources", {}).values():
        for split in SPLITS:
            for ext in ("bin", "idx"):
                name = entry.get(split, {}).get(ext)
                if name and "/" not in name:
                    (out_dir / name).unlink(missing_ok=True)


def resolve_sources(names: list[str] | None, inputs: list[str]) -> list[Source]:
    """Built-in sources (all present ones when `names` is None and no inputs are given; none when
    only inputs are given), then one folder source per input path."""
    if names is None:
        builtin = [] if inputs else [s for s in get_sources() if s.present()]
    else:
        builtin = get_sources(names)
        missing = [s.name for s in builtin if not s.present()]
        if missing:
            raise ValueError(f"source(s) not installed: {', '.join(missing)} (run `omnigpt data sources --install`)")
    sources, taken = list(builtin), {s.name for s in builtin}
    for path in inputs:
        s = folder_source(path)
        name, i = s.name, 2
        while name in taken:  # two folders called "data": data, data_2
            name, i = f"{s.name}_{i}", i + 1
        taken.add(name)
        sources.append(replace(s, name=name))
    if not sources:
        raise ValueError("no sources: none is installed (run `omnigpt data sources --install`) and no --input given")
    return sources


def build_corpus(out_dir: str | Path, tokenizer: str, sources: list[str] | None = None, inputs: list[str] = (),
                 settings: BuildSettings | None = None, workers: int | None = None, log=print) -> dict:
    """Build the corpus into `out_dir`; returns its manifest. See the module docstring."""
    settings = settings or BuildSettings()
    workers = workers or workers_available()
    out_dir = Path(out_dir)
    chosen = resolve_sources(sources, list(inputs))
    tok = parse_tokenizer_spec(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # 1. clean + sign, in worker processes (spawned: no forked tokenizer threads or torch state)
    prepared = []
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
    try:
        for s in chosen:
            t0 = time.time()
            p = prepare_source(s, settings, pool.map if pool else map)
            log(f"[clean] {s.name}: {p.read} documents read, {len(p.texts)} kept ({p.empty} empty) in {time.time() - t0:.1f}s")
            if not p.texts:
                where = f"input path {s.path}" if s.path else f"source {s.name}"
                raise ValueError(f"{where} has no text: all {p.read} documents are empty")
            prepared.append(p)
    finally:
        if pool:
            pool.shutdown()

    # 2. dedup + split
    t0 = time.time()
    dedup_and_split(prepared, settings)
    log(f"[dedup] {sum(p.exact_dups for p in prepared)} exact and {sum(p.near_dups for p in prepared)} near "
        f"duplicates removed in {time.time() - t0:.1f}s")

    # 3. tokenizer, 4. shards, 5. manifest (last: its presence marks a complete corpus)
    _remove_old_shards(out_dir)
    if isinstance(tok, int):
        tok, spec = train_tokenizer(prepared, tok, out_dir, settings.tokenizer_sample_bytes, log), "tokenizer"
    else:  # a directory is recorded absolute, so the manifest is valid from anywhere
        spec = str(Path(tokenizer).resolve()) if Path(tokenizer).is_dir() else tokenizer
    t0 = time.time()
    entries = write_shards(prepared, tok, out_dir, workers)
    log(f"[shards] tokenized in {time.time() - t0:.1f}s")
    totals = {split: {k: sum(e[split][k] for e in entries.values()) for k in ("documents", "bytes", "tokens")}
              for split in SPLITS}
    manifest = {
        "format": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": tokenizer_info(tok, spec),
        "dtype": str(token_dtype(max(tok.vocab_size, tok.eot_id + 1))),
        "settings": {k: v for k, v in vars(settings).items() if not k.startswith("chunk_")},
        "sources": entries,
        "totals": totals,
        "build_seconds": round(time.time() - t_start, 1),
    }
    write_manifest(out_dir, manifest)
    return manifest


def format_table(manifest: dict) -> str:
    """Per-source documents, bytes and tokens (train + val), and what dedup removed."""
    rows = [("source", "docs", "val docs", "MB", "tokens", "bytes/tok", "dups (exact+near)")]
    for name, e in [*manifest["sources"].items(), ("total", None)]:
        t, v = (e["train"], e["val"]) if e else (manifest["totals"]["train"], manifest["totals"]["val"])
        docs, nbytes, tokens = (t[k] + v[k] for k in ("documents", "bytes", "tokens"))
        dups = f"{e['exact_dups']}+{e['near_dups']}" if e else ""
        rows.append((name, f"{docs:,}", f"{v['documents']:,}", f"{nbytes / 1e6:.2f}", f"{tokens:,}",
                     f"{nbytes / max(tokens, 1):.2f}", dups))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)
