"""Token shards: one flat token array per (source, split) and the corpus manifest.

Layout of a corpus directory:

    manifest.json              tokenizer (spec, vocab size, eot id, sha256 of its files), dtype, and per
                               source and split: documents, bytes, tokens, shard file names and sha256
    <source>.<split>.bin       every document's token ids followed by the tokenizer's eot id, back to
                               back; uint16 when all ids fit, else uint32; read with np.memmap
    <source>.<split>.idx       int64 offsets: idx[i] is where document i starts, idx[-1] the token count
    tokenizer/                 the tokenizer, when the build trained one ("train:N")

`ShardReader` gives random access to one shard and refuses a tokenizer other than the one the
shards were made with. The manifest is written last, so a directory with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in it: half the disk and page cache of uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    """sha256 over the files `tok.save` writes (names and contents). Generation-code counts are
    zeroed first: they change neither text ids nor the eot id, so shards stay valid for a
    tokenizer extended with image/audio codes."""
    if hasattr(tok, "with_codes"):
        tok = tok.with_codes(0, 0)
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        for path in sorted(Path(d).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(d)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def tokenizer_info(tok, spec: str) -> dict:
    return {"spec": spec, "name": getattr(tok, "name", spec), "vocab_size": int(tok.vocab_size), "eot_id": int(tok.eot_id),
            "sha256": tokenizer_fingerprint(tok)}


class ShardWriter:
    """Appends documents (token id lists) to `<prefix>.bin`, each followed by eot; `close()` writes
    the `.idx` and returns the shard's entry for the manifest. Files are written under temporary
    names and renamed on close, so an interrupted build leaves no truncated shard under a real name."""

    def __init__(self, prefix: str | Path, dtype: np.dtype, eot_id: int, flush_tokens: int = 1 << 20):
        self.prefix, self.dtype, self.eot_id = Path(prefix), np.dtype(dtype), eot_id
        self.max_id = np.iinfo(self.dtype).max
        self._bin = open(f"{self.prefix}.bin.tmp", "wb")
        self._buf: list[int] = []
        self._offsets = [0]
        self._flush_tokens = flush_tokens
        self.bytes = 0  # UTF-8 bytes of the text encoded, for the manifest

    def add(self, ids: list[int], nbytes: int = 0) -> None:
        self._buf.extend(ids)
        self._buf.append(self.eot_id)
        self._offsets.append(self._offsets[-1] + len(ids) + 1)
        self.bytes += nbytes
        if len(self._buf) >= self._flush_tokens:
            self._flush()

    def _flush(self) -> None:
        arr = np.array(self._buf, dtype=np.int64)
        if len(arr) and (arr.min() < 0 or arr.max() > self.max_id):
            raise ValueError(f"token id {int(arr.max())} does not fit the shard dtype {self.dtype}")
        arr.astype(self.dtype).tofile(self._bin)
        self._buf.clear()

    def close(self) -> dict:
        self._flush()
        self._bin.close()
        np.array(self._offsets, dtype=np.int64).tofile(f"{self.prefix}.idx.tmp")
        entry = {"documents": len(self._offsets) - 1, "bytes": self.bytes, "tokens": self._offsets[-1]}
        for ext in ("bin", "idx"):
            os.replace(f"{self.prefix}.{ext}.tmp", f"{self.prefix}.{ext}")
            entry[ext] = f"{self.prefix.name}.{ext}"
            entry[f"{ext}_sha256"] = sha256_file(f"{self.prefix}.{ext}")
        return entry


def write_manifest(corpus_dir: str | Path, manifest: dict) -> None:
    path = Path(corpus_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: readers see the old manifest or the new one


def read_manifest(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{corpus_dir} is not a corpus: no {MANIFEST} (build one with `omnigpt data build`)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: corpus format {manifest.get('format')}, this omnigpt reads {FORMAT_VERSION}")
    return manifest


def check_tokenizer(manifest: dict, tok, where: str = "shards") -> None:
    """Raise ValueError when `tok` is not the tokenizer the corpus was made with."""
    made = manifest["tokenizer"]
    got = tokenizer_fingerprint(tok)
    if got != made["sha256"]:
        name = getattr(tok, "name", type(tok).__name__)
        raise ValueError(
            f"{where} made with tokenizer {made.get('name', made['spec'])} ({made['spec']}, vocab {made['vocab_size']}, "
            f"sha256 {made['sha256'][:12]}), "
            f"got {name} (vocab {tok.vocab_size}, sha256 {got[:12]})")


def load_corpus_tokenizer(corpus_dir: str | Path):
    """The tokenizer a corpus was made with ("tokenizer", a trained one, is relative to the corpus)."""
    from omnigpt.tokenizer.text import load_tokenizer

    spec = read_manifest(corpus_dir)["tokenizer"]["spec"]
    local = Path(corpus_dir) / spec
    return load_tokenizer(str(local) if local.is_dir() else spec)


class ShardReader:
    """Random access to one shard: `reader.document(i)`, `reader.tokens(start, stop)`, `len(reader)`
    documents and `reader.num_tokens` tokens. `path` is the `.bin` file (or its prefix
    `<corpus>/<source>.<split>`); the manifest beside it gives the dtype. Pass `tokenizer` (an
    object or a spec string) to have it checked against the one the shards were made with."""

    def __init__(self, path: str | Path, tokenizer=None):
        path = Path(path)
        prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
        self.corpus_dir = prefix.parent
        self.manifest = read_manifest(self.corpus_dir)
        self.source, _, self.split = prefix.name.rpartition(".")
        entry = self.manifest["sources"].get(self.source, {}).get(self.split)
        if entry is None:
            raise ValueError(f"{prefix}: no shard for source {self.source!r} split {self.split!r} in the manifest")
        if tokenizer is not None:
            if isinstance(tokenizer, str):
                from omnigpt.tokenizer.text import load_tokenizer

                tokenizer = load_tokenizer(tokenizer)
            check_tokenizer(self.manifest, tokenizer, where=f"shards in {self.corpus_dir}")
        self.entry = entry
        self.eot_id = self.manifest["tokenizer"]["eot_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.offsets = np.fromfile(self.corpus_dir / entry["idx"], dtype=np.int64)
        bin_path = self.corpus_dir / entry["bin"]
        n = bin_path.stat().st_size // self.dtype.itemsize
        if len(self.offsets) != entry["documents"] + 1 or self.offsets[-1] != n or n != entry["tokens"]:
            raise ValueError(f"{bin_path}: shard does not match its index and manifest (truncated or replaced?)")
        # np.memmap cannot map an empty file; an empty shard is an empty array.
        self.data = np.memmap(bin_path, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_docs(self) -> int:
        return len(self)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i, its trailing eot included (a read-only view of the map)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        i %= len(self)
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """The flat token stream [start, stop), across document boundaries."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens}]")
        return self.data[start:stop]

    def verify(self) -> None:
        """Check both files against the sha256 in the manifest (reads them whole)."""
        for ext in ("bin", "idx"):
            if sha256_file(self.corpus_dir / self.entry[ext]) != self.entry[f"{ext}_sha256"]:
                raise ValueError(f"{self.corpus_dir / self.entry[ext]}: sha256 differs from the manifest")

    def __repr__(self) -> str:
        return f"ShardReader({self.source}.{self.split}: {len(self)} docs, {self.num_tokens} tokens)"


def open_shards(corpus_dir: str | Path, split: str = "train", tokenizer=None,
                sources: list[str] | None = None) -> dict[str, ShardReader]:
    """Readers for every source (or the named ones) of one split, in manifest order."""
    manifest = read_manifest(corpus_dir)
    names = sources or [s for s, e in manifest["sources"].items() if split in e]
    if isinstance(tokenizer, str):
        from omnigpt.tokenizer.text import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is not None:
        check_tokenizer(manifest, tokenizer, where=f"shards in {corpus_dir}")  # once, not per shard
    return {s: ShardReader(Path(corpus_dir) / f"{s}.{split}") for s in names}
