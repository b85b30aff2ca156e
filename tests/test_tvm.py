"""Terminal Velocity Matching against closed-form Gaussian flow maps and float64 references."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import fewstep.objectives.tvm as tvm_module
from fewstep.backbones.dit import DiTConfig, tvm_variant
from fewstep.contracts import DataSpec
from fewstep.objectives.common import mean_flat, per_sample
from fewstep.objectives.time_samplers import gap_star
from fewstep.objectives.tvm import TVMConfig, TVM
from fewstep.sample import sample

from oracle import FlowMapOracle, d, gaussian_batch, guided_velocity, oracle_means, rk4_flow_map
from oracle import velocity as gaussian_velocity

SIGMA, K = 0.5, 3
SPEC = DataSpec(name="x", channels=1, resolution=8, num_classes=K, num_items=1)


def tvm(error: float = 0.0, gap_error: float = 0.0, **cfg) -> TVM:
    config = TVMConfig(**{"label_dropout": 0.0, **cfg})
    oracle = FlowMapOracle(oracle_means(K), SIGMA, scaled=config.scaled, error=error, gap_error=gap_error)
    return TVM(oracle, config, num_classes=K).double()


def draws(n: int, seed: int = 0, w: float = 1.0):
    """Data, labels, noise, gap* times and constant w for :meth:`TVM.terms`."""
    x, y = gaussian_batch(oracle_means(K), SIGMA, n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    times = gap_star(n, generator=gen)
    return x, y, eps, times.t.double(), times.s.double(), times.s_prime.double(), torch.full((n,), w, dtype=torch.float64)


def fm_floor_tolerance(floor: torch.Tensor, dims: int) -> float:
    """6 sd of the batch mean of (per-sample FM loss − floor): each is a mean of `dims` squared N(0, floor)."""
    return 6 * float((2 * floor ** 2 / dims).mean().sqrt()) / floor.numel() ** 0.5


@pytest.mark.parametrize("scaled", [True, False])
def test_exact_oracle_zero_terminal_residual_and_fm_floor(scaled):
    obj = tvm(guidance=1.0, scaled=scaled)
    x, y, eps, t, s, s_prime, w = draws(8192)
    terms = obj.terms(x, y, eps, t, s, s_prime, w)
    assert float((terms.V - terms.u_terminal).abs().max()) < 1e-10            # V = u⁻ pointwise
    x_t = (1 - per_sample(t, x)) * x + per_sample(t, x) * eps
    assert torch.allclose(terms.X, obj.backbone.flow_map(x_t, t, s, y, w), atol=1e-12)
    floor = SIGMA ** 2 / d(s_prime, SIGMA)                                      # β²w²·Var(ε − x | x_s′) at w = 1
    assert abs(float((terms.fm - floor).mean())) < fm_floor_tolerance(floor, 16)
    out = obj(x, y, torch.Generator().manual_seed(0))
    assert float(out.logs["loss_terminal"]) < 1e-20 and torch.allclose(out.loss, out.per_sample.mean())


def test_perturbed_oracle_has_strictly_larger_loss():
    x, y = gaussian_batch(oracle_means(K), SIGMA, 8192)
    run = lambda **kw: tvm(guidance=1.0, **kw)(x, y, torch.Generator().manual_seed(0))   # paired noise and times
    exact, shifted, bent = run(), run(error=0.05), run(gap_error=0.1)
    assert shifted.loss > exact.loss and bent.loss > exact.loss
    assert abs(float(shifted.logs["loss_fm"] - exact.logs["loss_fm"]) - 0.05 ** 2) < 2e-3
    # a map error that vanishes at gap 0 leaves the FM term alone: only the terminal term sees it
    assert torch.allclose(bent.logs["loss_fm"], exact.logs["loss_fm"], rtol=1e-12)
    assert float(bent.logs["loss_terminal"]) > 1e-4


@pytest.mark.parametrize("scaled", [True, False])
def test_guided_oracle_zero_terminal_residual(scaled):
    obj = tvm(guidance=2.0, scaled=scaled)
    oracle, means = obj.backbone, obj.backbone.means
    x, y, eps, t, s, s_prime, w = draws(4096, w=2.0)
    null = torch.arange(4096) % 10 == 0                                         # dropped: null label, w = 1
    y, w = torch.where(null, K, y), torch.where(null, 1.0, w).double()
    x_t = (1 - per_sample(t, x)) * x + per_sample(t, x) * eps
    field = lambda z, tau: guided_velocity(z, tau, means[y], means[K].expand_as(z), w, SIGMA)
    assert torch.allclose(oracle.flow_map(x_t, t, s, y, w), rk4_flow_map(field, x_t, t, s, 200), atol=1e-9)
    terms = obj.terms(x, y, eps, t, s, s_prime, w)
    assert float((terms.V - terms.u_terminal).abs().max()) < 1e-10
    assert float((terms.V - field(terms.X, s)).abs().max()) < 1e-10         # V is the guided velocity at X
    floor = SIGMA ** 2 / d(s_prime[~null], SIGMA)                            # β²w²·σ²/(w²·d) for w = 2
    assert abs(float((terms.fm[~null] - floor).mean())) < fm_floor_tolerance(floor, 16)


def test_targets_come_from_the_ema_teacher_with_the_unconditional_velocity():
    obj = tvm(error=0.3, guidance=2.0)
    obj.teacher.error = 0.0                                                    # exact teacher, wrong student
    means = obj.backbone.means
    x, y, eps, t, s, s_prime, w = draws(256, w=2.0)
    terms = obj.terms(x, y, eps, t, s, s_prime, w)
    x_sp = (1 - per_sample(s_prime, x)) * x + per_sample(s_prime, x) * eps
    v_null = gaussian_velocity(x_sp, s_prime, means[K].expand_as(x), SIGMA)
    assert torch.allclose(terms.v_cfg, 2.0 * (eps - x) + (1 - 2.0) * v_null, atol=1e-12)
    u_minus = guided_velocity(terms.X, s, means[y], means[K].expand_as(x), w, SIGMA)
    assert torch.allclose(terms.u_terminal, u_minus, atol=1e-12)


@pytest.mark.parametrize("scaled", [True, False])
def test_one_and_two_step_samples_have_the_data_law(scaled):
    for w, nfe in ((1.0, 1), (1.0, 2), (2.0, 1)):
        obj = tvm(guidance=w, scaled=scaled)
        means = obj.backbone.means
        out = sample(obj, list(range(4000)), nfe=nfe, batch_size=4000)
        mu_w = means[K] + w * (means[out.labels] - means[K])                  # guided: N(μ_w, σ²I)
        resid = (out.images.double() - mu_w).reshape(4000, -1)
        n = resid.shape[0]
        assert float(resid.mean(0).abs().max()) < 6 * SIGMA / n ** 0.5
        cov = resid.T @ resid / n - torch.outer(resid.mean(0), resid.mean(0))
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        assert float((cov - SIGMA ** 2 * eye).abs().max()) < 6 * SIGMA ** 2 * (2 / n) ** 0.5


def tiny_dit(seed: int = 0, perturb: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tvm_variant(DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=4))
    net = cfg.build(SPEC).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # leave the zero-init so every path (and ∂_sF) is non-trivial
        for p in net.parameters():
            if p.requires_grad:
                p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


def dit_inputs(n: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.rand(n, generator=gen, dtype=torch.float64) * 0.6 + 0.4
    s = t * torch.rand(n, generator=gen, dtype=torch.float64)
    s_prime = torch.rand(n, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, K] * (n // 4))
    w = torch.tensor([2.0, 1.5, 3.0, 1.0] * (n // 4), dtype=torch.float64)
    return x, y, eps, t, s, s_prime, w


@pytest.mark.parametrize("scaled", [True, False])
def test_terminal_velocity_matches_finite_differences_of_the_map(scaled):
    obj = TVM(tiny_dit(), TVMConfig(scaled=scaled), num_classes=K)
    x_t, y, _, t, s, _, w = dit_inputs()
    k = w if scaled else torch.ones_like(w)
    X, V = obj.terminal(x_t, t, s, y, 1 / w, k)
    h = 1e-5
    V_fd = (obj.terminal(x_t, t, s + h, y, 1 / w, k)[0] - obj.terminal(x_t, t, s - h, y, 1 / w, k)[0]) / (2 * h)
    assert torch.allclose(V, V_fd, rtol=1e-6, atol=1e-8)
    F = obj.backbone(x_t, t, s, y=y, guidance=1 / w)
    assert torch.allclose(X, x_t + per_sample((s - t) * k, x_t) * F, atol=1e-12)
    assert float((V - per_sample(k, F) * F).detach().abs().max()) > 1e-3               # ∂_sF really contributes


def test_detach_jvp_same_loss_no_gradient_through_the_tangent():
    inputs = dit_inputs()
    x, y, eps, t, s, s_prime, w = inputs
    x_t = (1 - per_sample(t, x)) * x + per_sample(t, x) * eps
    grads, losses = {}, {}
    for detach in (False, True):
        obj = TVM(tiny_dit(), TVMConfig(detach_jvp=detach), num_classes=K)
        net = obj.backbone
        terms = obj.terms(*inputs)
        losses[detach] = (terms.terminal.detach(), terms.fm.detach())
        params = [p for p in net.parameters() if p.requires_grad]
        grads[detach] = torch.cat([g.flatten() for g in torch.autograd.grad(terms.terminal.mean(), params)])
        # reference: the same terminal loss with ∂_sF from central differences (h = 1e-4), with or
        # without a graph through it
        F = lambda ss: net(x_t, t, ss, y=y, guidance=1 / w)
        with torch.no_grad() if detach else contextlib.nullcontext():
            dF = (F(s + 1e-4) - F(s - 1e-4)) / 2e-4
        V = per_sample(w, x) * (F(s) + per_sample(s - t, x) * dF)
        ref = mean_flat((per_sample(1 / w, x) * (V - terms.u_terminal)) ** 2).mean()
        ref_grad = torch.cat([g.flatten() for g in torch.autograd.grad(ref, params)])
        assert torch.allclose(grads[detach], ref_grad, rtol=1e-6, atol=1e-9)
    assert torch.equal(losses[False][0], losses[True][0]) and torch.equal(losses[False][1], losses[True][1])
    assert float((grads[False] - grads[True]).norm()) > 1e-3 * float(grads[False].norm())


def test_time_sampler_matches_the_official_statistics():
    times = gap_star(1_000_000, generator=torch.Generator().manual_seed(0))
    table = {   # docs/design/tvm.md §1.3: mean, 1 / 10 / 50 / 90 / 99 % quantiles
        "t": (0.687, 0.214, 0.398, 0.709, 0.941, 0.994), "s": (0.347, 0.052, 0.130, 0.326, 0.598, 0.779),
        "gap": (0.340, 0.042, 0.111, 0.310, 0.618, 0.820), "s_prime": (0.418, 0.062, 0.157, 0.402, 0.707, 0.873)}
    q = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99], dtype=torch.float64)
    for name, (mean, *quantiles) in table.items():
        v = getattr(times, name).double()
        assert abs(float(v.mean()) - mean) < 0.003, name
        sorted_v = v.sort().values
        got = sorted_v[(q * (v.numel() - 1)).round().long()]
        assert torch.allclose(got, torch.tensor(quantiles, dtype=torch.float64), atol=0.004), (name, got)
    assert abs(float((times.gap > 0.5).double().mean()) - 0.5 * math.erfc(0.8 / 2 ** 0.5)) < 0.002   # Φ(−0.8)
    assert bool((times.s <= 1 - times.gap + 1e-6).all()) and bool((times.t <= 1).all())
    assert bool((times.s <= times.t).all()) and bool((times.s >= 0).all())


def test_label_dropout_null_label_and_unit_guidance():
    calls = []

    class Spy(FlowMapOracle):
        def forward(self, x, t, s=None, y=None, guidance=None):
            calls.append((self, y, guidance, None if torch._C._functorch.is_functorch_wrapped_tensor(t) else (t, s)))
            return super().forward(x, t, s, y, guidance)

    obj = TVM(Spy(oracle_means(K), SIGMA), TVMConfig(guidance=2.0, label_dropout=0.1), num_classes=K).double()
    x, y = gaussian_batch(oracle_means(K), SIGMA, 100_000)
    out = obj(x, y, torch.Generator().manual_seed(0))
    (_, y_jvp, b_jvp, _), (teacher, y2, b2, (t2, s2)), (student, y_fm, b_fm, _) = calls
    assert teacher is obj.teacher and student is obj.backbone
    dropped = y_fm == K
    assert abs(float(dropped.double().mean()) - 0.1) < 0.005
    assert torch.equal(y_fm[~dropped], y[~dropped])
    assert bool((b_fm[dropped] == 1).all()) and bool((b_fm[~dropped] == 0.5).all())
    assert torch.equal(y_jvp, y_fm) and torch.equal(b_jvp, b_fm)
    assert torch.equal(y2, torch.cat([y_fm, torch.full_like(y_fm, K)])) and torch.equal(b2, torch.cat([b_fm, torch.ones_like(b_fm)]))
    assert torch.equal(t2, s2)                                                  # teacher at gap 0
    assert abs(float(out.logs["guidance_mean"]) - 1.9) < 0.005


def test_random_guidance_modes_and_config_checks():
    gen = torch.Generator().manual_seed(0)
    w = TVM(FlowMapOracle(oracle_means(K), SIGMA), TVMConfig(guidance=None, guidance_min=1.5, guidance_max=2.5), K).training_guidance(100_000, gen, torch.device("cpu"))
    assert 1.5 <= float(w.min()) and float(w.max()) <= 2.5 and abs(float(w.mean()) - 2.0) < 0.01
    beta = 1 / TVM(FlowMapOracle(oracle_means(K), SIGMA), TVMConfig(guidance=None), K).training_guidance(100_000, gen, torch.device("cpu"))
    assert 0 < float(beta.min()) and float(beta.max()) <= 1 and abs(float(beta.mean()) - 0.5) < 0.005
    for bad in ({"label_dropout": 1.5}, {"guidance": 0.0}, {"teacher_beta": 2.0}):
        with pytest.raises(ValueError, match="TVMConfig"):
            TVMConfig(**bad)
    for bad in ({"guidance_min": 1.0, "guidance_max": 2.0}, {"guidance": None, "guidance_min": 1.0},
                {"guidance": None, "guidance_min": 2.0, "guidance_max": 1.0}):
        with pytest.raises(ValueError, match="TVMConfig"):
            TVM(FlowMapOracle(oracle_means(K), SIGMA), TVMConfig(**bad), K)


def test_terminal_term_is_masked_where_s_equals_t_and_nonfinite_is_counted(monkeypatch):
    obj = tvm(guidance=1.0)
    obj.teacher.error = 0.1                                                    # terminal ≠ 0 even at s = t
    n = 64
    fake = gap_star(n, generator=torch.Generator().manual_seed(0))
    fake.s[: n // 2] = fake.t[: n // 2]
    monkeypatch.setattr(tvm_module, "gap_star", lambda *a, **k: fake)
    x, y = gaussian_batch(obj.backbone.means, SIGMA, n)
    x[5, 0, 0, 0] = float("nan")
    out = obj(x, y, torch.Generator().manual_seed(0))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)   # forward's first draw
    terms = obj.terms(x, y, eps, fake.t, fake.s, fake.s_prime, torch.ones(n, dtype=torch.float64))
    masked, ok = slice(0, n // 2), torch.isfinite(out.per_sample)
    assert torch.allclose(out.per_sample[n // 2:], (terms.terminal + terms.fm)[n // 2:])
    assert torch.allclose(out.per_sample[masked][ok[masked]], terms.fm[masked][ok[masked]])
    assert float(terms.terminal[masked][ok[masked]].min()) > 1e-4
    assert int(out.logs["nonfinite"]) == 1 and not torch.isfinite(out.loss) and not bool(ok[5])
    assert int(ok.sum()) == n - 1


def test_ema_teacher_update_and_state():
    obj = TVM(tiny_dit(), TVMConfig(), num_classes=K)
    assert obj.teacher_tracks() == [(obj.teacher, 0.99)]
    old = [p.clone() for p in obj.teacher.parameters()]
    with torch.no_grad():
        for p in obj.backbone.parameters():
            p.add_(torch.randn_like(p))
    obj.after_step()
    for p_old, p_new, p_online in zip(old, obj.teacher.parameters(), obj.backbone.parameters()):
        assert torch.allclose(p_new, 0.99 * p_old + 0.01 * p_online, rtol=1e-12, atol=1e-15)
    obj.train()
    assert not obj.teacher.training and obj.backbone.training
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    assert any(k.startswith("teacher.") for k in obj.state_dict())


def test_tiny_dit_smoke_grads_accumulation_and_sampling():
    torch.manual_seed(0)
    cfg = DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=4, gap_embedder=True, guidance_embedder=True)
    obj = TVM(tvm_variant(cfg).build(SPEC), TVMConfig(), num_classes=K)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % K
    out = obj(x, y, torch.Generator().manual_seed(0))
    out.loss.backward()
    for name, p in obj.backbone.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert torch.isfinite(out.loss) and int(out.logs["nonfinite"]) == 0
    for term in ("terminal", "fm"):
        shares = sum(out.logs[f"loss_{term}_t{i}"] for i in range(4))
        assert torch.allclose(shares, out.logs[f"loss_{term}"])
    assert torch.allclose(sum(out.logs[f"frac_t{i}"] for i in range(4)), torch.tensor(1.0))
    # per-sample terms do not depend on the rest of the batch (gradient accumulation)
    dobj = TVM(tiny_dit(), TVMConfig(), num_classes=K)
    inputs = dit_inputs(8)
    full = dobj.terms(*inputs)
    halves = [dobj.terms(*(v[i:i + 4] for v in inputs)) for i in (0, 4)]
    assert torch.allclose(full.terminal, torch.cat([h.terminal for h in halves]), rtol=1e-10)
    assert torch.allclose(full.fm, torch.cat([h.fm for h in halves]), rtol=1e-10)
    assert obj.flops_per_sample(1.0) == 11.0 and dobj.evaluations_per_step(None) == 1
    assert TVM(tiny_dit(), TVMConfig(detach_jvp=True), num_classes=K).flops_per_sample(1.0) == 9.0
    for nfe in (1, 2):
        res = sample(obj, list(range(5)), nfe=nfe)
        assert res.images.shape == (5, 1, 8, 8) and bool(torch.isfinite(res.images).all())
        assert res.evaluations == nfe
