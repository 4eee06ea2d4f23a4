"""Every number of the analysis report, as pure functions of an SDE and data.

``sde`` is anything with ``forward(z, t) -> (mu*dt, sigma*sqrt(dt))`` in increment units and ``dt``:
:class:`~hf_sde.heads.SDEHeads`, or a baseline wrapped in :class:`~hf_sde.simulate.BaselineSDE`.
Data are projected paths (a list of ``(L_i, d)`` tensors whose row ``k`` is token position ``k``, so
``t_k = k / T``) or their :class:`~hf_sde.fitting.Transitions`. Drift, diffusion and every derived
constant are reported in SDE time units (``t = position / T``), as in METHOD.md. Functions return plain
Python floats and lists (JSON-ready); nothing here draws or writes files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..fitting.fit import Transitions


# ----- evaluating an SDE -----------------------------------------------------------------------------
def predict_increments(sde, z: torch.Tensor, t: torch.Tensor | float,
                       batch_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu*dt, sigma*sqrt(dt))`` at states ``z`` ``(n, d)`` and times ``t`` ``(n,)`` (or a scalar), batched."""
    z = torch.as_tensor(z, dtype=torch.float32)
    t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[:-1])
    means, stds = [], []
    with torch.no_grad():
        for s in range(0, max(z.shape[0], 1), batch_size):
            m, sd = sde(z[s:s + batch_size], t[s:s + batch_size])
            means.append(m)
            stds.append(sd)
    return torch.cat(means), torch.cat(stds)


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else float("nan")


