"""The shared closed-form Gaussian oracle (tests/oracle.py, docs/design/frontier.md §2): its closed forms
against RK4 and forward-mode AD, and every objective (old and new) against the same ``gaussian`` fixture:
an exact oracle backbone in the objective's own parameterisation scores strictly below a perturbed one
on the same batch, noise and times. Each objective's own test file checks its residuals in detail."""
from __future__ import annotations

import math

import pytest
import torch

from fewstep.objectives.common import per_sample
from fewstep.objectives.trigflow import to_trigflow
from fewstep.registry import objectives

from oracle import (AverageVelocityOracle, EDMOracle, FlowMapOracle, TrigFlowOracle, VelocityOracle, average_velocity,
                    d, edm_slope, exact_consistency, flow_map, guided_mean, interval_average_velocity,
                    interval_flow_map, pf_velocity, rk4_flow_map, velocity)


def times(n: int, seed: int, low: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    t = low + (1 - low) * torch.rand(n, generator=g, dtype=torch.float64)
    return t, t * torch.rand(n, generator=g, dtype=torch.float64), g


# ---------------------------------------------------------------------------------------------------
# The closed forms
# ---------------------------------------------------------------------------------------------------
def test_flow_map_and_average_velocity_match_rk4_and_the_meanflow_identity(gaussian):
    x, y = gaussian.batch(64)
    t, s, g = times(64, 0)
    z = (1 - per_sample(t, x)) * x + per_sample(t, x) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mu = gaussian.means[y]
    X = rk4_flow_map(lambda zz, tau: velocity(zz, tau, mu, gaussian.sigma), z, t, s, steps=400)
    assert torch.allclose(X, flow_map(z, t, s, mu, gaussian.sigma), rtol=0, atol=1e-10)
    u = average_velocity(z, t, s, mu, gaussian.sigma)
    assert torch.allclose(u, (z - X) / per_sample(t - s, z), rtol=0, atol=1e-8)
    assert torch.allclose(average_velocity(z, t, t, mu, gaussian.sigma), velocity(z, t, mu, gaussian.sigma), atol=1e-14)
    # MeanFlow identity R = u − v + (t − s)·(∂_z u·v + ∂_t u) = 0 through forward-mode AD (tangent (v, 1, 0))
    v = velocity(z, t, mu, gaussian.sigma)
    u, dudt = torch.func.jvp(lambda zz, tt, ss: average_velocity(zz, tt, ss, mu, gaussian.sigma), (z, t, s),
                             (v, torch.ones_like(t), torch.zeros_like(s)))
    assert float((u - v + per_sample(t - s, u) * dudt).abs().max()) < 1e-10
    # the flow-matching floor σ²/S_t² is Var(ε − x | z) per dimension (exact identity of the closed forms)
    assert torch.allclose((1 + gaussian.sigma ** 2) - (t - (1 - t) * gaussian.sigma ** 2) ** 2 / d(t, gaussian.sigma),
                          gaussian.sigma ** 2 / d(t, gaussian.sigma), atol=1e-14)


def test_interval_guided_flow_map_matches_rk4_of_the_piecewise_field(gaussian):
    x, y = gaussian.batch(64, seed=3)
    t, s, g = times(64, 1)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = 1 + 7 * torch.rand(64, generator=g, dtype=torch.float64)
    t_min, t_max = 0.5 * torch.rand(64, generator=g, dtype=torch.float64), 0.5 + 0.5 * torch.rand(64, generator=g, dtype=torch.float64)
    mu_y, mu_null = gaussian.means[y], gaussian.means[-1].expand_as(z)

    def field(zz, tau):
        w_eff = torch.where((tau >= t_min) & (tau <= t_max), w, torch.ones_like(w))
        return velocity(zz, tau, guided_mean(mu_y, mu_null, w_eff), gaussian.sigma)

    X = rk4_flow_map(field, z, t, s, steps=4000)   # the field jumps at t_min, t_max: RK4 is first order there
    exact = interval_flow_map(z, t, s, mu_y, mu_null, gaussian.sigma, w, t_min, t_max)
    assert float((X - exact).abs().max()) < 2e-3
    u = interval_average_velocity(z, t, s, mu_y, mu_null, gaussian.sigma, w, t_min, t_max)
    v_t = field(z, t)
    _, dudt = torch.func.jvp(lambda zz, tt: interval_average_velocity(zz, tt, s, mu_y, mu_null, gaussian.sigma, w,
                                                                      t_min, t_max), (z, t), (v_t, torch.ones_like(t)))
    assert float((u + per_sample(t - s, u) * dudt - v_t).abs().max()) < 1e-10   # V = v^{w_eff(t)}


def test_consistency_forms_are_the_shared_flow_map(gaussian):
    """sCM's f*(x_τ, τ) is Φ_{t→0} and its PF velocity dx_τ/dτ; ECT's slope a(σ) is Φ_{t→t(σ_min)}."""
    x, y = gaussian.batch(32)
    t, _, g = times(32, 2)
    z = (1 - per_sample(t, x)) * x + per_sample(t, x) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mu, sd = gaussian.means[y], 0.5
    x_tau, tau = to_trigflow(z, t, sd)
    assert torch.allclose(exact_consistency(x_tau, tau, mu, gaussian.sigma, sd),
                          flow_map(z, t, torch.zeros_like(t), mu, gaussian.sigma), atol=1e-12)
    h = 1e-5
    tau2 = tau + h
    x_tau2, _ = to_trigflow(flow_map(z, t, torch.sin(tau2) * sd / (torch.cos(tau2) + sd * torch.sin(tau2)), mu,
                                     gaussian.sigma), torch.sin(tau2) * sd / (torch.cos(tau2) + sd * torch.sin(tau2)), sd)
    assert torch.allclose((x_tau2 - x_tau) / h, pf_velocity(x_tau, tau, mu, gaussian.sigma, sd), atol=1e-4)
    sigma = t / (1 - t)
    t_min = torch.full_like(t, 0.002 / 1.002)
    lhs = flow_map(z, t, t_min, mu, gaussian.sigma) / per_sample(1 - t_min, z)
    rhs = mu + per_sample(edm_slope(sigma, gaussian.sigma), z) * (z / per_sample(1 - t, z) - mu)
    assert torch.allclose(lhs, rhs, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# Every objective against the same oracle problem
# ---------------------------------------------------------------------------------------------------
def build(name: str, problem, error: float):
    """The objective ``name`` on the oracle backbone of its parameterisation (``error`` added to its
    output), guidance and label dropout off where they would make the null Gaussian matter."""
    from fewstep.objectives import (DMF, ECT, IMF, SCM, AlphaFlow, AlphaFlowConfig, DMFConfig, ECTConfig,
                                    FlowMatching, FlowMatchingConfig, IMFConfig, MeanFlow, MeanFlowConfig, Shortcut,
                                    ShortcutConfig, TVMConfig, TVM)
    from fewstep.objectives.scm import SCMConfig

    m, sd, K = problem.means, problem.sigma, problem.num_classes

    class ExactTeacherSCM(SCM):   # sCD with the exact PF velocity as tangent: the loss is then 0 at the oracle
        def velocity(self, x0, z, x_tau, tau, y):
            return pf_velocity(x_tau, tau, self.backbone.means[y], self.backbone.s, self.config.sigma_data)

    makers = {
        "fm": lambda: FlowMatching(VelocityOracle(m, sd, error), FlowMatchingConfig(label_dropout=0.0), K),
        "meanflow": lambda: MeanFlow(AverageVelocityOracle(m, sd, error),
                                     MeanFlowConfig(omega=1.0, kappa=0.0, label_dropout=0.0), K),
        "tvm": lambda: TVM(FlowMapOracle(m, sd, error=error), TVMConfig(guidance=1.0, label_dropout=0.0), K),
        "scm": lambda: ExactTeacherSCM(TrigFlowOracle(m, sd, 0.5, error=error), SCMConfig(sigma_data=0.5), K),
        "ect": lambda: ECT(EDMOracle(m, sd, offset=10 * error), ECTConfig(huber_c=0.0), K),
        "imf": lambda: IMF(AverageVelocityOracle(m, sd, error, conditions=True), IMFConfig(label_dropout=0.0), K),
        "alphaflow": lambda: AlphaFlow(AverageVelocityOracle(m, sd, error),
                                       AlphaFlowConfig(alpha_constant=0.0, kappa=0.0, label_dropout=0.0), K),
        "dmf": lambda: DMF(AverageVelocityOracle(m, sd, error), DMFConfig(guidance=0.0, label_dropout=0.0), K),
        "shortcut": lambda: Shortcut(AverageVelocityOracle(m, sd, error), ShortcutConfig(label_dropout=0.0), K),
    }
    return makers[name]().double()


IN_TREE = ["fm", "tvm", "meanflow", "scm", "ect", "imf", "alphaflow", "dmf", "shortcut"]


def test_every_in_tree_objective_is_checked_against_the_oracle():
    in_tree = {e.name for e in objectives.entries() if e.source == "fewstep"}
    assert in_tree <= set(IN_TREE), f"add {sorted(in_tree - set(IN_TREE))} to tests/test_oracle.py"


@pytest.mark.parametrize("name", IN_TREE)
def test_the_exact_oracle_scores_below_a_perturbed_one(gaussian, name):
    x, y = gaussian.batch(4096, seed=5)
    nimg = 10 ** 7      # 10 000 kimg: past sCM's tangent warm-up, ECT at stage 3
    exact = build(name, gaussian, 0.0)(x, y, torch.Generator().manual_seed(0), nimg=nimg)
    worse = build(name, gaussian, 0.05)(x, y, torch.Generator().manual_seed(0), nimg=nimg)
    assert math.isfinite(float(exact.loss)) and int(exact.logs.get("nonfinite", 0)) == 0
    assert float(worse.loss) > float(exact.loss) + 1e-6, (float(worse.loss), float(exact.loss))
