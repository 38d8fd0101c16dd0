"""Packing documents into fixed-length rows: a source mixture, a deterministic resumable order, per-rank shards.

Terms
-----
A *document* is a token array ending in EOT. A *source* is a random-access list of documents (`ListSource` for
arrays in memory, `ShardSource` for `omnigpt.data.shards.ShardReader`). The *stream* is the concatenation of
documents in the order described below; it never ends for training and is one pass for validation.

Rows. Row j of the stream is its tokens [j*T, j*T + T + 1): inputs are row[:-1], targets row[1:]. Consecutive
rows share one token, so every stream token after the first is a target exactly once and nothing is wasted.

Document boundaries. A target belongs to the document it is a token of, and an input position takes the document
of its target. So the EOT that ends document A is the first *input* of document B (it acts as B's BOS) and every
prediction sees only its own document: `doc_ids` (for the model's attention mask) never lets a query attend
across documents and `pos` restarts at 0 where a document starts (and at the start of a row: a document cut by a
row boundary continues in the next row without its earlier context, positions from 0; RoPE is relative so only
the restart matters). Positions past the end of a finite stream are padding: input 0, target -100, doc id -1.

Order. Sources are mixed by *tokens*: the next document comes from the source furthest behind its weight share
(argmin tokens_drawn / weight; ties to the first source), which is deterministic and exact in the long run. Each
source walks a permutation of its documents, drawn from (seed, source name, epoch) and redrawn each epoch. The
whole position is a few integers, so `state_dict()` is JSON and resuming replays nothing.

Ranks. Every rank walks the same stream (reading only document lengths, which is cheap) and materialises only its
own rows: global micro-batch k is rows [k*B*W, (k+1)*B*W) and rank r takes the r-th block of B rows. So the global
batch is the same for any world size W (a run on 2 ranks with B=2 sees what 1 rank with B=4 sees), the ranks'
rows are disjoint, and a checkpoint's data position means the same thing whatever the world size.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # target value the loss skips (F.cross_entropy ignore_index)


# ---- sources ---------------------------------------------------------------------------------------------------
class ListSource:
    """Documents held in memory: a list of 1-D integer arrays (tests, small corpora)."""

    def __init__(self, name: str, docs: Sequence):
        self.name = name
        self.docs = [np.asarray(d) for d in docs]
        self.lengths = np.array([len(d) for d in self.docs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.docs)

    def doc_len(self, i: int) -> int:
        return int(self.lengths[i])

    def doc(self, i: int) -> np.ndarray:
        return self.docs[i]


class ShardSource:
    """One split of one source on disk, read through `omnigpt.data.shards.ShardReader` (memory-mapped)."""

    def __init__(self, name: str, reader):
        self.name = name
        self.reader = reader
        self.lengths = _reader_lengths(reader)

    def __len__(self) -> int:
        return len(self.lengths)

    def doc_len(self, i: int) -> int:
        return int(self.lengths[i])

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.reader.document(i))


def _reader_lengths(reader) -> np.ndarray:
    """Per-document token counts from the reader's index, without touching the token file where possible."""
    for attr in ("doc_lengths", "lengths"):
        v = getattr(reader, attr, None)
        if v is not None:
            return np.asarray(v() if callable(v) else v, dtype=np.int64)
    offsets = getattr(reader, "offsets", None)
    if offsets is not None:
        return np.diff(np.asarray(offsets, dtype=np.int64))
    return np.array([len(reader.document(i)) for i in range(len(reader))], dtype=np.int64)


