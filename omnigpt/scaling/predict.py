"""Predict a run's final loss (and a downstream metric) from much smaller runs, then check the prediction.

Like the GPT-4 report's figures 1 and 2: fit L(C) = a C^-b + c on runs that each used at most `max_fraction` of
the target's compute, write the prediction down before the target trains, train it, report the error, and plot
fit, points, prediction and outcome. Downstream metrics are fitted as -log(metric) for rates (accuracy) and as
-metric for mean log-probabilities (`mc_logp_pass`, the report's "mean log pass rate": log p of the right answer,
the probability that a sample at temperature 1 is exactly right), with the same form. A rate is refused while the
small runs sit at what a model reaches without reading the question (chance or the most common answer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from omnigpt.scaling.fit import PowerLaw, ScalingError, check_points, fit_power_law

# metric name in a run record -> (how it is fitted, label)
METRICS = {
    "val_loss": ("identity", "validation loss (nats/token)"),
    "val_bpb": ("identity", "validation bits per byte"),
    "mc_acc": ("neglog", "-log multiple-choice accuracy"),
    "mc_acc_norm": ("neglog", "-log multiple-choice accuracy (per byte)"),
    "mc_acc_pmi": ("neglog", "-log multiple-choice accuracy (calibrated)"),
    "mc_logp_correct": ("negate", "-mean log p(right choice | the choices)"),
    "mc_logp_pass": ("negate", "-mean log pass rate (nats per item)"),  # log p(right answer | context), summed
    "mc_logp_norm": ("negate", "-mean log p(correct choice), per-byte scores"),
    "mc_logp_pmi": ("negate", "-mean log p(correct choice), calibrated"),
}


def to_fitted(metric: str, values) -> np.ndarray:
    kind = METRICS.get(metric, ("identity", metric))[0]
    v = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"identity": v, "neglog": -np.log(v), "negate": -v}[kind]


def from_fitted(metric: str, y: float) -> float:
    kind = METRICS.get(metric, ("identity", metric))[0]
    return {"identity": y, "neglog": math.exp(-y), "negate": -y}[kind]


def check_runs(records: list[dict], metric: str = "val_loss") -> None:
    """Refuse (ScalingError) when a run diverged or lacks a finite value of the metric."""
    bad = []
    for r in records:
        v = r.get(metric)
        if r.get("diverged"):
            bad.append(f"{r['name']} ({r['diverged']})")
        elif v is None or not math.isfinite(float(v)):
            bad.append(f"{r['name']} ({metric} is {v})")
    if bad:
        raise ScalingError("refusing to predict: run(s) diverged: " + "; ".join(bad))


def check_above_prior(records: list[dict], metric: str) -> None:
    """Refuse (ScalingError) to extrapolate a rate (an accuracy) that the runs at the largest fitted compute hold
    at the level a model reaches without reading the question (`mc_prior`: chance, or the most common answer's
    share when the choices repeat): there is no trend yet, only the prior. Needs `mc_prior` in the records; the
    margin is two standard errors of the mean accuracy over those runs."""
    if METRICS.get(metric, ("identity",))[0] != "neglog":
        return
    priors = [r["mc_prior"] for r in records if r.get("mc_prior") is not None]
    if not priors:
        return
    prior = max(priors)
    top = max(r["flops"] for r in records)
    at_top = [r for r in records if r["flops"] >= top * (1 - 1e-9)]
    acc = float(np.mean([r[metric] for r in at_top]))
    n = sum(int(r.get("mc_n") or 0) for r in at_top)
    margin = 2 * math.sqrt(max(prior * (1 - prior), 1e-12) / n) if n else 0.0
    if acc <= prior + margin:
        raise ScalingError(f"refusing to predict {metric}: the largest fitted runs score {acc:.3f}, not above the "
                           f"{prior:.3f} a model reaches without reading the question (chance or the most common "
                           f"answer) by 2 standard errors ({margin:.3f}); there is no trend to extrapolate")


FIT_AXES = {"flops": "omnigpt FLOPs: 6N per token plus the attention scores (the compute spent)",
            "6nd": "6ND: 6 x matmul parameters x tokens (Kaplan, Chinchilla; attention scores left out)"}


def axis_compute(rec: dict, axis: str = "flops") -> float:
    """A run's compute on a fit axis (FIT_AXES). The 1/100 budget rule is always in FLOPs, what a run costs."""
    if axis == "flops":
        return float(rec["flops"])
    if axis == "6nd":
        return 6.0 * rec["params"] * rec["tokens"]
    raise ValueError(f"unknown fit axis {axis!r}: choose from {', '.join(FIT_AXES)}")


@dataclass
class Prediction:
    metric: str
    target: str
    target_flops: float
    predicted: float  # in the metric's own units
    law: dict  # PowerLaw fields, fitted on to_fitted(metric) against compute on `axis`
    fit_runs: list[str]
    largest_fraction: float  # the largest fitted run's FLOPs / the target's
    actual: float | None = None
    error: float | None = None  # (predicted - actual) / actual
    extra: dict = field(default_factory=dict)
    axis: str = "flops"  # the compute axis of the fit (FIT_AXES)
    target_compute: float | None = None  # the target's compute on that axis

    def to_dict(self) -> dict:
        return asdict(self)


