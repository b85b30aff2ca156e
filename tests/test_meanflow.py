"""MeanFlow against closed forms on Gaussian class data (the shared oracle, tests/oracle.py).

For an oracle u* that is the exact average velocity of an affine field V, the MeanFlow target built from a
sample velocity ṽ satisfies, pointwise,  u* − u_tgt = −√(d(r)/d(t))·(ṽ − V(z_t, t)):  the identity
u* = V − (t − r)·du*/dt holds exactly along V, and the remaining tangent ṽ − V enters through ∂_z u* only
(∂X/∂z = √(d(r)/d(t))·I). Since E[ṽ − V | z_t] = 0, the oracle is the fixed point of the loss. At r = t
the residual is u − v, whose per-dimension mean square is the flow-matching floor σ²/d(t).
"""
from __future__ import annotations

import math

import pytest
import torch

from fewstep.backbones.dit import DiTConfig
from fewstep.contracts import DataSpec
from fewstep.objectives.common import mean_flat, per_sample
from fewstep.objectives.meanflow import MeanFlow, MeanFlowConfig
from fewstep.sample import sample

from oracle import (AverageVelocityOracle, average_velocity, d, flow_map, gaussian_batch, guided_means, rk4_flow_map,
                    standard_problem, velocity)

SIGMA, K, D = 0.5, 3, 16


def means_table() -> torch.Tensor:
    """(K + 1, 1, 4, 4) float64 means of the shared oracle problem; the null label has its own Gaussian."""
    return standard_problem(K, sigma=SIGMA).means.clone()


