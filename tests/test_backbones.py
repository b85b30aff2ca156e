"""The DiT family: shapes, parameter counts (docs/design/tvm.md §2.3), initialisation, JVP, errors, registry."""
import dataclasses
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from fewstep.backbones import DiT, DiTConfig, tvm_variant
from fewstep.backbones.dit import dit_b, dit_debug, dit_l, dit_s, dit_xl
from fewstep.backbones.layers import timestep_embedding
from fewstep.contracts import Backbone, DataSpec
from fewstep.kernels.attention import last_path
from fewstep.registry import backbones


def debug(**switches) -> DiTConfig:
    return dataclasses.replace(dit_debug(), **switches)


def inputs(model: DiT, batch: int = 2, seed: int = 0, dtype=torch.float32):
    """(x, t, s, y, cond) matching the model; s ≤ t, labels include the null one."""
    g = torch.Generator().manual_seed(seed)
    R, C = model.input_size, model.in_channels
    x = torch.randn(batch, C, R, R, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    s = t * torch.rand(batch, generator=g, dtype=dtype) if model.gap_embedder is not None else None
    y = torch.arange(batch) % (model.num_classes + 1) if model.num_classes else None
    cond = {"guidance": torch.rand(batch, generator=g, dtype=dtype)} if model.guidance_embedder else {}
    return x, t, s, y, cond


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Move every trainable parameter off its (partly zero) init, so all paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ---------------------------------------------------------------------------------------------------
# Shapes and dtypes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, channels, size, classes", [
    (debug(), 3, 16, 10),
    (debug(patch_size=4), 1, 32, 0),
    (debug(patch_size=8, norm="rmsnorm"), 4, 32, 1000),
    (tvm_variant(dit_debug()), 4, 8, 5),
    (dataclasses.replace(dit_s(), patch_size=4, qk_norm=True), 4, 16, 10),
], ids=["debug-p2", "debug-p4-uncond", "debug-p8-rms", "tvm-debug", "s-p4"])
def test_output_shape(cfg, channels, size, classes):
    model = DiT(cfg, channels, size, classes)
    assert isinstance(model, Backbone)
    x, t, s, y, cond = inputs(perturb(model), batch=3)
    out = model(x, t, s, y, **cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert last_path() == "sdpa"
    assert (model.in_channels, model.input_size, model.num_classes) == (channels, size, classes)


def test_output_dtype_follows_autocast():
    model = perturb(DiT(tvm_variant(dit_debug()), 4, 8, 5))
    x, t, s, y, cond = inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, s, y, **cond)
    assert out.dtype == torch.bfloat16
    ref = model(x, t, s, y, **cond)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_build_from_dataspec():
    data = DataSpec(name="toy", channels=1, resolution=32, num_classes=10, num_items=100)
    model = debug(patch_size=4).build(data)
    assert (model.in_channels, model.input_size, model.num_classes, model.grid) == (1, 32, 10, 8)
    assert model.y_embedder.num_embeddings == 11


def test_unpatchify_inverts_patch_order():
    model = DiT(debug(patch_size=4), 3, 16, 0)
    x = torch.randn(2, 3, 16, 16)
    tokens = x.reshape(2, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 48)  # (b, h·w, p·q·c)
    torch.testing.assert_close(model.unpatchify(tokens), x, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Parameter counts (docs/design/tvm.md §2.3: 4-channel 32×32 latents, 1000 classes), built on the meta device
# ---------------------------------------------------------------------------------------------------
def counts(cfg: DiTConfig, size: int = 32) -> tuple[float, float]:
    with torch.device("meta"):
        model = DiT(cfg, 4, size, 1000)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) / 1e6
    return trainable, frozen


