"""Packing, mixture, resumable order and per-rank sharding (omnigpt.data.packing)."""

import numpy as np
import pytest
import torch

from omnigpt.data.packing import IGNORE, ListSource, MixtureStream, PackedLoader, ShardSource, eval_batches
from omnigpt.data.shards import ShardReader
from omnigpt.train.synthetic import markov_docs, write_synthetic_corpus

EOT = 0


def make_docs(n, seed=0, lo=1, hi=40, base=1):
    rng = np.random.default_rng(seed)
    docs = []
    for k in range(n):
        length = int(rng.integers(lo, hi))
        # Unique, increasing ids inside a document make its tokens easy to trace; the last token is EOT.
        docs.append(np.array([base + 1000 * k + j for j in range(length)] + [EOT], dtype=np.int64))
    return docs


def doc_of_token(docs):
    return {int(t): k for k, d in enumerate(docs) for t in d[:-1]}


def check_row_invariants(batch, docs):
    """Every target is predicted only from its own document, positions restart at document starts."""
    owner = doc_of_token(docs)
    for b in range(batch.inputs.shape[0]):
        inp, tgt, did, pos = (t[b].tolist() for t in (batch.inputs, batch.targets, batch.doc_ids, batch.pos))
        for t in range(len(inp)):
            if tgt[t] == IGNORE:
                assert did[t] == -1
                continue
            same = [s for s in range(t + 1) if did[s] == did[t]]
            assert same == list(range(t - pos[t], t + 1)), "a document is one contiguous run and pos counts from its start"
            if tgt[t] != EOT:
                # The target's document: every input it can see is an earlier token of it, or the EOT before it.
                d = owner[tgt[t]]
                for s in same:
                    assert inp[s] == EOT and s == t - pos[t] or owner.get(inp[s]) == d
            if pos[t] > 0:
                assert inp[t] != EOT, "an EOT input always starts a new document"


def test_rows_keep_documents_and_boundaries():
    docs = make_docs(30)
    src = ListSource("s", docs)
    stream = np.concatenate(docs)
    T, B = 16, 3
    seen = []
    for batch in eval_batches(src, T, B):
        assert batch.inputs.shape == (B, T) and batch.inputs.dtype == torch.int64
        check_row_invariants(batch, docs)
        for b in range(B):
            seen += [t for t in batch.targets[b].tolist() if t != IGNORE]
    # One pass = the stream, every token after the first exactly once as a target, in order.
    assert seen == stream[1:].tolist()


def test_padding_masks_only_past_the_end():
    docs = [np.array([5, 6, 7, EOT]), np.array([8, 9, EOT])]
    (batch,) = list(eval_batches(ListSource("s", docs), 8, 1))
    assert batch.inputs[0].tolist() == [5, 6, 7, 0, 8, 9, 0, 0]
    assert batch.targets[0].tolist() == [6, 7, 0, 8, 9, 0, IGNORE, IGNORE]
    assert batch.pos[0].tolist()[:6] == [0, 1, 2, 0, 1, 2]  # the EOT ending doc 1 is doc 2's first input
    d = batch.doc_ids[0].tolist()
    assert d[0] == d[1] == d[2] != d[3] == d[4] == d[5] and d[6] == d[7] == -1


def test_mixture_follows_token_weights():
    a = ListSource("a", make_docs(50, seed=1, base=1))
    b = ListSource("b", make_docs(50, seed=2, base=200_000))
    loader = PackedLoader([a, b], 32, 8, weights=[3.0, 1.0], seed=0)
    from_a = total = 0
    for _ in range(40):
        tgt = next(loader).targets
        real = tgt[(tgt != IGNORE) & (tgt != EOT)]
        from_a += int((real < 200_000).sum())
        total += real.numel()
    assert abs(from_a / total - 0.75) < 0.03


def test_loader_resume_gives_the_same_batches():
    sources = [ListSource("a", make_docs(20, seed=3)), ListSource("b", make_docs(7, seed=4, base=500_000))]
    ref = PackedLoader(sources, 24, 4, weights=[1.0, 2.0], seed=7)
    expected = [next(ref) for _ in range(30)]  # several epochs of the small source
    first = PackedLoader(sources, 24, 4, weights=[1.0, 2.0], seed=7)
    for _ in range(11):
        next(first)
    state = first.state_dict()
    import json

    state = json.loads(json.dumps(state))  # it is saved as JSON
    resumed = PackedLoader(sources, 24, 4, weights=[1.0, 2.0], seed=7)
    resumed.load_state_dict(state)
    for k in range(11, 30):
        got = next(resumed)
        for name in ("inputs", "targets", "doc_ids", "pos"):
            assert torch.equal(getattr(got, name), getattr(expected[k], name)), (k, name)
    other_seed = PackedLoader(sources, 24, 4, weights=[1.0, 2.0], seed=8)
    assert not torch.equal(next(other_seed).inputs, expected[0].inputs)
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(sources, 32, 4, weights=[1.0, 2.0], seed=7).load_state_dict(state)


