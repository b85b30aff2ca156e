"""ECT (discrete consistency training) against closed forms on Gaussian data, in EDM σ."""
from __future__ import annotations

import math

import pytest
import torch

from fewstep.backbones.dit import DiTConfig
from fewstep.contracts import Condition, DataSpec
from fewstep.objectives.ect import ECT, ECTConfig, ect_sigma_r, ect_stage
from fewstep.objectives.edm import (cm_preconditioning, sigma_from_t, t_from_sigma, t_max, x_sigma_from_x_t,
                                    x_t_from_x_sigma)
from fewstep.sample import sample, seed_noise_and_labels

from oracle import EDMOracle, class_means, edm_residual_variance as residual_variance, edm_slope as a_of, gaussian_batch

STD = 0.5   # data std s
D = 16      # item dimension (1, 4, 4)


def ect(offset: float = 0.0, **cfg) -> ECT:
    return ECT(EDMOracle(class_means(3), STD, offset), ECTConfig(**cfg), num_classes=3).double()


def pair(n: int, seed: int = 1):
    x, y = gaussian_batch(class_means(3), STD, n, seed)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    return x, y, eps


def closed_residual(obj: ECT, x, y, eps, sigma_t, sigma_r):
    """(B, C, H, W) f*(x + σ_t ε, σ_t) − f*(x + σ_r ε, σ_r), σ_r raised to σ_min (tests/oracle.py, edm_residual_variance)."""
    mu = obj.backbone.means[y]
    s_t, s_r = sigma_t.view(-1, 1, 1, 1), sigma_r.clamp(min=obj.config.sigma_min).view(-1, 1, 1, 1)
    a_t, a_r = a_of(s_t, STD), a_of(s_r, STD)
    return (a_t - a_r) * (x - mu) + (a_t * s_t - a_r * s_r) * eps


# -- EDM σ boundary and preconditioning ---------------------------------------------------------------
def test_sigma_t_conversion_round_trips_and_matches_edm_state():
    t = torch.linspace(0, 0.999, 1001, dtype=torch.float64)
    assert torch.allclose(t_from_sigma(sigma_from_t(t)), t, rtol=0, atol=1e-15)
    sigma = torch.logspace(-4, 4, 200, dtype=torch.float64)
    assert torch.allclose(sigma_from_t(t_from_sigma(sigma)), sigma, rtol=1e-12)
    assert torch.allclose(sigma_from_t(t, sigma_p=0.5), 0.5 * t / (1 - t))
    assert t_max(80.0) == 80 / 81
    x, _, eps = pair(64)
    t = torch.rand(64, dtype=torch.float64) * 0.99
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    x_sigma = x_sigma_from_x_t(x_t, t)
    assert torch.allclose(x_sigma, x + sigma_from_t(t).view(-1, 1, 1, 1) * eps, rtol=1e-12, atol=1e-12)
    assert torch.allclose(x_t_from_x_sigma(x_sigma, t), x_t, rtol=0, atol=1e-14)


def test_boundary_condition_is_exact_and_backbone_sees_toolkit_time():
    seen = []

    def net(u, t, s=None, y=None):   # any finite, input-dependent output
        seen.append((u, t, s))
        return 100 * torch.sin(37 * u) + t.view(-1, 1, 1, 1)

    obj = ECT(EDMOracle(class_means(3), STD), ECTConfig(), num_classes=3)
    x = torch.randn(8, 1, 4, 4)
    at_min = torch.full((8,), 0.002)
    assert torch.equal(obj.f(x, at_min, None, net), x)
    c_skip, c_out, c_in = cm_preconditioning(torch.full((8,), 0.002, dtype=torch.float64))
    assert torch.equal(c_skip, torch.ones_like(c_skip)) and torch.equal(c_out, torch.zeros_like(c_out))
    sigma = torch.full((8,), 3.0)
    out = obj.f(x, sigma, None, net)
    u, t, s = seen[-1]
    assert s is None and torch.allclose(t, torch.full((8,), 0.75))            # t = σ/(σ + 1)
    assert torch.allclose(u, x / math.sqrt(9 + 0.25))                          # c_in·x_σ
    c_skip, c_out = 0.25 / (2.998 ** 2 + 0.25), 2.998 * 0.5 / math.sqrt(9.25)
    assert torch.allclose(out, c_skip * x + c_out * net(u, t), rtol=1e-5, atol=1e-4)


def test_oracle_backbone_gives_the_exact_consistency_function():
    obj = ect()
    x, y, eps = pair(256)
    sigma = torch.exp(torch.randn(256, dtype=torch.float64) * 2 - 1).clamp(min=0.002)
    x_sigma = x + sigma.view(-1, 1, 1, 1) * eps
    mu = obj.backbone.means[y]
    expected = mu + a_of(sigma, STD).view(-1, 1, 1, 1) * (x_sigma - mu)
    assert torch.allclose(obj.f(x_sigma, sigma, y), expected, rtol=1e-10, atol=1e-10)


