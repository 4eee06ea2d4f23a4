"""Known-answer tests for hf_sde.analysis.diagnostics and hf_sde.analysis.simulate.

Exact Ornstein-Uhlenbeck heads are built by setting SDEHeads' weights (drift_linear = OU drift, drift_net and
the diffusion net's last-layer weight zero, diffusion through the last-layer bias); data are simulated from the
OU process with an independent Euler recursion written out here, so every analysis number has a known value.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from hf_sde.analysis import diagnostics as an
from hf_sde.analysis.simulate import BaselineSDE, as_sde, simulate
from hf_sde.fitting.fit import BrownianBaseline, OUBaseline, _evaluate, fit_heads, make_transitions
from hf_sde.fitting.heads import SDEHeads, SDEHeadsConfig
from hf_sde.trajectories.extract import Trajectories

T = 50
DT = 1.0 / T
THETA = 2.0
SIGMA = torch.tensor([0.3, 0.5, 0.7, 0.4])
Z_STAR = torch.tensor([1.0, -2.0, 0.5, 0.0])
D = 4


def exact_heads(A: torch.Tensor, b: torch.Tensor, sigma: torch.Tensor, horizon: float = T,
                calibrate: bool = False) -> SDEHeads:
    """SDEHeads whose drift is exactly ``A z + b`` and whose diffusion is exactly ``sigma`` (time units)."""
    d = A.shape[0]
    heads = SDEHeads(SDEHeadsConfig(hidden_size=d, proj_dim=d, layer=0, num_layers=1, horizon=horizon, width=8,
                                    depth=1))
    dt = 1.0 / horizon
    with torch.no_grad():
        heads.drift_linear.weight.copy_(A * dt)
        heads.drift_linear.bias.copy_(b * dt)
        heads.diffusion_net[-1].weight.zero_()
        target = sigma.float() * math.sqrt(dt) - heads.config.sigma_floor
        heads.diffusion_net[-1].bias.copy_(target + torch.log(-torch.expm1(-target)))
    if calibrate:
        heads.config.log_diffusion_mean = math.log(float(sigma.pow(2).mean().sqrt()))
        heads.config.log_diffusion_std = 0.5
    return heads


def ou_heads(theta: float = THETA, sigma: torch.Tensor = SIGMA, z_star: torch.Tensor = Z_STAR) -> SDEHeads:
    d = len(z_star)
    return exact_heads(-theta * torch.eye(d), theta * z_star, sigma)


def ou_paths(n: int, length: int, seed: int = 1, theta: float = THETA, sigma: torch.Tensor = SIGMA,
             z_star: torch.Tensor = Z_STAR, z0: torch.Tensor | None = None) -> torch.Tensor:
    """``(n, length, d)`` Euler paths of ``dZ = theta (z* - Z) dt + sigma dW`` (stationary start by default)."""
    g = torch.Generator().manual_seed(seed)
    d = len(z_star)
    if z0 is None:
        z = z_star + sigma / math.sqrt(2 * theta) * torch.randn(n, d, generator=g)
    else:
        z = z0.expand(n, d).clone()
    out = [z]
    for _ in range(length - 1):
        z = z + theta * (z_star - z) * DT + sigma * math.sqrt(DT) * torch.randn(n, d, generator=g)
        out.append(z)
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def ou_data():
    paths = ou_paths(120, T + 1)
    return list(paths), make_transitions(list(paths), T)


# ----- simulate ---------------------------------------------------------------------------------------
def euler_ou_moments(z0, k, theta=THETA, sigma=SIGMA, z_star=Z_STAR):
    """Exact mean and variance of the Euler-discretized OU after k steps from z0."""
    a = 1 - theta * DT
    mean = z_star + a**k * (z0 - z_star)
    var = sigma.pow(2) * DT * sum(a ** (2 * j) for j in range(k))
    return mean, var


def test_simulate_shape_order_and_seed():
    heads = ou_heads()
    z0 = torch.stack([torch.full((D,), 10.0), torch.full((D,), -10.0)])
    sim = simulate(heads, z0, steps=5, n_paths=3, seed=0)
    assert sim.shape == (6, 6, D)
    assert torch.equal(sim[:3, 0], z0[0].expand(3, D)) and torch.equal(sim[3:, 0], z0[1].expand(3, D))
    assert (sim[:3, -1] > 0).all() and (sim[3:, -1] < 0).all()
    assert torch.equal(sim, simulate(heads, z0, steps=5, n_paths=3, seed=0))
    assert torch.equal(sim, simulate(heads, z0, steps=5, n_paths=3, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(sim, simulate(heads, z0, steps=5, n_paths=3, seed=1))
    assert simulate(heads, z0[0], n_paths=2, seed=0).shape == (2, T + 1, D)  # default: one horizon
    with pytest.raises(ValueError, match="method"):
        simulate(heads, z0, steps=2, method="rk4")


def test_simulate_euler_matches_ou_moments():
    heads = ou_heads()
    z0 = torch.zeros(D)
    n = 4000
    sim = simulate(heads, z0, steps=T, n_paths=n, seed=0)
    for k in (10, T):
        mean, var = euler_ou_moments(z0, k)
        emp_mean, emp_var = sim[:, k].double().mean(0), sim[:, k].double().var(0)
        assert torch.all((emp_mean - mean).abs() < 4 * (var / n).sqrt()), (k, emp_mean, mean)
        assert torch.allclose(emp_var, var.double(), rtol=0.1), (k, emp_var, var)


def test_simulate_finer_dt_matches_continuous_ou():
    heads = ou_heads()
    z0 = torch.zeros(D)
    sim = simulate(heads, z0, steps=4 * T, dt=DT / 4, n_paths=3000, seed=0)
    mean = Z_STAR * (1 - math.exp(-THETA))
    var = SIGMA.pow(2) / (2 * THETA) * (1 - math.exp(-2 * THETA))
    assert torch.all((sim[:, -1].mean(0) - mean).abs() < 4 * (var / 3000).sqrt())
    assert torch.allclose(sim[:, -1].var(0), var, rtol=0.1)


def test_simulate_ou_baseline_adapter(ou_data):
    _, tr = ou_data
    ou = OUBaseline.fit(tr)
    z0 = torch.zeros(D)
    a = simulate(ou, z0, steps=T, n_paths=2000, seed=0, horizon=T)
    b = simulate(BaselineSDE(ou, T), z0, steps=T, n_paths=2000, seed=0)
    assert torch.equal(a, b)
    mean, var = euler_ou_moments(z0, T)
    # the OU baseline is a least-squares estimate: close to the truth, not equal to it
    assert torch.allclose(a[:, -1].mean(0), mean, atol=0.15)
    assert torch.allclose(a[:, -1].var(0), var, rtol=0.25)
    wrapped = as_sde(ou, horizon=T)
    assert torch.allclose(wrapped.drift(Z_STAR.unsqueeze(0), 0.0), torch.zeros(1, D), atol=0.3)
    assert torch.allclose(wrapped.diffusion(torch.zeros(1, D), 0.0)[0], SIGMA, rtol=0.05)
    with pytest.raises(ValueError, match="horizon"):
        simulate(ou, z0, steps=2)
    br = BrownianBaseline.fit(tr)
    assert simulate(br, z0, steps=3, horizon=T, seed=0).shape == (1, 4, D)


@pytest.mark.parametrize("method", ["milstein", "srk"])
def test_simulate_torchsde_methods(method):
    heads = ou_heads()
    z0 = torch.zeros(D)
    n, steps = 300, 10
    sim = simulate(heads, z0, steps=steps, n_paths=n, seed=0, method=method)
    assert sim.shape == (n, steps + 1, D) and torch.isfinite(sim).all()
    assert torch.equal(sim[:, 0], z0.expand(n, D))
    # constant diffusion: Milstein and SRK agree with the continuous OU moments at t = steps * dt
    t = steps * DT
    mean = Z_STAR * (1 - math.exp(-THETA * t))
    var = SIGMA.pow(2) / (2 * THETA) * (1 - math.exp(-2 * THETA * t))
    assert torch.all((sim[:, -1].mean(0) - mean).abs() < 4 * (var / n).sqrt() + 1e-3)
    assert torch.allclose(sim[:, -1].var(0), var, rtol=0.25)
    assert torch.equal(sim, simulate(heads, z0, steps=steps, n_paths=n, seed=0, method=method))


def test_simulate_torchsde_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)
    with pytest.raises(ImportError, match=r"pip install hf-sde\[sde\]"):
        simulate(ou_heads(), torch.zeros(D), steps=2, method="milstein")


# ----- drift and diffusion -----------------------------------------------------------------------------
def test_drift_diffusion_profile_on_ou(ou_data):
    _, tr = ou_data
    heads = ou_heads()
    prof = an.drift_diffusion_profile(heads, tr, n_bins=10)
    true_drift = (THETA * (Z_STAR - tr.z)).norm(dim=-1)
    rms_sigma = float(SIGMA.pow(2).mean().sqrt())
    assert prof["drift_norm_mean"] == pytest.approx(float(true_drift.mean()), rel=1e-4)
    assert prof["diffusion_mean"] == pytest.approx(rms_sigma, rel=1e-4)
    assert prof["diffusion_rms"] == pytest.approx(rms_sigma, rel=1e-4)
    # the realized residual size estimates sigma from the data alone
    assert prof["realized_diffusion"] == pytest.approx(rms_sigma, rel=0.03)
    assert prof["diffusion_calibration_ratio"] == pytest.approx(1.0, abs=0.06)
    b = prof["bins"]
    assert sum(b["count"]) == len(tr) == prof["n_transitions"]
    assert all(x == pytest.approx(rms_sigma, rel=1e-4) for x in b["diffusion_mean"])
    assert all(lo <= hi for lo, hi in zip(b["drift_norm_q25"], b["drift_norm_q75"], strict=True))
    # stationary process: neither drift nor diffusion trends with time
    assert abs(prof["drift_norm_spearman_t"]) < 0.1 and prof["diffusion_spearman_t"] == 0.0


def test_drift_profile_constant_drift_and_trend():
    b = torch.tensor([3.0, -4.0, 0.0, 0.0])
    heads = exact_heads(torch.zeros(D, D), b, SIGMA)
    paths = ou_paths(10, T + 1, theta=0.0, z0=torch.zeros(D))
    prof = an.drift_diffusion_profile(heads, make_transitions(list(paths), T), n_bins=5)
    assert all(x == pytest.approx(5.0, rel=1e-4) for x in prof["bins"]["drift_norm_mean"])
    # a drift that grows with |z| on paths that drift away from 0 trends upward with t
    heads2 = exact_heads(torch.eye(D), torch.zeros(D), SIGMA)
    away = ou_paths(20, T + 1, theta=-3.0, z_star=torch.zeros(D), z0=torch.ones(D))
    assert an.drift_diffusion_profile(heads2, make_transitions(list(away), T))["drift_norm_spearman_t"] > 0.8


def test_phase_plane_on_ou():
    heads = ou_heads()
    plane = an.phase_plane(heads, (-1.0, 1.0), (-2.0, 0.0), n=5, t=0.3)
    x, y = np.asarray(plane["x"]), np.asarray(plane["y"])
    u, v = np.asarray(plane["u"]), np.asarray(plane["v"])
    np.testing.assert_allclose(u, np.broadcast_to(THETA * (1.0 - x)[None, :], (5, 5)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v, np.broadcast_to(THETA * (-2.0 - y)[:, None], (5, 5)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(plane["s"], float(SIGMA.pow(2).mean().sqrt()), rtol=1e-4)
    base = torch.tensor([0.0, 0.0, 3.0, 3.0])
    u2 = np.asarray(an.phase_plane(heads, (-1.0, 1.0), (-2.0, 0.0), n=5, base=base)["u"])
    np.testing.assert_allclose(u2, u, rtol=1e-4, atol=1e-4)  # the plane's drift does not depend on other coords


# ----- process properties ----------------------------------------------------------------------------
def brownian_heads_and_paths(n=100, length=T + 1, seed=3):
    heads = exact_heads(torch.zeros(D, D), torch.zeros(D), SIGMA)
    paths = ou_paths(n, length, seed=seed, theta=0.0, z_star=torch.zeros(D), z0=torch.zeros(D))
    return heads, list(paths)


def test_brownian_residuals_are_gaussian_and_white():
    heads, paths = brownian_heads_and_paths()
    tr = make_transitions(paths, T)
    resid = an.standardized_residuals(heads, tr)
    assert resid.shape == (len(tr), D)
    g = an.gaussianity(resid, seed=0)
    assert g["ks_pvalue"] > 0.01 and g["ks_statistic"] < 0.02
    assert g["n_tested"] == min(20000, resid.numel()) and g["n_values"] == resid.numel()
    assert abs(g["mean"]) < 0.03 and g["std"] == pytest.approx(1.0, abs=0.03)
    assert abs(g["skewness"]) < 0.1 and abs(g["excess_kurtosis"]) < 0.15
    acf = an.autocorrelation(an.split_by_sequence(resid, tr.seq), max_lag=10)
    assert acf["lags"] == list(range(1, 11)) and acf["n"] == len(tr)
    assert acf["band"] == pytest.approx(1.96 / math.sqrt(len(tr)))
    assert acf["max_abs_acf"] < 2 * acf["band"] and acf["share_outside_band"] <= 0.2
    qq = an.qq_points(resid, n=50)
    np.testing.assert_allclose(qq["sample"], qq["theoretical"], atol=0.12)


def test_heavy_tails_fail_the_gaussianity_check():
    torch.manual_seed(0)
    lap = torch.distributions.Laplace(0.0, 1 / math.sqrt(2)).sample((20000,))  # variance 1, heavy tails
    res = an.gaussianity(lap.reshape(-1, 4))
    assert res["ks_pvalue"] < 1e-6 and res["excess_kurtosis"] > 2


def test_autocorrelation_of_ar1():
    g = torch.Generator().manual_seed(0)
    series = []
    for _ in range(20):
        x = torch.zeros(500, 2)
        e = torch.randn(500, 2, generator=g)
        for k in range(1, 500):
            x[k] = 0.5 * x[k - 1] + e[k]
        series.append(x)
    acf = an.autocorrelation(series, max_lag=3)
    assert acf["acf"][0] == pytest.approx(0.5, abs=0.03)
    assert acf["acf"][1] == pytest.approx(0.25, abs=0.03)
    assert acf["share_outside_band"] == 1.0


def test_split_by_sequence_and_truncate():
    seq = torch.tensor([0, 0, 0, 2, 2, 5])
    parts = an.split_by_sequence(torch.arange(6), seq)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4], [5]]
    sim = torch.arange(2 * 3 * 4 * 1, dtype=torch.float32).reshape(6, 4, 1)  # 2 starts x 3 paths, 4 states
    cut = an.truncate_to_lengths(sim, [2, 4], n_paths=3)
    assert [p.shape[0] for p in cut] == [2, 2, 2, 4, 4, 4]
    assert torch.equal(cut[3], sim[3])
    assert an.common_length([10, 8, 6, 4]) == 8 and an.common_length([10, 8, 6, 4], 1.0) == 4
    assert an.common_length([7]) == 7


def test_quadratic_variation_matches_integrated_sigma():
    heads, paths = brownian_heads_and_paths()
    qv = an.quadratic_variation(heads, paths)
    expected_iv = len(paths) * T * float(SIGMA.pow(2).sum()) * DT
    assert qv["integrated_total"] == pytest.approx(expected_iv, rel=1e-4)
    assert qv["ratio"] == pytest.approx(1.0, abs=0.03)
    assert qv["ratio_drift_corrected"] == pytest.approx(qv["ratio"], rel=1e-6)  # zero drift
    assert qv["per_sequence_ratio_median"] == pytest.approx(1.0, abs=0.05)
    assert qv["n_sequences"] == len(paths) and len(qv["curve_realized"]) == T
    assert qv["curve_integrated"][-1] == pytest.approx(float(SIGMA.pow(2).sum()) * T * DT, rel=1e-4)
    # a constant drift b adds ||b dt||^2 per step to the realized QV: ratio = 1 + ||b||^2 dt / sum sigma^2
    b = torch.tensor([6.0, 0.0, 0.0, 0.0])
    drifting = exact_heads(torch.zeros(D, D), b, SIGMA)
    moved = [p + b * DT * torch.arange(p.shape[0]).unsqueeze(-1) for p in paths]
    qv2 = an.quadratic_variation(drifting, moved)
    expected = 1 + float(b.pow(2).sum()) * DT / float(SIGMA.pow(2).sum())
    assert qv2["ratio"] == pytest.approx(expected, rel=0.04)
    assert qv2["ratio_drift_corrected"] == pytest.approx(1.0, abs=0.03)


# ----- simulation against reality ------------------------------------------------------------------------
def test_moment_curves_and_errors_exact():
    p1 = torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 2.0]])
    p2 = torch.tensor([[2.0, 0.0], [3.0, 0.0]])
    c = an.moment_curves([p1, p2])
    assert c["count"] == [2, 2, 1]
    assert c["mean"] == [[1.0, 0.0], [2.0, 1.0], [2.0, 2.0]]
    assert c["var"][0] == [1.0, 0.0] and c["var"][1] == [1.0, 1.0]
    assert c["total_var"][:2] == [1.0, 2.0]
    assert c["second"][0] == pytest.approx((0 + 4) / 2) and c["second"][2] == pytest.approx(8.0)
    same = an.curve_errors(c, c)
    assert same["mean_rmse"] == 0 and same["var_rmse"] == 0 and same["positions"] == 3 and same["var_positions"] == 2
    shifted = an.moment_curves([p1 + torch.tensor([3.0, 4.0]), p2 + torch.tensor([3.0, 4.0])])
    err = an.curve_errors(c, shifted)
    assert err["mean_rmse"] == pytest.approx(5.0) and err["var_rmse"] == pytest.approx(0.0, abs=1e-9)
    wide = an.moment_curves([p1 * 2, p2 * 2])
    e2 = an.curve_errors(c, wide)
    assert e2["var_rmse"] == pytest.approx(math.sqrt(((4 - 1) ** 2 + (8 - 2) ** 2) / 2))
    assert e2["var_rel"] == pytest.approx(e2["var_rmse"] / 1.5)
    # non-finite simulated states are left out of the curves
    bad = an.moment_curves([p1, torch.tensor([[float("nan"), 0.0], [1.0, 2.0]])])
    assert bad["count"] == [1, 2, 1]


def test_sliced_wasserstein_known_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g)
    y = torch.randn(3000, 8, generator=g)
    assert an.sliced_wasserstein(x, y, n_projections=100) < 0.07
    # a translation: every projection differs by exactly theta.v, so only the projection average is random
    v = torch.tensor([3.0, 0, 0, 4.0, 0, 0, 0, 0])
    sw = an.sliced_wasserstein(x[:200], x[:200] + v, n_projections=2000)
    assert sw == pytest.approx(5.0 / math.sqrt(8), rel=0.05)
    # scale: W2 of N(0,1) vs N(0,4) along any direction is 1
    assert an.sliced_wasserstein(x, 2 * y, n_projections=100) == pytest.approx(1.0, abs=0.07)
    # different sizes, symmetric, non-finite rows dropped
    assert an.sliced_wasserstein(x[:1000], y, n_projections=50) == pytest.approx(
        an.sliced_wasserstein(y, x[:1000], n_projections=50), abs=0.02)
    y_bad = torch.cat([y, torch.full((5, 8), float("inf"))])
    assert an.sliced_wasserstein(x, y_bad, n_projections=50) == pytest.approx(
        an.sliced_wasserstein(x, y, n_projections=50), abs=0.02)
    assert math.isnan(an.sliced_wasserstein(x, torch.full((3, 8), float("nan"))))


def test_neural_vs_ou_sliced_wasserstein_prefers_the_true_model(ou_data):
    """SW from simulations of the true OU is smaller than from a wrong (Brownian) model."""
    paths, _ = ou_data
    real = torch.cat(paths[:60])
    z0 = torch.stack([p[0] for p in paths[:60]])
    good = simulate(ou_heads(), z0, steps=T, n_paths=1, seed=0).reshape(-1, D)
    wrong = simulate(exact_heads(torch.zeros(D, D), torch.zeros(D), SIGMA), z0, steps=T, n_paths=1, seed=0)
    assert an.sliced_wasserstein(real, good) < 0.5 * an.sliced_wasserstein(real, wrong.reshape(-1, D))


# ----- theory checks -----------------------------------------------------------------------------------
def test_lipschitz_and_growth_of_linear_drift(ou_data):
    _, tr = ou_data
    A = torch.tensor([[-2.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.5, 0.0], [0.0, 0.0, -3.0, 0.0], [0.5, 0.0, 0.0, -1.0]])
    b = torch.tensor([1.0, 0.0, -1.0, 2.0])
    heads = exact_heads(A, b, SIGMA)
    z, t = tr.z[:1500], tr.t[:1500]
    res = an.lipschitz_growth(heads, z, t, n_pairs=3000)
    spec = float(torch.linalg.matrix_norm(A.double(), ord=2))
    assert res["drift"]["jacobian_max"] == pytest.approx(spec, rel=1e-3)
    assert res["drift"]["jacobian_median"] == pytest.approx(spec, rel=1e-3)
    assert 0.5 * spec < res["drift"]["pair_ratio_max"] <= spec * (1 + 1e-3)
    growth = ((z.double() @ A.double().T + b.double()).norm(dim=-1) / (1 + z.double().norm(dim=-1))).max()
    assert res["drift"]["growth_max"] == pytest.approx(float(growth), rel=1e-3)
    assert res["drift"]["growth_max"] <= max(spec, float(b.norm())) + 1e-6
    assert res["diffusion"]["jacobian_max"] == 0.0 and res["diffusion"]["pair_ratio_max"] == pytest.approx(0.0, abs=1e-5)
    sig_growth = float(SIGMA.norm()) / (1 + float(z.double().norm(dim=-1).min()))
    assert res["diffusion"]["growth_max"] == pytest.approx(sig_growth, rel=1e-3)
    assert res["n_samples"] == 1500
    # jacobians(): exact for a linear map
    jac = an.jacobians(heads.drift, z[:3], t[:3])
    assert torch.allclose(jac, A.expand(3, D, D), atol=1e-4)


def test_attractor_and_lyapunov_of_ou(ou_data):
    _, tr = ou_data
    heads = ou_heads()
    z, t = tr.z[:3000], tr.t[:3000]
    att = an.estimate_attractor(heads, z, t)
    assert torch.allclose(torch.tensor(att["z_star"], dtype=torch.float64), Z_STAR.double(), atol=1e-3)
    assert att["linear_eig_real_max"] == pytest.approx(-THETA, rel=1e-3)
    assert att["linear_eig_real_min"] == pytest.approx(-THETA, rel=1e-3)
    assert att["reversion_per_step_min"] == pytest.approx(THETA * DT, rel=1e-3)
    assert att["reversion_per_step_max"] == pytest.approx(THETA * DT, rel=1e-3)
    assert att["residual_drift"] < 1e-2 * att["data_drift_norm"]
    assert att["distance_from_data_mean"] < 0.3
    # LV = -2 theta ||z - z*||^2 + sum sigma^2 < 0 exactly outside r_c = sqrt(sum sigma^2 / (2 theta))
    r_c = math.sqrt(float(SIGMA.pow(2).sum()) / (2 * THETA))
    dist = (z - Z_STAR).norm(dim=-1)
    lv = an.generator_lv(heads, z, t, Z_STAR)
    expected = -2 * THETA * dist.double().pow(2) + float(SIGMA.pow(2).sum())
    assert torch.allclose(lv, expected, rtol=1e-3, atol=1e-3)
    ly = an.lyapunov(heads, z, t, Z_STAR.tolist(), radius=r_c * 1.01)
    assert ly["share_negative_outside"] == 1.0
    assert ly["share_negative_all"] == pytest.approx(float((dist > r_c).double().mean()), abs=2e-3)
    assert 0.9 * r_c < ly["critical_radius"] <= r_c * 1.001
    assert ly["n_outside"] == int((dist > r_c * 1.01).sum()) and ly["n_samples"] == 3000
    default = an.lyapunov(heads, z, t, Z_STAR.tolist())
    assert default["radius"] == pytest.approx(float(torch.quantile(dist.double(), 0.5)), rel=1e-6)
    assert default["n_outside"] == pytest.approx(1500, abs=2)
    # an unstable linear drift has LV > 0 far out
    unstable = exact_heads(THETA * torch.eye(D), -THETA * Z_STAR, SIGMA)
    assert an.lyapunov(unstable, z, t, Z_STAR.tolist(), radius=r_c)["share_negative_outside"] == 0.0


def test_attractor_of_a_nonlinear_drift_is_refined():
    """Drift mu = -(z - z*) - (z - z*)^3 (per coordinate): the linear fit is off-centre, L-BFGS refines it."""

    class Cubic(torch.nn.Module):
        dt = DT

        def forward(self, z, t):
            c = torch.tensor([1.0, 2.0])
            x = z - c
            return (-(x + x.pow(3)) + 0.5 * x.pow(2)) * DT, torch.full_like(z, 0.1 * math.sqrt(DT))

        def drift(self, z, t):
            return self(z, t)[0] / DT

    g = torch.Generator().manual_seed(0)
    z = torch.tensor([1.0, 2.0]) + 1.5 * torch.randn(2000, 2, generator=g)
    att = an.estimate_attractor(Cubic(), z, torch.rand(2000, generator=g))
    assert att["refined"]
    assert torch.allclose(torch.tensor(att["z_star"], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64),
                          atol=1e-3)


def test_ito_moments_on_ou():
    heads = ou_heads()
    z0 = torch.zeros(D)
    sim = simulate(heads, z0, steps=T, n_paths=3000, seed=0)
    res = an.ito_moments(heads, list(sim))
    assert res["n_sequences"] == 3000 and res["length"] == T + 1
    assert res["mean_scale"] > 1.0
    assert res["mean_ratio"] < 0.03 and res["second_em_ratio"] < 0.03 and res["second_ratio"] < 0.05
    # the empirical curve follows the analytic Euler mean
    mean, _ = euler_ou_moments(z0, T)
    assert torch.allclose(torch.tensor(res["empirical_mean"][-1], dtype=torch.float64), mean.double(), atol=0.03)
    assert torch.allclose(torch.tensor(res["ito_mean"][-1], dtype=torch.float64), mean.double(), atol=0.03)
    # the remaining gap is the sampling noise of 3000 paths: its predicted size matches
    assert 0.2 < res["mean_gap_over_noise"] < 2.5 and 0.2 < res["second_em_gap_over_noise"] < 2.5
    # a model without drift cannot explain the mean's motion, far beyond sampling noise
    no_drift = exact_heads(torch.zeros(D, D), torch.zeros(D), SIGMA)
    wrong = an.ito_moments(no_drift, list(sim))
    assert wrong["mean_ratio"] > 0.9 and wrong["mean_gap_over_noise"] > 20
    # variable lengths: the fixed set is the paths reaching the common length
    mixed = [p[: (T + 1 if i % 2 else 20)] for i, p in enumerate(sim[:10])]
    half = an.ito_moments(heads, mixed)  # half the paths reach 51 states
    assert (half["length"], half["n_sequences"]) == (T + 1, 5)
    most = an.ito_moments(heads, mixed, min_fraction=0.6)
    assert (most["length"], most["n_sequences"]) == (20, 10)


def test_token_diffusion_zscore():
    heads = exact_heads(-THETA * torch.eye(D), THETA * Z_STAR, SIGMA, calibrate=True)
    z = torch.randn(7, D)
    td = an.token_diffusion(heads, z)
    rms = float(SIGMA.pow(2).mean().sqrt())
    np.testing.assert_allclose(td["diffusion"], rms, rtol=1e-4)
    np.testing.assert_allclose(td["zscore"], 0.0, atol=1e-3)
    heads.config.log_diffusion_mean = math.log(rms) - 1.0
    np.testing.assert_allclose(an.token_diffusion(heads, z)["zscore"], 2.0, atol=1e-3)  # (1.0) / std 0.5


def test_transition_nll_of_exact_model(ou_data):
    """The held-out NLL the report prints: for the true model it is the Gaussian entropy of the increments."""
    _, tr = ou_data
    nll = _evaluate(ou_heads(), tr)["total"]
    expected = float((0.5 * torch.log(2 * math.pi * math.e * SIGMA.pow(2) * DT)).mean())
    assert nll == pytest.approx(expected, abs=0.01)


# ----- heads fitted on OU data recover the truth ------------------------------------------------------------
def test_fitted_heads_recover_ou():
    paths = ou_paths(100, T + 1, seed=5)
    traj = Trajectories(list(paths), layer=0, hidden_size=D, num_layers=1)
    torch.manual_seed(0)
    heads = fit_heads(traj, proj_dim=None, standardize=False, horizon=T, epochs=8, width=16, depth=1, lr=1e-2,
                      progress=False).heads
    z = [heads.project(p) for p in paths[:50]]  # SDE coordinates are centred on the training mean
    tr = make_transitions(z, T)
    truth = Z_STAR - heads.proj_mean
    att = an.estimate_attractor(heads, tr.z, tr.t)
    assert torch.allclose(torch.tensor(att["z_star"]).float(), truth, atol=0.3)
    prof = an.drift_diffusion_profile(heads, tr)
    assert prof["diffusion_rms"] == pytest.approx(float(SIGMA.pow(2).mean().sqrt()), rel=0.05)
    lip = an.lipschitz_growth(heads, tr.z[:1000], tr.t[:1000])
    assert 0.6 * THETA < lip["drift"]["jacobian_median"] < 1.6 * THETA
    assert lip["diffusion"]["jacobian_max"] < 0.5 * THETA
