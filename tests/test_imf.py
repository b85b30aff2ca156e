"""Improved MeanFlow against the shared Gaussian oracle (tests/oracle.py; docs/design/frontier.md §3.5).

The oracle backbone is the average velocity of the interval-guided field v_∅ + w_eff(τ)·(v_y − v_∅) (the
u-head, fed ω through 1 − 1/ω and [t_min, t_max]) and its v-head the instantaneous guided velocity at
w_eff(t). Then, pointwise and to float64 precision: V = u + (t − s)·du/dt = v^{w_eff(t)} (the MeanFlow
identity along the own-velocity tangent), and for a kept label V − v_g = v_y(x_t) − (ε − x): the target's
noise and nothing else, whose conditional mean is 0, so the oracle is the fixed point, with the
flow-matching floor σ²/S_t² per dimension as its loss.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fewstep.backbones.dit import DiTConfig
from fewstep.build import resolve
from fewstep.config import RunConfig
from fewstep.contracts import DataSpec
from fewstep.objectives.common import per_sample
from fewstep.objectives.imf import IMF, IMFConfig, omega_condition
from fewstep.sample import sample

from oracle import AverageVelocityOracle, fm_floor, guided_mean, interval_flow_map, velocity


def imf(problem, error: float = 0.0, aux_error: float = 0.0, **cfg) -> IMF:
    net = AverageVelocityOracle(problem.means, problem.sigma, error, conditions=True, aux_error=aux_error)
    return IMF(net, IMFConfig(**cfg), num_classes=problem.num_classes).double()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def guided_velocity(problem, tm, y) -> torch.Tensor:
    """v^{w_eff(t)}(x_t) for labels y (null rows give v_∅)."""
    mu_y, mu_null = problem.means[y], problem.means[-1].expand_as(tm.x_t)
    return velocity(tm.x_t, tm.t, guided_mean(mu_y, mu_null, tm.omega_eff), problem.sigma)


@pytest.mark.parametrize("v_source", ["aux_head", "boundary"])
def test_V_is_the_guided_velocity_and_the_residual_is_the_target_noise(gaussian, v_source):
    obj = imf(gaussian, v_source=v_source)
    x, y = gaussian.batch(4096)
    tm = obj.terms(x, y, gen(0))
    y_net = torch.where(tm.dropped, gaussian.num_classes, y)
    v_star = guided_velocity(gaussian, tm, y_net)
    V = tm.V.detach()
    assert float((V - v_star).abs().max()) < 1e-10                         # MeanFlow identity along v̂
    kept = ~tm.dropped
    noise = velocity(tm.x_t, tm.t, gaussian.means[y], gaussian.sigma) - tm.v   # v_y(x_t) − (ε − x)
    assert float((V - tm.v_g - noise)[kept].abs().max()) < 1e-10
    assert torch.equal(tm.v_g[tm.dropped], tm.v[tm.dropped])                 # dropped: unguided target
    if v_source == "aux_head":
        assert float((tm.v_aux.detach() - tm.v_g - noise)[kept].abs().max()) < 1e-10
    else:
        assert tm.v_aux is None
    # the guidance is really on: ω up to 8 and the target moved away from ε − x where it applies
    on = kept & (tm.omega_eff > 1.5)
    assert bool(on.any()) and float((tm.v_g - tm.v)[on].abs().mean()) > 0.1
    assert tm.u.requires_grad and not tm.dudt.requires_grad and not tm.v_g.requires_grad


def test_loss_at_the_oracle_is_the_flow_matching_floor_and_perturbations_raise_it(gaussian):
    x, y = gaussian.batch(8192)
    cfg = dict(label_dropout=0.0, norm_p=0.0)               # plain sums: expectations are closed-form
    tm = imf(gaussian, **cfg).terms(x, y, gen(1))
    floor = gaussian.dims * fm_floor(tm.t, gaussian.sigma)
    L_u = ((tm.V - tm.v_g) ** 2).flatten(1).sum(1)
    tol = 6 * float(floor.mean()) * math.sqrt(2 / gaussian.dims) / math.sqrt(8192)
    assert abs(float((L_u - floor).mean())) < tol
    exact = imf(gaussian, **cfg)(x, y, gen(1))
    worse_u = imf(gaussian, error=0.05, **cfg)(x, y, gen(1))
    worse_v = imf(gaussian, aux_error=0.05, **cfg)(x, y, gen(1))
    assert float(exact.loss) == pytest.approx(2 * float(L_u.mean()), rel=1e-12)   # L_u + L_v, equal at the oracle
    # a constant error δ on u (or on v) adds D·δ² to that term in expectation
    for worse, key in ((worse_u, "loss_u"), (worse_v, "loss_v")):
        assert float(worse.loss) > float(exact.loss)
        assert abs(float(worse.logs[key] - exact.logs[key]) - 0.05 ** 2) < 5e-4
    assert torch.allclose(worse_u.logs["loss_v"], exact.logs["loss_v"])      # u's error leaves the v-term alone


def test_adaptive_weights_and_logs(gaussian):
    obj = imf(gaussian, error=0.03)
    x, y = gaussian.batch(512)
    tm, out = obj.terms(x, y, gen(2)), obj(x, y, gen(2))
    L_u = ((tm.V - tm.v_g) ** 2).flatten(1).sum(1).detach()
    L_v = ((tm.v_aux - tm.v_g) ** 2).flatten(1).sum(1).detach()
    assert torch.allclose(out.per_sample, L_u / (L_u + 0.01) + L_v / (L_v + 0.01), rtol=1e-12, atol=0)
    assert torch.allclose(out.logs["loss_u"], (L_u / gaussian.dims).mean()) and float(out.logs["frac_r_neq_t"]) == 0.5
    out.loss.backward()   # the weights carry no gradient: d/d bias = mean(2Σres_u/(L_u + c) + 2Σres_v/(L_v + c))
    expected = (2 * (tm.V - tm.v_g).flatten(1).sum(1) / (L_u + 0.01) + 2 * (tm.v_aux - tm.v_g).flatten(1).sum(1) / (L_v + 0.01)).mean()
    # V = u + (t − s)·sg(du/dt): the bias enters V and v once each (its du/dt is 0)
    assert math.isclose(float(obj.backbone.bias.grad), float(expected.detach()), rel_tol=1e-9)


def test_batch_layout_times_guidance_and_which_omega_goes_where(gaussian):
    obj = imf(gaussian)
    x, y = gaussian.batch(20_000)
    obj.backbone.seen.clear()
    tm = obj.terms(x, y, gen(3))
    B = 20_000
    equal = tm.s == tm.t
    assert bool(equal[:B // 2].all()) and not bool(equal[B // 2:].any())      # first-k: s = t on the first half
    k = int(tm.dropped.sum())
    assert bool(tm.dropped[:k].all()) and abs(k / B - 0.1) < 0.01             # first-k label dropout
    assert bool((tm.t_min[equal] == 0).all() and (tm.t_max[equal] == 1).all())
    lo, hi = tm.t_min[~equal], tm.t_max[~equal]
    assert 0 <= float(lo.min()) and float(lo.max()) <= 0.5 and 0.5 <= float(hi.min()) and float(hi.max()) <= 1
    assert abs(float(lo.mean()) - 0.25) < 0.01 and abs(float(hi.mean()) - 0.75) < 0.01
    assert abs(float(torch.log(tm.omega).mean()) - math.log(8) / 2) < 0.02        # ω = 8^U: log-uniform
    assert 1 <= float(tm.omega.min()) and float(tm.omega.max()) <= 8
    inside = (tm.t >= tm.t_min) & (tm.t <= tm.t_max)
    assert torch.equal(tm.omega_eff, torch.where(inside, tm.omega, torch.ones_like(tm.omega)))
    # call 1: no-grad v-head at h = 0 on [x_t; x_t] with (ω_eff, [0, 1], y) and (ω = 1, [0, 1], ∅)
    # call 2: the JVP's primal, the u-head with its v-head, raw ω and the sampled interval
    first, second = obj.backbone.seen
    assert first["head"] == "aux" and torch.equal(first["s"], first["t"])
    assert torch.equal(first["omega"], omega_condition(torch.cat([tm.omega_eff, torch.ones_like(tm.omega)])))
    assert bool((first["t_min"] == 0).all() and (first["t_max"] == 1).all())
    assert torch.equal(obj.backbone.calls[0][B:], torch.full((B,), gaussian.num_classes))
    assert second["head"] == "both" and torch.equal(second["omega"], omega_condition(tm.omega))
    assert torch.equal(second["t_min"], tm.t_min) and torch.equal(second["s"], tm.s)
    assert obj.backbone.modes[0] is False and obj.backbone.training          # guidance pass in eval mode
    assert obj.backbone.grad == [False, True]                                # … and without autograd


def tiny_dit(seed: int = 0, aux: bool = True):
    torch.manual_seed(seed)
    spec = DataSpec(name="x", channels=1, resolution=8, num_classes=3, num_items=1)
    cfg = resolve(RunConfig(recipe="t", objective=IMFConfig(v_source="aux_head" if aux else "boundary"),
                            backbone=DiTConfig(name="dit-debug", depth=2, hidden_size=32, num_heads=2, patch_size=4))).backbone
    assert (cfg.time_mode, cfg.conditions, cfg.aux_head, cfg.gap_embedder) == ("h", ("omega", "t_min", "t_max"), aux, True)
    net = cfg.build(spec).double()
    with torch.no_grad():    # leave adaLN-Zero's zero init so every input matters
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    return net


def test_jvp_tangent_matches_central_differences_of_a_real_dit():
    net = tiny_dit()
    assert net.t_embedder is None                       # no absolute time: iMF's network sees h = t − s only
    obj = IMF(net, IMFConfig(), num_classes=3)
    x = torch.randn((8, 1, 8, 8), generator=gen(5), dtype=torch.float64)
    tm = obj.terms(x, torch.arange(8) % 3, gen(5))
    assert bool((tm.s < tm.t).any())
    y_net = torch.where(tm.dropped, 3, torch.arange(8) % 3)
    cond = {"omega": omega_condition(tm.omega), "t_min": tm.t_min, "t_max": tm.t_max}

    def fd(ds: float, h: float = 1e-5) -> torch.Tensor:
        with torch.no_grad():
            f = lambda e: net(tm.x_t + e * tm.v_hat, tm.t + e, tm.s + e * ds, y=y_net, **cond)   # noqa: E731
            return (f(h) - f(-h)) / (2 * h)

    scale = float(tm.dudt.abs().max())
    assert scale > 1e-3 and not tm.dudt.requires_grad                    # stop-gradient: du/dt is a constant
    assert torch.allclose(tm.dudt, fd(0.0), rtol=0, atol=1e-8 * scale)
    assert not torch.allclose(tm.dudt, fd(1.0), rtol=0, atol=1e-3 * scale)      # the (v̂, 1, 1) tangent differs
    with torch.no_grad():                                                        # v̂ is the v-head at h = 0
        v_hat = net(tm.x_t, tm.t, tm.t, y=y_net, head="aux", omega=omega_condition(tm.omega_eff),
                    t_min=torch.zeros_like(tm.t), t_max=torch.ones_like(tm.t))
    assert torch.allclose(tm.v_hat, v_hat, rtol=0, atol=1e-12)
    assert torch.allclose(tm.V, tm.u + per_sample(tm.t - tm.s, x) * tm.dudt, rtol=0, atol=1e-12)


def test_boundary_variant_has_no_aux_head_and_uses_u_at_s_equals_t():
    net = tiny_dit(aux=False)
    assert net.aux_final_layer is None
    obj = IMF(net, IMFConfig(v_source="boundary"), num_classes=3)
    x = torch.randn((6, 1, 8, 8), generator=gen(6), dtype=torch.float64)
    tm = obj.terms(x, torch.arange(6) % 3, gen(6))
    y_net = torch.where(tm.dropped, 3, torch.arange(6) % 3)
    with torch.no_grad():
        u_tt = net(tm.x_t, tm.t, tm.t, y=y_net, omega=omega_condition(tm.omega_eff), t_min=torch.zeros_like(tm.t),
                   t_max=torch.ones_like(tm.t))
    assert torch.allclose(tm.v_hat, u_tt, rtol=0, atol=1e-12) and "loss_v" not in obj(x, torch.arange(6) % 3, gen(6)).logs


def test_sampler_feeds_omega_and_the_interval_and_follows_the_guided_map(gaussian):
    obj = imf(gaussian, guidance=3.0, guidance_t_min=0.3, guidance_t_max=0.7)
    one = sample(obj, list(range(512)), nfe=1)
    eps = torch.stack([torch.randn((1, 4, 4), generator=gen(i)) for i in range(512)]).double()
    mu_y, mu_null = gaussian.means[one.labels], gaussian.means[-1].expand_as(eps)
    ones = torch.ones(512, dtype=torch.float64)
    expected = interval_flow_map(eps, ones, 0 * ones, mu_y, mu_null, gaussian.sigma, 3 * ones, 0.3 * ones, 0.7 * ones)
    assert torch.allclose(one.images.double(), expected, rtol=0, atol=1e-5) and one.evaluations == 1
    two = sample(obj, list(range(512)), nfe=2)                   # the exact map composes
    assert torch.allclose(two.images, one.images, rtol=0, atol=1e-5)
    again = sample(obj, list(range(3, 7)), nfe=2)                 # image i depends on seed i only
    assert torch.equal(again.images, two.images[3:7])
    other = sample(obj, list(range(512)), nfe=1, guidance=1.0)   # ω = 1: the class Gaussian itself
    res = (other.images.double() - gaussian.means[other.labels]).flatten()
    assert abs(float(res.std()) - gaussian.sigma) < 0.02
    with pytest.raises(ValueError, match="ω must be ≥ 1"):
        sample(obj, [0], nfe=1, guidance=0.5)


def test_config_checks_name_the_field():
    for bad, message in [({"omega_max": 0.5}, "omega_max must be ≥ 1"), ({"v_source": "x"}, "v_source"),
                         ({"guidance_t_min": 0.8, "guidance_t_max": 0.2}, "guidance_t_min ≤ guidance_t_max"),
                         ({"interval_min_range": (0.6, 0.2)}, "interval ranges")]:
        with pytest.raises(ValueError, match=message):
            IMFConfig(**bad)
    assert dataclasses.replace(IMF.needs_for(IMFConfig(v_source="boundary")), aux_head=True) == IMF.needs
