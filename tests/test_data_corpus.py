"""The offline corpus: cleaning, dedup, split, shards and the `omnigpt data` commands.

Everything runs on small generated folders (CI installs no Debian dictionaries); the dictd, reST
and fortune cleaners are tested on inline samples in their real formats."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from omnigpt.cli import main
from omnigpt.data import clean
from omnigpt.data.corpus import BuildSettings, build_corpus, format_table
from omnigpt.data.shards import ShardReader, load_corpus_tokenizer, open_shards, read_manifest
from omnigpt.data.sources import _b64_number, folder_source, read_dictd

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu the a of and to in is it").split()


def random_doc(rng: random.Random, n: int = 80) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(n // 10)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus_input(tmp_path_factory):
    """40 .txt documents, 2 of them repeated (one exactly, one with a word changed), plus 20 JSONL lines."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("texts")
    docs = [random_doc(rng, 150) for _ in range(40)]
    for i, d in enumerate(docs):
        (root / f"doc{i:02d}.txt").write_text(d + "\n")
    (root / "zcopy.txt").write_text("  " + docs[3].upper().replace("\n", "\n\n") + "\n")  # same text once folded
    near = docs[5].split()
    near[40] = "zzzz"
    (root / "sub").mkdir()
    (root / "sub" / "near.md").write_text(" ".join(near))
    lines = [random_doc(rng, 30) for _ in range(20)]
    (root / "sub" / "more.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(lines)))
    return root, docs + lines


@pytest.fixture(scope="module")
def built(corpus_input, tmp_path_factory):
    root, expected = corpus_input
    out = tmp_path_factory.mktemp("corpus")
    manifest = build_corpus(out, "train:320", inputs=[str(root)], settings=BuildSettings(min_val_docs=3), workers=1,
                            log=lambda *_: None)
    return out, manifest, expected


# ---------------------------------------------------------------- cleaning

def test_gcide_markup_is_stripped():
    raw = ('Lapidate \\Lap"i*date\\, v. t. [L. lapidatus, p. p. of {lapidare}.]\n'
           "   To stone. [Obs.] (l[=a]p\"[i^]*d[=a]t) Caf['e] and [ae]on.\n   [1913 Webster]\n")
    text = clean.clean_document(raw, "gcide")
    assert text.startswith("Lapidate, v. t. [L. lapidatus, p. p. of lapidare.]\nTo stone. [Obs.]")
    assert "Café and æon." in text  # accent codes become Unicode (NFC)
    assert "1913 Webster" not in text and "\\" not in text and "[=a]" not in text


def test_rest_markup_is_stripped():
    raw = """:mod:`functools` --- Higher-order functions
==========================================

.. module:: functools
   :synopsis: Higher-order functions.

.. index:: single: hidden

The :func:`~functools.cache` decorator, see :pep:`8` and `the docs <https://x.org>`_. It is **fast**.

.. function:: cache(user_function)

   Wraps *user_function*.  Example::

      @cache
      def f(*args, **kw): return ``x``

   .. versionadded:: 3.9

.. note::
   Mind the ``*args``.
"""
    text = clean.clean_document(raw, "rest")
    assert text.splitlines()[0] == "functools --- Higher-order functions"
    assert "The cache decorator, see PEP 8 and the docs. It is fast." in text
    assert "cache(user_function)\n\n   Wraps user_function.  Example:" in text
    assert "      def f(*args, **kw): return ``x``" in text  # literal block verbatim
    assert "New in version 3.9." in text and "Note:\n   Mind the *args." in text
    for gone in ("synopsis", "hidden", "===", ".. ", ":func:"):
        assert gone not in text
    html = "<!--html--><html><head><title>t</title></head><body><p>Hello <b>world</b></p><script>x()</script></body>"
    assert clean.clean_document(html, "rest") == "Hello world"  # docs packaged without their reST sources


def test_licence_header_fortune_and_whitespace():
    code = "#!/usr/bin/env python3\n# Copyright (C) 2002 Someone\n# All rights reserved.\n\n\"\"\"Doc.\"\"\"\nimport os\n"
    assert clean.clean_document(code, "python") == '"""Doc."""\nimport os'
    plain = "# a comment about the module\nx = 1\n"
    assert clean.clean_document(plain, "python") == plain.strip()
    assert clean.clean_document("_\x08b_\x08o_\x08l_\x08d and B\x08Bold", "fortune") == "bold and Bold"
    assert clean.normalize_whitespace("\r\n\n  a  \r\n\n\n\n\tb\t \n\n") == "  a\n\n\tb"
    guten = "header\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nbody\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence"
    assert clean.clean_document(guten, "text") == "body"


def test_dictd_reader(tmp_path):
    import gzip

    entries = ["00-database-info\n   licence blurb\n", "apple\n   a fruit\n", "Apple \\Ap\"ple\\, n.\n   sense two\n",
               "pear\n   another fruit\n"]
    data = "".join(entries).encode()
    offsets = np.cumsum([0] + [len(e.encode()) for e in entries])
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def enc(n):
        s = ""
        while True:
            s = b64[n % 64] + s
            n //= 64
            if not n:
                return s

    assert _b64_number(enc(123456)) == 123456
    names = ["00-database-info", "apple", "apple", "pear"]
    (tmp_path / "d.index").write_text("".join(f"{w}\t{enc(int(o))}\t{enc(len(e.encode()))}\n"
                                              for w, o, e in zip(names, offsets, entries)))
    (tmp_path / "d.dict.dz").write_bytes(gzip.compress(data))
    docs = list(read_dictd(tmp_path / "d"))
    assert docs == ["apple\n   a fruit\n\nApple \\Ap\"ple\\, n.\n   sense two\n", "pear\n   another fruit\n"]


# ---------------------------------------------------------------- dedup and split

def test_exact_and_near_duplicates():
    rng = random.Random(1)
    a, b = random_doc(rng, 200), random_doc(rng, 200)
    words = a.split()
    words[20] = "changed"
    texts = [a, "  " + a.upper().replace("\n", "\n\n "), b, " ".join(words), "short text", "short text!"]
    exact = clean.exact_duplicates([clean.doc_key(t) for t in texts])
    assert exact.tolist() == [False, True, False, False, False, False]
    sig = clean.minhash_signatures(texts)
    assert sig.shape == (6, 128) and sig.dtype == np.uint32
    assert (sig == clean.minhash_signatures(list(texts), chunk_words=7, block_windows=5)).all()  # chunking-free
    near = clean.near_duplicates(sig, skip=exact)
    # the one-word edit is a near duplicate; the unrelated doc is not; exact dups are left to exact;
    # "short text" and "short text!" have the same words, so the second is a near duplicate
    assert near.tolist() == [False, False, False, True, False, True]


def test_split_is_deterministic_and_per_document():
    keys = [clean.doc_key(f"document number {i}") for i in range(20000)]
    val = clean.val_mask(keys, val_fraction=0.01, min_val=2)
    assert 150 < val.sum() < 250
    # the split of a document depends on its text alone: a subset or a reordering does not move it
    sub = clean.val_mask(keys[::-1][:15000], val_fraction=0.01, min_val=2)
    assert (sub == val[::-1][:15000]).all()
    tiny = clean.val_mask(keys[:10], val_fraction=0.005, min_val=3)
    assert tiny.sum() == 3 and (clean.val_mask(keys[:10], 0.005, 3) == tiny).all()
    assert clean.val_mask(keys[:1], 0.005, 3).sum() == 0  # a lone document stays in train


# ---------------------------------------------------------------- build and shards

def test_build_manifest_matches_readers(built):
    out, manifest, expected = built
    name = next(iter(manifest["sources"]))
    entry = manifest["sources"][name]
    assert entry["read"] == 62 and entry["exact_dups"] == 1 and entry["near_dups"] == 1
    assert entry["val"]["documents"] >= 3 and entry["train"]["documents"] + entry["val"]["documents"] == 60
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] <= 320
    for split in ("train", "val"):
        r = ShardReader(out / f"{name}.{split}.bin")
        assert (len(r), r.num_tokens) == (entry[split]["documents"], entry[split]["tokens"])
        assert r.data.dtype == np.uint16
        r.verify()
    assert name in format_table(manifest)