def meanflow(table: torch.Tensor, error: float = 0.0, **cfg) -> MeanFlow:
    return MeanFlow(AverageVelocityOracle(table, SIGMA, error), MeanFlowConfig(**cfg), num_classes=K).double()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def shrink(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """k = √(d(r)/d(t)) = ∂X/∂z_t, per sample."""
    return torch.sqrt(d(r, SIGMA) / d(t, SIGMA))


def mc_tol(expected: torch.Tensor) -> float:
    """6 sd of the batch mean of mean_flat(N(0, e)²) over D dims: e·√(2/D)/√B."""
    return 6 * float(expected.mean()) * math.sqrt(2 / D) / math.sqrt(expected.numel())


def test_residual_is_the_noise_term_of_the_meanflow_identity():
    means = means_table()
    obj = meanflow(means, omega=1.0, kappa=0.0, label_dropout=0.0)
    x, y = gaussian_batch(means, SIGMA, 8192)
    tm = obj.terms(x, y, gen(0))
    res = (tm.u - tm.u_tgt).detach()
    k = shrink(tm.t, tm.r)
    expected = -per_sample(k, res) * (tm.v - velocity(tm.z_t, tm.t, means[y], SIGMA))
    assert torch.allclose(res, expected, rtol=0, atol=1e-10)
    assert tm.u.dtype == torch.float64 and tm.u.requires_grad
    assert not tm.dudt.requires_grad and not tm.u_tgt.requires_grad

    eq = tm.r == tm.t                       # flow-matching samples: residual u − v, mean square σ²/d(t)
    assert int(eq.sum()) == 6144
    assert torch.allclose(res[eq], (tm.u - tm.v)[eq], rtol=0, atol=1e-12)
    floor = SIGMA ** 2 / d(tm.t[eq], SIGMA)
    assert abs(float((mean_flat(res[eq] ** 2) - floor).mean())) < mc_tol(floor)
    lt = ~eq                                # r < t: mean square k²σ²/d(t)
    floor = k[lt] ** 2 * SIGMA ** 2 / d(tm.t[lt], SIGMA)
    assert abs(float((mean_flat(res[lt] ** 2) - floor).mean())) < mc_tol(floor)
    assert abs(float(res.mean())) < 6 / math.sqrt(res.numel())   # E[residual | z_t] = 0: a fixed point


@pytest.mark.parametrize("omega,kappa", [(2.0, 0.0), (1.0, 0.5), (0.5, 0.75)])   # all ω/(1 − κ) = 2
def test_cfg_oracle_at_the_effective_scale_is_the_fixed_point(omega, kappa):
    means = means_table()
    scale = omega / (1 - kappa)
    x, y = gaussian_batch(means, SIGMA, 4096)
    obj = meanflow(guided_means(means, scale), omega=omega, kappa=kappa, label_dropout=0.1)
    tm = obj.terms(x, y, gen(1))
    res, k = tm.u - tm.u_tgt, per_sample(shrink(tm.t, tm.r), x)
    kept, dropped = ~tm.dropped, tm.dropped
    v_y = velocity(tm.z_t, tm.t, means[y], SIGMA)                       # unguided class field
    v_null = velocity(tm.z_t, tm.t, means[K].expand_as(x), SIGMA)
    assert torch.allclose(res[kept], (-omega * k * (tm.v - v_y))[kept], rtol=0, atol=1e-10)
    assert torch.allclose(res[dropped], (-k * (tm.v - v_null))[dropped], rtol=0, atol=1e-10)
    assert bool((tm.r < tm.t).any()) and bool(dropped.any())
    if kappa:   # the oracle at the naive scale ω is not a fixed point: the identity above fails
        wrong = meanflow(guided_means(means, omega), omega=omega, kappa=kappa, label_dropout=0.1).terms(x, y, gen(1))
        assert not torch.allclose((wrong.u - wrong.u_tgt)[kept], (-omega * k * (wrong.v - v_y))[kept], atol=1e-3)


def test_guided_field_average_velocity_closed_form_matches_rk4():
    means, w = means_table(), 2.0
    g = gen(2)
    y = torch.randint(K, (64,), generator=g)
    z = torch.randn((64, 1, 4, 4), generator=g, dtype=torch.float64)
    t = 0.1 + 0.9 * torch.rand(64, generator=g, dtype=torch.float64)
    r = t * torch.rand(64, generator=g, dtype=torch.float64) * 0.9

    def guided(zz, tau):
        v_null = velocity(zz, tau, means[K].expand_as(zz), SIGMA)
        return v_null + w * (velocity(zz, tau, means[y], SIGMA) - v_null)

    X = rk4_flow_map(guided, z, t, r, steps=400)
    mu_g = guided_means(means, w)[y]
    assert torch.allclose(X, flow_map(z, t, r, mu_g, SIGMA), rtol=0, atol=1e-10)
    assert torch.allclose((z - X) / per_sample(t - r, z), average_velocity(z, t, r, mu_g, SIGMA), rtol=0, atol=1e-9)
    assert torch.allclose(average_velocity(z, t, t, mu_g, SIGMA), guided(z, t), rtol=0, atol=1e-12)


def test_perturbed_oracle_has_strictly_larger_loss_and_the_exact_one_is_stationary():
    means = means_table()
    x, y = gaussian_batch(means, SIGMA, 4096)
    losses, grads = {}, {}
    for name, err, p in [("exact", 0.0, 0.0), ("worse", 0.1, 0.0), ("exact_w", 0.0, 1.0), ("worse_w", 0.1, 1.0)]:
        obj = meanflow(means, err, omega=1.0, kappa=0.0, label_dropout=0.0, norm_p=p)
        out = obj(x, y, gen(3))                                     # paired noise and times
        out.loss.backward()
        losses[name], grads[name] = float(out.loss.detach()), float(obj.backbone.bias.grad)
    assert losses["worse"] > losses["exact"] and losses["worse_w"] > losses["exact_w"]
    # E Σ(res + δ)² − E Σ res² = Dδ² = 0.16, up to 2δ·mean(Σ res) (sd ≈ 2δ·2.8/√4096 ≈ 0.009)
    assert abs(losses["worse"] - losses["exact"] - D * 0.1 ** 2) < 0.05
    # d loss / d bias = 2·mean(Σ res): ≈ 0 (sd ≈ 0.09) for the exact oracle, 2Dδ = 3.2 for the perturbed one
    assert abs(grads["exact"]) < 0.5 and abs(grads["worse"] - 2 * D * 0.1) < 0.5
    assert abs(grads["exact_w"]) < 0.2 * abs(grads["worse_w"])


def test_adaptive_weight_is_a_stop_gradient_normaliser_and_logs_match():
    means = means_table()
    obj = meanflow(means, 0.05, label_dropout=0.1)
    x, y = gaussian_batch(means, SIGMA, 512)
    tm = obj.terms(x, y, gen(4))
    out = obj(x, y, gen(4))
    L = ((tm.u - tm.u_tgt) ** 2).flatten(1).sum(1).detach()
    assert torch.allclose(out.per_sample, L / (L + 0.01), rtol=1e-12, atol=0)
    assert torch.allclose(out.loss, out.per_sample.mean())
    assert torch.allclose(out.logs["loss_u"], (L / D).mean())
    assert torch.allclose(out.logs["v_loss"], ((tm.u - tm.v) ** 2).flatten(1).sum(1).mean())
    assert torch.allclose(out.logs["weight"], (1 / (L + 0.01)).mean())
    assert float(out.logs["frac_r_neq_t"]) == 128 / 512 and float(out.logs["nonfinite"]) == 0
    out.loss.backward()   # d loss / d bias = mean(2 Σ res / (L + c)): the weight carries no gradient
    res_sum = (tm.u - tm.u_tgt).flatten(1).sum(1).detach()
    assert math.isclose(float(obj.backbone.bias.grad), float((2 * res_sum / (L + 0.01)).mean()), rel_tol=1e-9)


def test_nonfinite_losses_are_counted_not_hidden():
    means = means_table()
    obj = meanflow(means, omega=1.0, kappa=0.0, label_dropout=0.0)
    x, y = gaussian_batch(means, SIGMA, 8)
    x[2, 0, 0, 0] = float("nan")
    out = obj(x, y, gen(0))
    assert float(out.logs["nonfinite"]) == 1 and not torch.isfinite(out.loss)


def tiny_dit(gap: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    spec = DataSpec(name="x", channels=1, resolution=8, num_classes=3, num_items=1)
    cfg = DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=4, gap_embedder=gap)
    return cfg.build(spec)


def test_jvp_tangent_matches_central_differences_of_a_real_dit():
    net = tiny_dit().double()
    with torch.no_grad():   # leave adaLN-Zero's zero init so every input matters
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    obj = MeanFlow(net, MeanFlowConfig(), num_classes=3)
    x = torch.randn((8, 1, 8, 8), generator=gen(5), dtype=torch.float64)
    y = torch.arange(8) % 3
    tm = obj.terms(x, y, gen(5))
    assert bool((tm.r < tm.t).any())

    def fd(dr: float, h: float = 1e-5) -> torch.Tensor:
        with torch.no_grad():
            f = lambda e: net(tm.z_t + e * tm.v_tilde, tm.t + e, tm.r + e * dr, y=tm.y)   # noqa: E731
            return (f(h) - f(-h)) / (2 * h)

    scale = float(tm.dudt.abs().max())
    assert torch.allclose(tm.dudt, fd(0.0), rtol=0, atol=1e-8 * scale)
    assert not torch.allclose(tm.dudt, fd(1.0), rtol=0, atol=1e-3 * scale)    # the (v, 1, 1) tangent differs
    assert torch.allclose(tm.u_tgt, tm.v_tilde - per_sample(tm.t - tm.r, x) * tm.dudt, rtol=0, atol=1e-12)


def _logit_normal_order_stat_means(mean: float, std: float) -> tuple[float, float, float, float]:
    """E and E² of max and min of two iid σ(N(mean, std²)), by quadrature on the standard normal."""
    z = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    phi = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)
    cdf = torch.special.ndtr(z)
    s = torch.sigmoid(mean + std * z)
    hi, lo = 2 * phi * cdf, 2 * phi * (1 - cdf)
    q = lambda f: float(torch.trapezoid(f, z))   # noqa: E731
    return q(s * hi), q(s * s * hi), q(s * lo), q(s * s * lo)