@pytest.mark.parametrize("cfg, trainable", [
    (tvm_variant(dit_xl()), 678.07),
    (dataclasses.replace(tvm_variant(dit_xl()), guidance_embedder=False), 676.44),
    (tvm_variant(dit_l()), 460.45),
    (tvm_variant(dit_b()), 131.88),
    (tvm_variant(dit_s()), 33.35),
], ids=["xl-18h", "xl-no-guidance", "l", "b", "s"])
def test_parameter_counts(cfg, trainable):
    got, frozen = counts(cfg)
    assert got == pytest.approx(trainable, abs=0.005)
    assert frozen == pytest.approx({1152: 0.29, 1024: 0.26, 768: 0.20, 384: 0.10}[cfg.hidden_size], abs=0.005)


def test_xl_variant_has_18_heads_and_frozen_pos_embed_at_512px():
    cfg = tvm_variant(dit_xl())
    assert (cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.name) == (18, 64, "dit-xl")
    assert counts(cfg, size=64)[1] == pytest.approx(1.18, abs=0.005)
    model = DiT(debug(), 4, 8, 0)
    assert not model.pos_embed.requires_grad and list(model.buffers()) == []


def test_forward_flops_match_dit_paper():
    """DiT paper Table 4 reports multiply-adds ("Gflops"); forward_flops counts 2 per MAC."""
    for flavour, gmacs in [(dit_xl, 118.6), (dit_l, 80.7), (dit_b, 23.0), (dit_s, 6.06)]:
        with torch.device("meta"):
            model = DiT(flavour(), 4, 32, 1000)
        assert model.forward_flops(1) / 2e9 == pytest.approx(gmacs, rel=2e-3)
        assert model.forward_flops(8) == pytest.approx(8 * model.forward_flops(1))


# ---------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------
def sigma_max(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).double(), ord=2).item()


@pytest.mark.parametrize("time_init", ["normal", "spectral"])
def test_spectral_init(time_init):
    model = DiT(debug(init="spectral", time_init=time_init, qk_norm=True, gap_embedder=True,
                      guidance_embedder=True), 3, 8, 10)
    zero = {id(b.adaLN_modulation.linear) for b in model.blocks}
    zero |= {id(model.final_layer.adaLN_modulation.linear), id(model.final_layer.linear)}
    timed = {id(m) for e in model.time_embedders() for m in e.mlp}
    checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if id(m) in zero:
            assert not m.weight.any() and not m.bias.any(), name
        elif id(m) in timed and time_init == "normal":
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.05), name
        else:
            assert sigma_max(m.weight) == pytest.approx(1.0, abs=1e-4), name
            assert not m.bias.any(), name
            checked += 1
    assert checked == 1 + 4 * 2 + (6 if time_init == "spectral" else 0)   # patch conv, 4 per block
    assert model.y_embedder.weight.std().item() == pytest.approx(0.02, rel=0.15)   # 11×64 draws
    assert all(b.attn.q_norm.weight.eq(1).all() and b.attn.k_norm.weight.eq(1).all() for b in model.blocks)


