"""α-Flow against the shared Gaussian oracle (tests/oracle.py; docs/design/frontier.md §4.7).

With the oracle u* (the exact average velocity) as the network: at α = 0 the target is MeanFlow's, and
u* − u_tgt = −√(S_s²/S_t²)·(ṽ − v*) pointwise (the identity holds along v*; only the tangent's noise
ṽ − v* enters, through ∂_z u*); at α = 1 the target is ṽ itself (its mean is v*, not u*: trajectory flow
matching is biased); in between, with the marginal shift ṽ = v*, the target misses u* by O(α²), and with
the exact shift ṽ = u*(x_t, t, τ) it is u* for every α (the semigroup property of the flow map).
"""
from __future__ import annotations

import math

import pytest
import torch

from fewstep.backbones.dit import DiTConfig
from fewstep.contracts import DataSpec
from fewstep.objectives.alphaflow import AlphaFlow, AlphaFlowConfig, alpha_schedule
from fewstep.objectives.common import mean_flat, per_sample
from fewstep.sample import sample

from oracle import AverageVelocityOracle, average_velocity, d, flow_map, guided_means, velocity


def alphaflow(problem, means=None, error: float = 0.0, **cfg) -> AlphaFlow:
    cfg = {"kappa": 0.0, "label_dropout": 0.0, **cfg}
    net = AverageVelocityOracle(problem.means if means is None else means, problem.sigma, error)
    return AlphaFlow(net, AlphaFlowConfig(**cfg), num_classes=problem.num_classes).double()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def point(problem, n: int, seed: int):
    """(x_t, t, s, y, μ_y) with s < t, float64."""
    x, y = problem.batch(n, seed)
    g = gen(seed + 1)
    t = 0.1 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    s = t * torch.rand(n, generator=g, dtype=torch.float64) * 0.95
    x_t = (1 - per_sample(t, x)) * x + per_sample(t, x) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x_t, t, s, y, problem.means[y]


def test_schedule_is_a_snapped_sigmoid_in_images():
    assert alpha_schedule(0.0, 100.0, 300.0) == 1.0 and alpha_schedule(299.999, 100.0, 300.0) == 0.0
    assert alpha_schedule(300.0, 100.0, 300.0) == 0.0 and alpha_schedule(200.0, 100.0, 300.0) == 0.5
    assert alpha_schedule(150.0, 100.0, 300.0) == 1.0                       # 0.998 snaps to 1
    mid = alpha_schedule(190.0, 100.0, 300.0)
    assert mid == pytest.approx(1 - 1 / (1 + math.exp(25 * 0.05)), rel=1e-12)
    grid = torch.linspace(0, 1, 100_001).tolist()
    values = [alpha_schedule(p, 0.0, 1.0) for p in grid]
    strictly_inside = sum(0 < a < 1 for a in values) / len(values)
    assert strictly_inside == pytest.approx(2 * math.log(199) / 25, abs=1e-3)      # ≈ 42 % of the span
    assert all(a in (0.0, 1.0) or 0.005 <= a <= 0.995 for a in values)                 # snapped
    assert all(b <= a for a, b in zip(values, values[1:]))                             # monotone 1 → 0
    obj = alphaflow_tiny(alpha_start_kimg=1.0, alpha_end_kimg=3.0)
    assert [obj.alpha(n) for n in (0, 2000, 10_000)] == [1.0, 0.5, 0.0]
    assert alphaflow_tiny(alpha_start_kimg=0.0, alpha_end_kimg=0.0).alpha(0) == 0.0   # α ≡ 0: MeanFlow


def test_alpha_zero_is_meanflow_through_the_jvp(gaussian):
    obj = alphaflow(gaussian, alpha_constant=0.0)
    x_t, t, s, y, mu = point(gaussian, 2048, 0)
    v_tilde = velocity(x_t, t, mu, gaussian.sigma) + 0.3 * torch.randn(x_t.shape, generator=gen(9), dtype=torch.float64)
    u, u_tgt = obj.target(x_t, t, s, v_tilde, y, 0.0)
    k = torch.sqrt(d(s, gaussian.sigma) / d(t, gaussian.sigma))
    expected = -per_sample(k, u) * (v_tilde - velocity(x_t, t, mu, gaussian.sigma))
    assert float((u.detach() - u_tgt - expected).abs().max()) < 1e-10
    assert len(obj.backbone.calls) == 1 and u.requires_grad and not u_tgt.requires_grad   # one JVP, no extra pass


def test_alpha_one_regresses_on_the_shift_velocity_without_a_second_pass(gaussian):
    obj = alphaflow(gaussian, alpha_constant=1.0)
    x_t, t, s, y, mu = point(gaussian, 256, 1)
    v_tilde = torch.randn(x_t.shape, generator=gen(2), dtype=torch.float64)
    u, u_tgt = obj.target(x_t, t, s, v_tilde, y, 1.0)
    assert torch.equal(u_tgt, v_tilde) and len(obj.backbone.calls) == 1
    assert torch.allclose(u.detach(), average_velocity(x_t, t, s, mu, gaussian.sigma), atol=1e-12)


