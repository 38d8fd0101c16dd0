"""Power-law fits for predictable scaling, and the checks that refuse to fit meaningless points.

    loss vs compute        L(C)   = a * C^(-b) + c                      (GPT-4 report figure 1; Kaplan et al.)
    loss vs params/data    L(N,D) = E + A / N^alpha + B / D^beta         (Chinchilla, Hoffmann et al. approach 3)
    a downstream metric    -log(rate)(C) = a * C^(-b) + c                 (GPT-4 report figure 2; c may be 0)

Fits are least squares on log(L) (relative errors: every point counts the same whatever its loss), with C
measured in units of the largest fitted compute so the parameters are well scaled. The initialisation is a grid
over the irreducible term c: for a fixed c, log(L - c) is linear in log(C), so each grid point is a closed-form
line fit; the best one starts a bounded `scipy.optimize.least_squares` refinement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


class ScalingError(ValueError):
    """The points cannot support a fit or a prediction (too few, diverged, not improving with scale)."""


# ---- checks ----------------------------------------------------------------------------------------------------
def check_points(xs, ys, *, what: str = "loss", min_points: int = 3, names=None, monotone: bool = True) -> None:
    """Raise ScalingError unless there are >= min_points finite points and (monotone) y falls as x grows."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    names = list(names) if names is not None else [f"point {i}" for i in range(len(xs))]
    bad = [n for n, x, y in zip(names, xs, ys) if not (math.isfinite(x) and math.isfinite(y) and x > 0)]
    if bad:
        raise ScalingError(f"refusing to fit: {', '.join(bad)} diverged or has no finite {what} (NaN/inf)")
    if len(xs) < min_points:
        raise ScalingError(f"refusing to fit: {len(xs)} point(s), need at least {min_points} distinct compute budgets")
    if len(np.unique(xs)) < min_points:
        raise ScalingError(f"refusing to fit: only {len(np.unique(xs))} distinct compute values, need {min_points}")
    if not monotone:
        return
    # Mean over the runs at each compute (several seeds), which must fall at every step up in compute.
    ux = np.unique(xs)
    means = np.array([ys[xs == x].mean() for x in ux])
    if means[-1] >= means[0]:
        raise ScalingError(f"refusing to fit: {what} does not fall with compute ({means[0]:.4g} at the smallest "
                           f"run, {means[-1]:.4g} at the largest): the runs are not in a scaling regime")
    rise = np.nonzero(np.diff(means) >= 0)[0]
    if len(rise):
        i = int(rise[0])
        who = [n for n, x in zip(names, xs) if x == ux[i + 1]]
        raise ScalingError(f"refusing to fit: {what} rises with compute, from {means[i]:.4g} at C={ux[i]:.3g} to "
                           f"{means[i + 1]:.4g} at C={ux[i + 1]:.3g} ({', '.join(who)}): a run went wrong or the "
                           "sizes are too close to separate from noise")