def test_long_documents_are_cut_into_pieces_drawn_apart():
    """piece_len: each long document becomes pieces in random order; every token still comes once per epoch, rows
    keep their invariants, and a loader resumes exactly. Without long documents the order is unchanged."""
    short = make_docs(30, seed=1, hi=20)
    long = make_docs(3, seed=2, lo=600, hi=700, base=5_000_000)  # ids 5e6 + 1000k + j: k < 3, j < 700 stay unique
    docs = short + long
    total = sum(len(d) for d in docs)
    owner = doc_of_token(docs)
    whole = PackedLoader([ListSource("s", docs)], 16, 2, seed=0)
    cut = PackedLoader([ListSource("s", docs)], 16, 2, seed=0, piece_len=48)
    seen = {"whole": [], "cut": []}
    for name, loader in (("whole", whole), ("cut", cut)):
        for _ in range(-(-total // 32)):  # one epoch of rows (each row holds T+1 stream tokens, its last shared)
            b = next(loader)
            check_row_invariants(b, docs)
            seen[name].append(b)
    long_tokens = {t for t, k in owner.items() if k >= 30}
    first_long = {owner[t] for b in seen["cut"][:20] for t in b.inputs.flatten().tolist() if t in long_tokens}
    assert len(first_long) >= 2  # pieces of different long documents interleave early on
    def longest_run(batches):  # consecutive batches whose tokens all come from one long document
        best = run = 0
        for b in batches:
            ks = {owner.get(t) for t in b.inputs.flatten().tolist() if t != EOT}
            run = run + 1 if len(ks) == 1 and ks <= {30, 31, 32} else 0
            best = max(best, run)
        return best
    assert longest_run(seen["whole"]) >= 15 and longest_run(seen["cut"]) <= 4  # a 48-token piece spans <= 3 batches of 32
    # Each pass over the pieces covers every token of every document once: count a whole epoch of the stream.
    mix = MixtureStream([ListSource("s", docs)], None, 0, piece_len=48)
    drawn = []
    while sum(n for *_, n, _ in drawn) < total:
        drawn.append(mix.next())
    covered = sorted((d, off + j) for _, d, n, off in drawn for j in range(n))
    assert covered == sorted((k, j) for k, d in enumerate(docs) for j in range(len(d)))
    # Resume with pieces; a loader that cuts documents otherwise refuses the state.
    ref = PackedLoader([ListSource("s", docs)], 16, 2, seed=0, piece_len=48)
    expected = [next(ref) for _ in range(40)]
    again = PackedLoader([ListSource("s", docs)], 16, 2, seed=0, piece_len=48)
    for _ in range(17):
        next(again)
    resumed = PackedLoader([ListSource("s", docs)], 16, 2, seed=0, piece_len=48)
    resumed.load_state_dict(again.state_dict())
    for k in range(17, 40):
        assert torch.equal(next(resumed).inputs, expected[k].inputs)
    with pytest.raises(ValueError, match="piece_len"):
        PackedLoader([ListSource("s", docs)], 16, 2, seed=0).load_state_dict(again.state_dict())
    # No document longer than a piece: the same batches as whole documents.
    a, b = PackedLoader([ListSource("s", short)], 16, 2, seed=4), PackedLoader([ListSource("s", short)], 16, 2, seed=4, piece_len=64)
    assert all(torch.equal(next(a).inputs, next(b).inputs) for _ in range(20))


def test_ranks_get_disjoint_parts_of_the_same_global_batch():
    sources = [ListSource("a", make_docs(40, seed=5))]
    one = PackedLoader(sources, 16, 6, seed=1)
    ranks = [PackedLoader(sources, 16, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        full = next(one)
        parts = [next(r) for r in ranks]
        for name in ("inputs", "targets", "pos"):
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(full, name))
    # Validation on 2 ranks: same number of batches on each, together exactly the 1-rank targets.
    src = sources[0]
    ones = [t for b in eval_batches(src, 16, 2) for t in b.targets.flatten().tolist() if t != IGNORE]
    per_rank = [list(eval_batches(src, 16, 1, rank=r, world_size=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    both = [t for pair in zip(*per_rank) for b in pair for t in b.targets.flatten().tolist() if t != IGNORE]
    assert both == ones


def test_shard_source_reads_the_corpus_format(tmp_path):
    write_synthetic_corpus(tmp_path, {"alpha": 30}, vocab=256, val_docs=3, seed=2)
    reader = ShardReader(tmp_path / "alpha.train")
    shard = ShardSource("alpha", reader)
    docs = [d + [EOT] for d in markov_docs(33, 256, seed=2000)[:30]]
    mem = ListSource("alpha", docs)
    assert shard.lengths.tolist() == mem.lengths.tolist()
    a = PackedLoader([shard], 32, 4, seed=3)
    b = PackedLoader([mem], 32, 4, seed=3)
    for _ in range(6):
        x, y = next(a), next(b)
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)


def test_bad_sources_are_named():
    empty = ListSource("empty", [])
    with pytest.raises(ValueError, match="empty"):
        PackedLoader([empty], 8, 1)
    with pytest.raises(ValueError, match="zero"):
        PackedLoader([ListSource("a", make_docs(3))], 8, 1, weights=[0.0])
