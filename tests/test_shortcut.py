"""Shortcut models against the shared Gaussian oracle (tests/oracle.py; docs/design/frontier.md §6).

With the exact average velocity u* as network and teacher, two half jumps compose into the full one
(Φ_{t→s} = Φ_{t−d/2→s}∘Φ_{t→t−d/2}), so every self-consistency target equals u*(x_t, t, t − d) exactly;
the flow-matching samples keep the target noise v* − (ε − x) plus the small gap of the finest step.
Guided finest-level targets are u* of the guided Gaussian (u* is affine in μ).
"""
from __future__ import annotations

import pytest
import torch

from fewstep.contracts import Condition
from fewstep.objectives.common import per_sample
from fewstep.objectives.shortcut import Shortcut, ShortcutConfig
from fewstep.sample import sample

from oracle import AverageVelocityOracle, average_velocity, guided_means


def shortcut(problem, error: float = 0.0, **cfg) -> Shortcut:
    net = AverageVelocityOracle(problem.means, problem.sigma, error)
    return Shortcut(net, ShortcutConfig(**cfg), num_classes=problem.num_classes).double()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_levels_cycle_and_times_sit_on_each_levels_grid(gaussian):
    obj = shortcut(gaussian, levels=3, bootstrap_fraction=0.5)
    batch = obj.sample_times(20_000, gen(0), torch.device("cpu"))
    nb = batch.n_boot
    assert nb == 10_000 and torch.equal(batch.level[:nb], torch.arange(nb) % 3)
    assert bool((batch.level[nb:] == 3).all())                                  # flow matching at d = 1/8
    assert torch.equal(batch.d, 0.5 ** batch.level.float())
    j = batch.t / batch.d
    assert torch.allclose(j, j.round()) and bool((j >= 1).all()) and bool((j <= 1 / batch.d).all())
    for k in range(4):                                                          # j uniform on {1 … 2^k}
        on = batch.level == k
        assert set(j[on].round().long().tolist()) == set(range(1, 2 ** k + 1))
    tiny = shortcut(gaussian, levels=7).sample_times(16, gen(1), torch.device("cpu"))
    assert tiny.n_boot == 2 and tiny.level[:2].tolist() == [0, 1]          # never only d = 1 on small batches


def test_exact_oracle_makes_every_self_consistency_target_exact(gaussian):
    obj = shortcut(gaussian, levels=4, bootstrap_fraction=1.0, label_dropout=0.0)
    x, y = gaussian.batch(2048)
    out = obj(x, y, gen(2))
    assert float(out.logs["loss_bootstrap"]) < 1e-24 and float(out.per_sample.max()) < 1e-24
    fm_only = shortcut(gaussian, levels=4, bootstrap_fraction=0.0, label_dropout=0.0)(x, y, gen(2))
    assert 0.05 < float(fm_only.loss) < 2.0                                    # FM part keeps its noise
    with torch.no_grad():
        obj_bad = shortcut(gaussian, error=0.05, levels=4, bootstrap_fraction=1.0, label_dropout=0.0)
        obj_bad.teacher.error = 0.0                                            # exact teacher, biased student
    assert float(obj_bad(x, y, gen(2)).loss) == pytest.approx(0.05 ** 2, rel=1e-9)


def test_guidance_is_baked_into_the_finest_self_consistency_level_only(gaussian):
    w = 1.5
    obj = shortcut(gaussian, levels=3, bootstrap_fraction=1.0, label_dropout=0.5, guidance=w)
    x, y = gaussian.batch(3000)
    batch = obj.sample_times(3000, gen(3), torch.device("cpu"))
    t, d = batch.t.double(), batch.d.double()
    eps = torch.randn(x.shape, generator=gen(9), dtype=torch.float64)
    x_t = (1 - per_sample(t, x)) * x + per_sample(t, x) * eps
    guided = batch.level == 2
    target = obj.bootstrap_target(x_t, t, d, y, guided)
    exact = average_velocity(x_t, t, t - d, guided_means(gaussian.means, w)[y], gaussian.sigma)
    plain = average_velocity(x_t, t, t - d, gaussian.means[y], gaussian.sigma)
    assert float((target - exact)[guided].abs().max()) < 1e-12
    assert float((target - plain)[~guided].abs().max()) < 1e-12 and float((exact - plain)[guided].abs().max()) > 0.1
    out = obj(x, y, gen(3))                                                  # self-consistency samples keep labels
    assert obj.backbone.calls[-1] is not None and bool((obj.backbone.calls[-1] < 3).all())
    level = obj.sample_times(3000, gen(3), torch.device("cpu")).level       # the same draws as the forward
    finest = level == 2                # there the unguided student misses the guided target, elsewhere it is exact
    assert float(out.per_sample[~finest].max()) < 1e-20 and float(out.per_sample[finest].min()) > 1e-6


def test_label_dropout_hits_flow_matching_samples_only(gaussian):
    obj = shortcut(gaussian, bootstrap_fraction=0.25, label_dropout=0.5)
    x, y = gaussian.batch(4000)
    obj(x, y, gen(4))
    fed = obj.backbone.calls[-1]
    assert bool((fed[:1000] == y[:1000]).all())
    assert abs(float((fed[1000:] == 3).double().mean()) - 0.5) < 0.03


def test_teacher_is_an_ema_and_sampling_follows_the_exact_map(gaussian):
    obj = shortcut(gaussian)
    one = sample(obj, list(range(2000)), nfe=1)
    res = (one.images.double() - gaussian.means[one.labels]).flatten()
    assert abs(float(res.std()) - gaussian.sigma) < 0.02 and one.evaluations == 1
    assert torch.allclose(sample(obj, list(range(200)), nfe=4).images, one.images[:200], atol=1e-5)
    with torch.no_grad():
        obj.backbone.bias.fill_(1.0)
    obj.after_step()
    assert float(obj.teacher.bias) == pytest.approx(0.001) and not obj.teacher.training
    with pytest.raises(ValueError, match="guidance"):
        obj.step(torch.zeros(1, 1, 4, 4, dtype=torch.float64), torch.ones(1), torch.zeros(1),
                 Condition(guidance=torch.full((1,), 2.0)))


def test_config_checks_name_the_field():
    for bad, message in [({"levels": 0}, "levels must be ≥ 1"), ({"guidance": 0.5}, "guidance must be ≥ 1"),
                         ({"bootstrap_fraction": 1.5}, "bootstrap_fraction"), ({"clip": 0.0}, "clip")]:
        with pytest.raises(ValueError, match=message):
            ShortcutConfig(**bad)