def test_intermediate_alpha_misses_u_star_by_order_alpha_squared(gaussian):
    obj = alphaflow(gaussian)
    x_t, t, s, y, mu = point(gaussian, 512, 2)
    v_star, u_star = velocity(x_t, t, mu, gaussian.sigma), average_velocity(x_t, t, s, mu, gaussian.sigma)
    errors = []
    for alpha in (0.1, 0.05, 0.025):
        _, u_tgt = obj.target(x_t, t, s, v_star, y, alpha)
        errors.append(float((u_tgt - u_star).norm()))
    slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(slope - 2) < 0.1 for slope in slopes), slopes
    for alpha in (0.25, 0.5, 0.9):   # the exact shift velocity u*(x_t, t, τ): u_tgt = u* for every α
        tau = t - alpha * (t - s)
        _, u_tgt = obj.target(x_t, t, s, average_velocity(x_t, t, tau, mu, gaussian.sigma), y, alpha)
        assert float((u_tgt - u_star).abs().max()) < 1e-10


def test_batch_layout_weights_and_logs(gaussian):
    obj = alphaflow(gaussian, alpha_constant=0.4, error=0.02, fm_fraction=0.25)
    x, y = gaussian.batch(400)
    tm, out = obj.terms(x, y, gen(3)), obj(x, y, gen(3))
    assert bool((tm.s[:100] == tm.t[:100]).all()) and bool((tm.s[100:] < tm.t[100:]).all())
    L = mean_flat((tm.u - tm.u_tgt) ** 2).detach()
    weight = torch.where(tm.s < tm.t, torch.full_like(L, 0.4), torch.ones_like(L)) / (L + 1e-3)
    assert torch.allclose(out.per_sample, weight * L, rtol=1e-12, atol=0)
    assert torch.equal(tm.u_tgt[:100], tm.v_tilde[:100])                    # s = t: plain flow matching
    assert float(out.logs["alpha"]) == pytest.approx(0.4) and torch.allclose(out.logs["loss_u"], L.mean())
    assert obj.backbone.grad[-2:] == [True, False]                         # u with graph, u⁻(sub-jump) without
    out.loss.backward()             # the weights carry no gradient: d/d bias = mean(w·2·mean_CHW(u − u_tgt))
    expected = (weight * 2 * mean_flat(tm.u - tm.u_tgt)).mean()
    assert math.isclose(float(obj.backbone.bias.grad), float(expected.detach()), rel_tol=1e-9)
    jump = tm.s < tm.t
    assert torch.allclose(out.logs["loss_tfm"], mean_flat((tm.u - tm.v_tilde) ** 2)[jump].mean())
    assert torch.allclose(out.logs["loss_tc"], mean_flat(2 * (tm.v_tilde - tm.u_tgt) * tm.u)[jump].mean())
    again = obj.terms(x, y, gen(3))
    assert torch.equal(again.u_tgt, tm.u_tgt)                               # deterministic given the generator
    clipped = alphaflow(gaussian, alpha_constant=0.4, clamp_utgt=0.5).terms(x, y, gen(3))
    assert float(clipped.u_tgt.abs().max()) == 0.5


@pytest.mark.parametrize("omega,kappa", [(2.0, 0.0), (1.0, 0.5), (0.2, 0.9)])    # all ω/(1 − κ) = 2
def test_cfg_oracle_at_the_effective_scale_is_the_fixed_point(gaussian, omega, kappa):
    scale = omega / (1 - kappa)
    obj = alphaflow(gaussian, means=guided_means(gaussian.means, scale), omega=omega, kappa=kappa,
                    label_dropout=0.1, guidance_t_min=0.2, guidance_t_max=0.9, alpha_constant=0.0)
    x, y = gaussian.batch(20_000, seed=4)
    tm = obj.terms(x, y, gen(4))
    inside = (tm.t > 0.2) & (tm.t < 0.9)
    assert not bool(tm.dropped[~inside].any())                               # dropout only inside the interval
    assert abs(float(tm.dropped[inside].double().mean()) - 0.1) < 0.01
    kept_in = inside & ~tm.dropped
    v_y = velocity(tm.x_t, tm.t, gaussian.means[y], gaussian.sigma)
    v_guided = velocity(tm.x_t, tm.t, guided_means(gaussian.means, scale)[y], gaussian.sigma)
    assert float((tm.v_tilde - v_guided - omega * (tm.v - v_y))[kept_in].abs().max()) < 1e-10
    assert torch.equal(tm.v_tilde[~inside], tm.v[~inside])                  # outside: ε − x, label kept
    u_null = velocity(tm.x_t, tm.t, gaussian.means[-1].expand_as(tm.x_t), gaussian.sigma)
    dropped_target = omega * tm.v + (1 - omega) * u_null                   # y = ∅ before the κ pass
    assert float((tm.v_tilde - dropped_target)[tm.dropped].abs().max()) < 1e-10