# -- the loss -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting,huber_c", [("gap", 0.0), ("gap", None), ("snrpk", 0.3)])
def test_loss_is_weighted_pseudo_huber_of_the_closed_form_residual(weighting, huber_c):
    obj = ect(weighting=weighting, huber_c=huber_c)
    x, y, eps = pair(512)
    sigma_t = torch.exp(torch.randn(512, dtype=torch.float64) * 2 - 1.1).clamp(min=0.002)
    sigma_r = ect_sigma_r(sigma_t, stage=1)                   # mix of boundary (σ_r = 0) and interior targets
    assert 0.3 < float((sigma_r <= 0.002).double().mean()) < 0.7
    out = obj.consistency_loss(x, y, eps, sigma_t, sigma_r, stage=1)
    c = 0.00054 * math.sqrt(D) if huber_c is None else huber_c
    sq = closed_residual(obj, x, y, eps, sigma_t, sigma_r).flatten(1).square().sum(1)
    w = 1 / (sigma_t - sigma_r) if weighting == "gap" else 1 / sigma_t ** 2 + 1 / 0.25
    assert torch.allclose(out.per_sample, w * ((sq + c * c).sqrt() - c), rtol=1e-9, atol=1e-12)
    assert torch.allclose(out.loss, out.per_sample.mean())
    assert torch.allclose(out.logs["weight"], w.mean()) and int(out.logs["nonfinite"]) == 0
    assert torch.allclose(out.logs["boundary_frac"], (sigma_r <= 0.002).double().mean().float())


def test_gradient_flows_only_through_the_online_branch():
    obj = ect(offset=0.1, huber_c=0.06)
    x, y, eps = pair(256)
    sigma_t = torch.exp(torch.randn(256, dtype=torch.float64) - 0.5).clamp(min=0.002)
    sigma_r = ect_sigma_r(sigma_t, stage=3)
    obj.consistency_loss(x, y, eps, sigma_t, sigma_r).loss.backward()
    c_out_t = cm_preconditioning(sigma_t)[1]
    c_out_r = cm_preconditioning(sigma_r.clamp(min=0.002))[1]               # 0 at the boundary
    delta = closed_residual(obj, x, y, eps, sigma_t, sigma_r).flatten(1) + 0.1 * (c_out_t - c_out_r).view(-1, 1)
    # d/dδ of λ·(√(‖Δ‖² + c²) − c) with sg on the target: ∂Δ/∂δ = c_out(σ_t)·1,
    # not c_out(σ_t) − c_out(σ_r) as it would be without the stop-gradient
    grad = (1 / (sigma_t - sigma_r)) * delta.sum(1) * c_out_t / (delta.square().sum(1) + 0.06 ** 2).sqrt()
    assert torch.allclose(obj.backbone.offset.grad, grad.mean(), rtol=1e-9)


def test_expected_residual_matches_closed_form_and_vanishes_as_the_gap_shrinks():
    obj = ect(huber_c=0.0)
    x, y, eps = pair(20_000)
    sigma_t = torch.full((20_000,), 0.7, dtype=torch.float64)
    v_prev = math.inf
    for stage in range(10):
        sigma_r = ect_sigma_r(sigma_t, stage)
        out = obj.consistency_loss(x, y, eps, sigma_t, sigma_r, stage)
        mc = float(((out.per_sample * (sigma_t - sigma_r)) ** 2).mean()) / D      # ‖Δ‖²/D
        v = float(residual_variance(sigma_t[:1], sigma_r[:1], STD))
        assert abs(mc / v - 1) < 0.03                                            # SE ≈ √(2/D)/√N ≈ 0.25%
        assert v < v_prev / (3.0 if stage >= 2 else 1.0)                         # → q² = 4 per stage
        v_prev = v
    assert v_prev < 1e-4
    limit = (STD ** 2 + 0.002 ** 2) * STD ** 2 / (STD ** 2 + 0.7 ** 2) ** 2   # E‖Δ‖²/(D·gap²) → this
    gap = float(sigma_t[0] - sigma_r[0])
    assert abs(v_prev / gap ** 2 / limit - 1) < 0.01