def test_documents_roundtrip_through_shards(built):
    out, manifest, expected = built
    tok = load_corpus_tokenizer(out)
    seen = []
    for split, readers in (("train", open_shards(out, "train", tokenizer=tok)), ("val", open_shards(out, "val"))):
        for r in readers.values():
            flat = []
            for i in range(len(r)):
                ids = r.document(i)
                assert ids[-1] == tok.eot_id and tok.eot_id not in ids[:-1]
                seen.append(tok.decode(ids[:-1].tolist()))
                flat.append(ids)
            assert (r.tokens(0, r.num_tokens) == np.concatenate(flat)).all()
            if len(r) > 1:
                assert (r.tokens(int(r.offsets[1]), int(r.offsets[2])) == r.document(1)).all()
    assert sorted(seen) == sorted(expected)  # every unique document, exactly once, text intact


def test_build_is_deterministic(built, corpus_input, tmp_path):
    out, manifest, _ = built
    again = build_corpus(tmp_path, str(out / "tokenizer"),
                         inputs=[str(corpus_input[0])], settings=BuildSettings(min_val_docs=3), workers=1,
                         log=lambda *_: None)
    for name, e in manifest["sources"].items():
        for split in ("train", "val"):
            assert again["sources"][name][split]["bin_sha256"] == e[split]["bin_sha256"]


