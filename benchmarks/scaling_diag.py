"""Diagnostics for the CPU scaling ladder (issue 7): extra rungs, strict backtests and loss by position.

    # extra runs of the ladder recipe (LadderSpec defaults, no downstream task): widths x seeds into OUT/runs.jsonl
    python benchmarks/scaling_diag.py train --out runs/scaling-diag/base 88:0,1,2,3
    # the same with muP's width-independent input-embedding lr (the lr at --lr-ref-width, for every width)
    python benchmarks/scaling_diag.py train --out runs/scaling-diag/mup --embed-lr-const 8:0,1,2,3,4 24:0,1,2,3,4
    # another family (LadderSpec fields), e.g. four layers instead of two
    python benchmarks/scaling_diag.py train --out runs/scaling-diag/depth4 --set depth=4 -- 8:0,1,2 64:0,1
    # fit some widths (pure power law, as the ladder) and predict a held-out width, its seeds averaged
    python benchmarks/scaling_diag.py backtest --fit 8,12,16,20 --held 88 runs/scaling-cpu/runs.jsonl runs/scaling-diag/base/runs.jsonl
    # the same on a 6ND compute axis (attention-score FLOPs not counted), with the seed-bootstrap spread of the prediction
    python benchmarks/scaling_diag.py backtest --fit 8,12,16,20 --held 128 --convention 6nd --bootstrap 1000 runs/scaling-diag/fixattn/runs.jsonl
    # pre-register a prediction for a width not yet trained (planned with the fit runs' recipe), written as JSON
    python benchmarks/scaling_diag.py backtest --fit 8,12,16,20 --predict-width 160 --convention 6nd --bootstrap 1000 --write PRED.json runs/scaling-diag/fixattn/runs.jsonl
    # how much seed noise moves the ladder's own prediction (at the target's compute, 9.1e12 FLOPs)
    python benchmarks/scaling_diag.py backtest --fit 8,12,16,20,24 --at-flops 9.1e12 --bootstrap 500 runs/scaling-cpu/runs.jsonl
    # Chinchilla approach 1: runs of several token budgets per width (--set tokens_per_param=R), seeds averaged; fit
    # the compute frontier (the runs no cheaper run beats) and N_opt(C), place a held-out run on it, then score it
    python benchmarks/scaling_diag.py frontier --max-flops 6.6e10 --at-flops 6.6e12 runs/scaling-diag/frontier/runs.jsonl
    python benchmarks/scaling_diag.py frontier --max-flops 6.6e10 --held width84-r12.3 runs/scaling-diag/frontier/runs.jsonl
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


def runs_by_name(paths) -> dict[str, dict]:
    """The run records of several runs.jsonl files, the first record of each name."""
    runs = {}
    for f in paths:
        for line in Path(f).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs.setdefault(r["name"], r)
    return runs


def cmd_backtest(args) -> None:
    import numpy as np

    from omnigpt.scaling.fit import ScalingError, fit_power_law
    from omnigpt.scaling.predict import axis_compute

    runs = runs_by_name(args.runs)
    fit_w = [int(v) for v in args.fit.split(",")]
    fit = [r for r in runs.values() if r["value"] in fit_w]
    held = [r for r in runs.values() if r["value"] == args.held]
    # compute axis: omnigpt's 6N + 12 L H hd T (the records' flops), or 6ND (attention scores not counted, as Kaplan/Chinchilla)
    axis = "flops" if args.convention == "omnigpt" else "6nd"
    flops = lambda r: axis_compute(r, axis)  # noqa: E731
    law = fit_power_law([flops(r) for r in fit], [r["val_loss"] for r in fit], irreducible=0)
    target = None
    if getattr(args, "predict_width", 0):  # a width nobody has trained: plan it with the fit runs' own recipe
        from omnigpt.data.shards import read_manifest
        from omnigpt.scaling.ladder import LadderSpec, plan_run

        specs = {json.dumps(r["spec"], sort_keys=True) for r in fit}
        if len(specs) != 1:
            raise SystemExit(f"--predict-width: the fit runs have {len(specs)} recipes, not one")
        p = plan_run(args.predict_width, LadderSpec(**fit[0]["spec"]), fit[0]["model"]["vocab_size"])
        c6 = {"omnigpt": p.flops, "6nd": axis_compute(vars(p), "6nd")}
        corpus = Path(getattr(args, "data", None) or CORPUS)
        train_tokens = sum(s["train"]["tokens"] for s in read_manifest(corpus)["sources"].values())
        target = {"width": args.predict_width, "params": p.params, "tokens": p.tokens, "steps": p.steps,
                  "flops_omnigpt": p.flops, "flops_6nd": c6["6nd"], "epochs": p.tokens / train_tokens,
                  "corpus_train_tokens": train_tokens,
                  "largest_fit_fraction_omnigpt": max(r["flops"] for r in fit) / p.flops,
                  "largest_fit_fraction_6nd": max(axis_compute(r, "6nd") for r in fit) / c6["6nd"]}
        print(f"width {p.value} planned from the fit runs' recipe: N {p.params:,}, D {p.tokens:,} ({p.steps} steps, "
              f"{target['epochs']:.3f} epochs of {corpus.name}'s {train_tokens:,} training tokens), C omnigpt {p.flops:.4g}, "
              f"6ND {c6['6nd']:.4g}; largest fit run 1/{1 / target['largest_fit_fraction_omnigpt']:.0f} (omnigpt), "
              f"1/{1 / target['largest_fit_fraction_6nd']:.0f} (6ND)")
        C = c6[args.convention]
    else:
        C = args.at_flops or flops(held[0])
    pred = float(law(C))
    if args.bootstrap:  # resample the seeds of each fitted width, refit, predict again
        rng = np.random.default_rng(0)
        by = [[r for r in fit if r["value"] == w] for w in fit_w]
        boot = []
        refused = 0
        for _ in range(args.bootstrap):
            pick = [g[i] for g in by for i in rng.integers(0, len(g), len(g))]
            try:
                boot.append(float(fit_power_law([flops(r) for r in pick], [r["val_loss"] for r in pick], irreducible=0)(C)))
            except ScalingError:  # a resample whose loss does not fall with compute
                refused += 1
        lo, hi = np.quantile(boot, [0.05, 0.95])
        print(f"prediction at C={C:.3g}: {pred:.4f}, seed-bootstrap 90% interval [{lo:.4f}, {hi:.4f}] "
              f"(sd {100 * np.std(boot) / pred:.2f}%; {refused} of {args.bootstrap} resamples refused)")
    if target is not None:
        print(f"fit widths {fit_w} ({len(fit)} runs, {args.convention} FLOPs): {law.describe()}, rms log {law.rms_log:.4f}")
        print(f"width {target['width']}: predicted {pred:.4f} at C={C:.4g} ({args.convention})")
        if getattr(args, "write", None):
            rec = {"fit_widths": fit_w, "fit_runs": len(fit), "convention": args.convention, "law": law.to_dict(),
                   "at_flops": C, "predicted": pred, **target}
            if args.bootstrap:
                rec.update({"bootstrap": args.bootstrap, "bootstrap_refused": refused, "interval90": [float(lo), float(hi)],
                            "bootstrap_sd_frac": float(np.std(boot) / pred)})
            Path(args.write).write_text(json.dumps(rec, indent=1) + "\n")
            print(f"wrote {args.write}")
    if not held:
        return
    ys = np.array([r["val_loss"] for r in held])
    sem = ys.std(ddof=1) / math.sqrt(len(ys)) if len(ys) > 1 else float("nan")
    print(f"fit widths {fit_w} ({len(fit)} runs, largest 1/{C / max(flops(r) for r in fit):.0f} of width {args.held}, "
          f"{args.convention} FLOPs): "
          f"{law.describe()}")
    print(f"width {args.held}: predicted {pred:.4f}, actual {ys.mean():.4f} +- {sem:.4f} (mean +- s.e. of {len(ys)} seeds: "
          f"{', '.join(f'{y:.4f}' for y in ys)}), error {100 * (pred / ys.mean() - 1):+.2f}%")


def cmd_frontier(args) -> None:
    """Chinchilla's approach 1 on final losses: average the seeds of each (width, token budget), keep the frontier (each
    point lower than every point of less or equal compute), fit L(C) (pure power law, the seed runs of the frontier
    points) and N_opt(C) (a line in log-log), and place a held-out run at --at-flops on it: the width whose N is
    nearest N_opt(C) (a multiple of 4), its tokens per parameter set so that its compute is C."""
    import numpy as np

    from omnigpt.scaling.fit import fit_power_law
    from omnigpt.scaling.ladder import LadderSpec, plan_run

    runs = runs_by_name(args.runs)
    groups = {}
    for r in runs.values():
        groups.setdefault(r["name"].rsplit("-s", 1)[0] if "-s" in r["name"] else r["name"], []).append(r)
    pts = sorted(((g[0]["flops"], float(np.mean([r["val_loss"] for r in g])), g[0]["params"], k, g) for k, g in groups.items()
                  if g[0]["flops"] <= args.max_flops), key=lambda t: t[0])
    front, best = [], float("inf")
    print("width-budget      C        N   seeds  mean loss  frontier")
    for C, L, N, k, g in pts:
        on = L < best
        best = min(best, L)
        if on:
            front.append((C, L, N, k, g))
        print(f"{k:14s} {C:9.3g} {N:7d} {len(g):5d} {L:10.4f}  {'*' if on else ''}")
    fit_runs = [r for *_, g in front for r in g]
    law = fit_power_law([r["flops"] for r in fit_runs], [r["val_loss"] for r in fit_runs], irreducible=0)
    lc, ln = np.log([p[0] for p in front]), np.log([p[2] for p in front])
    slope, icpt = np.polyfit(lc, ln, 1)
    print(f"frontier: {len(front)} points ({len(fit_runs)} runs); {law.describe()}, rms log {law.rms_log:.4f}; "
          f"N_opt(C) = {np.exp(icpt):.4g} * C^{slope:.3f}")
    spec = LadderSpec(downstream="", mc_items=0)
    if args.at_flops:
        n_opt = float(np.exp(icpt + slope * np.log(args.at_flops)))
        width = min(range(8, 257, 4), key=lambda w: abs(math.log(plan_run(w, spec, 320).params / n_opt)))
        cfg = plan_run(width, spec, 320).cfg
        ratio = round(args.at_flops / cfg.flops_per_token(spec.seq_len) / cfg.param_counts()["active_matmul"], 2)
        p = plan_run(width, spec, 320, tokens_per_param=ratio)
        print(f"at C={args.at_flops:.3g}: N_opt {n_opt:.4g} -> held-out width {width} (N {p.params}) at {ratio:g} tokens per "
              f"parameter: {p.steps} steps, C={p.flops:.4g} (largest frontier run 1/{p.flops / max(r['flops'] for r in fit_runs):.0f}); "
              f"predicted loss {float(law(p.flops)):.4f}")
    if args.held:
        held = [r for r in runs.values() if r["name"] == args.held or r["name"].startswith(args.held + "-s")]
        ys = np.array([r["val_loss"] for r in held])
        C = held[0]["flops"]
        pred = float(law(C))
        sem = ys.std(ddof=1) / math.sqrt(len(ys)) if len(ys) > 1 else float("nan")
        print(f"{args.held} (C={C:.4g}, largest frontier run 1/{C / max(r['flops'] for r in fit_runs):.0f}): predicted {pred:.4f}, "
              f"actual {ys.mean():.4f} +- {sem:.4f} ({', '.join(f'{y:.4f}' for y in ys)}), error {100 * (pred / ys.mean() - 1):+.2f}%")


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
    b.add_argument("--convention", choices=["omnigpt", "6nd"], default="omnigpt",
                   help="compute axis: omnigpt's 6N + 12 L H hd T, or 6ND (attention scores not counted)")
    b.add_argument("--predict-width", type=int, default=0,
                   help="predict a width not yet trained: plan it with the fit runs' recipe (its compute on --convention's axis)")
    b.add_argument("--data", default=str(CORPUS), help="with --predict-width: the corpus whose epochs are counted")
    b.add_argument("--write", help="with --predict-width: write the prediction (JSON) here")
    b.add_argument("runs", nargs="+", metavar="RUNS.jsonl")
    fr = sub.add_parser("frontier")
    fr.add_argument("--max-flops", type=float, required=True, help="fit only runs of at most this compute")
    fr.add_argument("--at-flops", type=float, help="place a held-out run of this compute on the fitted frontier")
    fr.add_argument("--held", help="score the runs of this name (without -sSEED), seeds averaged")
    fr.add_argument("runs", nargs="+", metavar="RUNS.jsonl")
    p = sub.add_parser("positions")
    p.add_argument("--data", default=str(CORPUS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("dirs", nargs="+")
    args = ap.parse_args()
    {"train": cmd_train, "backtest": cmd_backtest, "frontier": cmd_frontier, "positions": cmd_positions}[args.cmd](args)


if __name__ == "__main__":
    main()