def test_released_tvm_init_leaves_the_patch_embedding_unnormalised():
    """The released TVM code (training/dit.py) divides a rebound ``.data`` alias of the patch weight, so the
    parameter keeps xavier-normal (σ_max ≈ 1.45-1.55 for DiT-S on 1-channel 32² inputs), and its time/gap/guidance
    MLPs are N(0, 0.02); every other Linear is spectral as in ``init='spectral'``."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(dit_s(), init="spectral-released", time_init="normal", gap_embedder=True,
                              guidance_embedder=True)
    model, written = DiT(cfg, 1, 32, 10), DiT(dataclasses.replace(cfg, init="spectral"), 1, 32, 10)
    patch = model.x_embedder.weight.reshape(384, -1)                        # (D, C·p²) = (384, 4)
    assert patch.std().item() == pytest.approx((2 / (384 + 4)) ** 0.5, rel=0.05)      # xavier-normal
    assert 1.35 < sigma_max(patch) < 1.7 and sigma_max(written.x_embedder.weight) == pytest.approx(1.0, abs=1e-4)
    timed = {id(m) for e in model.time_embedders() for m in e.mlp if isinstance(m, nn.Linear)}
    assert len(timed) == 6
    zero = {id(b.adaLN_modulation.linear) for b in model.blocks}
    zero |= {id(model.final_layer.adaLN_modulation.linear), id(model.final_layer.linear)}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and id(m) in timed:
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.05) and not m.bias.any(), name
        elif isinstance(m, nn.Linear) and id(m) not in zero:
            assert sigma_max(m.weight) == pytest.approx(1.0, abs=1e-4) and not m.bias.any(), name
    with pytest.raises(ValueError, match="time_specinit never reaches the model"):
        dataclasses.replace(cfg, time_init="spectral")


def test_xavier_init_is_the_original_dit():
    model = DiT(debug(), 3, 8, 10)
    qkv = model.blocks[0].attn.qkv.weight                       # (3D, D): bound √(6 / (D + 3D))
    bound = (6 / (64 + 192)) ** 0.5
    assert qkv.abs().max().item() <= bound and qkv.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    conv = model.x_embedder.weight                              # flattened: fan_in 3·2·2, fan_out 64
    assert conv.abs().max().item() <= (6 / (12 + 64)) ** 0.5
    assert sigma_max(qkv) > 1.5                                 # not spectral


def test_fresh_model_outputs_exactly_zero():
    for cfg in (debug(), tvm_variant(dit_debug())):
        model = DiT(cfg, 3, 8, 10)
        x, t, s, y, cond = inputs(model)
        assert torch.equal(model(x, t, s, y, **cond), torch.zeros_like(x))


def test_mod_norm_gives_unit_rms_modulation():
    model = DiT(debug(mod_norm=True), 3, 8, 10)
    c = torch.randn(4, 64)
    block, final = model.blocks[0].adaLN_modulation, model.final_layer.adaLN_modulation
    assert torch.equal(block(c), torch.zeros(4, 6, 64))       # adaLN-Zero still starts at zero
    perturb(model)
    for head, n in ((block, 6), (final, 2)):
        m = head(c)
        assert m.shape == (4, n, 64)
        torch.testing.assert_close(m.square().mean(-1).sqrt(), torch.ones(4, n), atol=1e-4, rtol=0)  # eps 1e-6
    plain = perturb(DiT(debug(), 3, 8, 10)).blocks[0].adaLN_modulation(c)
    assert (plain.square().mean(-1).sqrt() - 1).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------
# Conditioning semantics
# ---------------------------------------------------------------------------------------------------
def test_one_time_call_skips_the_gap_embedder():
    model = perturb(DiT(tvm_variant(dit_debug()), 3, 8, 10))
    x, t, s, y, cond = inputs(model)
    one_time = model(x, t, None, y, **cond)
    assert not torch.allclose(one_time, model(x, t, s, y, **cond))
    with torch.no_grad():
        model.gap_embedder.mlp[2].weight.zero_()
        model.gap_embedder.mlp[2].bias.zero_()
    torch.testing.assert_close(model(x, t, s, y, **cond), one_time)


def test_gap_embedder_sees_only_t_minus_s():
    model = perturb(DiT(tvm_variant(dit_debug()), 3, 8, 10))
    with torch.no_grad():
        model.t_embedder.mlp[2].weight.zero_()
        model.t_embedder.mlp[2].bias.zero_()
    x, t, s, y, cond = inputs(model)
    torch.testing.assert_close(model(x, t + 0.25, s + 0.25, y, **cond), model(x, t, s, y, **cond))
    assert not torch.allclose(model(x, t + 0.25, s, y, **cond), model(x, t, s, y, **cond))


def test_sinusoid_and_position_embedding():
    t = torch.tensor([0.0, 0.3, 1.0])
    emb = timestep_embedding(t)
    assert emb.shape == (3, 256) and emb.dtype == torch.float64
    torch.testing.assert_close(emb[:, 0], torch.cos(t.double()))                     # cos half first
    torch.testing.assert_close(emb[:, 128 + 5], torch.sin(t.double() * 10000 ** (-5 / 128)))
    model = DiT(debug(), 3, 8, 0)                                                    # 4×4 tokens, D = 64
    pos = model.pos_embed[0]
    row, col = 2, 3
    token = pos[row * 4 + col]                      # halves: [sin, cos](col·ω), [sin, cos](row·ω)
    expected = torch.tensor([math.sin(col), math.cos(col), math.sin(row), math.cos(row)])
    torch.testing.assert_close(token[[0, 16, 32, 48]], expected)
    torch.testing.assert_close(token[1], torch.sin(torch.tensor(col * 10000 ** (-1 / 16))))


def test_null_label_and_time_scale():
    model = perturb(DiT(debug(), 3, 8, 10))
    x, t, _, _, _ = inputs(model)
    torch.testing.assert_close(model(x, t), model(x, t, y=torch.full((2,), 10)))
    scaled = DiT(debug(time_scale=1000.0), 3, 8, 10)
    scaled.load_state_dict(model.state_dict())
    torch.testing.assert_close(scaled(x, t / 1000), model(x, t))


# ---------------------------------------------------------------------------------------------------
# Forward-mode AD
# ---------------------------------------------------------------------------------------------------
def test_jvp_matches_finite_differences():
    model = perturb(DiT(tvm_variant(dit_debug()), 3, 8, 10)).double()
    x, t, s, y, cond = inputs(model, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    tangents = (torch.randn(x.shape, generator=g, dtype=torch.float64),
                torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64))

    def f(x, t, s):
        return model(x, t, s, y, **cond)

    out, tangent = torch.func.jvp(f, (x, t, s), tangents)
    assert last_path() == "explicit"
    h = 1e-6
    plus = f(*(p + h * v for p, v in zip((x, t, s), tangents)))
    minus = f(*(p - h * v for p, v in zip((x, t, s), tangents)))
    fd = (plus - minus) / (2 * h)
    assert ((tangent - fd).norm() / fd.norm()).item() < 1e-7
    torch.testing.assert_close(out, f(x, t, s), rtol=0, atol=1e-12)
    with fwAD.dual_level():
        dual = f(*(fwAD.make_dual(p, v) for p, v in zip((x, t, s), tangents)))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, tangent, rtol=0, atol=1e-10)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_gradients_flow_through_the_tangent(autocast):
    """TVM back-propagates through ∂_s F (tangents (0, 0, 1)); every trainable weight must get a
    gradient from a loss on the tangent alone (except the output bias, which ∂_s F does not see)."""
    model = perturb(DiT(tvm_variant(dit_debug()), 3, 8, 10))
    x, t, s, y, cond = inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, ds = torch.func.jvp(lambda s: model(x, t, s, y, **cond), (s,), (torch.ones_like(s),))
        assert last_path() == "explicit" and ds.dtype == (torch.bfloat16 if autocast else torch.float32)
        ds.float().square().mean().backward(retain_graph=True)
    for name, p in model.named_parameters():
        if p.requires_grad and name != "final_layer.linear.bias":
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if name != "y_embedder.weight":
                assert p.grad.abs().sum() > 0, name
    model.zero_grad()
    out.float().square().mean().backward()          # the primal output is differentiable too
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
def bad_calls():
    one_time = DiT(debug(), 3, 8, 5)
    tvm = DiT(tvm_variant(dit_debug()), 3, 8, 5)
    uncond = DiT(debug(), 3, 8, 0)
    x, t, s, y, g = torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2), torch.tensor([0, 5]), torch.rand(2)
    return [
        ("channels", lambda: one_time(torch.randn(2, 4, 8, 8), t),
         r"4 channels but this DiT expects 3.*\(2, 4, 8, 8\)"),
        ("resolution", lambda: one_time(torch.randn(2, 3, 16, 16), t), r"resolution 16×16 .* built for 8×8"),
        ("x-rank", lambda: one_time(torch.randn(3, 8, 8), t), r"\(B, 3, 8, 8\), got shape \(3, 8, 8\)"),
        ("t-shape", lambda: one_time(x, t[:, None]), r"t must be a float tensor of shape \(B,\) = \(2,\)"),
        ("guidance-float", lambda: tvm(x, t, s, y, guidance=0.5), r"guidance must be a float tensor .* got 0.5"),
        ("label-range", lambda: one_time(x, t, y=torch.tensor([0, 6])),
         r"\[0, 5\] \(5 = null\), got values in \[0, 6\]"),
        ("label-negative", lambda: one_time(x, t, y=torch.tensor([-1, 0])), r"got values in \[-1, 0\]"),
        ("label-dtype", lambda: one_time(x, t, y=torch.tensor([0.0, 1.0])), r"y must be an int64 tensor"),
        ("unconditional", lambda: uncond(x, t, y=y), r"unconditional \(num_classes=0\)"),
        ("two-time", lambda: one_time(x, t, s),
         r"two-time call F\(x, t, s\) on a one-time DiT \(gap_embedder=False\)"),
        ("missing-guidance", lambda: tvm(x, t, s, y), r"missing guidance="),
        ("unexpected-guidance", lambda: one_time(x, t, guidance=g), r"no guidance embedder"),
        ("unknown-cond", lambda: tvm(x, t, s, y, guidance=g, foo=g), r"unknown conditions \['foo'\]"),
        ("patch", lambda: DiT(debug(patch_size=4), 3, 10, 5), r"resolution 10 is not divisible by patch_size 4"),
        ("heads", lambda: debug(num_heads=5), r"hidden_size 64 must be divisible by num_heads 5"),
        ("norm", lambda: debug(norm="batchnorm"), r"norm must be 'layernorm' or 'rmsnorm'"),
    ]


@pytest.mark.parametrize("case", range(len(bad_calls())), ids=[c[0] for c in bad_calls()])
def test_bad_inputs_name_the_problem(case):
    _, call, message = bad_calls()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------
def test_flavours_are_registered_and_keep_switches():
    sizes = {"dit-debug": (2, 64, 4), "dit-s": (12, 384, 6), "dit-b": (12, 768, 12),
             "dit-l": (24, 1024, 16), "dit-xl": (28, 1152, 16)}
    assert set(sizes) <= set(backbones.names())
    base = tvm_variant(dit_debug())
    base = dataclasses.replace(base, patch_size=4, time_init="spectral", time_scale=1000.0)
    for name, (depth, width, heads) in sizes.items():
        fresh = backbones.get(name)(None)
        assert fresh == DiTConfig(name=name, depth=depth, hidden_size=width, num_heads=heads)
        kept = backbones.get(name)(base)
        assert (kept.name, kept.depth, kept.hidden_size, kept.num_heads) == (name, depth, width, heads)
        assert dataclasses.replace(kept, name=base.name, depth=2, hidden_size=64, num_heads=4) == base
    from fewstep.config import default_backbone_config
    assert default_backbone_config("dit-b", base).init == "spectral"


def test_compiles_without_graph_breaks():
    """Routing and input checks must stay traceable (``fullgraph=True`` fails on any graph break)."""
    model = perturb(DiT(tvm_variant(dit_debug()), 3, 8, 10))
    x, t, s, y, cond = inputs(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, t, s, y, **cond), model(x, t, s, y, **cond))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_tvm_jvp_step():
    """TVM's JVP pass on CUDA: DiT-S/2 (TVM variant) on 4×32×32 latents under bf16 autocast, tangent
    (0, 0, 1), backward through primal and tangent; compared with the same pass in fp32."""
    torch.manual_seed(0)
    model = perturb(DiT(tvm_variant(dit_s()), 4, 32, 1000), std=0.02).cuda()
    x, t, s, y, cond = (v.cuda() if torch.is_tensor(v) else v for v in inputs(model, batch=8))
    cond = {k: v.cuda() for k, v in cond.items()}

    def step(autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out, ds = torch.func.jvp(lambda s: model(x, t, s, y, **cond), (s,), (torch.ones_like(s),))
            (out.float().square().mean() + ds.float().square().mean()).backward()
        return out.float(), ds.float(), model.blocks[0].attn.qkv.weight.grad.clone()

    out32, ds32, g32 = step(False)
    out16, ds16, g16 = step(True)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out16, out32) < 5e-2 and rel(ds16, ds32) < 5e-2 and rel(g16, g32) < 1e-1
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused = model(x, t, s, y, **cond)                    # SDPA path
    assert last_path() == "sdpa" and rel(fused.float(), out32) < 5e-2


# ---------------------------------------------------------------------------------------------------
# Conditioning switches of the frontier objectives (docs/design/frontier.md §1)
# ---------------------------------------------------------------------------------------------------
def frontier(mode: str, aux: bool = False, conditions=("omega", "t_min"), **kw) -> DiT:
    cfg = debug(depth=3, gap_embedder=True, time_mode=mode, conditions=conditions, aux_head=aux, **kw)
    return perturb(DiT(cfg, 3, 8, 10)).double()


def frontier_inputs(model: DiT, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64)
    t = 0.2 + 0.8 * torch.rand(batch, generator=g, dtype=torch.float64)
    cond = {k: torch.rand(batch, generator=g, dtype=torch.float64) for k in model.config.conditions}
    return x, t, 0.5 * t, torch.tensor([0, 4, 10])[:batch], cond


@pytest.mark.parametrize("mode", ["t+h", "h", "t+s", "split"])
@pytest.mark.parametrize("aux", [False, True], ids=["main", "aux"])
def test_explicit_jvp_matches_torch_func_in_every_time_mode(mode, aux):
    from fewstep.objectives.jvp import backbone_jvp, functorch_jvp

    model = frontier(mode, aux)
    x, t, s, y, cond = frontier_inputs(model)
    g = torch.Generator().manual_seed(3)
    tangents = (torch.randn(x.shape, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64),
                torch.rand(3, generator=g, dtype=torch.float64))
    head = "both" if aux else "main"
    own = backbone_jvp(model, x, t, s, tangents, y=y, head=head, **cond)
    with functorch_jvp():
        ref = backbone_jvp(model, x, t, s, tangents, y=y, head=head, **cond)
    assert len(own) == (3 if aux else 2)
    for a, b in zip(own, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    h = 1e-6
    fd = (model(x + h * tangents[0], t + h * tangents[1], s + h * tangents[2], y, **cond)
          - model(x - h * tangents[0], t - h * tangents[1], s - h * tangents[2], y, **cond)) / (2 * h)
    assert ((own[1] - fd).norm() / fd.norm()).item() < 1e-7
    if aux:
        torch.testing.assert_close(own[2], model(x, t, s, y, head="aux", **cond), rtol=0, atol=1e-12)


def test_time_modes_embed_what_they_say():
    x, t, s, y, cond = frontier_inputs(frontier("h"))
    gap_only = frontier("h")
    assert gap_only.t_embedder is None
    torch.testing.assert_close(gap_only(x, t + 0.1, s + 0.1, y, **cond), gap_only(x, t, s, y, **cond))   # only t − s
    torch.testing.assert_close(gap_only(x, t, None, y, **cond), gap_only(x, t, t, y, **cond))            # h = 0
    both = frontier("t+s")
    torch.testing.assert_close(both(x, t, None, y, **cond), both(x, t, t, y, **cond))                    # s = t
    assert not torch.allclose(both(x, t + 0.1, s + 0.1, y, **cond), both(x, t, s, y, **cond))
    split = frontier("split", split_depth=2)
    assert split.gap_embedder is None and split.split == 2
    one_time = DiT(debug(depth=3, conditions=("omega", "t_min")), 3, 8, 10).double()
    one_time.load_state_dict(split.state_dict())                                     # the same parameters
    assert torch.equal(split(x, t, t.clone(), y, **cond), one_time(x, t, None, y, **cond))
    with torch.no_grad():   # s reaches only block 2 and the final layer: silence them and s is gone
        split.blocks[2].adaLN_modulation.linear.weight.zero_()
        split.final_layer.adaLN_modulation.linear.weight.zero_()
    assert torch.equal(split(x, t, s, y, **cond), split(x, t, t, y, **cond))
    assert DiT(debug(depth=28, gap_embedder=True, time_mode="split"), 3, 8, 0).split == 20   # DMF's 20 of 28


def test_conditions_and_aux_head_add_exactly_their_parameters():
    base = DiT(debug(depth=3), 3, 8, 10)
    rich = DiT(debug(depth=3, conditions=("omega", "t_min", "t_max"), aux_head=True, aux_head_depth=2), 3, 8, 10)
    count = lambda m: sum(p.numel() for p in m.parameters())                                     # noqa: E731
    per_embedder = count(base.t_embedder)
    extra = 3 * per_embedder + 2 * count(base.blocks[0]) + count(base.final_layer)
    assert count(rich) - count(base) == extra
    assert rich.forward_flops(1) > base.forward_flops(1)
    assert DiT(debug(depth=12, aux_head=True), 3, 8, 0).head_depth == 2                  # depth // 6
    x, t, s, y, cond = frontier_inputs(frontier("t+h", aux=True))
    model = frontier("t+h", aux=True)
    main, aux = model(x, t, s, y, head="both", **cond)
    torch.testing.assert_close(main, model(x, t, s, y, **cond), rtol=0, atol=0)
    with torch.no_grad():
        model.aux_final_layer.linear.weight.add_(1.0)                                     # the heads are separate
    assert torch.equal(model(x, t, s, y, **cond), main) and not torch.allclose(model(x, t, s, y, head="aux", **cond), aux)


def frontier_bad_calls():
    gap = DiT(debug(gap_embedder=True, time_mode="h", conditions=("omega",)), 3, 8, 5)
    plain = DiT(debug(), 3, 8, 5)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    return [
        ("missing-condition", lambda: gap(x, t, t), r"missing omega=: this DiT embeds the extra conditions \['omega'\]"),
        ("unknown-condition", lambda: gap(x, t, t, omega=t, beta=t), r"unknown conditions \['beta'\]; the DiT accepts omega="),
        ("aux-without-head", lambda: plain(x, t, head="aux"), r"head='aux' needs an auxiliary head: build with aux_head=true"),
        ("bad-head", lambda: plain(x, t, head="v"), r"head must be 'main', 'aux' or 'both', got 'v'"),
        ("gap-only-needs-gap", lambda: DiT(debug(time_mode="h"), 3, 8, 5), r"time_mode 'h' embeds only the gap t − s; set gap_embedder=true"),
        ("split-too-deep", lambda: DiT(debug(time_mode="split", gap_embedder=True, split_depth=5), 3, 8, 5),
         r"split_depth 5 exceeds the depth 2"),
        ("mode", lambda: debug(time_mode="t-s"), r"time_mode must be one of t\+h, h, t\+s, split"),
        ("condition-name", lambda: debug(conditions=("guidance",)), r"conditions must be distinct identifiers"),
    ]


@pytest.mark.parametrize("case", range(len(frontier_bad_calls())), ids=[c[0] for c in frontier_bad_calls()])
def test_frontier_switches_fail_with_a_clear_message(case):
    _, call, message = frontier_bad_calls()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        call()
