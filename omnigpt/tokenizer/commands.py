"""`omnigpt tokenizer train|encode`."""

from __future__ import annotations

import itertools
import json
import os


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE, or encode text with a tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    sub.required = True

    t = sub.add_parser("train", help="train a byte-level BPE on text files")
    t.add_argument("files", nargs="+", metavar="FILES", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, help="total size, our 32 special tokens included")
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="directory to write tokenizer.json + omnigpt_tokenizer.json")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("encode", help="print the token ids of TEXT")
    e.add_argument("text", metavar="TEXT")
    e.add_argument("--tokenizer", required=True, help="cl100k_base, o200k_base or a tokenizer directory")
    e.add_argument("--special", action="store_true", help="parse special-token strings in TEXT as special tokens")
    e.set_defaults(func=cmd_encode)


def cmd_train(args) -> None:
    from omnigpt.cli import CommandError
    from omnigpt.tokenizer.text import read_training_text, train_bpe

    if args.vocab_size <= 0:
        raise CommandError(f"--vocab-size must be positive, got {args.vocab_size}")
    tok = train_bpe(args.files, args.vocab_size, min_frequency=args.min_frequency, show_progress=True)
    tok.save(args.out)
    n_tokens = n_bytes = 0
    chunks = read_training_text(args.files)  # ~1 MB each, 16 at a time so the backend encodes them in parallel
    while batch := list(itertools.islice(chunks, 16)):
        n_tokens += sum(map(len, tok.encode_batch(batch)))
        n_bytes += sum(len(c.encode()) for c in batch)
    print(f"vocab size: {tok.vocab_size} ({tok.n_text} text + 32 special)")
    print(f"tokens/bytes on the training files: {n_tokens / max(n_bytes, 1):.4f} ({n_tokens:,} tokens, {n_bytes:,} bytes)")
    print(f"saved to {os.path.abspath(args.out)}")


def cmd_encode(args) -> None:
    from omnigpt.tokenizer.text import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(json.dumps(tok.encode(args.text, allowed_special="all" if args.special else frozenset())))