# ----- drift and diffusion over time -----------------------------------------------------------------
def drift_diffusion_profile(sde, tr: Transitions, n_bins: int = 20) -> dict:
    """Drift norm ``||mu||`` and diffusion magnitude ``s = sqrt(mean_i sigma_i^2)`` against time.

    Per time bin (equal width over ``[0, max t]``): mean and quartiles of ``||mu(Z_k, t_k)||`` and of
    ``s(Z_k, t_k)``, and the *realized* diffusion ``sqrt(mean_i (dZ_k - mu dt)_i^2 / dt)`` pooled in the
    bin (root of the mean square), which the model's RMS diffusion ``sqrt(mean s^2)`` should match when
    sigma is calibrated. Summary: pooled means, ``diffusion_calibration_ratio`` = realized / model mean
    squares (1 when calibrated), and Spearman correlations of drift norm and diffusion with ``t``.
    """
    from scipy.stats import spearmanr

    dt = float(sde.dt)
    mean_inc, std_inc = predict_increments(sde, tr.z, tr.t)
    drift_norm = (mean_inc / dt).norm(dim=-1).double()
    diff = (std_inc.pow(2).mean(-1) / dt).sqrt().double()
    realized_sq = ((tr.dz - mean_inc).pow(2).mean(-1) / dt).double()
    t = tr.t.double()
    t_max = float(t.max()) + 1e-9 if len(t) else 1.0
    edges = torch.linspace(0.0, t_max, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(t, edges[1:-1], right=True)
    bins: dict[str, list] = {k: [] for k in (
        "t", "count", "drift_norm_mean", "drift_norm_q25", "drift_norm_q75", "diffusion_mean", "diffusion_q25",
        "diffusion_q75", "diffusion_rms", "realized_diffusion")}
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        bins["t"].append(float((edges[b] + edges[b + 1]) / 2))
        bins["count"].append(n)
        dn, df = drift_norm[sel], diff[sel]
        nan = float("nan")
        bins["drift_norm_mean"].append(float(dn.mean()) if n else nan)
        bins["drift_norm_q25"].append(_quantile(dn, 0.25))
        bins["drift_norm_q75"].append(_quantile(dn, 0.75))
        bins["diffusion_mean"].append(float(df.mean()) if n else nan)
        bins["diffusion_q25"].append(_quantile(df, 0.25))
        bins["diffusion_q75"].append(_quantile(df, 0.75))
        bins["diffusion_rms"].append(float(df.pow(2).mean().sqrt()) if n else nan)
        bins["realized_diffusion"].append(float(realized_sq[sel].mean().sqrt()) if n else nan)
    model_ms = float(diff.pow(2).mean())
    realized_ms = float(realized_sq.mean())

    def rho(x):
        if len(x) < 3 or float(x.std()) == 0.0:
            return 0.0
        return float(spearmanr(t.numpy(), x.numpy()).statistic)

    return {
        "bins": bins,
        "drift_norm_mean": float(drift_norm.mean()),
        "drift_norm_median": _quantile(drift_norm, 0.5),
        "diffusion_mean": float(diff.mean()),
        "diffusion_rms": math.sqrt(model_ms),
        "realized_diffusion": math.sqrt(realized_ms),
        "diffusion_calibration_ratio": realized_ms / model_ms if model_ms > 0 else float("nan"),
        "drift_norm_spearman_t": rho(drift_norm),
        "diffusion_spearman_t": rho(diff),
        "n_transitions": len(tr),
    }


def phase_plane(sde, xlim: tuple[float, float], ylim: tuple[float, float], n: int = 21, t: float = 0.5,
                dims: tuple[int, int] = (0, 1), base: torch.Tensor | None = None) -> dict:
    """Drift and diffusion on a grid of the plane spanned by coordinates ``dims`` (the first two PCA axes).

    The other coordinates sit at ``base`` (default 0, the training mean in PCA coordinates) and time at
    ``t``. Returns the grid ``x`` (n,), ``y`` (n,), the drift components ``u``, ``v`` (n, n; row = y) in time
    units, and the diffusion magnitude ``s`` (n, n).
    """
    d = _dim(sde, base)
    xs = torch.linspace(xlim[0], xlim[1], n)
    ys = torch.linspace(ylim[0], ylim[1], n)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    z = torch.zeros(n * n, d) if base is None else base.float().expand(n * n, d).clone()
    z[:, dims[0]] = gx.reshape(-1)
    z[:, dims[1]] = gy.reshape(-1)
    mean_inc, std_inc = predict_increments(sde, z, float(t))
    mu = mean_inc / sde.dt
    s = (std_inc.pow(2).mean(-1) / sde.dt).sqrt()
    return {"x": xs.tolist(), "y": ys.tolist(), "u": mu[:, dims[0]].reshape(n, n).tolist(),
            "v": mu[:, dims[1]].reshape(n, n).tolist(), "s": s.reshape(n, n).tolist(), "t": float(t)}


def _dim(sde, base=None) -> int:
    if base is not None:
        return int(base.shape[-1])
    cfg = getattr(sde, "config", None)
    if cfg is not None:
        return int(cfg.proj_dim)
    baseline = getattr(sde, "baseline", None)
    if baseline is not None:
        return int(baseline.std.shape[-1])
    raise ValueError("Cannot tell the state dimension of this SDE; pass base=torch.zeros(d).")


# ----- process properties ----------------------------------------------------------------------------
def standardized_residuals(sde, tr: Transitions) -> torch.Tensor:
    """``(dZ - mu dt) / (sigma sqrt(dt))`` per transition and dimension, ``(n, d)``: iid N(0, 1) if the model is right."""
    mean_inc, std_inc = predict_increments(sde, tr.z, tr.t)
    return (tr.dz - mean_inc) / std_inc


def split_by_sequence(x: torch.Tensor, seq: torch.Tensor) -> list[torch.Tensor]:
    """Rows of ``x`` grouped by ``seq`` (transitions of one sequence are contiguous and in order)."""
    if len(seq) == 0:
        return []
    change = torch.nonzero(seq[1:] != seq[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), len(seq)]
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def autocorrelation(series: Sequence[torch.Tensor], max_lag: int = 20) -> dict:
    """Autocorrelation of a multivariate series at lags ``1..max_lag``, within sequences only.

    ``series`` is a list of ``(L_i, d)`` tensors (e.g. increments or standardized residuals per sequence).
    Per dimension: ``sum (x_k - m)(x_{k+h} - m) / N_h`` over all pairs inside a sequence, divided by the
    pooled variance; then averaged over dimensions. ``band`` is the 95% white-noise band ``1.96/sqrt(N)``;
    ``share_outside_band`` the share of lags whose ACF lies outside it.
    """
    x_all = torch.cat([s.double() for s in series])
    n_total, d = x_all.shape
    m = x_all.mean(0)
    var = x_all.var(0, unbiased=False).clamp_min(1e-300)
    acf = []
    lags = list(range(1, max_lag + 1))
    for h in lags:
        num = torch.zeros(d, dtype=torch.float64)
        cnt = 0
        for s in series:
            if s.shape[0] > h:
                c = s.double() - m
                num += (c[:-h] * c[h:]).sum(0)
                cnt += s.shape[0] - h
        acf.append(float((num / cnt / var).mean()) if cnt else float("nan"))
    band = 1.96 / math.sqrt(n_total)
    finite = [a for a in acf if math.isfinite(a)]
    return {"lags": lags, "acf": acf, "band": band, "n": n_total,
            "max_abs_acf": max((abs(a) for a in finite), default=float("nan")),
            "lag1": acf[0] if acf else float("nan"),
            "share_outside_band": sum(abs(a) > band for a in finite) / max(len(finite), 1)}


def gaussianity(residuals: torch.Tensor, max_samples: int = 20000, seed: int = 0) -> dict:
    """Kolmogorov-Smirnov test of pooled standardized residuals against N(0, 1), plus moments.

    All entries are pooled (transitions x dimensions) and a seeded random subsample of at most
    ``max_samples`` is tested, so the p-value does not collapse just because a corpus is large (with
    ~10^6 values any tiny misfit is "significant"). Skewness and excess kurtosis use every value.
    """
    from scipy import stats

    flat = residuals.double().flatten()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() > max_samples:
        g = torch.Generator().manual_seed(seed)
        sample = flat[torch.randperm(flat.numel(), generator=g)[:max_samples]]
    else:
        sample = flat
    ks = stats.kstest(sample.numpy(), "norm")
    x = flat.numpy()
    return {"ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue), "n_tested": int(sample.numel()),
            "n_values": int(flat.numel()), "mean": float(x.mean()), "std": float(x.std()),
            "skewness": float(stats.skew(x)), "excess_kurtosis": float(stats.kurtosis(x))}


def qq_points(residuals: torch.Tensor, n: int = 200) -> dict:
    """Sample quantiles of pooled residuals against N(0, 1) quantiles at ``n`` probabilities in (0, 1)."""
    from scipy import stats

    flat = residuals.double().flatten()
    flat = flat[torch.isfinite(flat)].numpy()
    p = (np.arange(n) + 0.5) / n
    return {"theoretical": stats.norm.ppf(p).tolist(), "sample": np.quantile(flat, p).tolist()}


def quadratic_variation(sde, paths: Sequence[torch.Tensor], min_fraction: float = 0.5) -> dict:
    """Realized quadratic variation of each path against its integrated ``sum_i sigma_i^2``.

    Per path: ``QV = sum_k ||dZ_k||^2``, the drift-corrected ``QV_res = sum_k ||dZ_k - mu dt||^2`` and
    ``IV = sum_k sum_i sigma_i(Z_k, t_k)^2 dt``. For an Ito process QV -> IV as dt -> 0; at a finite step
    the drift adds ``sum ||mu dt||^2`` to QV, which ``QV_res`` removes. Ratios are pooled (sum over paths
    over sum over paths). ``curve_*`` are the mean cumulative QV / IV over positions for the paths at
    least as long as the common length (see :func:`common_length`).
    """
    qv, qv_res, iv = [], [], []
    for p in paths:
        if p.shape[0] < 2:
            continue
        mean_inc, std_inc = _path_increments(sde, p)
        dz = (p[1:] - p[:-1]).float()
        qv.append(dz.pow(2).sum(-1).double())
        qv_res.append((dz - mean_inc).pow(2).sum(-1).double())
        iv.append(std_inc.pow(2).sum(-1).double())
    if not qv:
        raise ValueError("quadratic_variation needs at least one path with two states.")
    tot = [torch.stack([x.sum() for x in v]) for v in (qv, qv_res, iv)]
    per_seq = tot[0] / tot[2]
    K = common_length([x.shape[0] + 1 for x in qv], min_fraction) - 1
    keep = [i for i, x in enumerate(qv) if x.shape[0] >= K]
    curve_qv = torch.stack([qv[i][:K].cumsum(0) for i in keep]).mean(0)
    curve_iv = torch.stack([iv[i][:K].cumsum(0) for i in keep]).mean(0)
    return {
        "ratio": float(tot[0].sum() / tot[2].sum()),
        "ratio_drift_corrected": float(tot[1].sum() / tot[2].sum()),
        "per_sequence_ratio_median": float(per_seq.median()),
        "realized_total": float(tot[0].sum()), "integrated_total": float(tot[2].sum()),
        "n_sequences": len(qv),
        "curve_t": [(k + 1) * float(sde.dt) for k in range(K)],
        "curve_realized": curve_qv.tolist(), "curve_integrated": curve_iv.tolist(),
    }


def _path_increments(sde, p: torch.Tensor, t0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = (torch.arange(p.shape[0] - 1, dtype=torch.float32) + t0) * float(sde.dt)
    return predict_increments(sde, p[:-1].float(), t)


# ----- simulation against reality --------------------------------------------------------------------
def common_length(lengths: Sequence[int], min_fraction: float = 0.5) -> int:
    """The largest ``K`` that at least ``min_fraction`` of the sequences (and at least 2, if there are 2)
    reach: moment curves over a fixed set of sequences run over positions ``0..K-1``."""
    if not lengths:
        raise ValueError("common_length needs the lengths of at least one sequence, got none: the corpus gave "
                         "no held-out paths (check the data, --limit and the held-out fraction).")
    desc = sorted(lengths, reverse=True)
    need = max(math.ceil(min_fraction * len(desc)), min(2, len(desc)))
    return int(desc[need - 1])


def moment_curves(paths: Sequence[torch.Tensor], max_len: int | None = None) -> dict:
    """Mean ``E[Z_k]`` (K, d), per-dimension variance (K, d), total variance ``sum_i Var Z_k,i`` (K,),
    second moment ``E||Z_k||^2`` (K,) and count (K,) at each position over the paths that reach it."""
    K = max(p.shape[0] for p in paths) if max_len is None else max_len
    d = paths[0].shape[-1]
    s1 = torch.zeros(K, d, dtype=torch.float64)
    s2 = torch.zeros(K, d, dtype=torch.float64)
    cnt = torch.zeros(K, dtype=torch.float64)
    for p in paths:
        L = min(p.shape[0], K)
        x = p[:L].double()
        finite = torch.isfinite(x).all(-1)
        x = torch.where(finite.unsqueeze(-1), x, torch.zeros_like(x))
        s1[:L] += x
        s2[:L] += x.pow(2)
        cnt[:L] += finite.double()
    c = cnt.clamp_min(1).unsqueeze(-1)
    mean = s1 / c
    var = (s2 / c - mean.pow(2)).clamp_min(0)
    return {"mean": mean.tolist(), "var": var.tolist(), "total_var": var.sum(-1).tolist(),
            "second": (s2 / c).sum(-1).tolist(), "count": cnt.long().tolist()}


def curve_errors(real: dict, sim: dict, min_count: int = 2) -> dict:
    """How far simulated moment curves are from real ones.

    ``mean_rmse`` = RMS over positions of ``||E[Z_k]_real - E[Z_k]_sim||`` (positions both reach);
    ``var_rmse`` = RMS of the total-variance difference over positions where both have ``>= min_count``
    paths; ``var_rel`` = ``var_rmse`` / mean real total variance there. NaN where no position qualifies.
    """
    K = min(len(real["count"]), len(sim["count"]))
    ok_m = [k for k in range(K) if real["count"][k] >= 1 and sim["count"][k] >= 1]
    ok_v = [k for k in range(K) if real["count"][k] >= min_count and sim["count"][k] >= min_count]
    nan = float("nan")
    out = {"mean_rmse": nan, "var_rmse": nan, "var_rel": nan, "positions": len(ok_m), "var_positions": len(ok_v)}
    if ok_m:
        mr = torch.tensor([real["mean"][k] for k in ok_m], dtype=torch.float64)
        ms = torch.tensor([sim["mean"][k] for k in ok_m], dtype=torch.float64)
        out["mean_rmse"] = float((mr - ms).norm(dim=-1).pow(2).mean().sqrt())
    if ok_v:
        vr = torch.tensor([real["total_var"][k] for k in ok_v], dtype=torch.float64)
        vs = torch.tensor([sim["total_var"][k] for k in ok_v], dtype=torch.float64)
        out["var_rmse"] = float((vr - vs).pow(2).mean().sqrt())
        out["var_rel"] = out["var_rmse"] / max(float(vr.mean()), 1e-12)
    return out


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256, seed: int = 0,
                       max_samples: int = 20000) -> float:
    """Sliced 2-Wasserstein distance between point clouds ``x`` (n, d) and ``y`` (m, d).

    ``SW_2 = sqrt(E_theta W_2^2(theta.x, theta.y))`` over ``n_projections`` seeded random unit directions;
    each 1-D ``W_2`` compares the two samples' quantiles at ``min(n, m)`` levels. Non-finite rows are
    dropped; clouds larger than ``max_samples`` are seeded subsamples. A pure translation by ``v`` gives
    ``||v|| / sqrt(d)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = x.double()[torch.isfinite(x).all(-1)]
    y = y.double()[torch.isfinite(y).all(-1)]
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    if len(x) > max_samples:
        x = x[torch.randperm(len(x), generator=g)[:max_samples]]
    if len(y) > max_samples:
        y = y[torch.randperm(len(y), generator=g)[:max_samples]]
    theta = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    # numpy sorts contiguous rows several times faster than torch sorts columns on CPU
    px = np.sort((theta.T @ x.T).numpy(), axis=1)
    py = np.sort((theta.T @ y.T).numpy(), axis=1)
    m = min(px.shape[1], py.shape[1])
    levels = (np.arange(m) + 0.5) / m

    def quantiles(p: np.ndarray) -> np.ndarray:
        n = p.shape[1]
        if n == m:
            return p
        pos = levels * n - 0.5
        lo = np.clip(np.floor(pos), 0, n - 1).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        w = np.clip(pos - lo, 0, 1)
        return p[:, lo] * (1 - w) + p[:, hi] * w

    return float(np.sqrt(np.mean((quantiles(px) - quantiles(py)) ** 2)))


def truncate_to_lengths(sim: torch.Tensor, lengths: Sequence[int], n_paths: int) -> list[torch.Tensor]:
    """Cut ``simulate`` output ``(B * n_paths, S+1, d)`` so paths from start ``b`` are ``lengths[b]`` long,
    matching the real path they started from (so moment curves compare like with like)."""
    return [sim[b * n_paths + j, : lengths[b]] for b in range(len(lengths)) for j in range(n_paths)]


# ----- theory checks ---------------------------------------------------------------------------------
def jacobians(fn, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Jacobians ``d fn(z, t) / d z`` at each sample, ``(n, d_out, d_in)``, by one backward pass per output
    dimension (samples are independent, so the gradient of the batch sum gives every sample's row)."""
    z = z.detach().float().clone().requires_grad_(True)
    t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[:-1])
    with torch.enable_grad():
        out = fn(z, t)
        rows = []
        for i in range(out.shape[-1]):
            (gi,) = torch.autograd.grad(out[:, i].sum(), z, retain_graph=i < out.shape[-1] - 1, allow_unused=True)
            rows.append(torch.zeros_like(z) if gi is None else gi)
    return torch.stack(rows, dim=1).detach()


