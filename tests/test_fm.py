"""Flow matching against closed forms on Gaussian data."""
from __future__ import annotations

import torch

from fewstep.contracts import Condition
from fewstep.objectives.fm import FlowMatching, FlowMatchingConfig
from fewstep.sample import sample

from oracle import VelocityOracle, class_means, gaussian_batch

SIGMA = 0.5


def fm(error: float = 0.0, **cfg) -> FlowMatching:
    means = class_means(3)
    config = FlowMatchingConfig(label_dropout=0.0, **cfg)
    return FlowMatching(VelocityOracle(means, SIGMA, error), config, num_classes=3).double()


def test_oracle_reaches_the_closed_form_minimum():
    obj = fm()
    x, y = gaussian_batch(obj.backbone.means, SIGMA, 8192)
    out = obj(x, y, torch.Generator().manual_seed(0))
    t = obj.backbone.seen_t[-1].double()
    floor = SIGMA ** 2 / ((1 - t) ** 2 * SIGMA ** 2 + t ** 2)   # per-dimension Var(ε − x | x_t)
    gap = out.per_sample - floor
    # per-sample loss = mean of D=16 squared N(0, floor) → sd of the gap mean ≈ floor·√(2/16)/√B
    tol = 6 * float((floor * (2 / 16) ** 0.5).mean()) / 8192 ** 0.5
    assert abs(float(gap.mean())) < tol
    assert torch.allclose(out.loss, out.per_sample.mean())


def test_perturbed_oracle_has_strictly_larger_loss():
    x, y = gaussian_batch(class_means(3), SIGMA, 4096)
    exact = fm()(x, y, torch.Generator().manual_seed(0)).loss
    worse = fm(error=0.05)(x, y, torch.Generator().manual_seed(0)).loss
    assert worse > exact
    assert abs(float(worse - exact) - 0.05 ** 2) < 2e-3   # E[(r + δ)²] − E[r²] = δ² (paired noise)


def test_times_are_logit_normal():
    obj = fm(t_mean=-0.4, t_std=1.0)
    x, y = gaussian_batch(obj.backbone.means, SIGMA, 200_000)
    obj(x, y, torch.Generator().manual_seed(3))
    logit = torch.logit(obj.backbone.seen_t[-1].double())
    assert abs(float(logit.mean()) + 0.4) < 0.01 and abs(float(logit.std()) - 1.0) < 0.01


def test_label_dropout_rate_and_null_label():
    seen = []

    class Spy(VelocityOracle):
        def forward(self, x, t, s=None, y=None, **cond):
            seen.append(y)
            return super().forward(x, t, s, y, **cond)

    obj = FlowMatching(Spy(class_means(3), SIGMA), FlowMatchingConfig(label_dropout=0.1), num_classes=3).double()
    x, y = gaussian_batch(obj.backbone.means, SIGMA, 100_000)
    obj(x, y, torch.Generator().manual_seed(0))
    dropped = (seen[-1] == 3).double().mean()
    assert abs(float(dropped) - 0.1) < 0.005
    assert torch.equal(seen[-1][seen[-1] != 3], y[seen[-1] != 3])


def test_one_step_sample_is_the_class_mean_and_many_steps_match_the_data():
    obj = fm()
    means = obj.backbone.means
    one = sample(obj, list(range(256)), nfe=1)
    assert torch.allclose(one.images.double(), means[one.labels], atol=1e-5)   # FM's 1-step blur: exactly μ_y
    many = sample(obj, list(range(4000)), nfe=200, batch_size=1000)
    resid = many.images.double() - means[many.labels]
    assert abs(float(resid.mean())) < 0.01
    assert abs(float(resid.std()) - SIGMA) < 0.01


def test_cfg_uses_two_evaluations_and_extrapolates():
    obj = fm(guidance=2.0)
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    y = torch.arange(8) % 3
    t, s = torch.full((8,), 0.7, dtype=torch.float64), torch.full((8,), 0.2, dtype=torch.float64)
    cond = Condition(y=y)
    assert obj.evaluations_per_step(cond) == 2
    net = obj.backbone
    v_c, v_u = net(x, t, y=y), net(x, t, y=torch.full_like(y, 3))
    expected = x + (s - t).view(-1, 1, 1, 1) * (v_u + 2.0 * (v_c - v_u))
    assert torch.allclose(obj.step(x, t, s, cond), expected)
    assert obj.evaluations_per_step(Condition(y=y, guidance=torch.ones(8))) == 1