def test_tokenizer_mismatch_is_refused(built):
    out, manifest, _ = built
    name = next(iter(manifest["sources"]))
    with pytest.raises(ValueError, match=r"shards in .* made with tokenizer bpe320 \(tokenizer, vocab .*got cl100k_base"):
        ShardReader(out / f"{name}.train.bin", tokenizer="cl100k_base")
    with pytest.raises(ValueError, match="made with tokenizer"):
        open_shards(out, "val", tokenizer="cl100k_base")
    ShardReader(out / f"{name}.train", tokenizer=load_corpus_tokenizer(out).with_codes(16, 8))  # codes: still fine


def test_bad_input_paths_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} holds no .txt"):
        folder_source(empty)
    with pytest.raises(ValueError, match="does not exist"):
        folder_source(tmp_path / "nope")
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match=f"input path {blank} has no text"):
        build_corpus(tmp_path / "o1", "cl100k_base", inputs=[str(blank)], workers=1, log=lambda *_: None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not a JSON object with a \"text\" field"):
        build_corpus(tmp_path / "o2", "cl100k_base", inputs=[str(bad)], workers=1, log=lambda *_: None)
    with pytest.raises(ValueError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_cli_build_and_errors(corpus_input, tmp_path, capsys):
    root, _ = corpus_input
    out = tmp_path / "c"
    assert main(["data", "build", "--tokenizer", "cl100k_base", "--out", str(out), "--input", str(root),
                 "--workers", "2", "--max-docs-per-source", "30"]) == 0
    stdout = capsys.readouterr().out
    assert "total" in stdout and "tokens" in stdout
    m = read_manifest(out)
    assert m["dtype"] == "uint32" and m["tokenizer"]["spec"] == "cl100k_base"
    assert next(iter(m["sources"].values()))["read"] == 30
    assert main(["data", "build", "--tokenizer", "cl100k_base", "--out", str(out), "--input", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert main(["data", "build", "--tokenizer", "train:x", "--out", str(out), "--input", str(root)]) == 2
    assert "train:N" in capsys.readouterr().err