def choose_floor(C, y, names=None, what: str = "loss") -> tuple[float | None, dict]:
    """Pick between fitting the irreducible term c and a pure power law (c = 0) by a backtest: fit each form
    on all but the runs at the largest compute, predict those, and keep c only if that cuts the error by more
    than 10% (on a tie the simpler law wins). With
    a few points spanning one or two decades c is barely identified, and a spurious c bends the extrapolation
    (the fit of c would follow noise); the backtest decides on the fitted runs alone, before the target exists."""
    C, y = np.asarray(C, dtype=float), np.asarray(y, dtype=float)
    held = C == C.max()
    if (~held).sum() < 3 or len(np.unique(C[~held])) < 3:
        return None, {"reason": "too few runs below the largest to backtest; c fitted"}
    errs = {}
    for label, floor in (("fitted c", None), ("c = 0", 0.0)):
        try:
            law = fit_power_law(C[~held], y[~held], irreducible=floor, what=what)
            errs[label] = float(np.mean(np.abs(law(C[held]) / y[held] - 1)))
        except ScalingError:
            errs[label] = float("inf")
    pick = "fitted c" if errs["fitted c"] < 0.9 * errs["c = 0"] else "c = 0"  # the extra parameter must earn its keep
    return (0.0 if pick == "c = 0" else None), {"backtest_error": errs, "chosen": pick}


def predict(records: list[dict], target_name: str, target_flops: float, *, metric: str = "val_loss",
            max_fraction: float = 0.01, irreducible: float | str | None = "auto", axis: str = "flops",
            target_compute: float | None = None) -> tuple[Prediction, PowerLaw]:
    """Fit the runs (all must use <= max_fraction of target_flops) and predict the target's metric.
    irreducible: a number fixes c, None fits it, "auto" chooses between the two by a backtest (choose_floor).
    axis: the compute the law is fitted against (FIT_AXES); off "flops", target_compute is the target's on it."""
    if axis != "flops" and target_compute is None:
        raise ValueError(f"fit axis {axis!r} needs the target's compute on it (target_compute)")
    Ct = target_flops if axis == "flops" else float(target_compute)
    if not records:
        raise ScalingError("refusing to predict: no runs to fit")
    too_big = [r for r in records if r["flops"] > max_fraction * target_flops * (1 + 1e-9)]
    if too_big:
        r = max(too_big, key=lambda r: r["flops"])
        raise ScalingError(f"refusing to predict: run {r['name']} used 1/{target_flops / r['flops']:.0f} of the target's "
                           f"compute; the limit is 1/{1 / max_fraction:.0f}")
    check_runs(records, metric)
    check_above_prior(records, metric)
    C = np.array([axis_compute(r, axis) for r in records])
    y = to_fitted(metric, [r[metric] for r in records])
    names = [r["name"] for r in records]
    what = METRICS.get(metric, (None, metric))[1]
    check_points(C, y, what=what, names=names)
    extra = {}
    if irreducible == "auto":
        irreducible, extra = choose_floor(C, y, names, what)
    law = fit_power_law(C, y, irreducible=irreducible, what=what, names=names)
    pred = Prediction(metric=metric, target=target_name, target_flops=target_flops,
                      predicted=from_fitted(metric, float(law(Ct))), law=law.to_dict(), fit_runs=names,
                      largest_fraction=max(r["flops"] for r in records) / target_flops, extra=extra, axis=axis,
                      target_compute=Ct)
    return pred, law


def score(pred: Prediction, actual: float) -> Prediction:
    pred.actual = float(actual)
    pred.error = (pred.predicted - pred.actual) / pred.actual if actual else float("nan")
    return pred


def plot_prediction(records: list[dict], law: PowerLaw, pred: Prediction, path, title: str = "") -> None:
    """GPT-4 report figure 1 / 2 style: compute normalised to the target's (target = 1), fitted runs as points,
    the fit extended to the target, the prediction and (when known) the outcome."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ct = pred.target_compute or pred.target_flops
    C = np.array([axis_compute(r, pred.axis) for r in records])
    y = to_fitted(pred.metric, [r[pred.metric] for r in records])
    xs = np.logspace(np.log10(C.min() / 2), np.log10(Ct * 2), 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot(xs / Ct, law(xs), "--", color="#666", lw=1.2, label="fit: " + law.describe().replace("L(C) = ", ""))
    ax.scatter(C / Ct, y, color="#777", zorder=3, label=f"fitted runs ({len(C)})")
    yp = float(law(Ct))
    ax.scatter([1.0], [yp], marker="o", facecolors="none", edgecolors="#1f77b4", s=90, lw=2, zorder=4,
               label=f"prediction {pred.predicted:.4g}")
    if pred.actual is not None:
        ya = float(to_fitted(pred.metric, [pred.actual])[0])
        ax.scatter([1.0], [ya], marker="*", color="#2ca02c", s=140, zorder=5,
                   label=f"outcome {pred.actual:.4g} (error {100 * pred.error:+.2f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("compute (fraction of the target run's)" + ("" if pred.axis == "flops" else ", 6ND"))
    ax.set_ylabel(METRICS.get(pred.metric, (None, pred.metric))[1])
    ax.set_title(title or f"predicting {pred.target} from runs with <= {pred.largest_fraction:.2g} of its compute", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