def test_offset_perturbed_oracle_has_a_larger_expected_loss():
    # A scale error is no test for CT: loss values are not minimised by f* (a constant map scores 0).
    # An offset on F preserves f(x, σ_min) = x and adds δ·(c_out(σ_t) − c_out(σ_r)) to a zero-mean residual.
    nimg = 5 * 3200 * 1000
    x, y = gaussian_batch(class_means(3), STD, 8192, seed=4)
    exact = ect(huber_c=0.0)(x, y, torch.Generator().manual_seed(0), nimg=nimg)
    worse = ect(offset=0.5, huber_c=0.0)(x, y, torch.Generator().manual_seed(0), nimg=nimg)
    assert int(exact.logs["stage"]) == 5
    assert float(worse.logs["distance"]) > 1.02 * float(exact.logs["distance"])
    assert float(worse.loss.detach()) > 1.02 * float(exact.loss.detach())


# -- schedules ------------------------------------------------------------------------------------------
def test_gap_schedule_values_and_stages():
    sig = lambda z: 1 / (1 + math.exp(-z))
    for sigma_t, stage, q in [(1.0, 2, 2.0), (10.0, 0, 2.0), (0.3, 4, 4.0), (0.5, 0, 2.0)]:
        hand = max(0.0, sigma_t * (1 - (1 + 8 * sig(-sigma_t)) / q ** (stage + 1)))
        got = float(ect_sigma_r(torch.tensor([sigma_t], dtype=torch.float64), stage, q=q))
        assert abs(got - hand) < 1e-14
    assert abs(float(ect_sigma_r(torch.tensor([1.0], dtype=torch.float64), 2)) - 0.60605858) < 1e-8
    sigma_t = torch.logspace(-2.5, 2, 50, dtype=torch.float64)
    ratios = torch.stack([ect_sigma_r(sigma_t, s) / sigma_t for s in range(25)])
    assert bool((ratios < 1).all()) and bool((ratios[1:] >= ratios[:-1]).all())
    assert bool((ratios[-1] > 1 - 1e-6).all())
    assert [ect_stage(n, 3.2) for n in (0, 3199, 3200, 6399, 6400)] == [0, 0, 1, 1, 2]


def test_forward_draws_lognormal_sigma_and_maps_r_with_the_current_stage():
    obj = ect(P_mean=-1.1, P_std=2.0, stage_kimg=1.0)
    x, y = gaussian_batch(obj.backbone.means, STD, 100_000, seed=2)
    out = obj(x, y, torch.Generator().manual_seed(5), nimg=3500)
    assert int(out.logs["stage"]) == 3
    t_t, t_r = obj.backbone.seen_t[-2:]
    sigma_t, sigma_r = sigma_from_t(t_t), sigma_from_t(t_r)
    assert bool((sigma_t > 0.002).all())
    lo = torch.special.ndtr(torch.tensor((math.log(0.002) + 1.1) / 2.0, dtype=torch.float64))   # truncation
    p = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    expected = -1.1 + 2.0 * torch.special.ndtri(lo + (1 - lo) * p)
    assert torch.allclose(torch.quantile(sigma_t.log()[:50_000], p), expected, atol=0.04)
    inside = sigma_r > 0.002 + 1e-9
    assert torch.allclose(sigma_r[inside], ect_sigma_r(sigma_t, 3)[inside], rtol=1e-9)
    gap = t_from_sigma(sigma_t) - t_from_sigma(ect_sigma_r(sigma_t, 3))
    assert torch.allclose(out.logs["gap_t"], gap.mean())


def test_target_pass_replays_the_grad_pass_randomness():
    class DropoutNet(torch.nn.Module):    # a dropout-like draw from the global RNG in every call
        masks: list = []

        def forward(self, u, t, s=None, y=None):
            self.masks.append(torch.rand(u.shape))
            return u * (self.masks[-1] > 0.5)

    obj = ECT(DropoutNet(), ECTConfig(), num_classes=0)
    x = torch.randn(16, 1, 4, 4)
    obj.consistency_loss(x, None, torch.randn_like(x), torch.full((16,), 5.0), torch.full((16,), 4.0))
    masks = obj.backbone.masks
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])


def test_default_schedule_is_edm_sigma_converted():
    obj = ect()
    assert obj.default_schedule(1) == [1.0, 0.0]
    assert obj.default_schedule(2) == pytest.approx([1.0, 0.821 / 1.821, 0.0], abs=1e-15)
    assert ect(sigma_mid=1.526).default_schedule(2)[1] == pytest.approx(1.526 / 2.526)
    three = [sigma_from_t(torch.tensor(t, dtype=torch.float64)) for t in obj.default_schedule(3)[1:-1]]
    assert float(three[0]) == pytest.approx(math.sqrt(80 * 0.821)) and float(three[1]) == pytest.approx(0.821)
    with pytest.raises(ValueError, match="must lie in"):
        obj.step(torch.zeros(2, 1, 4, 4), torch.full((2,), 1.5), torch.zeros(2), Condition())


