"""sCT (TrigFlow consistency training) against closed forms on Gaussian data and float64 references."""
from __future__ import annotations

import math

import pytest
import torch

from fewstep.backbones.dit import DiTConfig
from fewstep.contracts import Condition, DataSpec
from fewstep.objectives.common import per_sample
from fewstep.objectives.scm import SCM, SCMConfig
from fewstep.objectives.trigflow import from_trigflow, t_from_tau, tau_from_t, to_trigflow
from fewstep.registry import objectives
from fewstep.sample import sample, seed_noise_and_labels

from oracle import (TrigFlowOracle, VelocityOracle, class_means, exact_consistency, gaussian_batch, pf_velocity,
                    trigflow_std as S)

SD = 0.5          # σ_d
DATA_STD = 0.7    # s ≠ σ_d where the closed forms allow it, so nothing cancels by accident


def scm(s: float = DATA_STD, error: float = 0.0, parameterization: str = "trigflow", **cfg) -> SCM:
    config = SCMConfig(sigma_data=SD, parameterization=parameterization, **cfg)
    return SCM(TrigFlowOracle(class_means(3), s, SD, parameterization, error), config, num_classes=3).double()


class ExactTeacherSCM(SCM):
    """sCD with an exact teacher: the tangent uses the PF-ODE velocity instead of cos τ·z − sin τ·x₀."""

    def velocity(self, x0, z, x_tau, tau, y):
        net = self.backbone
        return pf_velocity(x_tau, tau, net.means[y], net.s, self.config.sigma_data)


def trig_batch(obj: SCM, n: int, seed: int = 1):
    """Data x₀, labels, TrigFlow τ (B,) spread over (0.02, π/2 − 0.02), z and x_τ (float64)."""
    x0, y = gaussian_batch(obj.backbone.means, obj.backbone.s, n, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tau = 0.02 + (math.pi / 2 - 0.04) * torch.rand(n, generator=gen, dtype=torch.float64)
    z = SD * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    return x0, y, tau, z, per_sample(torch.cos(tau), x0) * x0 + per_sample(torch.sin(tau), z) * z


# -- conversions ------------------------------------------------------------------------------------
def test_conversion_matches_direct_trigflow_construction_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(7, 2, 3, 3, generator=gen, dtype=torch.float64), torch.randn(7, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 1e-6, 0.1, 0.5, 0.9, 1 - 1e-6, 1.0], dtype=torch.float64)
    x_t = per_sample(1 - t, x0) * x0 + per_sample(t, eps) * eps          # ours: σ_p = 1
    x_tau, tau = to_trigflow(x_t, t, SD)
    direct = per_sample(torch.cos(tau), x0) * x0 + per_sample(torch.sin(tau), eps) * (SD * eps)
    assert torch.allclose(x_tau, direct, atol=1e-12, rtol=0)             # same x₀ and ε, matched SNR
    assert tau[0] == 0 and torch.isclose(tau[-1], torch.tensor(math.pi / 2, dtype=torch.float64))
    sigma = t[:-1] / (1 - t[:-1])                                         # EDM σ agrees: σ = σ_d·tan τ
    assert torch.allclose(SD * torch.tan(tau[:-1]), sigma, rtol=1e-9)
    back_x, back_t = from_trigflow(x_tau, tau, SD)
    assert torch.allclose(back_x, x_t, atol=1e-12) and torch.allclose(back_t, t, atol=1e-12)
    assert torch.allclose(tau_from_t(t_from_tau(tau, SD), SD), tau, atol=1e-12)


def test_velocity_parameterization_is_the_flow_matching_jump():
    """With output = v, f_θ(x_τ, τ) = x_t − t·v(x_t, t) exactly (an FM model is a diffusion init)."""
    means = class_means(3)
    obj = SCM(VelocityOracle(means, SD), SCMConfig(sigma_data=SD, parameterization="velocity"), 3).double()
    x0, y = gaussian_batch(means, SD, 6)
    t = torch.linspace(0.05, 1.0, 6, dtype=torch.float64)
    x_t = per_sample(1 - t, x0) * x0 + per_sample(t, x0) * torch.randn_like(x0)
    x_tau, tau = to_trigflow(x_t, t, SD)
    expected = x_t - per_sample(t, x_t) * obj.backbone(x_t, t, y=y)
    assert torch.allclose(obj.consistency_fn(x_tau, tau, y), expected, atol=1e-12)