def test_time_sampler_fraction_order_and_marginals():
    obj = meanflow(means_table())
    for n in (1, 2, 7, 10, 256):
        t, r = obj.sample_times(n, gen(n), torch.device("cpu"))
        assert int((r == t).sum()) == math.floor(0.75 * n + 0.5) and bool((r <= t).all())
    n = 100_000
    t, r = obj.sample_times(n, gen(6), torch.device("cpu"), torch.float64)
    eq = r == t
    assert int(eq.sum()) == 75_000 and bool(eq[:75_000].all()) and bool((r[~eq] < t[~eq]).all())
    m_hi, m2_hi, m_lo, m2_lo = _logit_normal_order_stat_means(-0.4, 1.0)
    tol = 6 * 0.25 / math.sqrt(25_000)
    for sample_, m, m2 in [(t[~eq], m_hi, m2_hi), (r[~eq], m_lo, m2_lo), (t[eq], m_hi, m2_hi)]:
        assert abs(float(sample_.mean()) - m) < tol and abs(float((sample_ ** 2).mean()) - m2) < tol


def test_one_step_sample_of_the_oracle_is_the_data_distribution():
    means = means_table()
    obj = meanflow(means, omega=1.0, kappa=0.0)
    one = sample(obj, list(range(6000)), nfe=1, batch_size=2000)
    res = (one.images.double() - means[one.labels]).flatten(1)           # should be N(0, σ²I)
    n = res.shape[0]
    assert float(res.mean(0).abs().max()) < 6 * SIGMA / math.sqrt(n)
    cov = res.T @ res / n
    assert float((cov.diagonal() - SIGMA ** 2).abs().max()) < 6 * SIGMA ** 2 * math.sqrt(2 / n)
    assert float((cov - torch.diag(cov.diagonal())).abs().max()) < 6 * SIGMA ** 2 / math.sqrt(n)
    two = sample(obj, list(range(256)), nfe=2)                           # the exact map composes
    assert torch.allclose(two.images, one.images[:256], rtol=0, atol=1e-5)
    assert one.evaluations == 1 and two.evaluations == 2