def test_first_jump_starts_exactly_at_sigma_max():
    """ECT's sampler evaluates f(σ_max·z, σ_max) (official ``generator_fn``), not f(z/(1 − t_max)) = f(81·z)."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, s=None, y=None):
            seen.append((x, t))
            return torch.zeros_like(x)

    obj = ECT(Spy(), ECTConfig(), num_classes=3).double()
    z = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    x0 = obj.step(z, torch.ones(4), torch.zeros(4), Condition(y=torch.zeros(4, dtype=torch.long)))
    c_skip, _, c_in = cm_preconditioning(torch.full((4,), 80.0, dtype=torch.float64))
    assert torch.allclose(seen[0][0], 80.0 * z * c_in.view(-1, 1, 1, 1), rtol=1e-12)   # input c_in·σ_max·z
    assert torch.allclose(seen[0][1], torch.full((4,), 80 / 81, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(x0, c_skip.view(-1, 1, 1, 1) * 80.0 * z, rtol=1e-12)       # F = 0: c_skip·x_σ


# -- sampling -------------------------------------------------------------------------------------------
def test_one_and_two_step_oracle_samples_have_the_closed_form_moments():
    obj = ect()
    means = obj.backbone.means
    a1, big = float(a_of(80.0, STD)), 80.0              # x_σ = σ_max·ε (ECT's start; data part dropped)
    one = sample(obj, list(range(4000)), nfe=1, batch_size=1000)
    z = (one.images.double() - (1 - a1) * means[one.labels]) / (a1 * big)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    resid = one.images.double() - means[one.labels]     # ≈ data: N(μ, s²) (the data part of x_σ is dropped)
    assert abs(float(resid.std()) / STD - 1) < 0.02
    two = sample(obj, list(range(4000)), nfe=2, batch_size=1000)
    a2 = float(a_of(0.821, STD))
    var = a2 ** 2 * ((a1 * big) ** 2 + 0.821 ** 2)      # x̂₀' = μ + a₂·(x̂₀ + σ_mid·ε′ − μ)
    z = (two.images.double() - (1 - a2 * a1) * means[two.labels]) / math.sqrt(var)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((two.images.double() - means[two.labels]).std()) / STD - 1) < 0.02


def test_renoise_noise_is_independent_of_the_prior_noise():
    # ECT's 2-step sampler needs fresh ε′; equal to the prior noise, x̂₀ and ε′ are correlated.
    obj, seen = ect(), []
    step = obj.step
    obj.step = lambda x, t, s, cond, net=None, noise=None: seen.append(noise) or step(x, t, s, cond, net, noise)
    sample(obj, list(range(6)), nfe=2)
    prior, _ = seed_noise_and_labels(list(range(6)), (1, 4, 4), 3)
    assert not torch.allclose(seen[0], prior), "sampler re-noise equals the prior noise (CPU seeds use 32 bits)"


def tiny_dit(seed: int = 0) -> torch.nn.Module:
    data = DataSpec(name="x", channels=1, resolution=8, num_classes=3, num_items=1)
    cfg = DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=4,
                    gap_embedder=False, guidance_embedder=False)
    torch.manual_seed(seed)
    return cfg.build(data)


def test_sampling_with_renoise_is_independent_of_batch_size():
    dit = tiny_dit()
    with torch.no_grad():                   # leave the zero init so the output depends on the input
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obj = ECT(dit, ECTConfig(), num_classes=3)
    a = sample(obj, list(range(7)), nfe=2, batch_size=4)
    b = sample(obj, list(range(7)), nfe=2, batch_size=3)
    c = sample(obj, [4, 5, 6], nfe=2, batch_size=2)
    assert torch.allclose(a.images, b.images, atol=1e-5) and torch.allclose(a.images[4:], c.images, atol=1e-5)
    assert not torch.allclose(a.images, sample(obj, list(range(7)), nfe=1).images, atol=1e-3)


def test_tiny_dit_trains_and_samples():
    obj = ECT(tiny_dit(), ECTConfig(stage_kimg=0.004), num_classes=3)
    x, y = torch.randn(8, 1, 8, 8) * 0.5, torch.tensor([0, 1, 2, 0, 1, 2, 0, 3])
    out = obj(x, y, torch.Generator().manual_seed(0), nimg=40)
    assert out.loss.isfinite() and out.per_sample.shape == (8,) and int(out.logs["stage"]) == 10
    out.loss.backward()
    for name, p in obj.backbone.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(p.grad.isfinite().all()), name
    assert any(float(p.grad.abs().sum()) > 0 for p in obj.backbone.parameters() if p.requires_grad)
    assert obj.flops_per_sample(1.0) == 4.0
    for nfe in (1, 2):
        res = sample(obj, [0, 1], nfe=nfe)
        assert res.images.shape == (2, 1, 8, 8) and bool(res.images.isfinite().all())