def lipschitz_growth(sde, z: torch.Tensor, t: torch.Tensor, n_pairs: int = 4000, seed: int = 0) -> dict:
    """Lipschitz and linear-growth constants of ``mu`` and ``sigma`` (time units) over data samples.

    For ``f`` in (drift, diffusion): the spectral norm ``||df/dz||_2`` of the Jacobian at every sample
    (``jacobian_max`` / ``_p95`` / ``_median``; the Lipschitz constant on the data region is at least the
    max), the largest difference quotient ``||f(z_i, t) - f(z_j, t)|| / ||z_i - z_j||`` over ``n_pairs``
    random pairs at a common time (``pair_ratio_max``, a lower bound of the constant), and the linear-growth
    constant ``max ||f(z, t)|| / (1 + ||z||)`` (``growth_max``; ``growth_p95``). For the diagonal diffusion,
    ``||diag(s(x)) - diag(s(y))||_F = ||s(x) - s(y)||``, so the same numbers bound the matrix function.
    These are estimates on the data region, not proofs.
    """
    z = z.float()
    t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[:-1])
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(z), (n_pairs,), generator=g)
    j = torch.randint(0, len(z), (n_pairs,), generator=g)
    same = i == j
    i, j = i[~same], j[~same]
    out = {}
    for name, fn in (("drift", sde.drift), ("diffusion", sde.diffusion)):
        jac = jacobians(fn, z, t)
        norms = torch.linalg.matrix_norm(jac.double(), ord=2)
        with torch.no_grad():
            fz = fn(z, t).double()
            fa, fb = fz[i], fn(z[j], t[i]).double()
        dist = (z[i] - z[j]).double().norm(dim=-1)
        ok = dist > 1e-9
        ratio = (fa - fb).norm(dim=-1)[ok] / dist[ok]
        growth = fz.norm(dim=-1) / (1 + z.double().norm(dim=-1))
        out[name] = {"jacobian_max": float(norms.max()), "jacobian_p95": _quantile(norms, 0.95),
                     "jacobian_median": _quantile(norms, 0.5),
                     "pair_ratio_max": float(ratio.max()) if ratio.numel() else float("nan"),
                     "growth_max": float(growth.max()), "growth_p95": _quantile(growth, 0.95)}
    out["n_samples"] = len(z)
    return out