def test_label_dropout_null_labels_and_guided_targets():
    means = means_table()
    obj = meanflow(guided_means(means, 2.0), omega=1.5, kappa=0.3, label_dropout=0.1,
                   guidance_t_min=0.3, guidance_t_max=0.8)
    x, y = gaussian_batch(means, SIGMA, 100_000)
    obj.train()
    tm = obj.terms(x, y, gen(8))
    assert obj.backbone.modes == [False, True] and obj.backbone.training   # guidance pass in eval mode, restored
    assert abs(float(tm.dropped.double().mean()) - 0.1) < 0.005
    assert obj.backbone.calls[-1] is tm.y                                # the JVP pass sees the dropped labels
    assert bool((tm.y[tm.dropped] == K).all()) and torch.equal(tm.y[~tm.dropped], y[~tm.dropped])
    on = ~tm.dropped & (tm.t >= 0.3) & (tm.t <= 0.8)
    assert torch.equal(tm.v_tilde[~on], tm.v[~on])                       # dropped or outside the interval
    net = obj.backbone
    u_c, u_null = net(tm.z_t, tm.t, tm.t, y=y), net(tm.z_t, tm.t, tm.t, y=torch.full_like(y, K))
    expected = 1.5 * tm.v + 0.3 * u_c + (1 - 1.5 - 0.3) * u_null
    assert torch.allclose(tm.v_tilde[on], expected[on], rtol=0, atol=1e-12)
    assert float((tm.v_tilde[on] - tm.v[on]).abs().mean()) > 0.1


def test_released_label_dropout_drops_the_first_samples_all_with_r_equal_t():
    """``label_dropout_samples='first'`` (the official JAX ``cond_drop``): the mask's count k, then the first k
    samples; the same draws as ``mask``, so the count matches and only which samples differ."""
    means = means_table()
    x, y = gaussian_batch(means, SIGMA, 4000)
    paper = meanflow(means, label_dropout=0.2).terms(x, y, gen(3))
    released = meanflow(means, label_dropout=0.2, label_dropout_samples="first").terms(x, y, gen(3))
    k = int(paper.dropped.sum())
    assert 600 < k < 1000 and int(released.dropped.sum()) == k
    assert bool(released.dropped[:k].all()) and not bool(released.dropped[k:].any())
    assert bool((released.t[:k] == released.r[:k]).all())          # all in the r = t (flow-matching) branch
    assert bool((paper.t[paper.dropped] != paper.r[paper.dropped]).any())   # the mask reaches r < t samples
    assert bool((released.y[:k] == K).all()) and torch.equal(released.y[k:], y[k:])
    assert torch.equal(released.v_tilde[:k], released.v[:k])          # dropped samples get the unguided v
    assert torch.equal(released.t, paper.t) and torch.equal(released.z_t, paper.z_t)
    with pytest.raises(ValueError, match="label_dropout_samples"):
        MeanFlowConfig(label_dropout_samples="last")


@pytest.mark.parametrize("omega,kappa,flops", [(1.0, 0.5, 6.0), (1.0, 0.0, 4.0), (3.0, 0.0, 5.0)])
def test_tiny_dit_trains_and_samples(omega, kappa, flops):
    obj = MeanFlow(tiny_dit(), MeanFlowConfig(omega=omega, kappa=kappa), num_classes=3, ema_betas={"ema": 0.99})
    x = torch.randn((6, 1, 8, 8), generator=gen(9))
    out = obj(x, torch.tensor([0, 1, 2, 0, 1, 2]), gen(9))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.per_sample.shape == (6,)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in out.logs.values())
    for name, p in obj.backbone.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert all(p.grad is None for p in obj.ema.parameters())
    assert obj.flops_per_sample(1.0) == flops
    obj.after_step()
    for nfe in (1, 2):
        res = sample(obj, list(range(5)), nfe=nfe, weights="ema")
        assert res.images.shape == (5, 1, 8, 8) and bool(torch.isfinite(res.images).all())
    with pytest.raises(ValueError, match="guidance"):
        sample(obj, [0], nfe=1, guidance=2.0)
