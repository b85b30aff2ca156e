"""The 2-D toy setting: data, MLP backbone, sliced Wasserstein, scatter plots, evaluation, recipe.

Closed forms: the toy mixture's exact flow-matching velocity (a mixture of Gaussian velocities weighted
by posterior responsibilities), SW₂ of shifted sets (mean_θ ⟨Δ, θ⟩² → ‖Δ‖²/D), SW₂ of a point mass.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from imagefiles import read_rgb
from torch import nn

from fewstep.backbones.mlp import MLP, MLPConfig
from fewstep.build import load_objective
from fewstep.config import DataConfig, apply_overrides, run_config_from_dict, to_dict
from fewstep.contracts import DataSpec
from fewstep.data import load_dataset
from fewstep.data.base import DataError
from fewstep.data.toy2d import (NUM_CLASSES, Toy2D, class_of_component, component_means, component_std,
                                sample_mixture)
from fewstep.evaluate_points import evaluate_points
from fewstep.metrics import random_directions, sliced_wasserstein
from fewstep.objectives.fm import FlowMatching, FlowMatchingConfig
from fewstep.objectives.jvp import jvp
from fewstep.plots import default_extent, scatter_png
from fewstep.recipes.toy2d import toy2d
from fewstep.registry import backbones, datasets, recipes
from fewstep.train import train


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def test_dataset_is_deterministic_shaped_and_registered():
    a, b = Toy2D("train"), load_dataset(DataConfig(name="toy2d", split="train"))
    assert torch.equal(a.points, b.points) and torch.equal(a.labels, b.labels)
    assert a.points.shape == (50_000, 2, 1, 1) and a.points.dtype == torch.float32
    assert a.labels.dtype == torch.int64 and len(Toy2D("test")) == 10_000
    assert a.spec == DataSpec(name="toy2d", channels=2, resolution=1, num_classes=4, num_items=50_000, kind="points")
    x, y = a[7]
    assert x.shape == (2, 1, 1) and y.ndim == 0 and torch.equal(x, a.points[7])
    xb, yb = a.get_batch(torch.tensor([7, 3, 7]))
    assert torch.equal(xb[0], x) and torch.equal(xb[2], x) and yb.tolist() == [int(y), int(a.labels[3]), int(y)]
    assert "toy2d" in datasets.names()


def test_dataset_statistics_and_classes():
    data = Toy2D("train")
    x = data.points.reshape(-1, 2).double()
    cov = torch.cov(x.T)
    assert x.mean(0).abs().max() < 0.02 and (cov - torch.eye(2, dtype=torch.float64)).abs().max() < 0.03
    counts = torch.bincount(data.labels, minlength=NUM_CLASSES).double() / len(data)
    assert data.labels.min() == 0 and data.labels.max() == NUM_CLASSES - 1
    assert (counts - 1 / NUM_CLASSES).abs().max() < 0.01
    nearest = torch.cdist(x, component_means(torch.float64)).argmin(dim=1)   # components are far apart
    assert torch.equal(class_of_component(nearest), data.labels)
    resid = x - component_means(torch.float64)[nearest]
    assert abs(float(resid.std()) - component_std()) < 0.002
    # every class is bimodal with opposite modes: its mean is the origin
    for c in range(NUM_CLASSES):
        assert x[data.labels == c].mean(0).abs().max() < 0.03
        assert set(nearest[data.labels == c].unique().tolist()) == {c, c + 4}


def test_splits_are_disjoint_and_seeded():
    train_rows = {row.numpy().tobytes() for row in Toy2D("train").points.reshape(-1, 2)}
    test_rows = [row.numpy().tobytes() for row in Toy2D("test").points.reshape(-1, 2)]
    assert not any(r in train_rows for r in test_rows)
    p1, y1 = sample_mixture(100, seed=5)
    p2, y2 = sample_mixture(100, seed=5)
    assert torch.equal(p1, p2) and torch.equal(y1, y2)


def test_dataset_errors():
    with pytest.raises(DataError, match="splits 'train', 'test', not 'val'"):
        Toy2D("val")
    with pytest.raises(DataError, match="resolution must be unset or 1, got 8"):
        load_dataset(DataConfig(name="toy2d", resolution=8))


# ---------------------------------------------------------------------------------------------------
# MLP backbone
# ---------------------------------------------------------------------------------------------------
SPEC = DataSpec(name="toy2d", channels=2, resolution=1, num_classes=4, num_items=1, kind="points")


def mlp(randomise_output: bool = True, **cfg) -> MLP:
    torch.manual_seed(0)
    net = MLPConfig(width=32, depth=2, **cfg).build(SPEC)
    if randomise_output:   # the output layer starts at zero; give it weights so derivatives are non-trivial
        with torch.no_grad():
            net.out_proj.weight.normal_(0, 0.3)
            net.out_proj.bias.normal_(0, 0.3)
    return net


def inputs(B: int = 6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, 2, 1, 1, generator=gen, dtype=dtype)
    t = torch.rand(B, generator=gen, dtype=dtype)
    s = t * torch.rand(B, generator=gen, dtype=dtype)
    y = torch.arange(B) % 5          # includes the null label 4
    return x, t, s, y


def test_mlp_shapes_zero_init_and_conditioning():
    x, t, s, y = inputs()
    fresh = mlp(randomise_output=False)
    out = fresh(x, t, y=y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    net = mlp(gap_embedder=True, guidance_embedder=True)
    g = torch.full_like(t, 0.5)
    base = net(x, t, s, y=y, guidance=g)
    assert base.shape == (6, 2, 1, 1) and torch.isfinite(base).all()
    assert not torch.allclose(base, net(x, t * 0.5, s * 0.5, y=y, guidance=g))        # time
    assert not torch.allclose(base, net(x, t, s * 0.5, y=y, guidance=g))              # gap
    assert not torch.allclose(base, net(x, t, s, y=(y + 1) % 4, guidance=g))          # label
    assert not torch.allclose(base, net(x, t, s, y=y, guidance=g * 0.2))              # guidance
    assert not torch.allclose(base, net(x, t, None, y=y, guidance=g))                 # s=None: no gap term
    null = torch.full_like(y, 4)
    assert torch.equal(net(x, t, s, y=None, guidance=g), net(x, t, s, y=null, guidance=g))
    # per-sample independence: row i depends only on input i
    assert torch.allclose(net(x[:2], t[:2], s[:2], y=y[:2], guidance=g[:2]), base[:2], atol=1e-6)


def test_mlp_errors():
    x, t, s, y = inputs()
    net = mlp()
    with pytest.raises(ValueError, match="two-time call F\\(x, t, s\\) on a one-time MLP"):
        net(x, t, s)
    with pytest.raises(ValueError, match="got guidance= but this MLP has no guidance embedder"):
        net(x, t, guidance=t)
    with pytest.raises(ValueError, match="missing guidance="):
        mlp(guidance_embedder=True)(x, t)
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\) = \(B, 2, 1, 1\)"):
        net(x.reshape(6, 2), t)
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 4\]"):
        net(x, t, y=y + 3)
    with pytest.raises(ValueError, match="t must be a float tensor of shape"):
        net(x, t[:3])
    with pytest.raises(TypeError, match="unknown conditions"):
        net(x, t, temperature=t)
    with pytest.raises(ValueError, match="unconditional"):
        MLPConfig(width=8, depth=1).build(DataSpec("u", 2, 1, 0, 1, "points"))(x, t, y=y)
    with pytest.raises(ValueError, match="depth must be ≥ 1"):
        MLPConfig(depth=0)


def test_mlp_jvp_matches_finite_differences_in_float64():
    net = mlp(gap_embedder=True, guidance_embedder=True).double()
    x, t, s, y = inputs(dtype=torch.float64)
    g = torch.full_like(t, 0.3)
    gen = torch.Generator().manual_seed(2)
    dx, dt, ds = (torch.randn(v.shape, generator=gen, dtype=torch.float64) for v in (x, t, s))

    def fn(x_, t_, s_):
        return net(x_, t_, s_, y=y, guidance=g)

    out, tangent = jvp(fn, (x, t, s), (dx, dt, ds))
    h = 1e-6
    fd = (fn(x + h * dx, t + h * dt, s + h * ds) - fn(x - h * dx, t - h * dt, s - h * ds)) / (2 * h)
    assert torch.equal(out, fn(x, t, s))
    assert tangent.abs().max() > 1e-3                      # a real derivative, not zero
    assert torch.allclose(tangent, fd, rtol=1e-6, atol=1e-8)
    # gradients flow through the tangent to every parameter but the output bias (as TVM's loss needs)
    tangent.square().sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads.pop("out_proj.bias") is None
    assert all(g is not None and torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values())


def test_mlp_flops_count_every_linear_layer():
    net = mlp(gap_embedder=True, guidance_embedder=True)
    macs = sum(m.in_features * m.out_features for m in net.modules() if isinstance(m, nn.Linear))
    assert net.forward_flops(5) == 2 * 5 * macs


def test_mlp_flavour_keeps_switches_and_config_round_trips():
    cfg = backbones.get("mlp")(MLPConfig(width=8, gap_embedder=True, time_scale=1000.0))
    assert (cfg.name, cfg.width, cfg.depth, cfg.gap_embedder, cfg.time_scale) == ("mlp", 256, 3, True, 1000.0)
    assert backbones.get("mlp")(None) == MLPConfig()
    run = toy2d("fm")
    assert run_config_from_dict(to_dict(run)) == run
    net = run.backbone.build(SPEC)
    assert (net.in_channels, net.input_size, net.num_classes) == (2, 1, 4)


# ---------------------------------------------------------------------------------------------------
# Sliced Wasserstein
# ---------------------------------------------------------------------------------------------------
def gaussian(n, mean, seed):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    return mean + torch.randn((n, mean.numel()), generator=gen, dtype=torch.float64)


def test_sw_of_a_set_with_itself_is_zero():
    a = gaussian(1000, [0.0, 1.0], 0)
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, a[torch.randperm(1000)]) == 0.0
    assert sliced_wasserstein(a, torch.cat([a, a, a])) == 0.0       # unequal sizes: exact quantiles
    assert sliced_wasserstein(a, a + 1e-3) > 0


def test_sw_of_a_shift_is_the_mean_squared_projection():
    a, delta = gaussian(2000, [0.0, 0.0], 1), torch.tensor([1.5, -2.0], dtype=torch.float64)
    sw = sliced_wasserstein(a, a + delta, num_projections=4096, generator=torch.Generator().manual_seed(9))
    theta = random_directions(4096, 2, torch.Generator().manual_seed(9))
    exact = float((theta @ delta).square().mean())
    assert abs(sw ** 2 - exact) < 1e-9
    assert abs(sw ** 2 - delta.square().sum() / 2) < 0.05 * 6.25 / 2         # ‖Δ‖²/D, Monte-Carlo error
    sw1 = sliced_wasserstein(a, a + delta, num_projections=4096, generator=torch.Generator().manual_seed(9), p=1)
    assert abs(sw1 - float((theta @ delta).abs().mean())) < 1e-9
    assert abs(sw1 - 2 * 2.5 / math.pi) < 0.05                                 # E|⟨Δ, θ⟩| = 2‖Δ‖/π in 2-D


@pytest.mark.parametrize("n, m", [(4000, 4000), (4000, 3000)])
def test_sw_between_shifted_gaussians_matches_the_closed_form(n, m):
    delta = torch.tensor([2.0, -1.0, 2.0], dtype=torch.float64)           # ‖Δ‖² = 9, D = 3
    a, b = gaussian(n, [0.0, 0.0, 0.0], 2), gaussian(m, delta, 3)
    sw = sliced_wasserstein(a, b, num_projections=1024, generator=torch.Generator().manual_seed(4))
    # per direction W₂² = ⟨Δ, θ⟩² up to sampling error (sd of the sample means ≈ √(2/n) ≈ 0.02)
    theta = random_directions(1024, 3, torch.Generator().manual_seed(4))
    assert abs(sw ** 2 - float((theta @ delta).square().mean())) < 0.1
    # and E_θ⟨Δ, θ⟩² = ‖Δ‖²/D = 3 (Monte-Carlo sd over 1024 directions ≈ 9·√(4/45)/32 ≈ 0.08)
    assert abs(sw ** 2 - 3.0) < 0.35
    assert sliced_wasserstein(gaussian(n, [0.0] * 3, 4), gaussian(m, [0.0] * 3, 5)) < 0.1


def test_sw_scale_translation_and_symmetry():
    a, b = gaussian(1500, [0.0, 0.0], 6), gaussian(1500, [1.0, 0.0], 7) * 0.5
    base = sliced_wasserstein(a, b)
    assert abs(sliced_wasserstein(-2.5 * a, -2.5 * b) - 2.5 * base) < 1e-9
    assert abs(sliced_wasserstein(3 * a, 3 * b[:1000]) - 3 * sliced_wasserstein(a, b[:1000])) < 1e-9
    shift = torch.tensor([10.0, -4.0], dtype=torch.float64)
    assert abs(sliced_wasserstein(a + shift, b + shift) - base) < 1e-9
    assert abs(sliced_wasserstein(b, a) - base) < 1e-12
    assert sliced_wasserstein(a.float(), b.float()) == pytest.approx(base, rel=1e-5)


def test_sw_errors():
    with pytest.raises(ValueError, match="same D"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        sliced_wasserstein(torch.full((3, 2), float("nan")), torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------------
# Scatter plots
# ---------------------------------------------------------------------------------------------------
def test_scatter_panels_are_titled_and_share_one_extent(tmp_path):
    first = torch.tensor([[-0.99, 0.99], [0.5, -0.5], [5.0, 0.0]])
    second = torch.tensor([[-0.6, -0.9]])
    path = scatter_png(tmp_path / "s.png", [first, second], ["held-out data", "1 step"], extent=(-1.0, 1.0),
                       panel_px=200)
    png = read_rgb(path)
    assert png.shape == (210, 400, 3)
    assert (png < 100).all(-1).any()                      # dark points and titles on white
    assert default_extent(first) == pytest.approx((-5.5, 5.5))
    with pytest.raises(ValueError, match="must be \\(N, 2\\)"):
        scatter_png(tmp_path / "x.png", [torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="1 titles for 2 point sets"):
        scatter_png(tmp_path / "x.png", [first, second], ["a"])


# ---------------------------------------------------------------------------------------------------
# Evaluation with an exact flow-matching oracle
# ---------------------------------------------------------------------------------------------------
class MixtureOracle(nn.Module):
    """The exact FM velocity of the toy data given the label: Σ_j r_j(x_t)·v_j(x_t, t) over the
    components j of class y (all components for the null label), with v_j the Gaussian velocity
    (t − (1 − t)σ²)/d·(x_t − (1 − t)μ_j) − μ_j, d = (1 − t)²σ² + t², and r_j ∝ N(x_t; (1 − t)μ_j, d·I)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("means", component_means(torch.float64))
        self.register_buffer("classes", class_of_component(torch.arange(8)))
        self.sigma, self.in_channels, self.input_size, self.num_classes = component_std(), 2, 1, NUM_CLASSES
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, s=None, y=None, **cond):
        B = x.shape[0]
        y = y if y is not None else torch.full((B,), self.num_classes)
        xf, tt = x.reshape(B, 1, 2).double(), t.double().reshape(B, 1, 1)
        d = (1 - tt) ** 2 * self.sigma ** 2 + tt ** 2
        diff = xf - (1 - tt) * self.means[None]                                # (B, 8, 2)
        logits = -diff.square().sum(-1) / (2 * d[:, :, 0])
        allowed = (self.classes[None] == y[:, None]) | (y[:, None] == self.num_classes)
        r = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=1)
        v = (tt - (1 - tt) * self.sigma ** 2) / d * diff - self.means[None]
        return (r[..., None] * v).sum(1).to(x.dtype).reshape(x.shape) + self.bias


