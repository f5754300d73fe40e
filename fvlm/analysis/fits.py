"""Scaling-law fits: per-size data scaling, joint Chinchilla, iso-FLOP minima, bootstrap intervals.

The exponents make every one of these fits non-convex, and a single local start lands wherever it
starts. The least-squares fits are therefore solved globally: for fixed exponents the model is
linear in its coefficients, so the coefficients are solved exactly on a grid of exponents and the
best grid cell is then refined. The Huber fit of Hoffmann et al. (approach 3) has no such linear
part; it runs L-BFGS from the best points of a grid of starts, as they did.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import re
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
from scipy import optimize
from scipy.special import logsumexp

HUBER_DELTA = 1e-3
# Resampling whole runs keeps the autocorrelation of a curve's points together, but with few runs
# the resamples are a handful of near-identical sets; below this many runs, points are resampled.
MIN_RUNS_FOR_RUN_BOOTSTRAP = 5
EXPONENT_MAX = 3.0
# The Chinchilla law L(N, D) = E + A / N^alpha + B / D^beta (D in tokens, not samples): context for
# our exponents only, never used in a fit. Hoffmann et al. 2022 (approach 3) print E = 1.69,
# A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28, rounded so far that the law's predictions shift;
# Besiroglu, Erdil, Barnett and You 2024 ("Chinchilla Scaling: A replication attempt") refit the
# same data and publish the estimates below at full precision. This is the one place they live.
CHINCHILLA_REFERENCE = {
    "source": "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt (refit of Hoffmann et al. 2022, "
    "approach 3)",
    "form": "L(N, D) = E + A / N^alpha + B / D^beta",
    "E": 1.8172,
    "A": 482.01,
    "B": 2085.43,
    "alpha": 0.3478,
    "beta": 0.3658,
    "as_printed_by_hoffmann_2022": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
    "note": "text-only LLMs with D in tokens; our D is samples, so only the exponents are comparable",
}


# ----------------------------------------------------------------------------- records


class Identification(TypedDict):
    """Whether a fit's numbers can be read as a result (`identification`)."""

    identified: bool
    not_identified_because: list[str]


class DataScalingParams(TypedDict):
    """The least-squares L(D) = E + a / D^b of one set of points."""

    E: float
    a: float
    b: float
    sse: float
    rmse: float
    n_points: int
    b_at_bound: bool


class DataScalingFit(DataScalingParams, Identification):
    """`fit_data_scaling`'s record: the fit and whether it is identified."""


class BootstrapResult(TypedDict):
    """`bootstrap`'s record: per key its percentile 95% interval (None with under 10 refits that
    had a value), and how the resamples were drawn."""

    ci95: dict[str, list[float] | None]
    unit: str  # "runs" or "points"
    n_resamples: int
    note: str


class IsoFlopEntry(TypedDict):
    """One run's finished point, for the iso-FLOP fits (`iso_flop`'s entries)."""

    run_id: str
    arch: str
    N: float
    D: float
    C: float
    loss: float


# ----------------------------------------------------------------------------- identification


# A plateau under this share of the lowest loss fitted is a plateau driven to zero: a fit whose E is a
# log-parameter (E > 0 by construction) reaches it only by running e = log E off to minus infinity,
# the bound of E's range, because the data show no floor.
PLATEAU_AT_ZERO = 1e-3