def estimate_attractor(sde, z: torch.Tensor, t: torch.Tensor, n_times: int = 16, refine_iters: int = 100) -> dict:
    """Estimated attractor ``z*``: a zero of the drift field near the data.

    1. Least squares: regress the model drift at the data, ``mu(Z_n, t_n) ~ A z + b``; ``z_lin`` solves
       ``A z = -b`` (least-squares solution). ``A``'s eigenvalues say whether the linearization is stable
       (all real parts < 0).
    ``reversion_per_step_*`` = ``-Re(eig) dt``: near 1 means the drift pulls the state most of the way back
    within a single token (the path is then far from the small-``dt`` regime of the continuous SDE).
    2. Refinement: minimise ``J(z) = mean_t ||mu(z, t)||^2`` over ``n_times`` quantiles of the data times
       with L-BFGS from ``z_lin`` (from the data mean if ``z_lin`` is not finite); kept only if it lowers J.

    ``residual_drift`` = ``sqrt(J(z*))`` against ``data_drift_norm`` (RMS drift norm at the data) says how
    close to a true zero ``z*`` is; ``distance_from_data_mean`` is in units of the data's RMS radius.
    """
    z = z.float()
    t = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[:-1])
    mean_inc, _ = predict_increments(sde, z, t)
    mu = (mean_inc / sde.dt).double()
    x = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], dim=1)
    w = torch.linalg.lstsq(x, mu).solution
    A, b = w[:-1].T, w[-1]
    eig = torch.linalg.eigvals(A)
    z_lin = torch.linalg.lstsq(A, -b.unsqueeze(-1)).solution.squeeze(-1)
    data_mean = z.double().mean(0)
    start = z_lin if torch.isfinite(z_lin).all() else data_mean
    t_grid = torch.quantile(t.double(), torch.linspace(0, 1, n_times, dtype=torch.float64)).float()

    def objective(v: torch.Tensor) -> torch.Tensor:
        zz = v.float().unsqueeze(0).expand(len(t_grid), -1)
        return sde.drift(zz, t_grid).double().pow(2).sum(-1).mean()

    with torch.no_grad():
        j_start = float(objective(start))
    v = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v], lr=1.0, max_iter=refine_iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(v)
        loss.backward()
        return loss

    with torch.enable_grad():
        try:
            opt.step(closure)
        except RuntimeError:  # pragma: no cover - numerical failure, keep the start
            pass
    with torch.no_grad():
        j_ref = float(objective(v.detach()))
    refined = math.isfinite(j_ref) and j_ref < j_start
    z_star = v.detach() if refined else start
    j_star = j_ref if refined else j_start
    radius = float((z.double() - data_mean).pow(2).sum(-1).mean().sqrt())
    return {
        "z_star": z_star.tolist(), "z_linear": z_lin.tolist(), "refined": bool(refined),
        "method": "least-squares zero of the drift field, refined by L-BFGS on mean_t ||mu(z,t)||^2",
        "linear_A": A.tolist(), "linear_b": b.tolist(),
        "linear_eig_real_max": float(eig.real.max()), "linear_eig_real_min": float(eig.real.min()),
        # -Re(eig) * dt: the share of the distance to z* the linearized drift removes in one token step
        "reversion_per_step_min": -float(eig.real.max()) * float(sde.dt),
        "reversion_per_step_max": -float(eig.real.min()) * float(sde.dt),
        "residual_drift": math.sqrt(max(j_star, 0.0)),
        "data_drift_norm": float(mu.pow(2).sum(-1).mean().sqrt()),
        "distance_from_data_mean": float((z_star - data_mean).norm()) / max(radius, 1e-12),
        "data_rms_radius": radius,
    }


