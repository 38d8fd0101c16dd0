"""Diagnostics for the CPU scaling ladder (issue 7): extra rungs, strict backtests and loss by position.

    # extra runs of the ladder recipe (LadderSpec defaults, no downstream task): widths x seeds into OUT/runs.jsonl
    python benchmarks/scaling_diag.py train --out runs/scaling-diag/base 88:0,1,2,3
    # the same with muP's width-independent input-embedding lr (the lr at --lr-ref-width, for every width)
    python benchmarks/scaling_diag.py train --out runs/scaling-diag/mup --embed-lr-const 8:0,1,2,3,4 24:0,1,2,3,4
    # another family (LadderSpec fields), e.g. four layers instead of two
    python benchmarks/scaling_diag.py train --out runs/scaling-diag/depth4 --set depth=4 -- 8:0,1,2 64:0,1
    # fit some widths (pure power law, as the ladder) and predict a held-out width, its seeds averaged
    python benchmarks/scaling_diag.py backtest --fit 8,12,16,20 --held 88 runs/scaling-cpu/runs.jsonl runs/scaling-diag/base/runs.jsonl
    # how much seed noise moves the ladder's own prediction (at the target's compute, 9.1e12 FLOPs)
    python benchmarks/scaling_diag.py backtest --fit 8,12,16,20,24 --at-flops 9.1e12 --bootstrap 500 runs/scaling-cpu/runs.jsonl
    # validation loss by position inside the document (WordNet entry), per run folder
    python benchmarks/scaling_diag.py positions runs/scaling-cpu/width8-r20 runs/scaling-diag/base/width88-r20

The strict backtest is the ladder's protocol one rung down: every fitted run uses at most 1/100 of the held-out
run's compute (widths 8-20 are <= 1/126 of width 88). Nothing here reads the ladder's target run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CORPUS = ROOT / "runs" / "corpora" / "wn320"
EDGES = [0, 1, 2, 4, 8, 16, 32, 64, 129]  # position buckets: [0], [1], [2, 4), ..., [64, 128]


def cmd_train(args) -> None:
    import torch

    import omnigpt.train.trainer as trainer
    from omnigpt.config import override_fields
    from omnigpt.scaling.ladder import LadderSpec, append_run, corpus_vocab, plan_run, read_runs, run_one

    torch.set_num_threads(args.threads)
    try:  # another family: LadderSpec fields, e.g. depth=4 seq_len=64
        spec = override_fields(LadderSpec(downstream="", mc_items=0), args.set)
    except ValueError as e:
        raise SystemExit(f"--set {e}") from None
    if args.embed_lr_const:  # muP (Tensor Programs V, table 3): input weights keep one lr at every width
        build = trainer.build_optimizer

        def with_embed_lr(model, kind="adamw", lr=3e-4, **kw):
            opt = build(model, kind, lr=lr, **kw)
            emb = model.embed.weight
            for g in opt.param_groups:
                g["params"] = [p for p in g["params"] if p is not emb]
            opt.param_groups = [g for g in opt.param_groups if g["params"]]
            opt.add_param_group(dict(params=[emb], weight_decay=kw.get("weight_decay", spec.weight_decay), lr=spec.lr))
            opt.param_groups[-1]["base_lr"] = spec.lr
            return opt

        trainer.build_optimizer = with_embed_lr
    out = Path(args.out)
    done = {r["name"] for r in read_runs(out / "runs.jsonl")}
    vocab = corpus_vocab(args.data)
    for item in args.runs:
        width, seeds = item.split(":")
        for seed in seeds.split(","):
            plan = plan_run(int(width), spec, vocab, seed=int(seed))
            if plan.name not in done:
                append_run(out / "runs.jsonl", {**run_one(plan, spec, args.data, out, None), "embed_lr_const": args.embed_lr_const})


def cmd_backtest(args) -> None:
    import numpy as np

    from omnigpt.scaling.fit import fit_power_law

    runs = {}
    for f in args.runs:
        for line in Path(f).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs.setdefault(r["name"], r)
    fit_w = [int(v) for v in args.fit.split(",")]
    fit = [r for r in runs.values() if r["value"] in fit_w]
    held = [r for r in runs.values() if r["value"] == args.held]
    law = fit_power_law([r["flops"] for r in fit], [r["val_loss"] for r in fit], irreducible=0)
    C = args.at_flops or held[0]["flops"]
    pred = float(law(C))
    if args.bootstrap:  # resample the seeds of each fitted width, refit, predict again
        rng = np.random.default_rng(0)
        by = [[r for r in fit if r["value"] == w] for w in fit_w]
        boot = []
        for _ in range(args.bootstrap):
            pick = [g[i] for g in by for i in rng.integers(0, len(g), len(g))]
            boot.append(float(fit_power_law([r["flops"] for r in pick], [r["val_loss"] for r in pick], irreducible=0)(C)))
        lo, hi = np.quantile(boot, [0.05, 0.95])
        print(f"prediction at C={C:.3g}: {pred:.4f}, seed-bootstrap 90% interval [{lo:.4f}, {hi:.4f}] "
              f"(sd {100 * np.std(boot) / pred:.2f}%)")
    if not held:
        return
    ys = np.array([r["val_loss"] for r in held])
    sem = ys.std(ddof=1) / math.sqrt(len(ys)) if len(ys) > 1 else float("nan")
    print(f"fit widths {fit_w} ({len(fit)} runs, largest 1/{C / max(r['flops'] for r in fit):.0f} of width {args.held}): "
          f"{law.describe()}")
    print(f"width {args.held}: predicted {pred:.4f}, actual {ys.mean():.4f} +- {sem:.4f} (mean +- s.e. of {len(ys)} seeds: "
          f"{', '.join(f'{y:.4f}' for y in ys)}), error {100 * (pred / ys.mean() - 1):+.2f}%")


def cmd_positions(args) -> None:
    import torch
    import torch.nn.functional as F

    from omnigpt.data.packing import IGNORE, eval_batches
    from omnigpt.evals.valloss import val_sources
    from omnigpt.model.weights import load_model
    from omnigpt.train import checkpoint as ckpt

    torch.set_num_threads(args.threads)
    print("run  loss | by position " + " ".join(f"[{a},{b})" for a, b in zip(EDGES, EDGES[1:])))
    for d in args.dirs:
        model = load_model(ckpt.latest_checkpoint(Path(d) / "checkpoints"), device="cpu").eval()
        S, N = torch.zeros(len(EDGES) - 1, dtype=torch.float64), torch.zeros(len(EDGES) - 1, dtype=torch.float64)
        with torch.no_grad():
            for src in val_sources(args.data):  # the ladder's val slice: 60k tokens per source, seq 128
                for b in eval_batches(src, 128, 16, max_batches=-(-60_000 // (128 * 16))):
                    logits = model(b.inputs, doc_ids_BT=b.doc_ids, pos_BT=b.pos).logits
                    loss = F.cross_entropy(logits.float().flatten(0, 1), b.targets.flatten(), ignore_index=IGNORE, reduction="none")
                    ok, pos = b.targets.flatten() != IGNORE, b.pos.flatten()
                    for i, (lo, hi) in enumerate(zip(EDGES, EDGES[1:])):
                        sel = ok & (pos >= lo) & (pos < hi)
                        S[i] += loss[sel].double().sum()
                        N[i] += sel.sum()
        print(f"{d} {float(S.sum() / N.sum()):.4f} | " + " ".join(f"{x:.3f}" for x in (S / N).tolist()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--data", default=str(CORPUS))
    t.add_argument("--embed-lr-const", action="store_true")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="LadderSpec overrides: another family")
    t.add_argument("runs", nargs="+", metavar="WIDTH:SEEDS")
    b = sub.add_parser("backtest")
    b.add_argument("--fit", required=True)
    b.add_argument("--held", type=int, default=0, help="the held-out width, its seeds averaged")
    b.add_argument("--at-flops", type=float, help="predict at this compute instead of the held-out width's")
    b.add_argument("--bootstrap", type=int, default=0, help="seed-bootstrap resamples of the fit (0: none)")
    b.add_argument("runs", nargs="+", metavar="RUNS.jsonl")
    p = sub.add_parser("positions")
    p.add_argument("--data", default=str(CORPUS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("dirs", nargs="+")
    args = ap.parse_args()
    {"train": cmd_train, "backtest": cmd_backtest, "positions": cmd_positions}[args.cmd](args)


if __name__ == "__main__":
    main()