# ---- batches ---------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One rank's micro-batch. All (B, T) int64. Pass to the model as
    `model(inputs, targets, doc_ids_BT=doc_ids, pos_BT=pos)`."""

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor
    pos: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.inputs, self.targets, self.doc_ids, self.pos)))

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())


def row_arrays(pieces: list[tuple[np.ndarray, int, bool]], T: int):
    """Assemble one row from (tokens, document number, cut) pieces covering at most T+1 stream tokens.

    Returns (inputs, targets, doc_ids, pos), each (T,) int64. Document numbers only need to differ between
    documents; -1 marks padding. `cut`: the piece's last token here ends a piece, not its document, so nothing is
    predicted from it (its document goes on elsewhere)."""
    tok = np.zeros(T + 1, dtype=np.int64)
    doc = np.full(T + 1, -1, dtype=np.int64)
    n, cut_inputs = 0, []
    for toks, d, cut in pieces:
        tok[n:n + len(toks)] = toks
        doc[n:n + len(toks)] = d
        n += len(toks)
        if cut and n - 1 < T:
            cut_inputs.append(n - 1)
    inputs, targets = tok[:-1], tok[1:].copy()
    doc_ids = doc[1:].copy()  # an input belongs to its target's document
    doc_ids[cut_inputs] = -1
    targets[doc_ids < 0] = IGNORE
    # Positions restart at every change of document (and at the row start).
    starts = np.ones(T, dtype=bool)
    starts[1:] = doc_ids[1:] != doc_ids[:-1]
    idx = np.arange(T)
    pos = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    return inputs, targets, doc_ids, pos


# ---- document order --------------------------------------------------------------------------------------------
def _name_key(name: str) -> int:
    return zlib.crc32(name.encode())


class MixtureStream:
    """Infinite, deterministic sequence of (source, document, length, offset) picks, mixed by token share.

    piece_len cuts documents longer than that into pieces drawn independently, in random order. Without it one long
    document (a 100k-token source file) fills hundreds of consecutive rows, so a small-batch run sees one source
    for many steps and ends wherever its last steps happened to be: on the all-sources corpus, 4-row runs of the same
    size differed by up to 1 nat between seeds. Pieces restart positions, as row starts already do."""

    def __init__(self, sources: Sequence, weights: Sequence[float] | None, seed: int, piece_len: int | None = None):
        if not sources:
            raise ValueError("no data sources")
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} mixture weights for {len(sources)} sources")
        for s, w in zip(sources, weights):
            if w < 0:
                raise ValueError(f"source {s.name!r}: mixture weight {w} is negative")
            if w > 0 and (len(s) == 0 or int(s.lengths.sum()) == 0):
                raise ValueError(f"source {s.name!r} has no tokens but mixture weight {w}")
        if not any(w > 0 for w in weights):
            raise ValueError("all mixture weights are zero")
        if piece_len is not None and piece_len <= 0:
            raise ValueError(f"piece_len={piece_len} must be positive")
        self.sources, self.weights, self.seed, self.piece_len = list(sources), weights, seed, piece_len
        self._pieces: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # source -> (document, offset) of each piece
        self.drawn = [0] * len(sources)  # tokens drawn per source: decides the next source
        self.epoch = [0] * len(sources)
        self.cursor = [0] * len(sources)  # position in this epoch's permutation
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _piece_table(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """Every document as ceil(length / piece_len) pieces (at least one, so that without long documents the
        order is the documents' own)."""
        if s not in self._pieces:
            lengths = np.asarray(self.sources[s].lengths, dtype=np.int64)
            count = np.ones_like(lengths) if self.piece_len is None else np.maximum(1, -(-lengths // self.piece_len))
            doc = np.repeat(np.arange(len(lengths), dtype=np.int64), count)
            first = np.repeat(np.cumsum(count) - count, count)  # index of each piece's document's first piece
            self._pieces[s] = (doc, (np.arange(len(doc), dtype=np.int64) - first) * (self.piece_len or 0))
        return self._pieces[s]

    def _perm(self, s: int) -> np.ndarray:
        cached = self._perms.get(s)
        if cached is None or cached[0] != self.epoch[s]:
            rng = np.random.default_rng([self.seed, _name_key(self.sources[s].name), self.epoch[s]])
            cached = (self.epoch[s], rng.permutation(len(self._piece_table(s)[0])))
            self._perms[s] = cached
        return cached[1]

    def next(self) -> tuple[int, int, int, int]:
        """(source, document, length, offset in the document); empty documents are skipped."""
        while True:
            s = min((i for i, w in enumerate(self.weights) if w > 0), key=lambda i: self.drawn[i] / self.weights[i])
            docs, offsets = self._piece_table(s)
            k = int(self._perm(s)[self.cursor[s]])
            self.cursor[s] += 1
            if self.cursor[s] == len(docs):
                self.epoch[s], self.cursor[s] = self.epoch[s] + 1, 0
            doc, off = int(docs[k]), int(offsets[k])
            n = self.sources[s].doc_len(doc) - off
            if self.piece_len is not None:
                n = min(n, self.piece_len)
            self.drawn[s] += n
            if n:
                return s, doc, n, off

    def state_dict(self) -> dict:
        return {"drawn": list(self.drawn), "epoch": list(self.epoch), "cursor": list(self.cursor)}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.epoch, self.cursor = list(state["drawn"]), list(state["epoch"]), list(state["cursor"])


class SequentialStream:
    """One pass over one source's documents in stored order (validation), then None."""

    def __init__(self, source, source_index: int = 0):
        self.source, self.index, self.cursor = source, source_index, 0

    def next(self):
        while self.cursor < len(self.source):
            doc = self.cursor
            self.cursor += 1
            n = self.source.doc_len(doc)
            if n:
                return self.index, doc, n, 0
        return None

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


# ---- the loader ------------------------------------------------------------------------------------------------
class PackedLoader:
    """Iterator of this rank's micro-batches (B rows of T tokens) from a document stream.

    state_dict() after the k-th batch, loaded into a fresh loader with the same sources and seed, makes it produce
    batch k+1 onwards exactly. Every rank must call next() the same number of times (the ranks share one stream).
    """

    def __init__(self, sources: Sequence, seq_len: int, batch_size: int, *, weights: Sequence[float] | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, stream=None, piece_len: int | None = None):
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.sources = list(sources)
        self.T, self.B, self.rank, self.world = seq_len, batch_size, rank, world_size
        self.stream = stream if stream is not None else MixtureStream(self.sources, weights, seed, piece_len)
        self.weights, self.seed, self.piece_len = weights, seed, piece_len
        self.row = 0  # next global row
        # [source, doc, stream start, length, offset in the doc] of the pieces reaching row*T onwards
        self.window: list[list[int]] = []
        self.end = 0  # stream offset just past the last document drawn
        self.exhausted = False  # a finite stream ran out

    # -- stream bookkeeping
    def _fill(self, upto: int) -> None:
        while self.end < upto and not self.exhausted:
            pick = self.stream.next()
            if pick is None:
                self.exhausted = True
                return
            s, d, n, off = pick
            self.window.append([s, d, self.end, n, off])
            self.end += n

    def _row(self, materialise: bool):
        start, stop = self.row * self.T, self.row * self.T + self.T + 1
        self._fill(stop)
        out = None
        if materialise:
            pieces = []
            for s, d, a, n, off in self.window:
                lo, hi = max(start, a), min(stop, a + n)
                if lo < hi:
                    toks = self.sources[s].doc(d)[off + lo - a:off + hi - a]
                    cut = hi == a + n and off + n < self.sources[s].doc_len(d)
                    pieces.append((toks, a, cut))  # the stream offset is a unique document number
            out = row_arrays(pieces, self.T)
        self.row += 1
        nxt = self.row * self.T
        self.window = [w for w in self.window if w[2] + w[3] > nxt]  # keep documents the next row still needs
        return out

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        rows = []
        for w in range(self.world):
            for _ in range(self.B):
                r = self._row(materialise=w == self.rank)
                if r is not None:
                    rows.append(r)
        cols = [torch.from_numpy(np.stack(c)) for c in zip(*rows)]
        return Batch(*cols)

    # -- resume
    def state_dict(self) -> dict:
        """JSON-serialisable position (identical on every rank)."""
        return {
            "seq_len": self.T,
            "sources": [s.name for s in self.sources],
            "weights": None if self.weights is None else [float(w) for w in self.weights],
            "seed": self.seed,
            "piece_len": self.piece_len,
            "row": self.row,
            "end": self.end,
            "window": [list(w) for w in self.window],
            "exhausted": self.exhausted,
            "stream": self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seq_len", "sources", "weights", "seed", "piece_len"):
            if state.get(key) != mine[key]:
                raise ValueError(f"data position was saved with {key}={state.get(key)!r}, this run has {key}={mine[key]!r}")
        self.row, self.end, self.exhausted = int(state["row"]), int(state["end"]), bool(state["exhausted"])
        self.window = [list(map(int, w)) + [0] * (5 - len(w)) for w in state["window"]]  # older states: whole documents
        self.stream.load_state_dict(state["stream"])


def eval_batches(source, seq_len: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None) -> Iterator[Batch]:
    """One pass over a source in stored order, padded at the end (targets -100), for validation.

    Every rank yields the same number of batches (FSDP needs each rank in every forward); rows past the end are all
    padding. `max_batches` caps the pass (global micro-batches)."""
    total = int(source.lengths.sum())
    rows = max(0, -(-(total - 1) // seq_len))  # ceil((tokens-1)/T): rows that hold at least one target
    n_batches = -(-rows // (batch_size * world_size))
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    loader = PackedLoader([source], seq_len, batch_size, rank=rank, world_size=world_size, stream=SequentialStream(source))
    for _ in range(n_batches):
        yield next(loader)
