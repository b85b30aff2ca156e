"""Decoupled MeanFlow and ``train.init_from`` (docs/design/frontier.md §5, §7).

Against the shared Gaussian oracle (tests/oracle.py): the flow-matching branch's residual is v* − (ε − x)
and the MeanFlow branch's u* − u_tgt = −√(S_s²/S_t²)·(g − v*), pointwise (the MeanFlow identity along v*);
with model guidance ω and the oracle at scale w = 1/(1 − ω) the guided target g is v^w plus the sample
noise. Structurally: a flow-matching checkpoint converted by ``init_from`` is, at s = t, the same network
bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fewstep.backbones.dit import DiTConfig
from fewstep.build import init_from_run, resolve
from fewstep.checkpoints import CheckpointError, save_checkpoint
from fewstep.config import RunConfig, SampleConfig, TrainConfig, to_dict
from fewstep.contracts import Condition, DataSpec
from fewstep.objectives.common import mean_flat, per_sample
from fewstep.objectives.dmf import DMF, DMFConfig, LogVariance, log_variance_loss
from fewstep.sample import sample
from fewstep.testing import perturbed

from oracle import AverageVelocityOracle, d, flow_map, guided_means, velocity

SPEC = DataSpec(name="x", channels=1, resolution=8, num_classes=3, num_items=1)


def dmf(problem, means=None, error: float = 0.0, **cfg) -> DMF:
    net = AverageVelocityOracle(problem.means if means is None else means, problem.sigma, error)
    return DMF(net, DMFConfig(**cfg), num_classes=problem.num_classes).double()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# The loss against the oracle
# ---------------------------------------------------------------------------------------------------
def test_branch_residuals_at_the_oracle_are_the_target_noise(gaussian):
    obj = dmf(gaussian, guidance=0.0)
    x, y = gaussian.batch(4096)
    tm = obj.terms(x, y, gen(0))
    mu = gaussian.means[tm.y]                                   # the labels fed (null where dropped)
    v_star_f = velocity(tm.x_f, tm.t_f, mu, gaussian.sigma)
    assert float((tm.p_f.detach() - tm.g_f - (v_star_f - tm.v_f)).abs().max()) < 1e-12
    k = torch.sqrt(d(tm.s, gaussian.sigma) / d(tm.t, gaussian.sigma))
    v_star = velocity(tm.x_t, tm.t, mu, gaussian.sigma)
    assert float((tm.u.detach() - tm.u_tgt + per_sample(k, x) * (tm.g - v_star)).abs().max()) < 1e-10
    # each branch's input is its own interpolant of the same x: x_t = (1 − t)·x + t·ε with v = ε − x
    for z, tt, v in ((tm.x_f, tm.t_f, tm.v_f), (tm.x_t, tm.t, tm.v)):
        assert torch.allclose(z, (1 - per_sample(tt, x)) * x + per_sample(tt, x) * (v + x), rtol=0, atol=1e-12)
    # independent branches: their own times and noise; the MeanFlow times lean to far jumps (s → 0)
    assert not torch.allclose(tm.t_f, tm.t) and not torch.allclose(tm.v_f, tm.v)
    assert float(tm.s.mean()) < 0.35 < float(tm.t.mean()) and bool((tm.s <= tm.t).all())
    assert tm.u.requires_grad and not tm.dudt.requires_grad and not tm.u_tgt.requires_grad


def test_model_guidance_fixed_point_is_cfg_at_one_over_one_minus_omega(gaussian):
    omega = 0.6
    w = 1 / (1 - omega)                                                       # 2.5
    obj = dmf(gaussian, means=guided_means(gaussian.means, w), guidance=omega, guidance_t_min=0.0, guidance_t_max=0.7)
    x, y = gaussian.batch(8192, seed=2)
    obj.train()
    tm = obj.terms(x, y, gen(2))
    v_y = velocity(tm.x_t, tm.t, gaussian.means[y], gaussian.sigma)
    v_w = velocity(tm.x_t, tm.t, guided_means(gaussian.means, w)[y], gaussian.sigma)
    on = (tm.t <= 0.7) & ~tm.dropped
    assert bool(on.any()) and bool((~on).any())
    assert float((tm.g - v_w - (tm.v - v_y))[on].abs().max()) < 1e-10       # E[g | x_t] = v^w
    assert torch.equal(tm.g[~on], tm.v[~on])                                 # outside or dropped: ε − x
    assert abs(float(tm.dropped.double().mean()) - 0.1) < 0.015
    assert bool((tm.y[tm.dropped] == 3).all()) and torch.equal(tm.y[~tm.dropped], y[~tm.dropped])   # null fed
    assert obj.backbone.modes[0] is False and obj.backbone.training          # the MG passes run in eval mode
    assert obj.backbone.grad[:2] == [False, True]                            # without autograd; p_f with it
    # one MG call for both branches: [x_f; x_t] with labels [y; y] and [∅; ∅]
    assert obj.backbone.calls[0].shape == (4 * 8192,)


def test_log_variance_loss_has_its_optimum_at_log_m_and_the_adaptive_gradient():
    m = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=torch.float64)
    phi = torch.log(m).requires_grad_(True)                          # ∂ℓ/∂φ = ½ − m e^{−φ}/(m e^{−φ} + 1) = 0
    (g,) = torch.autograd.grad(log_variance_loss(m, phi).sum(), phi)
    assert float(g.abs().max()) < 1e-15
    for delta in (-0.1, 0.1):                                        # ℓ is convex in φ: a minimum
        assert bool((log_variance_loss(m, phi.detach() + delta) > log_variance_loss(m, phi.detach())).all())
    p = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    target, lv = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mm = ((p - target) ** 2).mean(1)
    (grad,) = torch.autograd.grad(log_variance_loss(mm, lv).sum(), p)
    expected = 2 * (p - target) / (16 * (mm + torch.exp(lv)))[:, None]         # ∂ℓ/∂p = ∇m/(m + e^φ)
    assert torch.allclose(grad, expected.detach(), rtol=1e-12, atol=0)


def test_loss_logs_and_the_learned_log_variance(gaussian):
    obj = dmf(gaussian, error=0.05)
    x, y = gaussian.batch(256)
    tm, out = obj.terms(x, y, gen(3)), obj(x, y, gen(3))
    m_f, m = mean_flat((tm.p_f - tm.g_f) ** 2).detach(), mean_flat((tm.u - tm.u_tgt) ** 2).detach()
    assert torch.allclose(out.per_sample, 0.5 * (torch.log1p(m_f) + torch.log1p(m)), rtol=1e-12)   # φ starts at 0
    assert torch.allclose(out.logs["loss_fm"], m_f.mean()) and torch.allclose(out.logs["loss_mf"], m.mean())
    with torch.no_grad():                                          # a non-trivial φ(t, s): which times it sees
        obj.logvar.linear.weight.copy_(0.1 * torch.randn(obj.logvar.linear.weight.shape, generator=gen(8)))
    phi_f, phi = obj.logvar(tm.t_f, tm.t_f), obj.logvar(tm.t, tm.s)
    assert not torch.allclose(phi, obj.logvar(tm.t, tm.t))
    expected = 0.5 * (log_variance_loss(m_f, phi_f) + log_variance_loss(m, phi))
    assert torch.allclose(obj(x, y, gen(3)).per_sample, expected.detach(), rtol=1e-12)
    with torch.no_grad():
        obj.logvar.linear.weight.zero_()
    out = obj(x, y, gen(3))
    out.loss.backward()
    lv = obj.logvar.linear
    assert float(lv.weight.grad.abs().sum()) > 0 and float(obj.backbone.bias.grad.abs()) > 0
    x, y = gaussian.batch(4096)
    exact = dmf(gaussian, guidance=0.0)(x, y, gen(3))          # without MG the plain oracle is the fixed point
    worse = dmf(gaussian, guidance=0.0, error=0.1)(x, y, gen(3))
    assert float(worse.loss) > float(exact.loss)
    assert isinstance(obj.logvar, LogVariance) and "logvar.linear.weight" in obj.state_dict()


def test_samplers_follow_the_exact_map_and_restart_renoises(gaussian):
    euler = dmf(gaussian)
    one = sample(euler, list(range(2000)), nfe=1)
    res = (one.images.double() - gaussian.means[one.labels]).flatten()
    assert abs(float(res.std()) - gaussian.sigma) < 0.02 and one.evaluations == 1
    assert torch.allclose(sample(euler, list(range(128)), nfe=4).images, one.images[:128], atol=1e-5)
    restart = dmf(gaussian, sampler="restart")
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    t, s = torch.full((4,), 0.9, dtype=torch.float64), torch.full((4,), 0.4, dtype=torch.float64)
    y, noise = torch.arange(4) % 3, torch.randn(4, 1, 4, 4, dtype=torch.float64)
    x0 = flow_map(x, t, 0 * t, gaussian.means[y], gaussian.sigma)
    assert torch.allclose(restart.step(x, t, s, Condition(y=y), noise=noise), 0.6 * x0 + 0.4 * noise, atol=1e-12)
    with pytest.raises(ValueError, match="guidance"):
        sample(euler, [0], nfe=1, guidance=2.0)


# ---------------------------------------------------------------------------------------------------
# The split backbone and the conversion of a flow-matching run
# ---------------------------------------------------------------------------------------------------
def fm_run(tmp_path, width: int = 32, classes: int = 3, objective: str = "fm"):
    """A checkpoint of a small flow-matching DiT (perturbed weights, an EMA that differs from them)."""
    from fewstep.build import build_objective

    from fewstep.config import default_objective_config

    cfg = resolve(RunConfig(recipe="t", objective=default_objective_config(objective),
                            backbone=DiTConfig(name="dit-debug", depth=3, hidden_size=width, num_heads=2, patch_size=4),
                            train=TrainConfig(ema_betas={"ema": 0.5}), sample=SampleConfig(weights="ema")))
    spec = dataclasses.replace(SPEC, num_classes=classes)
    torch.manual_seed(0)
    obj = perturbed(build_objective(cfg, spec), scale=0.1)
    obj.after_step()
    with torch.no_grad():
        for p in obj.backbone.parameters():
            p.add_(0.01)                                  # online ≠ EMA: init_from must take the EMA
    save_checkpoint(tmp_path / "fm", 7, objective_state=obj.state_dict(), optimizer_state=None, rng_states=[],
                    manifest={"nimg": 448, "kimg": 0.448, "data_position": 0, "config": to_dict(cfg),
                              "data_spec": dataclasses.asdict(spec)})
    return obj, tmp_path / "fm"


def dmf_objective(split_depth: int = 2, width: int = 32) -> DMF:
    cfg = resolve(RunConfig(recipe="t", objective=DMFConfig(),
                            backbone=DiTConfig(name="dit-debug", depth=3, hidden_size=width, num_heads=2, patch_size=4,
                                               split_depth=split_depth),
                            train=TrainConfig(ema_betas={"ema": 0.9999})))
    assert (cfg.backbone.time_mode, cfg.backbone.gap_embedder) == ("split", True)
    torch.manual_seed(1)
    return DMF(cfg.backbone.build(SPEC), cfg.objective, num_classes=3, ema_betas={"ema": 0.9999})


def test_converted_model_reproduces_the_flow_matching_velocity_at_s_equals_t(tmp_path):
    fm, run = fm_run(tmp_path)
    obj = dmf_objective()
    note = init_from_run(obj, run)
    assert note.startswith("ema weights of ") and "step 7" in note
    x = torch.randn(5, 1, 8, 8, generator=gen(4))
    t, y = torch.rand(5, generator=gen(5)), torch.tensor([0, 1, 2, 3, 0])
    with torch.no_grad():
        v = fm.ema["ema"](x, t, y=y)
        for net in (obj.backbone, obj.ema["ema"]):
            assert torch.equal(net(x, t, t.clone(), y=y), v)                  # bit for bit at s = t
        assert not torch.equal(obj.backbone(x, t, 0.5 * t, y=y), v)           # s < t: the late blocks see s
        assert not torch.equal(fm.backbone(x, t, y=y), v)                     # and it was the EMA, not online
    assert float(obj.logvar.linear.weight.abs().sum()) == 0                   # objective-owned: left at init
    split = obj.backbone.split
    assert split == 2 and obj.backbone.gap_embedder is None                   # no new backbone parameters


def test_split_backbone_jvp_matches_central_differences_and_s_only_reaches_late_blocks(tmp_path):
    _, run = fm_run(tmp_path)
    obj = dmf_objective()
    init_from_run(obj, run)
    net = obj.double().backbone
    x = torch.randn((6, 1, 8, 8), generator=gen(6), dtype=torch.float64)
    tm = obj.terms(x, torch.arange(6) % 3, gen(6))
    h = 1e-5

    def fd(ds: float) -> torch.Tensor:
        with torch.no_grad():
            f = lambda e: net(tm.x_t + e * tm.g, tm.t + e, tm.s + e * ds, y=tm.y)   # noqa: E731
            return (f(h) - f(-h)) / (2 * h)

    scale = float(tm.dudt.abs().max())
    assert not tm.dudt.requires_grad and tm.u.requires_grad                # the tangent is computed without a graph
    assert torch.allclose(tm.dudt, fd(0.0), rtol=0, atol=1e-8 * scale)
    assert not torch.allclose(tm.dudt, fd(1.0), rtol=0, atol=1e-3 * scale)     # tangent (g, 1, 1) differs
    with torch.no_grad():                       # zeroing the late blocks' and final layer's modulation removes s
        for block in [*net.blocks[net.split:]]:
            block.adaLN_modulation.linear.weight.zero_()
        net.final_layer.adaLN_modulation.linear.weight.zero_()
        assert torch.equal(net(x, tm.t, tm.s, y=tm.y), net(x, tm.t, tm.t, y=tm.y))


def test_init_from_refuses_mismatched_backbones_with_one_clear_line(tmp_path):
    _, run = fm_run(tmp_path / "wide", width=64)
    with pytest.raises(CheckpointError) as err:
        init_from_run(dmf_objective(), run)
    message = str(err.value)
    assert "\n" not in message and "the source backbone does not fit this one" in message
    assert "shape (source vs here) ['pos_embed (1, 4, 64) vs (1, 4, 32)', 'x_embedder.weight (64, 1, 4, 4) vs" in message
    _, run10 = fm_run(tmp_path / "ten", classes=10)
    with pytest.raises(CheckpointError, match=r"shape \(source vs here\) \['y_embedder.weight \(11, 32\) vs \(4, 32\)'\]"):
        init_from_run(dmf_objective(), run10)
    _, run_mf = fm_run(tmp_path / "meanflow", objective="meanflow")   # its DiT has a gap embedder: extra keys
    with pytest.raises(CheckpointError, match=r"missing here \['gap_embedder.mlp.0.bias'"):
        init_from_run(dmf_objective(), run_mf)
    with pytest.raises(FileNotFoundError, match="no such run"):
        init_from_run(dmf_objective(), tmp_path / "nowhere")


def test_a_dmf_run_starts_from_an_fm_run_through_the_trainer_and_resumes_without_reinitialising(tmp_path):
    from fewstep.recipes.toy2d import toy2d
    from fewstep.train import train

    def cfg(objective: str, kimg: float, **train_fields):
        c = toy2d(objective)
        c.train = dataclasses.replace(c.train, total_kimg=kimg, batch=128, status_kimg=0.128, **train_fields)
        c.backbone = dataclasses.replace(c.backbone, width=32, depth=2)
        c.sample = dataclasses.replace(c.sample, num_images=64, nfe=(1, 2))
        return c

    train(cfg("fm", 0.256), tmp_path / "fm", show_progress=False)
    first = train(cfg("dmf", 0.256, init_from=str(tmp_path / "fm")), tmp_path / "dmf", show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "dmf" / "log.jsonl").read_text().splitlines()]
    events = [r for r in log if r.get("event") == "init_from"]
    assert len(events) == 1 and "fm/checkpoint-00000002" in events[0]["source"] and first.step == 2
    assert json.loads((tmp_path / "dmf" / "metrics.json").read_text())["sliced_wasserstein"]["2"] > 0
    train(cfg("dmf", 0.512, init_from=str(tmp_path / "fm")), tmp_path / "dmf", show_progress=False)   # resume
    log = [json.loads(line) for line in (tmp_path / "dmf" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in log if r.get("event") == "init_from"]) == 1     # resuming never re-initialises
    assert math.isfinite(log[-1].get("loss", 0.0))