# -- the tangent at the oracle -----------------------------------------------------------------------
@pytest.mark.parametrize("parameterization", ["trigflow", "velocity"])
def test_oracle_is_consistent_and_its_tangent_vanishes_along_the_pf_ode(parameterization):
    obj = scm(parameterization=parameterization)
    x0, y, tau, z, x_tau = trig_batch(obj, 64)
    mu = obj.backbone.means[y]
    assert torch.allclose(obj.consistency_fn(x_tau, tau, y), exact_consistency(x_tau, tau, mu, DATA_STD, SD), atol=1e-12)
    v = pf_velocity(x_tau, tau, mu, DATA_STD, SD)
    _, _, g = obj.consistency_tangent(x_tau, tau, v, y, r=1.0)
    scale = float(x_tau.abs().max())
    assert float(g.abs().max()) < 1e-10 * scale                          # d f*(x_τ(τ), τ)/dτ = 0
    _, _, g_half = obj.consistency_tangent(x_tau, tau, v, y, r=0.5)      # r < 1 is not a derivative
    assert float(g_half.abs().max()) > 1e-3


def test_sct_tangent_is_zero_in_expectation_and_a_perturbation_shifts_it():
    exact, worse = scm(), scm(error=0.05)
    x0, y, tau, z, x_tau = trig_batch(exact, 40_000)
    v = exact.velocity(x0, z, x_tau, tau, y)                            # conditional cos τ·z − sin τ·x₀
    _, _, g = exact.consistency_tangent(x_tau, tau, v, y, r=1.0)
    assert abs(float(g.mean())) < 6 * float(g.std()) / g.numel() ** 0.5
    assert float(g.abs().mean()) > 0.05                                  # pointwise it is not zero
    _, _, g_worse = worse.consistency_tangent(x_tau, tau, v, y, r=1.0)
    shift = -per_sample(torch.cos(tau) ** 2 * SD * 0.05, g)              # −cos²τ·σ_d·δ for F + δ
    assert torch.allclose(g_worse - g, shift.expand_as(g), atol=1e-10)


def test_exact_teacher_loss_is_zero_and_a_perturbed_oracle_is_strictly_worse():
    def run(error):
        obj = ExactTeacherSCM(TrigFlowOracle(class_means(3), DATA_STD, SD, error=error),
                              SCMConfig(sigma_data=SD), num_classes=3).double()
        x, y = gaussian_batch(obj.backbone.means, DATA_STD, 512)
        return obj(x, y, torch.Generator().manual_seed(0), nimg=10**12)

    exact, worse = run(0.0), run(0.05)
    assert abs(float(exact.loss.detach())) < 1e-18 and float(exact.logs["loss_unweighted"]) < 1e-18
    assert float(exact.logs["tangent_norm"]) < 1e-9 and int(exact.logs["nonfinite"]) == 0
    assert float(worse.loss.detach()) > 1e-4 and float(worse.logs["tangent_norm"]) > 1e-3
    assert torch.allclose(exact.loss, exact.per_sample.mean())


# -- the JVP on a real network (float64) ------------------------------------------------------------
def tiny_dit(classes: int = 3, scale: float = 0.0) -> torch.nn.Module:
    cfg = DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=4, gap_embedder=False)
    net = cfg.build(DataSpec(name="x", channels=1, resolution=8, num_classes=classes, num_items=1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():                                     # leave adaLN-zero so outputs depend on inputs
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


@pytest.mark.parametrize("parameterization", ["trigflow", "velocity"])
def test_jvp_matches_central_finite_differences_in_float64(parameterization):
    """The JVP (into-map and read-out by torch.func.jvp, the DiT by its own tangent rules)."""
    obj = SCM(tiny_dit(scale=0.3), SCMConfig(sigma_data=SD, parameterization=parameterization), num_classes=3).double()
    gen = torch.Generator().manual_seed(1)
    x0, z = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64), SD * torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    tau, y = torch.tensor([0.2, 0.9, 1.5], dtype=torch.float64), torch.tensor([0, 2, 3])
    x_tau = per_sample(torch.cos(tau), x0) * x0 + per_sample(torch.sin(tau), z) * z
    v = obj.velocity(x0, z, x_tau, tau, y)
    F, cs_dF, g = obj.consistency_tangent(x_tau, tau, v, y, r=1.0)
    cs, h = torch.cos(tau) * torch.sin(tau), 1e-4

    def central(fn):                                          # 5-point stencil, error O(h⁴)
        with torch.no_grad():
            return (-fn(2 * h) + 8 * fn(h) - 8 * fn(-h) + fn(-2 * h)) / (12 * h)

    fd = central(lambda e: obj.F(x_tau + e * per_sample(cs, v) * v, tau + e * cs, y))
    g_fd = per_sample(torch.cos(tau), v) * central(lambda e: obj.consistency_fn(x_tau + e * v, tau + e, y))
    assert float(cs_dF.abs().max()) > 1.0                    # g = cos τ·df/dτ along (v, 1) at r = 1
    assert torch.allclose(cs_dF, fd, atol=1e-8, rtol=1e-8)
    assert torch.allclose(g, g_fd, atol=1e-7, rtol=1e-7)


def test_gradient_reaches_the_backbone_through_the_jvp_primal_only():
    obj = SCM(tiny_dit(scale=0.3), SCMConfig(sigma_data=SD), num_classes=3).double()
    gen = torch.Generator().manual_seed(2)
    x_tau, v = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64), torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    tau, y, c = torch.tensor([0.4, 1.2], dtype=torch.float64), torch.tensor([1, 3]), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    F, cs_dF, g = obj.consistency_tangent(x_tau, tau, v, y, r=1.0)
    assert F.requires_grad and not cs_dF.requires_grad and not g.requires_grad
    params = [p for p in obj.backbone.parameters() if p.requires_grad]
    via_jvp = torch.autograd.grad((F * c).sum(), params, allow_unused=True)
    via_plain = torch.autograd.grad((obj.F(x_tau, tau, y) * c).sum(), params, allow_unused=True)
    for a, b in zip(via_jvp, via_plain):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-12))