def identification(
    fit: Mapping[str, Any], bounds: dict[str, tuple[float, float]], converged: bool, lowest_loss: float | None = None
) -> Identification:
    """Whether a fit's numbers can be read as a result: not when the optimiser did not converge, when an
    exponent sits at the bound of its search range (the data would have it go further: the law's
    shape is not pinned down), when a plateau E (or a per-size E + A/N^alpha) is below zero, which
    no loss can reach, or (given `lowest_loss`, the lowest loss fitted) when a plateau is driven to
    zero, its own bound. Returns {"identified": bool, "not_identified_because": [reasons]}."""
    reasons = [] if converged else ["the optimiser did not converge"]
    for key, (lo, hi) in bounds.items():
        value = fit.get(key)
        if value is None:
            continue
        tol = 1e-4 * (hi - lo)
        if value <= lo + tol or value >= hi - tol:
            reasons.append(f"{key} = {value:.4g} at its bound {lo if value <= lo + tol else hi:g}")
    plateaus = {"E": fit.get("E")} | {f"E[{k}]": v for k, v in (fit.get("E_by_size") or {}).items()}
    reasons += [f"plateau {k} = {v:.4g} below zero" for k, v in plateaus.items() if v is not None and v < 0]
    if lowest_loss is not None:
        reasons += [
            f"plateau {k} = {v:.4g} at its bound 0 (under {PLATEAU_AT_ZERO:g} of the lowest loss fitted, "
            f"{lowest_loss:.4g}: the data show no floor)"
            for k, v in plateaus.items()
            if v is not None and 0 <= v < PLATEAU_AT_ZERO * lowest_loss
        ]
    return {"identified": not reasons, "not_identified_because": reasons}


def not_identified_text(fit: Mapping[str, Any]) -> str:
    return "not identified (" + "; ".join(fit["not_identified_because"]) + ")"


# ----------------------------------------------------------------------------- per size: L(D) = E + a / D^b