def test_evaluate_points_with_the_exact_oracle(tmp_path):
    obj = FlowMatching(MixtureOracle(), FlowMatchingConfig(label_dropout=0.0), num_classes=NUM_CLASSES)
    test = Toy2D("test")
    m = evaluate_points(obj, test, tmp_path, nfes=(1, 4, 32), num=2000, weights="online")
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    sw = m["sliced_wasserstein"]
    # one step returns E[x | y] = 0 for every class: SW₂² = mean_θ mean_i ⟨x_i, θ⟩² exactly
    ref = test.points[:2000].reshape(-1, 2).double()
    theta = random_directions(1024, 2, torch.Generator().manual_seed(0))
    assert sw["1"] == pytest.approx(float((ref @ theta.T).square().mean()) ** 0.5, rel=1e-5)
    assert abs(sw["1"] - 1.0) < 0.05                                       # unit-covariance data
    assert 0.02 < m["test_reference_floor"] < 0.15
    assert sw["4"] < 0.5 * sw["1"] and sw["32"] < 2 * m["test_reference_floor"]
    assert m["evaluations"] == {"1": 1, "4": 4, "32": 32} and m["num"] == 2000 and m["weights"] == "online"
    png = read_rgb(tmp_path / "samples" / "scatter.png")
    assert png.shape[1] == 4 * 300 and m["scatter"]["panels"] == ["held-out data", "1 step", "4 steps", "32 steps"]
    with pytest.raises(ValueError, match="num ≤ len\\(test\\)/2 = 5000"):
        evaluate_points(obj, test, tmp_path, num=6000, weights="online")