# -- sampling -------------------------------------------------------------------------------------------
def test_default_schedule_and_first_step_time():
    obj = scm()
    t_mid = 0.5 * math.sin(1.1) / (math.cos(1.1) + 0.5 * math.sin(1.1))
    assert obj.default_schedule(1) == [1.0, 0.0]
    assert obj.default_schedule(2) == pytest.approx([1.0, t_mid, 0.0], abs=1e-12)
    five = obj.default_schedule(5)
    assert len(five) == 6 and all(a > b for a, b in zip(five, five[1:]))
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    obj.step(x, torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), Condition(y=torch.arange(4) % 3))
    seen_x, seen_t = obj.backbone.seen[-1]
    assert torch.allclose(seen_t, torch.full((4,), 80 / 81, dtype=torch.float64))  # σ_max = 80 → t = σ/(1 + σ)
    tau_max = math.atan(80 / SD)
    assert torch.allclose(seen_x, x * SD / (math.cos(tau_max) + SD * math.sin(tau_max)))  # x_τ = σ_d·ε exactly


@pytest.mark.parametrize("s", [SD, DATA_STD])
def test_oracle_one_and_two_step_samples_have_the_data_moments(s):
    obj, n = scm(s=s), 8000
    means, tau_max = obj.backbone.means, math.atan(80 / SD)
    one = sample(obj, list(range(n)), nfe=1, batch_size=2000)
    eps, _ = seed_noise_and_labels(list(range(n)), (1, 4, 4), 3)
    tm = torch.full((n,), tau_max, dtype=torch.float64)
    assert torch.allclose(one.images.double(), exact_consistency(SD * eps.double(), tm, means[one.labels], s, SD), atol=1e-5)
    # predicted moments: E = μ·(1 − m), std = q; both within 1% of the data's (μ, s)
    m1 = s / float(S(tm[:1], s, SD)) * math.cos(tau_max)
    q1 = s * SD / float(S(tm[:1], s, SD))
    tau2 = torch.tensor([1.1], dtype=torch.float64)
    c2, S2 = math.cos(1.1), float(S(tau2, s, SD))
    m2 = s / S2 * c2 * m1
    q2 = s / S2 * math.sqrt(c2 ** 2 * q1 ** 2 + math.sin(1.1) ** 2 * SD ** 2)
    two = sample(obj, list(range(n)), nfe=2, batch_size=2000)
    for res, m, q in ((one, m1, q1), (two, m2, q2)):
        assert m < 0.01 and abs(q - s) < 0.01 * s
        resid = (res.images.double() - means[res.labels] * (1 - m)).flatten(1)   # (n, 16)
        cov = resid.T @ resid / n
        assert float(resid.mean(0).abs().max()) < 5 * q / n ** 0.5
        assert float((cov - q ** 2 * torch.eye(16, dtype=torch.float64)).abs().max()) < 6 * q ** 2 * (2 / n) ** 0.5