def generator_lv(sde, z: torch.Tensor, t: torch.Tensor, z_star) -> torch.Tensor:
    """``LV = 2 (z - z*) . mu(z, t) + sum_i sigma_i(z, t)^2`` for ``V(z) = ||z - z*||^2``, per sample (time units)."""
    z = z.float()
    z_star = torch.as_tensor(z_star, dtype=z.dtype)
    mean_inc, std_inc = predict_increments(sde, z, t)
    dt = float(sde.dt)
    return (2 * ((z - z_star).double() * (mean_inc.double() / dt)).sum(-1) + (std_inc.double().pow(2) / dt).sum(-1))


def lyapunov(sde, z: torch.Tensor, t: torch.Tensor, z_star, radius: float | None = None,
             radius_quantile: float = 0.5) -> dict:
    """Lyapunov check with ``V(z) = ||z - z*||^2`` on data samples.

    ``share_negative_outside`` is the share of samples with ``LV < 0`` among those outside the ball of
    ``radius`` around ``z*`` (default: the ``radius_quantile`` quantile of the samples' distances to
    ``z*``, i.e. the outer half). ``critical_radius`` is the largest distance of a sample with ``LV >= 0``:
    beyond it every sample has ``LV < 0`` (0 if all do). For OU ``dZ = -theta (Z - z*) dt + sigma dW`` the
    exact boundary is ``||z - z*||^2 = sum sigma_i^2 / (2 theta)``.
    """
    z = z.float()
    z_star_t = torch.as_tensor(z_star, dtype=torch.float64)
    lv = generator_lv(sde, z, t, z_star)
    dist = (z.double() - z_star_t).norm(dim=-1)
    r = float(torch.quantile(dist, radius_quantile)) if radius is None else float(radius)
    outside = dist > r
    nonneg = lv >= 0
    return {
        "radius": r, "radius_quantile": None if radius is not None else radius_quantile,
        "n_outside": int(outside.sum()),
        "share_negative_outside": float((lv[outside] < 0).double().mean()) if outside.any() else float("nan"),
        "share_negative_all": float((lv < 0).double().mean()),
        "critical_radius": float(dist[nonneg].max()) if nonneg.any() else 0.0,
        "n_samples": len(z),
    }