def curve_diverged(losses, *, rise: float = 0.1) -> str | None:
    """Why a training curve counts as diverged, or None: a non-finite value, or the end of the curve (moving
    average over a fifth of the logged values, at least 3) risen more than `rise` (relative) above its lowest
    point. Batch-to-batch noise of small runs stays well inside that; a blow-up does not."""
    ls = np.asarray([float(x) for x in losses])
    if not len(ls):
        return None
    if not np.all(np.isfinite(ls)):
        return "non-finite loss"
    w = max(3, len(ls) // 5)
    smooth = np.convolve(ls, np.ones(w) / w, mode="valid") if len(ls) >= w else ls
    if smooth[-1] > smooth.min() * (1 + rise):
        return f"loss rose from {smooth.min():.4g} to {smooth[-1]:.4g} at the end of training"
    return None


# ---- L(C) = a * C^-b + c ---------------------------------------------------------------------------------------
@dataclass
class PowerLaw:
    """y = a * (C / C0)^(-b) + c, with C0 the largest fitted compute (so `a` is y - c at C0)."""

    a: float
    b: float
    c: float
    C0: float
    rms_log: float = 0.0  # root mean square residual of log(y) at the fitted points
    n: int = 0

    def __call__(self, C):
        return self.a * (np.asarray(C, dtype=float) / self.C0) ** (-self.b) + self.c

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"L(C) = {self.a:.4g} * (C / {self.C0:.3g})^(-{self.b:.4g}) + {self.c:.4g}"


def _line_fit(logx, logy_minus_c):
    """Least-squares line logy = la - b * logx; returns (la, b, residual sum of squares of the line)."""
    A = np.stack([np.ones_like(logx), -logx], axis=1)
    coef, *_ = np.linalg.lstsq(A, logy_minus_c, rcond=None)
    return coef[0], coef[1]


def fit_power_law(C, y, *, irreducible: float | None = None, min_points: int = 3, what: str = "loss",
                  names=None) -> PowerLaw:
    """Fit y = a * C^-b + c in log space. `irreducible` fixes c (0 gives a pure power law); otherwise c is fitted
    in [0, min(y)). Raises ScalingError on too few, non-finite or non-improving points."""
    from scipy.optimize import least_squares

    C, y = np.asarray(C, dtype=float), np.asarray(y, dtype=float)
    check_points(C, y, what=what, min_points=min_points, names=names)
    C0 = float(C.max())
    x = np.log(C / C0)
    ly = np.log(y)

    def resid(p, c):
        la, b = p[0], p[1]
        return np.log(np.exp(la) * np.exp(-b * x) + c) - ly

    def full_resid(p):
        return resid(p, p[2])

    # Grid over c (closed-form line fit for each), then a bounded refinement of all three parameters.
    ymin = float(y.min())
    grid = [irreducible] if irreducible is not None else list(ymin * np.linspace(0.0, 0.98, 50))
    best = None
    for c in grid:
        if np.any(y - c <= 0):
            continue
        la, b = _line_fit(x, np.log(y - c))
        b = max(b, 1e-6)
        cost = float(np.sum(resid((la, b), c) ** 2))
        if best is None or cost < best[0]:
            best = (cost, la, b, c)
    _, la, b, c = best
    if irreducible is None:
        lo, hi = [-np.inf, 1e-6, 0.0], [np.inf, 5.0, ymin * (1 - 1e-6)]
        p0 = np.clip([la, b, c], [v + 1e-9 if np.isfinite(v) else v for v in lo], [v - 1e-9 if np.isfinite(v) else v for v in hi])
        try:
            sol = least_squares(full_resid, p0, bounds=(lo, hi), method="trf", x_scale="jac")
            if sol.success and np.sum(sol.fun ** 2) <= best[0] + 1e-15:
                la, b, c = sol.x
        except ValueError:
            pass  # keep the grid optimum
    else:
        sol = least_squares(lambda p: resid(p, c), [la, b], bounds=([-np.inf, 1e-6], [np.inf, 5.0]), method="trf")
        if sol.success:
            la, b = sol.x
    r = resid((la, b), c)
    return PowerLaw(a=float(np.exp(la)), b=float(b), c=float(c), C0=C0, rms_log=float(np.sqrt(np.mean(r ** 2))), n=len(C))


# ---- L(N, D) = E + A / N^alpha + B / D^beta --------------------------------------------------------------------
@dataclass
class ChinchillaLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rms_log: float = 0.0
    n: int = 0

    def __call__(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"L(N,D) = {self.E:.4g} + {self.A:.4g}/N^{self.alpha:.4g} + {self.B:.4g}/D^{self.beta:.4g}"

    def optimal_split(self, C: float, flops_per_param_token: float = 6.0) -> tuple[float, float]:
        """(N, D) minimising L at compute C = k * N * D (closed form, Chinchilla eq. 4)."""
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        a, b = self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)
        return G * (C / flops_per_param_token) ** a, (C / flops_per_param_token) ** b / G


def both_vary(N, D, tol: float = 0.05) -> bool:
    """True when tokens-per-parameter changes across the runs (N and D vary independently), so L(N,D) is
    identifiable; a sweep at a fixed ratio only determines L(C)."""
    r = np.log(np.asarray(D, dtype=float) / np.asarray(N, dtype=float))
    return len(r) > 1 and float(r.max() - r.min()) > tol


def fit_chinchilla(N, D, L, *, min_points: int = 5, delta: float = 1e-3) -> ChinchillaLaw:
    """Chinchilla approach 3: minimise a Huber loss on log L - log(E + A/N^alpha + B/D^beta).

    Initialisation by variable projection: for fixed (alpha, beta) the law is linear in (E, A, B), so a grid over
    the exponents with a non-negative least-squares solve (relative errors) at each point finds the basin; one
    bounded `least_squares(loss="huber")` refinement in log space then polishes all five parameters."""
    from scipy.optimize import least_squares, nnls

    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    if not both_vary(N, D):
        raise ScalingError("refusing to fit L(N,D): every run has the same tokens per parameter, so N and D are "
                           "not separable; vary the token budget (or fit L(C))")
    check_points(N * D, L, min_points=min_points, monotone=False)  # L(N,D) need not fall with N*D alone
    best = None
    for alpha in np.linspace(0.05, 1.0, 39):
        for beta in np.linspace(0.05, 1.0, 39):
            X = np.stack([np.ones_like(N), N ** -alpha, D ** -beta], axis=1) / L[:, None]
            coef, rnorm = nnls(X, np.ones_like(L))
            if best is None or rnorm < best[0]:
                best = (rnorm, coef, alpha, beta)
    _, (E, A, B), alpha, beta = best
    lN, lD, lL = np.log(N), np.log(D), np.log(L)

    def resid(p):
        e, a, b, al, be = p
        return np.log(np.exp(e) + np.exp(a - al * lN) + np.exp(b - be * lD)) - lL

    tiny = 1e-12 * float(L.min())
    p0 = [np.log(max(E, tiny)), np.log(max(A, tiny)), np.log(max(B, tiny)), alpha, beta]
    sol = least_squares(resid, p0, bounds=([-np.inf, -np.inf, -np.inf, 0.01, 0.01], [np.inf, np.inf, np.inf, 2, 2]),
                        loss="huber", f_scale=delta)
    e, a, b, alpha, beta = sol.x if sol.success else p0
    law = ChinchillaLaw(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha), B=float(np.exp(b)), beta=float(beta), n=len(L))
    law.rms_log = float(np.sqrt(np.mean(resid([e, a, b, alpha, beta]) ** 2)))
    return law