# ---------------------------------------------------------------------------------------------------
# Recipe and a short end-to-end run
# ---------------------------------------------------------------------------------------------------
def test_recipe_settings():
    cfg = recipes.get("toy2d")("fm")
    assert cfg.data.name == "toy2d" and isinstance(cfg.backbone, MLPConfig) and cfg.objective.name == "fm"
    assert cfg.train.precision == "fp32" and cfg.train.sample_kimg == 0 and cfg.train.checkpoint_kimg == 0
    assert cfg.sample.nfe == (1, 4) and cfg.sample.weights in cfg.train.ema_betas


def test_short_training_run_writes_metrics_and_reloads(tmp_path):
    cfg = apply_overrides(toy2d("fm"), ["train.total_kimg=0.512", "train.status_kimg=0.256",
                                        "backbone.width=32", "backbone.depth=1"])
    result = train(cfg, tmp_path / "run", show_progress=False)
    assert result.step == 2 and result.checkpoint is not None
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["sliced_wasserstein"]) == {"1", "4"} and metrics["weights"] == "ema"
    assert all(math.isfinite(v) and v > 0 for v in metrics["sliced_wasserstein"].values())
    assert (tmp_path / "run" / "samples" / "scatter.png").is_file()
    assert not (tmp_path / "run" / "samples" / "final.png").exists()       # no image grid for points
    obj, _, _ = load_objective(tmp_path / "run")
    again = evaluate_points(obj, Toy2D("test"), tmp_path / "again", nfes=(1, 4), num=metrics["num"])
    assert again["sliced_wasserstein"] == metrics["sliced_wasserstein"]      # deterministic, from the checkpoint