# -- warm-up, weighting, proposal -------------------------------------------------------------------
def test_tangent_warmup_is_linear_in_kimg():
    obj = scm(warmup_kimg=2.0)
    x, y = gaussian_batch(obj.backbone.means, DATA_STD, 8)
    for nimg, r in ((0, 0.0), (500, 0.25), (1000, 0.5), (2000, 1.0), (10**6, 1.0)):
        assert float(obj(x, y, torch.Generator().manual_seed(0), nimg=nimg).logs["warmup"]) == pytest.approx(r)
    x0, y, tau, z, x_tau = trig_batch(obj, 16)
    v = obj.velocity(x0, z, x_tau, tau, y)
    g0, g1, gq = (obj.consistency_tangent(x_tau, tau, v, y, r)[2] for r in (0.0, 1.0, 0.25))
    assert torch.allclose(gq, g0 + 0.25 * (g1 - g0), atol=1e-12)
    F = obj.F(x_tau, tau, y)
    assert torch.allclose(g0, -per_sample(torch.cos(tau) ** 2, F) * (SD * F - v), atol=1e-12)
    assert scm(warmup_kimg=0.0).warmup(0) == 1.0


def test_adaptive_weight_gets_gradients_and_learns_minus_log_mean_square():
    obj = scm()
    x, y = gaussian_batch(obj.backbone.means, DATA_STD, 64)
    obj(x, y, torch.Generator().manual_seed(0), nimg=10**9).loss.backward()
    grads = {n: p.grad for n, p in obj.weight_net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert float(grads["mlp.2.bias"].abs()) > 0
    assert not any("weight_net" in k for k in obj.ema.state_dict())
    # optimum of e^w·a − w is w = −ln a: fit w_φ to a(τ) = 4·mean-square of ĝ at each τ
    net = SCM(TrigFlowOracle(class_means(3), DATA_STD, SD), SCMConfig(sigma_data=SD), 3).weight_net
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    tau = torch.linspace(0.05, 1.5, 64)
    a = 0.02 + 0.1 * tau
    for _ in range(300):
        w = net(tau)
        loss = (torch.exp(w) * a - w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(net(tau).detach(), -torch.log(a), atol=0.05)


def test_time_proposal_is_lognormal_in_edm_sigma():
    obj = scm(p_mean=-1.0, p_std=1.4)
    x, y = gaussian_batch(obj.backbone.means, DATA_STD, 100_000)
    out = obj(x, y, torch.Generator().manual_seed(3), nimg=10**9)
    t = obj.backbone.seen[-1][1]
    log_sigma = torch.log(t / (1 - t))                                   # σ = σ_p·t/(1 − t), σ_p = 1
    assert abs(float(log_sigma.mean()) + 1.0) < 0.02 and abs(float(log_sigma.std()) - 1.4) < 0.02
    assert int(out.logs["nonfinite"]) == 0 and set(out.logs) >= {"loss", "loss_unweighted", "weight_mean",
                                                                  "tangent_norm", "warmup", "nonfinite"}


# -- on the DiT --------------------------------------------------------------------------------------
def test_tiny_dit_trains_samples_and_is_batch_size_invariant():
    assert objectives.get("scm") is SCM and SCM.needs.renoise and SCM.needs.time_inputs == 1
    torch.manual_seed(0)   # the DiT's init draws from the global RNG: fix it so the test is order-independent
    obj = SCM(tiny_dit(), SCMConfig(sigma_data=SD), num_classes=3, ema_betas={"ema": 0.99})
    gen = torch.Generator().manual_seed(0)
    x, y = SD * torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3])
    out = obj(x, y, gen, nimg=100)
    out.loss.backward()
    assert torch.isfinite(out.loss) and int(out.logs["nonfinite"]) == 0
    for name, p in obj.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(float(p.grad.abs().sum()) > 0 for p in obj.backbone.parameters() if p.requires_grad)
    obj.after_step()
    with torch.no_grad():
        for p in obj.backbone.parameters():            # make the sampler's output depend on the noise
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    for nfe in (1, 2):
        res = sample(obj, list(range(7)), nfe, batch_size=4)
        assert res.images.shape == (7, 1, 8, 8) and torch.isfinite(res.images).all()
    a, b = sample(obj, list(range(7)), 2, batch_size=4), sample(obj, list(range(7)), 2, batch_size=3)
    scale = float(a.images.abs().max())   # outputs reach ~10 with these weights: float32 rounding scales with them
    torch.testing.assert_close(a.images, b.images, rtol=1e-5, atol=1e-5 * scale)
    assert not torch.allclose(a.images, sample(obj, list(range(7)), 1, batch_size=4).images, atol=1e-3)
    assert obj.flops_per_sample(1.0) == 4.0
    with pytest.raises(ValueError, match="guidance"):
        sample(obj, [0], 1, guidance=2.0)