def test_samplers_follow_the_exact_map_and_consistency_renoises(gaussian):
    traj = alphaflow(gaussian)
    one = sample(traj, list(range(2000)), nfe=1)
    res = (one.images.double() - gaussian.means[one.labels]).flatten()
    assert abs(float(res.std()) - gaussian.sigma) < 0.02 and abs(float(res.mean())) < 0.01
    assert torch.allclose(sample(traj, list(range(256)), nfe=2).images, one.images[:256], atol=1e-5)
    cons = alphaflow(gaussian, sampler="consistency")
    assert torch.equal(sample(cons, list(range(64)), nfe=1).images, one.images[:64])   # one jump: the same
    two = sample(cons, list(range(64)), nfe=2)
    assert not torch.allclose(two.images, one.images[:64], atol=1e-3)        # re-noised at t = ½ with fresh noise
    assert torch.equal(sample(cons, list(range(10, 20)), nfe=2).images, two.images[10:20])   # per seed
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t, s = torch.full((4,), 0.8, dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64)
    noise = torch.randn_like(x)
    from fewstep.contracts import Condition

    y = torch.arange(4) % 3
    x0 = flow_map(x, t, 0 * t, gaussian.means[y], gaussian.sigma)
    assert torch.allclose(cons.step(x, t, s, Condition(y=y), noise=noise), 0.7 * x0 + 0.3 * noise, atol=1e-12)
    with pytest.raises(ValueError, match="guidance"):
        sample(traj, [0], nfe=1, guidance=2.0)


def alphaflow_tiny(**cfg) -> AlphaFlow:
    torch.manual_seed(0)
    spec = DataSpec(name="x", channels=1, resolution=8, num_classes=3, num_items=1)
    net = DiTConfig(name="dit-debug", depth=2, hidden_size=32, num_heads=2, patch_size=4, gap_embedder=True,
                    time_mode="t+s").build(spec).double()
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    return AlphaFlow(net, AlphaFlowConfig(**cfg), num_classes=3)


def test_jvp_target_matches_central_differences_of_a_real_dit():
    obj = alphaflow_tiny(alpha_constant=0.0)
    net = obj.backbone
    x = torch.randn((8, 1, 8, 8), generator=gen(5), dtype=torch.float64)
    y = torch.arange(8) % 3
    tm = obj.terms(x, y, gen(5))
    h = 1e-5

    def f(e, ds):
        with torch.no_grad():
            return net(tm.x_t + e * tm.v_tilde, tm.t + e, tm.s + e * ds, y=tm.y)

    fd = (f(h, 0.0) - f(-h, 0.0)) / (2 * h)
    expected = tm.v_tilde - per_sample(tm.t - tm.s, x) * fd
    scale = float(expected.abs().max())
    assert torch.allclose(tm.u_tgt, expected, rtol=0, atol=1e-8 * scale)
    wrong = tm.v_tilde - per_sample(tm.t - tm.s, x) * (f(h, 1.0) - f(-h, 1.0)) / (2 * h)   # tangent (ṽ, 1, 1)
    assert not torch.allclose(tm.u_tgt, wrong, rtol=0, atol=1e-4 * scale)
    mid = alphaflow_tiny(alpha_constant=0.5).terms(x, y, gen(5))                     # α = ½: one no-grad forward
    tau = mid.t - 0.5 * (mid.t - mid.s)
    with torch.no_grad():
        second = net(mid.x_t - per_sample(0.5 * (mid.t - mid.s), x) * mid.v_tilde, tau, mid.s, y=mid.y)
    expect_mid = torch.where(per_sample(mid.s == mid.t, x), mid.v_tilde, 0.5 * mid.v_tilde + 0.5 * second)
    assert torch.allclose(mid.u_tgt, expect_mid, rtol=0, atol=1e-12)


def test_the_trainer_gives_the_network_both_absolute_times():
    """time_mode "t+s": with the t-embedder silenced the output still moves when t and s shift together
    (it sees s, not only t − s as MeanFlow's network would)."""
    from fewstep.build import resolve
    from fewstep.config import RunConfig

    cfg = resolve(RunConfig(recipe="t", objective=AlphaFlowConfig(),
                            backbone=DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=4)))
    assert (cfg.backbone.time_mode, cfg.backbone.gap_embedder) == ("t+s", True)
    torch.manual_seed(0)
    net = cfg.backbone.build(DataSpec(name="x", channels=1, resolution=8, num_classes=3, num_items=1))
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
        net.t_embedder.mlp[2].weight.zero_()
        net.t_embedder.mlp[2].bias.zero_()
        x, t, s = torch.randn(2, 1, 8, 8), torch.tensor([0.9, 0.7]), torch.tensor([0.4, 0.2])
        assert not torch.allclose(net(x, t, s), net(x, t + 0.1, s + 0.1), atol=1e-4)
        assert torch.equal(net(x, t, s), net(x, t + 0.1, s))                  # and nothing but s
