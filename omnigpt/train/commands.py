"""`omnigpt train`: pretrain a model on a token-shard corpus (`omnigpt data build`), on one process or many.

    omnigpt train --data corpus/ --preset tiny --steps 2000 --batch-size 16 --seq-len 256 --out runs/tiny
    omnigpt train ... --out runs/tiny --resume          # continue from runs/tiny/checkpoints/latest
    torchrun --standalone --nproc-per-node 2 -m omnigpt.cli train --data corpus/ --preset tiny-moe \\
        --expert-parallel --out runs/moe ...             # FSDP2 over 2 ranks, experts split between them

Multi-node launch (torchrun's c10d rendezvous) is described in omnigpt/train/parallelize.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from omnigpt.train.trainer import TrainConfig


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a model on token shards (one process, or many under torchrun)",
                              description=__doc__.split("\n\n")[0])
    d = TrainConfig()
    g = p.add_argument_group("data and model")
    g.add_argument("--data", required=True, metavar="DIR", help="corpus directory with manifest.json (omnigpt data build)")
    g.add_argument("--mix", metavar="SRC=W,...", help="mixture weights by token share of the listed sources (others are "
                   "left out); default: every source in proportion to its size")
    g.add_argument("--tokenizer", metavar="SPEC", help="check the shards were made with this tokenizer")
    g.add_argument("--piece-rows", type=int, default=d.piece_rows, help="cut documents longer than this many rows into "
                   "pieces drawn in random order (0: whole documents)")
    g.add_argument("--preset", default="tiny", help="model preset (see omnigpt model-card), default tiny")
    g.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field, e.g. --model n_layers=4 (repeatable); vocab_size defaults to the corpus tokenizer's, padded to 64")
    g.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints/, metrics.jsonl, loss.png")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (starts fresh if there is none)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in the whole run")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per rank per micro-step")
    o.add_argument("--seq-len", type=int, default=d.seq_len)
    o.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step")
    o.add_argument("--optimizer", choices=("adamw", "muon"), default=d.optimizer)
    o.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (with muon: for embeddings, norms, head)")
    o.add_argument("--muon-lr", type=float, default=d.muon_lr)
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm (0: off)")
    o.add_argument("--schedule", choices=("cosine", "wsd"), default=d.schedule)
    o.add_argument("--warmup", type=int, default=d.warmup_steps, dest="warmup_steps")
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr as a fraction of --lr")
    o.add_argument("--decay-frac", type=float, default=d.decay_frac, help="wsd: fraction of steps in the final decay")
    o.add_argument("--seed", type=int, default=d.seed, help="initial weights and data order")

    b = p.add_argument_group("logging, validation, checkpoints, systems")
    b.add_argument("--log-every", type=int, default=d.log_every)
    b.add_argument("--val-every", type=int, default=d.val_every, help="steps between validation passes (0: at the end only)")
    b.add_argument("--val-batches", type=int, default=d.val_batches, help="micro-batches per validation source")
    b.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints (0: at the end only)")
    b.add_argument("--keep", type=int, default=d.keep_checkpoints, dest="keep_checkpoints", help="checkpoints kept")
    b.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    b.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    b.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes with a checkpoint (resume later)")
    b.add_argument("--expert-parallel", action="store_true", help="MoE: split experts over ranks (all-to-all dispatch)")
    b.add_argument("--no-doc-mask", dest="doc_mask", action="store_false",
                   help="let attention cross packed documents (plain causal attention: faster SDPA kernels)")
    b.add_argument("--no-plot", dest="plot", action="store_false", help="skip loss.png")
    b.add_argument("--debug-step-sleep", type=float, default=0.0, help=__import__("argparse").SUPPRESS)
    p.set_defaults(func=cmd_train)


# ---- corpus -> sources -----------------------------------------------------------------------------------------
def parse_mix(text: str | None) -> dict[str, float] | None:
    from omnigpt.cli import CommandError

    if not text:
        return None
    out = {}
    for item in text.split(","):
        name, eq, w = item.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise CommandError(f"--mix: {item!r} is not SOURCE=WEIGHT") from None
        if not eq or out[name.strip()] < 0:
            raise CommandError(f"--mix: {item!r} is not SOURCE=WEIGHT with a weight >= 0")
    return out


def open_corpus(data_dir: str, mix: dict[str, float] | None = None, tokenizer: str | None = None):
    """(TrainData, mixture weights, manifest) for a corpus directory. Sources with no training tokens are skipped."""
    from omnigpt.cli import CommandError
    from omnigpt.data.packing import ShardSource
    from omnigpt.data.shards import open_shards, read_manifest
    from omnigpt.train.trainer import TrainData

    path = Path(data_dir)
    if not path.is_dir():
        raise CommandError(f"--data {data_dir}: no such directory")
    manifest = read_manifest(path)  # names the problem: no manifest, unreadable, other format
    train = {n: r for n, r in open_shards(path, "train", tokenizer=tokenizer).items() if r.num_tokens > 0}
    if not train:
        raise CommandError(f"--data {data_dir}: the corpus has no training tokens")
    if mix is not None:
        unknown = sorted(set(mix) - set(train))
        if unknown:
            raise CommandError(f"--mix names {unknown[0]!r}, not a source of {data_dir} (sources: {', '.join(train)})")
        train = {n: r for n, r in train.items() if mix.get(n, 0) > 0}
        if not train:
            raise CommandError("--mix gives every source weight 0")
        weights = [mix[n] for n in train]
    else:
        weights = [float(r.num_tokens) for r in train.values()]  # natural proportions: one epoch ~ every document once
    val = {n: r for n, r in open_shards(path, "val", sources=[s for s in train if "val" in manifest["sources"][s]]).items() if r.num_tokens > 1}
    data = TrainData(train=[ShardSource(n, r) for n, r in train.items()], val=[ShardSource(n, r) for n, r in val.items()])
    return data, weights, manifest


def model_config(preset_name: str, overrides: list[str], manifest: dict):
    """The preset with --model overrides; vocab_size from the corpus tokenizer unless given."""
    from omnigpt.cli import CommandError
    from omnigpt.config import preset

    fields = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise CommandError(f"--model {item!r}: expected FIELD=VALUE")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    tok = manifest["tokenizer"]
    need = max(int(tok["vocab_size"]), int(tok["eot_id"]) + 1)
    if "vocab_size" in fields:
        if fields["vocab_size"] < need:
            raise CommandError(f"--model vocab_size={fields['vocab_size']} is smaller than the corpus tokenizer "
                               f"{tok['spec']} (ids up to {need - 1})")
    else:
        fields["vocab_size"] = int(math.ceil(need / 64) * 64)  # a multiple of 64 keeps the head matmul aligned
    try:
        return preset(preset_name, **fields)
    except TypeError as e:
        raise CommandError(f"--model: {e}") from None


def cmd_train(args) -> None:
    from omnigpt.train.parallelize import shutdown_distributed
    from omnigpt.train.trainer import train

    data, weights, manifest = open_corpus(args.data, parse_mix(args.mix), args.tokenizer)
    cfg = model_config(args.preset, args.model, manifest)
    if args.seq_len > cfg.max_seq_len:
        cfg = cfg.replace(max_seq_len=args.seq_len)  # RoPE needs no table; max_seq_len only bounds generation
    keys = set(TrainConfig.__dataclass_fields__)
    tc = TrainConfig(**{k: v for k, v in vars(args).items() if k in keys and k != "weights"}, out_dir=args.out, weights=weights,
                     tokenizer_sha256=manifest["tokenizer"].get("sha256"))
    try:
        train(cfg, tc, data, resume=args.resume)
    finally:
        shutdown_distributed()
