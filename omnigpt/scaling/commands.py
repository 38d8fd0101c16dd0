"""`omnigpt scaling sweep | fit | predict`: train a family of models, fit scaling laws, predict a bigger run.

    omnigpt scaling sweep   --data corpus/ --out runs/ladder --values 8,12,16,20,24
    omnigpt scaling fit     runs/ladder/runs.jsonl
    omnigpt scaling predict --data corpus/ --out runs/ladder --values 8,12,16,20 --target 96

A sweep appends one JSON line per run to OUT/runs.jsonl and skips runs already there (resumable). `predict`
fits only runs using at most --max-fraction of the target's compute (default 1/100 on CPU, 1/1000 on GPU),
writes OUT/prediction.json before the target trains, then trains it and adds the outcome and the error.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _family_args(p) -> None:
    from omnigpt.scaling.ladder import LadderSpec

    d = LadderSpec()
    p.add_argument("--data", required=True, metavar="CORPUS", help="corpus directory (omnigpt data build) with a val split")
    p.add_argument("--out", required=True, metavar="DIR", help="runs.jsonl, one folder per run, fits and plots")
    _axis_arg(p)
    f = p.add_argument_group("model family (one size dial)")
    f.add_argument("--dial", choices=("width", "depth"), default=d.dial)
    f.add_argument("--depth", type=int, default=d.depth, help="n_layers when --dial width")
    f.add_argument("--aspect", type=int, default=d.aspect, help="d_model per layer when --dial depth")
    f.add_argument("--head-dim", type=int, default=d.head_dim)
    f.add_argument("--n-heads", type=int, help=f"a fixed head count (default {d.n_heads}; 0: d_model / --head-dim heads)")
    f.add_argument("--fixed-attention", action="store_true", default=None,
                   help="--n-heads x --head-dim attention at every size: the dial moves the residual width, MLP and "
                        "embeddings, and small members have the same context machinery as large ones")
    f.add_argument("--seq-len", type=int, default=d.seq_len)
    b = f.add_mutually_exclusive_group()
    b.add_argument("--tokens-per-param", type=float, default=None, help=f"D = r * N (default {d.tokens_per_param:g})")
    b.add_argument("--tokens", type=int, help="a fixed token budget for every run instead")
    o = p.add_argument_group("recipe")
    o.add_argument("--lr", type=float, default=d.lr, help="AdamW lr at d_model = --lr-ref-width")
    o.add_argument("--lr-ref-width", type=int, default=d.lr_ref_width)
    o.add_argument("--lr-width-power", type=float, default=d.lr_width_power, help="lr scales as (ref/d_model)^power")
    o.add_argument("--steps-ref", type=int, default=d.steps_ref, help="optimizer steps of a 1M-token run")
    o.add_argument("--steps-power", type=float, default=d.steps_power, help="steps grow as D^power; the batch takes the rest")
    o.add_argument("--max-batch", type=int, default=d.max_batch)
    o.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="a fixed batch (rows per step) at every size, the steps taking the rest (0: --steps-ref/--steps-power)")
    o.add_argument("--beta2", type=float, default=d.beta2, help="AdamW second-moment decay")
    o.add_argument("--warmup-frac", type=float, default=d.warmup_frac)
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--seeds", help="train each size with these seeds (comma-separated), e.g. 0,1: the fit averages seed noise")
    o.add_argument("--val-tokens", type=int, default=d.val_tokens, help="val tokens scored per source")
    o.add_argument("--downstream", default=d.downstream, help="multiple-choice task scored per run: dict-pos, dict-def or ''")
    o.add_argument("--mc-items", type=int, default=d.mc_items)
    o.add_argument("--device", choices=("cpu", "cuda"))
    o.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")


def _axis_arg(p) -> None:
    from omnigpt.scaling.predict import FIT_AXES

    p.add_argument("--fit-axis", choices=list(FIT_AXES), default="flops",
                   help="compute axis of the fitted law: " + "; ".join(f"{k}: {v}" for k, v in FIT_AXES.items())
                        + ". The 1/100 (1/1000) budget rule is always in FLOPs")


def _spec(args):
    from omnigpt.scaling.ladder import LadderSpec

    keys = {f.name for f in fields(LadderSpec)}
    kw = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    if args.tokens is not None:
        kw["tokens_per_param"] = None
    spec = LadderSpec(**kw)
    spec.validate()
    return spec


def _seeds(args) -> list[int] | None:
    return _ints(args.seeds) if args.seeds else None


def _setup(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("scaling", help="scaling-law sweeps, fits and checked predictions", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="scaling_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("sweep", help="train a family of models along one size dial and fit L(C) (and L(N,D))")
    s.add_argument("--values", required=True, help="dial values, comma-separated (e.g. 8,12,16,20,24)")
    s.add_argument("--ratios", help="several tokens-per-parameter ratios (comma-separated): N and D both vary, "
                                    "and L(N,D) is fitted too")
    _family_args(s)
    s.set_defaults(func=cmd_sweep)

    f = sub.add_parser("fit", help="fit L(C) (and L(N,D) when both vary) to a runs.jsonl")
    f.add_argument("runs", help="runs.jsonl written by a sweep")
    f.add_argument("--metric", default="val_loss")
    f.add_argument("--plot", help="PNG of the fit")
    _axis_arg(f)
    f.set_defaults(func=cmd_fit)

    q = sub.add_parser("predict", help="predict a target run's loss from small runs, then train it and report the error")
    q.add_argument("--values", required=True, help="dial values of the small runs the fit uses")
    q.add_argument("--target", type=int, required=True, help="dial value of the run to predict")
    q.add_argument("--max-fraction", type=float, help="largest compute of a fitted run as a fraction of the target's "
                                                      "(default 0.01 on CPU, 0.001 on GPU)")
    q.add_argument("--downstream-metric", default="mc_logp_pass,mc_logp_correct,mc_acc",
                   help="run-record metrics predicted alongside the loss, comma-separated (mc_logp_pass: the mean log "
                        "pass rate; mc_logp_correct: mean log p of the right choice among the choices; mc_acc: "
                        "accuracy, refused while the small runs sit at chance; '' for none)")
    q.add_argument("--downstream-max-fraction", type=float, help="like --max-fraction, for the downstream metric (default: the same)")
    q.add_argument("--irreducible", default="0", help="the floor c of L(C): a number fixes it (default 0: a pure power "
                                                      "law), 'fit' fits it, 'auto' picks fitted c or c = 0 by a backtest "
                                                      "on the small runs. Fit runs spanning a decade or two do not "
                                                      "identify c: a fitted floor bent every held-out backtest of the "
                                                      "CPU ladder (benchmarks/RESULTS.md)")
    q.add_argument("--no-train", action="store_true", help="only predict; do not train the target")
    _family_args(q)
    q.set_defaults(func=cmd_predict)


# ---- fit -------------------------------------------------------------------------------------------------------
def fit_records(records: list[dict], metric: str = "val_loss", axis: str = "flops") -> dict:
    """L(C) on every run (C on the fit axis), and L(N,D) when tokens-per-parameter varies. Raises ScalingError when
    it should not fit."""
    from omnigpt.scaling.fit import both_vary, fit_chinchilla
    from omnigpt.scaling.predict import METRICS, axis_compute, check_runs, to_fitted
    from omnigpt.scaling.fit import fit_power_law

    check_runs(records, metric)
    C = [axis_compute(r, axis) for r in records]
    out = {"metric": metric, "axis": axis, "runs": [r["name"] for r in records]}
    law = fit_power_law(C, to_fitted(metric, [r[metric] for r in records]), what=METRICS.get(metric, (0, metric))[1],
                        names=out["runs"])
    out["L(C)"] = {**law.to_dict(), "formula": law.describe()}
    N, D = [r["params"] for r in records], [r["tokens"] for r in records]
    if metric == "val_loss" and both_vary(N, D) and len(records) >= 5:
        ch = fit_chinchilla(N, D, [r[metric] for r in records])
        out["L(N,D)"] = {**ch.to_dict(), "formula": ch.describe()}
    return out, law


def _plot_fit(records, law, metric, path, title, axis: str = "flops") -> None:
    from omnigpt.scaling.predict import Prediction, axis_compute, plot_prediction

    top = max(records, key=lambda r: r["flops"])
    Ct = axis_compute(top, axis)
    pred = Prediction(metric=metric, target="largest run", target_flops=top["flops"], predicted=float(law(Ct)),
                      law=law.to_dict(), fit_runs=[], largest_fraction=1.0, axis=axis, target_compute=Ct)
    plot_prediction(records, law, pred, path, title=title)


def _print_fit(fit: dict) -> None:
    print(f"[scaling] {fit['L(C)']['formula']}  (rms log residual {fit['L(C)']['rms_log']:.4f}, {fit['L(C)']['n']} runs)")
    if "L(N,D)" in fit:
        print(f"[scaling] {fit['L(N,D)']['formula']}  (rms log residual {fit['L(N,D)']['rms_log']:.4f})")


def cmd_sweep(args) -> int:
    from omnigpt.scaling.ladder import sweep

    _setup(args)
    spec = _spec(args)
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else None
    records = sweep(_ints(args.values), spec, args.data, args.out, ratios=ratios, seeds=_seeds(args))
    out = Path(args.out)
    if len({r["flops"] for r in records}) < 3:  # e.g. extra seeds of one size: the runs are recorded, a fit needs more
        print(f"[scaling] {len(records)} run(s) recorded in {out / 'runs.jsonl'}; no fit (it needs 3 or more sizes)")
        return 0
    fit, law = fit_records(records, axis=args.fit_axis)
    (out / "fit.json").write_text(json.dumps(fit, indent=2) + "\n")
    _plot_fit(records, law, "val_loss", out / "fit.png", f"{len(records)} runs along {spec.dial}", args.fit_axis)
    _print_fit(fit)
    print(f"[scaling] runs: {out / 'runs.jsonl'}; fit: {out / 'fit.json'}, {out / 'fit.png'}")
    return 0


def cmd_fit(args) -> int:
    from omnigpt.scaling.ladder import read_runs

    records = read_runs(args.runs)
    if not records:
        raise ValueError(f"{args.runs}: no runs")
    fit, law = fit_records(records, args.metric, args.fit_axis)
    _print_fit(fit)
    print(json.dumps(fit, indent=2))
    if args.plot:
        _plot_fit(records, law, args.metric, args.plot, f"{len(records)} runs", args.fit_axis)
    return 0


# ---- predict ---------------------------------------------------------------------------------------------------
def cmd_predict(args) -> int:
    import torch

    from omnigpt.scaling.fit import ScalingError
    from omnigpt.scaling.ladder import append_run, corpus_vocab, downstream_items, plan_run, read_runs, run_one, sweep
    from omnigpt.scaling.predict import axis_compute, plot_prediction, predict, score

    _setup(args)
    spec = _spec(args)
    on_gpu = (spec.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    max_fraction = args.max_fraction or (0.001 if on_gpu else 0.01)
    out = Path(args.out)
    target = plan_run(args.target, spec, corpus_vocab(args.data))
    values = _ints(args.values)
    # Check the budgets before training anything.
    small = [plan_run(v, spec, corpus_vocab(args.data)) for v in values]
    over = [p for p in small if p.flops > max_fraction * target.flops]
    if over:
        raise ScalingError(f"refusing: run {over[-1].name} would use 1/{target.flops / over[-1].flops:.0f} of the target's "
                           f"compute ({target.name}, C={target.flops:.3g}); the limit is 1/{1 / max_fraction:.0f}")
    print(f"[scaling] target {target.name}: N={target.params:,} D={target.tokens:,} C={target.flops:.3g}; "
          f"fitting {len(values)} sizes x {len(_seeds(args) or [spec.seed])} seed(s), each <= 1/{1 / max_fraction:.0f} of its compute")
    records = sweep(values, spec, args.data, out, seeds=_seeds(args))

    preds, laws = {}, {}
    floor = {"auto": "auto", "fit": None}.get(args.irreducible)
    if floor is None and args.irreducible != "fit":
        try:
            floor = float(args.irreducible)
        except ValueError:
            raise ValueError(f"--irreducible {args.irreducible!r}: expected auto, fit or a number") from None
    on_axis = dict(axis=args.fit_axis, target_compute=axis_compute(vars(target), args.fit_axis))
    pred, laws["val_loss"] = predict(records, target.name, target.flops, max_fraction=max_fraction, irreducible=floor, **on_axis)
    preds["val_loss"] = pred
    if pred.extra.get("chosen"):
        errs = ", ".join(f"{k} {100 * v:.2f}%" for k, v in pred.extra["backtest_error"].items())
        print(f"[scaling] backtest on the largest small runs: {errs}; using {pred.extra['chosen']}")
    print(f"[scaling] fit {laws['val_loss'].describe()}; predicted final val loss of {target.name}: {pred.predicted:.4f}")
    refused = {}  # metric -> why no prediction (the runs sit at chance, ...); the outcome is still reported
    for dm in [m.strip() for m in (args.downstream_metric or "").split(",") if m.strip()]:
        if not all(dm in r for r in records):
            continue
        try:
            p2, laws[dm] = predict(records, target.name, target.flops, metric=dm,
                                   max_fraction=args.downstream_max_fraction or max_fraction, irreducible=floor, **on_axis)
            preds[dm] = p2
            print(f"[scaling] predicted {dm} of {target.name}: {p2.predicted:.4f}")
        except ScalingError as e:
            refused[dm] = {"metric": dm, "refused": str(e), "small_runs": {r["name"]: r[dm] for r in records}}
            print(f"[scaling] {dm}: {e}")

    def predictions() -> dict:
        return {**{k: v.to_dict() for k, v in preds.items()}, **refused}

    doc = {"target": {"name": target.name, "params": target.params, "tokens": target.tokens, "flops": target.flops,
                      "fit_axis": args.fit_axis, "compute_on_axis": on_axis["target_compute"]},
           "recipe": {k: v for k, v in vars(spec).items() if k not in ("device",)},
           "max_fraction": max_fraction, "predictions": predictions()}
    (out / "prediction.json").write_text(json.dumps(doc, indent=2) + "\n")  # on disk before the target trains
    if args.no_train:
        return 0

    done = {r["name"]: r for r in read_runs(out / "runs.jsonl")}  # sweep() checked that they share the recipe
    if target.name in done:
        result = done[target.name]
        print(f"[scaling] {target.name} already trained ({out / 'runs.jsonl'})")
    else:
        mc = downstream_items(args.data, spec.downstream, spec.mc_items, spec.seed)
        result = run_one(target, spec, args.data, out, mc)
        append_run(out / "runs.jsonl", result)
    if result.get("diverged") or not math.isfinite(result.get("val_loss", float("nan"))):
        raise ScalingError(f"the target run {target.name} diverged ({result.get('diverged')}); no error to report")
    for k, r in refused.items():
        r["actual"] = result.get(k)
    for k, p in preds.items():
        if k not in result:
            continue
        score(p, result[k])
        plot_prediction([r for r in records if r["name"] in p.fit_runs], laws[k], p, out / f"predict_{k}.png")
        print(f"[scaling] {k}: predicted {p.predicted:.4f}, actual {p.actual:.4f}, error {100 * p.error:+.2f}% "
              f"(plot {out / f'predict_{k}.png'})")
    doc["predictions"] = predictions()
    doc["target"]["seconds"] = result.get("seconds")
    (out / "prediction.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0