def _profile_sse(x: np.ndarray, loss: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each exponent b, the exact least-squares (E, a') of loss = E + a' x^-b, and its SSE.

    A straight-line regression of loss on z = x^-b per exponent, so SSE = Syy - Szy^2 / Szz
    (S: centred sums) needs no residual array: the per-size bootstrap evaluates this on a
    600-exponent grid for each of its thousands of refits."""
    z = np.exp(np.multiply.outer(-b, np.log(x)))
    z_mean = z.mean(axis=1)
    zc = z - z_mean[:, None]
    lc = loss - loss.mean()
    szy = zc @ lc
    szz = np.einsum("ij,ij->i", zc, zc)
    slope = np.where(szz > 0, szy / np.where(szz > 0, szz, 1), 0.0)
    intercept = loss.mean() - slope * z_mean
    return intercept, slope, np.maximum(lc @ lc - slope * szy, 0.0)


def fit_data_scaling(samples: np.ndarray, loss: np.ndarray) -> DataScalingFit:
    """Global least-squares fit of L(D) = E + a / D^b. Needs at least 3 points."""
    samples = np.asarray(samples, float)
    loss = np.asarray(loss, float)
    # Working in D / D0 keeps x^-b near 1 for every b, so the linear solve stays well conditioned.
    d0 = float(np.exp(np.mean(np.log(samples))))
    x = samples / d0
    grid = np.linspace(1e-3, EXPONENT_MAX, 600)
    _, _, sse = _profile_sse(x, loss, grid)
    k = int(np.argmin(sse))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(
        lambda b: _profile_sse(x, loss, np.array([b]))[2][0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-8}
    )
    b = float(res.x) if res.fun <= sse[k] else float(grid[k])
    e, a_scaled, _ = (float(v[0]) for v in _profile_sse(x, loss, np.array([b])))
    resid = loss - e - a_scaled * x**-b
    sse_best = float(resid @ resid)  # from the residuals themselves, free of Syy - Szy^2/Szz's cancellation
    params: DataScalingParams = {
        "E": e,
        "a": a_scaled * d0**b,
        "b": b,
        "sse": sse_best,
        "rmse": math.sqrt(sse_best / len(loss)),
        "n_points": int(len(loss)),
        "b_at_bound": bool(b >= EXPONENT_MAX - 1e-6 or b <= 1e-3 + 1e-9),
    }
    return {**params, **identification(params, {"b": (1e-3, EXPONENT_MAX)}, bool(res.success))}


def predict_data_scaling(fit: DataScalingParams, samples: np.ndarray | float) -> np.ndarray:
    return fit["E"] + fit["a"] / np.asarray(samples, float) ** fit["b"]


# ----------------------------------------------------------------------------- joint: L(N, D)


@dataclass
class JointData:
    n: np.ndarray  # parameters per point
    d: np.ndarray  # samples per point
    loss: np.ndarray
    size: np.ndarray  # integer size index per point (for the per-size-offset form)
    run: np.ndarray  # integer run index per point (for the bootstrap)
    size_labels: list[str]

    @property
    def n_sizes(self) -> int:
        return len(self.size_labels)

    def take(self, idx: np.ndarray) -> JointData:
        return JointData(self.n[idx], self.d[idx], self.loss[idx], self.size[idx], self.run[idx], self.size_labels)


def _design(data: JointData, alpha: float | None, beta: float, n0: float, d0: float) -> np.ndarray:
    """Columns of the model linear in its coefficients at fixed exponents.

    With three or more sizes: [1, (N/N0)^-alpha, (D/D0)^-beta]. With fewer, A/N^alpha only ever
    takes one value per size, so it cannot be told apart from E: one offset column per size.
    """
    d_term = (data.d / d0) ** -beta
    if alpha is None:
        onehot = (data.size[:, None] == np.arange(data.n_sizes)[None, :]).astype(float)
        return np.column_stack([onehot, d_term])
    return np.column_stack([np.ones_like(data.d), (data.n / n0) ** -alpha, d_term])


def _lstsq_sse(design: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, float]:
    coef, *_ = np.linalg.lstsq(design, loss, rcond=None)
    resid = loss - design @ coef
    return coef, float(resid @ resid)


def _offsets_grid_sse(data: JointData, betas: np.ndarray, d0: float) -> np.ndarray:
    """The per-size-offset form's (fewer than three sizes) SSE at every beta of a grid, all at once:
    the designs [one offset column per size, (D/D0)^-beta] stacked into one [betas, points, columns]
    array, columns scaled to unit norm, and the normal equations solved in one batch (a
    pseudo-inverse where one is singular). The same numbers as _lstsq_sse beta by beta."""
    d_terms = (data.d[None, :] / d0) ** -betas[:, None]
    onehot = (data.size[:, None] == np.arange(data.n_sizes)[None, :]).astype(float)
    design = np.concatenate([np.broadcast_to(onehot, (len(betas), *onehot.shape)), d_terms[..., None]], axis=-1)
    design = design / np.maximum(np.linalg.norm(design, axis=1, keepdims=True), 1e-300)
    transposed = design.transpose(0, 2, 1)
    try:
        coef = np.linalg.solve(transposed @ design, transposed @ data.loss[:, None])
    except np.linalg.LinAlgError:
        coef = np.linalg.pinv(design) @ data.loss[:, None]
    resid = data.loss[None, :] - (design @ coef)[..., 0]
    return (resid**2).sum(axis=1)


def _product_grid_sse(data: JointData, alphas: np.ndarray, betas: np.ndarray, n0: float, d0: float) -> np.ndarray:
    """The SSE of the best linear coefficients at every (alpha, beta) of alphas x betas ([alphas,
    betas]; the same numbers as _lstsq_sse cell by cell), from the normal equations: the design's
    columns are 1, (N/N0)^-alpha and (D/D0)^-beta, so every entry of every cell's 3x3 Gram matrix is
    a sum over points that a product of the [alphas, points] and [betas, points] term matrices gives
    for all cells at once. Columns are scaled to unit norm before the solve, and
    SSE = y'y - coef'X'y. The bootstrap refits this grid
    2,000 times: built this way it costs a few [60, points] x [points, 60] products instead of a
    [3600, points, 3] design per refit (about 15x faster on 81 points)."""
    y = data.loss
    n_t = (data.n[None, :] / n0) ** -alphas[:, None]  # [A, P]
    d_t = (data.d[None, :] / d0) ** -betas[:, None]  # [B, P]
    a, b = len(alphas), len(betas)
    gram = np.empty((a, b, 3, 3))
    gram[..., 0, 0] = len(y)
    gram[..., 0, 1] = gram[..., 1, 0] = n_t.sum(axis=1)[:, None]
    gram[..., 0, 2] = gram[..., 2, 0] = d_t.sum(axis=1)[None, :]
    gram[..., 1, 1] = (n_t**2).sum(axis=1)[:, None]
    gram[..., 2, 2] = (d_t**2).sum(axis=1)[None, :]
    gram[..., 1, 2] = gram[..., 2, 1] = n_t @ d_t.T
    rhs = np.empty((a, b, 3))
    rhs[..., 0] = y.sum()
    rhs[..., 1] = (n_t @ y)[:, None]
    rhs[..., 2] = (d_t @ y)[None, :]
    scale = np.sqrt(np.maximum(np.diagonal(gram, axis1=-2, axis2=-1), 1e-300))  # the columns' norms
    gram = gram / (scale[..., :, None] * scale[..., None, :])
    rhs = rhs / scale
    try:
        coef = np.linalg.solve(gram, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        coef = (np.linalg.pinv(gram) @ rhs[..., None])[..., 0]
    return np.maximum(y @ y - (coef * rhs).sum(axis=-1), 0.0)


def fit_joint_least_squares(data: JointData) -> dict[str, Any]:
    n0 = float(np.exp(np.mean(np.log(data.n))))
    d0 = float(np.exp(np.mean(np.log(data.d))))
    identifiable = data.n_sizes >= 3
    grid = np.linspace(0.02, EXPONENT_MAX, 60)

    def sse_of(exps: np.ndarray) -> float:
        alpha = float(exps[0]) if identifiable else None
        return _lstsq_sse(_design(data, alpha, float(exps[-1]), n0, d0), data.loss)[1]

    if identifiable:
        cells = np.array([(a, b) for a in grid for b in grid])
        scores = _product_grid_sse(data, grid, grid, n0, d0).reshape(-1)  # the same order as cells
    else:
        cells = grid[:, None]
        scores = _offsets_grid_sse(data, grid, d0)
    start = cells[int(np.argmin(scores))]
    res = optimize.minimize(sse_of, start, method="L-BFGS-B", bounds=[(1e-3, EXPONENT_MAX)] * len(start))
    exps = res.x if res.fun <= min(scores) else start
    alpha = float(exps[0]) if identifiable else None
    beta = float(exps[-1])
    coef, sse = _lstsq_sse(_design(data, alpha, beta, n0, d0), data.loss)
    out = _joint_record(data, coef, alpha, beta, n0, d0)
    out.update(method="least_squares", sse=sse, rmse=math.sqrt(sse / len(data.loss)))
    out.update(identification(out, {"alpha": (1e-3, EXPONENT_MAX), "beta": (1e-3, EXPONENT_MAX)}, bool(res.success)))
    return out


def _joint_record(
    data: JointData, coef: np.ndarray, alpha: float | None, beta: float, n0: float, d0: float
) -> dict[str, Any]:
    """Coefficients back in raw units (N in parameters, D in samples)."""
    record: dict[str, Any] = {"alpha": alpha, "beta": beta, "B": float(coef[-1] * d0**beta)}
    if alpha is None:
        record.update(E=None, A=None, E_by_size={lab: float(coef[i]) for i, lab in enumerate(data.size_labels)})
    else:
        record.update(E=float(coef[0]), A=float(coef[1] * n0**alpha), E_by_size=None)
    return record


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def fit_joint_huber(
    data: JointData, delta: float = HUBER_DELTA, n_starts: int = 16, extra_starts: list[np.ndarray] | None = None
) -> dict[str, Any]:
    """n_starts = 0 skips the grid and starts only from extra_starts (a bootstrap resample starts
    from the full-data optimum)."""
    """Hoffmann et al. approach 3: Huber loss on log L, L-BFGS from the best points of a start grid.

    Parameters are logs (e = log E per size or shared, a = log A, b = log B) and exponents, so the
    prediction is log L = logsumexp(e, a - alpha log N, b - beta log D).
    """
    log_n, log_d, log_l = np.log(data.n), np.log(data.d), np.log(data.loss)
    identifiable = data.n_sizes >= 3
    onehot = (data.size[:, None] == np.arange(data.n_sizes)[None, :]).astype(float)

    def terms(theta: np.ndarray) -> np.ndarray:
        if identifiable:
            e, a, b, alpha, beta = theta
            return np.column_stack([np.full_like(log_d, e), a - alpha * log_n, b - beta * log_d])
        es, b, beta = theta[:-2], theta[-2], theta[-1]
        return np.column_stack([onehot @ es, b - beta * log_d])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = terms(theta)
        # log-sum-exp of two or three terms per point, shifted by their maximum so exp never
        # overflows: scipy.special.logsumexp gives the same numbers, but its per-call overhead was
        # most of the bootstrap's 2,000 refits (about 50,000 calls).
        top = t.max(axis=1, keepdims=True)
        w = np.exp(t - top)
        total = w.sum(axis=1)
        pred = top[:, 0] + np.log(total)
        w /= total[:, None]
        value, g = _huber(pred - log_l, delta)
        if identifiable:
            grad = np.array([g @ w[:, 0], g @ w[:, 1], g @ w[:, 2], -(g * w[:, 1]) @ log_n, -(g * w[:, 2]) @ log_d])
        else:
            grad = np.concatenate([onehot.T @ (g * w[:, 0]), [g @ w[:, 1], -(g * w[:, 1]) @ log_d]])
        # Divided by delta: the same minimiser, but gradients of order one, so L-BFGS's absolute
        # gradient tolerance does not stop it at its start when residuals are all beyond delta.
        return float(value.sum()) / delta, grad / delta

    if identifiable:
        axes = [
            np.linspace(-1, 1, 5),
            np.arange(0, 30, 5.0),
            np.arange(0, 30, 5.0),
            np.linspace(0, 2, 5),
            np.linspace(0, 2, 5),
        ]
    else:
        axes = [np.linspace(-1, 1, 5)] * data.n_sizes + [np.arange(0, 30, 5.0), np.linspace(0, 2, 5)]
    starts = list(extra_starts or [])
    if n_starts:
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
        scores = _grid_huber(grid, log_n, log_d, log_l, onehot, identifiable, delta)
        starts = list(grid[np.argsort(scores)[:n_starts]]) + starts
    bounds = [(None, None)] * (len(axes) - 2) + [(None, None), (0.0, EXPONENT_MAX)]
    if identifiable:
        bounds = [(None, None)] * 3 + [(0.0, EXPONENT_MAX)] * 2
    best: optimize.OptimizeResult | None = None
    for start in starts:
        res = optimize.minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 500})
        if best is None or res.fun < best.fun:
            best = res
    assert best is not None, "no start to fit from: n_starts = 0 and no extra_starts"
    theta = best.x
    pred = np.exp(logsumexp(terms(theta), axis=1))
    resid = data.loss - pred
    record: dict[str, Any]  # _joint_record's keys, then the Huber fit's own (method, objective, theta, ...)
    if identifiable:
        e, a, b, alpha, beta = (float(v) for v in theta)
        record = {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta, "E_by_size": None}
    else:
        record = {
            "E": None,
            "A": None,
            "B": math.exp(float(theta[-2])),
            "alpha": None,
            "beta": float(theta[-1]),
            "E_by_size": {lab: math.exp(float(theta[i])) for i, lab in enumerate(data.size_labels)},
        }
    record.update(
        method="huber_log",
        huber_delta=delta,
        objective=float(best.fun) * delta,
        rmse=math.sqrt(float(resid @ resid) / len(resid)),
        theta=[float(v) for v in theta],
        n_starts=len(starts),
    )
    record.update(
        identification(
            record,
            {"alpha": (0.0, EXPONENT_MAX), "beta": (0.0, EXPONENT_MAX)},
            bool(best.success),
            lowest_loss=float(data.loss.min()),
        )
    )
    return record


def _grid_huber(
    grid: np.ndarray,
    log_n: np.ndarray,
    log_d: np.ndarray,
    log_l: np.ndarray,
    onehot: np.ndarray,
    identifiable: bool,
    delta: float,
) -> np.ndarray:
    """The Huber objective at every grid point at once (the grid has thousands of points)."""
    scores = np.empty(len(grid))
    for lo in range(0, len(grid), 512):
        g = grid[lo : lo + 512]
        if identifiable:
            t = np.stack(
                [
                    np.broadcast_to(g[:, :1], (len(g), len(log_d))),
                    g[:, 1:2] - g[:, 3:4] * log_n[None, :],
                    g[:, 2:3] - g[:, 4:5] * log_d[None, :],
                ],
                axis=-1,
            )
        else:
            t = np.stack([g[:, :-2] @ onehot.T, g[:, -2:-1] - g[:, -1:] * log_d[None, :]], axis=-1)
        scores[lo : lo + 512] = _huber(logsumexp(t, axis=-1) - log_l[None, :], delta)[0].sum(axis=1)
    return scores


def predict_joint(fit: dict[str, Any], n: float, d: np.ndarray | float, size: str | None = None) -> np.ndarray | None:
    """Loss at (N, D); for a fit with per-size offsets, only at the sizes it was fitted on."""
    d = np.asarray(d, float)
    if fit.get("alpha") is not None:
        return fit["E"] + fit["A"] / n ** fit["alpha"] + fit["B"] / d ** fit["beta"]
    offsets = fit.get("E_by_size") or {}
    if size not in offsets:
        return None
    return offsets[size] + fit["B"] / d ** fit["beta"]


# ----------------------------------------------------------------------------- bootstrap

# The process pool that refits bootstrap resamples inside `refits_in_processes`; None outside it.
_POOL: ProcessPoolExecutor | None = None
_POOL_JOBS = 1


@contextlib.contextmanager
def refits_in_processes(jobs: int) -> Iterator[None]:
    """Within it, `bootstrap` refits its resamples in `jobs` spawned processes (fit functions must
    then be picklable: module-level functions or partials of them). The resamples are drawn as
    before, so the intervals are the same as on one process. Almost all of an analysis is these
    refits: 2,000 per fit, each one an optimisation."""
    global _POOL, _POOL_JOBS
    if jobs <= 1 or _POOL is not None:
        yield
        return
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        _POOL, _POOL_JOBS = pool, jobs
        try:
            yield
        finally:
            _POOL, _POOL_JOBS = None, 1


def _refit(
    fit: Callable[[np.ndarray], Mapping[str, Any]], keys: list[str], resamples: list[np.ndarray]
) -> list[list[float | None]]:
    """fit(idx)[key] for each resample, as floats (None where the fit has no value)."""
    rows = []
    for idx in resamples:
        result = fit(idx)
        rows.append([float(result[k]) if result.get(k) is not None else None for k in keys])
    return rows


def bootstrap(
    run_index: np.ndarray,
    fit: Callable[[np.ndarray], Mapping[str, Any]],
    keys: list[str],
    n_boot: int,
    seed: int,
    strata: np.ndarray | None = None,
) -> BootstrapResult:
    """Percentile 95% intervals of fit(idx)[key] over resamples of whole runs or of points.

    Resampling happens within each stratum (model size), so no resample loses a size; runs are the
    unit only when every stratum has enough of them.
    """
    rng = np.random.default_rng(seed)
    strata = np.zeros(len(run_index), int) if strata is None else strata
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    runs_per_group = [np.unique(run_index[g]) for g in groups]
    by_run = min(len(r) for r in runs_per_group) >= MIN_RUNS_FOR_RUN_BOOTSTRAP
    resamples = []
    for _ in range(n_boot):
        parts = []
        for members, runs in zip(groups, runs_per_group):
            if by_run:
                parts += [np.flatnonzero(run_index == r) for r in rng.choice(runs, size=len(runs), replace=True)]
            else:
                parts.append(rng.choice(members, size=len(members), replace=True))
        resamples.append(np.concatenate(parts))
    if _POOL is None:
        values = _refit(fit, keys, resamples)
    else:  # the same resamples refitted in chunks by the pool's processes, results in order
        chunk = -(-len(resamples) // (4 * _POOL_JOBS))
        futures = [_POOL.submit(_refit, fit, keys, resamples[i : i + chunk]) for i in range(0, len(resamples), chunk)]
        values = [row for future in futures for row in future.result()]
    draws = {k: [v for row in values if (v := row[i]) is not None] for i, k in enumerate(keys)}
    intervals = {
        k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 10 else None)
        for k, v in draws.items()
    }
    fewest = min(len(r) for r in runs_per_group)
    note = (
        f"{n_boot} resamples of whole runs within each size"
        if by_run
        else f"{n_boot} resamples of points within each size: the fewest runs in a size is {fewest}, below "
        f"{MIN_RUNS_FOR_RUN_BOOTSTRAP}; points along one curve are correlated, so these intervals are optimistic"
    )
    return {"ci95": intervals, "unit": "runs" if by_run else "points", "n_resamples": n_boot, "note": note}


# ----------------------------------------------------------------------------- iso-FLOP


def chinchilla_allocation_exponent(reference: dict[str, Any] = CHINCHILLA_REFERENCE) -> float:
    """N* ~ C^a of L = E + A/N^alpha + B/D^beta under C ~ N D: a = beta / (alpha + beta)."""
    return reference["beta"] / (reference["alpha"] + reference["beta"])


def compare_allocation_exponents(by_arch: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The N*(C) exponents of the foveated and the baseline arm's iso-FLOP fits side by side (plan:
    "N ~ C^a exponents differ?"), with the Chinchilla reference's; unknown, with the reason, when
    an arm has fewer than two budgets with an interior minimum."""
    out: dict[str, Any] = {"chinchilla": chinchilla_allocation_exponent(), "arms": {}}
    missing = []
    for arch, iso in by_arch.items():
        law = iso.get("N_star_of_C")
        if law:
            out["arms"][arch] = {"a": law["a"], "n_budgets": law["n_budgets"]}
        else:
            missing.append(f"{arch}: {iso.get('note', 'no iso-FLOP fit')}")
    for arch in ("foveated", "multi_token"):
        if arch not in by_arch:
            missing.append(f"{arch}: no runs")
    if missing:
        out.update(verdict="unknown", evidence="N*(C) exponent missing for " + "; ".join(missing))
        return out
    a_f, a_b = out["arms"]["foveated"]["a"], out["arms"]["multi_token"]["a"]
    out.update(
        difference=a_f - a_b,
        verdict="measured",
        evidence=f"foveated N* ~ C^{a_f:.3f}, baseline N* ~ C^{a_b:.3f} (difference {a_f - a_b:+.3f}; "
        f"Chinchilla {out['chinchilla']:.3f}); from "
        f"{out['arms']['foveated']['n_budgets']} and {out['arms']['multi_token']['n_budgets']} "
        "budgets with interior minima, no interval (one point per budget)",
    )
    return out


_BUDGET_RE = re.compile(r"(?:^|[-_])(C\d+)(?:[-_]|$)")


def budget_label(run_id: str) -> str | None:
    match = _BUDGET_RE.search(run_id)
    return match.group(1) if match else None


def group_budgets(entries: list[IsoFlopEntry], by_label: bool = True) -> dict[str, list[IsoFlopEntry]]:
    """Runs grouped by FLOP budget: the plan's C1..C4 label in the run id, else (or with
    by_label=False) by total FLOPs (runs within a factor 1.5 of each other share a budget)."""
    groups: dict[str, list[IsoFlopEntry]] = {}
    unlabeled = []
    for entry in entries:
        label = budget_label(entry["run_id"]) if by_label else None
        if label:
            groups.setdefault(label, []).append(entry)
        elif entry.get("C"):
            unlabeled.append(entry)
    unlabeled.sort(key=lambda e: e["C"])
    cluster: list[IsoFlopEntry] = []
    for entry in unlabeled:
        if cluster and entry["C"] > 1.5 * cluster[0]["C"]:
            groups[f"{cluster[0]['C']:.2g}"] = cluster
            cluster = []
        cluster.append(entry)
    if cluster:
        groups[f"{cluster[0]['C']:.2g}"] = cluster
    return groups


def iso_flop(entries: list[IsoFlopEntry], by_label: bool = True) -> dict[str, Any]:
    """Parabola of final loss in log10 N per budget, its minimum N*, D* = C / FLOPs-per-sample(N*),
    and power laws N*(C), D*(C) across budgets. entries: run_id, N, C, D, loss. by_label=False groups
    by the FLOPs actually spent (the baseline's iso-sample cells spend more than their label says)."""
    budgets = {}
    for label, group in group_budgets(entries, by_label).items():
        sizes = sorted({e["N"] for e in group})
        record: dict[str, Any] = {
            "runs": [e["run_id"] for e in group],
            "n_sizes": len(sizes),
            "sizes": [float(n) for n in sizes],
            "C": float(np.exp(np.mean(np.log([e["C"] for e in group])))),
        }
        if len(sizes) < 3:
            record["note"] = f"{len(sizes)} model size(s) at this budget; a parabola needs 3"
            budgets[label] = record
            continue
        x = np.log10([e["N"] for e in group])
        y = np.array([e["loss"] for e in group])
        c2, c1, c0 = np.polyfit(x, y, 2)
        record["parabola"] = {"c2": float(c2), "c1": float(c1), "c0": float(c0), "x": "log10(N)"}
        if c2 <= 0:
            record["note"] = "the loss is not convex in log N at this budget: no minimum"
        else:
            x_star = -c1 / (2 * c2)
            record["N_star"] = float(10**x_star)
            # A minimum is interior only when the parabola's vertex lies strictly between the smallest and
            # the largest size and a size other than those two has the lowest loss: otherwise the data
            # only say the optimum is at or beyond an edge of the grid.
            best = int(np.argmin(y))
            lowest = x[best]
            record["interior"] = bool(x.min() < x_star < x.max() and x.min() < lowest < x.max())
            # Where the measured optimum is when it is not interior: at the grid's smallest or largest
            # size (lowest loss there), or a middle size whose parabola puts its vertex outside.
            record["lowest_N"] = float(group[best]["N"])
            record["loss_at_N_star"] = float(c0 - c1**2 / (4 * c2))
            fps = np.array([e["C"] / e["D"] for e in group])
            slope, icpt = np.polyfit(x, np.log10(fps), 1)
            record["D_star"] = float(record["C"] / 10 ** (icpt + slope * x_star))
        budgets[label] = record
    out: dict[str, Any] = {"budgets": budgets}
    # N*(C) only from interior minima: an extrapolated N* is not a measurement of the optimum.
    optimal = [b for b in budgets.values() if b.get("interior")]
    if len(optimal) >= 2:
        log_c = np.log10([b["C"] for b in optimal])
        for key in ("N_star", "D_star"):
            exponent, icpt = np.polyfit(log_c, np.log10([b[key] for b in optimal]), 1)
            out[f"{key}_of_C"] = {
                "form": f"{key} = k * C^a",
                "a": float(exponent),
                "k": float(10**icpt),
                "n_budgets": len(optimal),
            }
    else:
        out["note"] = f"{len(optimal)} budget(s) with an interior minimum; power laws N*(C), D*(C) need 2 or more"
    return out