def ito_moments(sde, paths: Sequence[torch.Tensor], min_fraction: float = 0.5) -> dict:
    """Moment dynamics via Ito, integrated along the data and set against the empirical moments.

    Over the fixed set of paths reaching the common length ``K`` (:func:`common_length`), truncated to
    ``K``, with expectations as means over those paths at each position:
    ``E[Z_k]_ito = E[Z_0] + sum_{j<k} E[mu(Z_j, t_j)] dt`` and
    ``E||Z_k||^2_ito = E||Z_0||^2 + sum_{j<k} E[2 Z_j . mu + sum_i sigma_i^2] dt``
    (left-point sums: the Euler-Maruyama step). The Euler-Maruyama scheme adds ``E||mu dt||^2`` per step to
    the second moment, which the continuous-time equation drops; ``second_em_*`` includes that term (it
    matters when ``||mu|| dt`` is not small against ``||Z||``, i.e. when mean reversion acts within a token).

    ``*_rmse`` is the RMS over positions of the gap to the empirical curve; ``*_scale`` the RMS of the
    empirical curve's own change from position 0 (the error of predicting "no change"), so ``*_ratio`` < 1
    means the drift and diffusion explain the motion. With ``n`` paths the integrated curve also carries
    sampling noise that accumulates like a random walk: ``*_noise_floor`` is the RMS gap expected from that
    alone if the model were exact (from the per-step variance of the realized residuals over paths, divided
    by ``n``, summed over steps), and ``*_gap_over_noise`` ~ 1 means the gap is sampling noise only.
    """
    lengths = [p.shape[0] for p in paths]
    K = common_length(lengths, min_fraction)
    X = torch.stack([p[:K].float() for p in paths if p.shape[0] >= K])
    n, _, d = X.shape
    if K < 2:
        raise ValueError("ito_moments needs paths with at least two states.")
    t = (torch.arange(K - 1, dtype=torch.float32) * float(sde.dt)).repeat(n)
    mean_inc, std_inc = predict_increments(sde, X[:, :-1].reshape(-1, d), t)
    mean_inc = mean_inc.reshape(n, K - 1, d).double()
    var_inc = std_inc.reshape(n, K - 1, d).double().pow(2).sum(-1)
    Xd = X.double()
    emp_mean = Xd.mean(0)
    sq = Xd.pow(2).sum(-1)
    emp_second = sq.mean(0)
    zero = torch.zeros(1, d, dtype=torch.float64)
    ito_mean = emp_mean[0] + torch.cat([zero, mean_inc.mean(0).cumsum(0)])
    gen_n = 2 * (Xd[:, :-1] * mean_inc).sum(-1) + var_inc
    em_n = gen_n + mean_inc.pow(2).sum(-1)
    gen, em = gen_n.mean(0), em_n.mean(0)
    z1 = torch.zeros(1, dtype=torch.float64)
    ito_second = emp_second[0] + torch.cat([z1, gen.cumsum(0)])
    em_second = emp_second[0] + torch.cat([z1, em.cumsum(0)])
    # Sampling noise of the integrated curves: martingale increments' variance over paths / n, accumulated.
    resid1 = Xd[:, 1:] - Xd[:, :-1] - mean_inc
    resid2 = sq[:, 1:] - sq[:, :-1] - em_n
    denom = max(n - 1, 1) * n
    floor1 = torch.cat([z1, ((resid1 - resid1.mean(0)).pow(2).sum((0, 2)) / denom).cumsum(0)]).sqrt()
    floor2 = torch.cat([z1, ((resid2 - resid2.mean(0)).pow(2).sum(0) / denom).cumsum(0)]).sqrt()

    def rms(x):
        return float(x.pow(2).mean().sqrt())

    mean_rmse = rms((ito_mean - emp_mean).norm(dim=-1))
    mean_scale = rms((emp_mean - emp_mean[0]).norm(dim=-1))
    second_rmse = rms(ito_second - emp_second)
    second_scale = rms(emp_second - emp_second[0])
    em_rmse = rms(em_second - emp_second)
    f1, f2 = rms(floor1), rms(floor2)
    return {
        "n_sequences": n, "length": K, "t": [k * float(sde.dt) for k in range(K)],
        "empirical_mean": emp_mean.tolist(), "ito_mean": ito_mean.tolist(),
        "empirical_second": emp_second.tolist(), "ito_second": ito_second.tolist(), "em_second": em_second.tolist(),
        "mean_rmse": mean_rmse, "mean_scale": mean_scale, "mean_ratio": mean_rmse / max(mean_scale, 1e-12),
        "mean_noise_floor": f1, "mean_gap_over_noise": mean_rmse / max(f1, 1e-12),
        "second_rmse": second_rmse, "second_scale": second_scale,
        "second_ratio": second_rmse / max(second_scale, 1e-12),
        "second_em_rmse": em_rmse, "second_em_ratio": em_rmse / max(second_scale, 1e-12),
        "second_noise_floor": f2, "second_em_gap_over_noise": em_rmse / max(f2, 1e-12),
    }


# ----- per-token diffusion ---------------------------------------------------------------------------
def token_diffusion(heads, z: torch.Tensor, start: int = 0) -> dict:
    """Diffusion magnitude ``s_k`` and its calibrated z-score at every state of one path ``(L, d)``.

    ``s_k = sqrt(mean_i sigma_i(Z_k, t_k)^2)`` (time units) with ``t_k = (start + k) / T``, and
    ``zscore_k = (log s_k - mean) / std`` with the training calibration stored in the heads. Position
    ``k`` is the state after reading token ``k``: it describes the step to token ``k + 1``.
    """
    t = (torch.arange(z.shape[0], dtype=torch.float32) + start) * float(heads.dt)
    _, std_inc = predict_increments(heads, z.float(), t)
    s = heads.diffusion_magnitude(std_inc)
    return {"diffusion": s.tolist(), "zscore": heads.zscore(s).tolist()}
