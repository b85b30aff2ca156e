"""Activation checkpointing of the DiT, all blocks or the first ``train.checkpoint_blocks``: which blocks
are recomputed, gradients unchanged (plain and explicit-JVP calls), copies keep the choice, config
checks, and the objective-wide switch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint

from fewstep.backbones import DiT, DiTConfig
from fewstep.compiling import set_activation_checkpointing
from fewstep.config import ConfigError, apply_overrides
from fewstep.registry import recipes
from fewstep.train.checks import check_config

TVM = dict(norm="rmsnorm", qk_norm=True, mod_norm=True, gap_embedder=True, guidance_embedder=True)


def net4() -> DiT:
    torch.manual_seed(0)
    net = DiT(DiTConfig(name="dit-debug", depth=4, hidden_size=32, num_heads=2, patch_size=2, **TVM),
              in_channels=3, input_size=8, num_classes=5).double()
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return net


def run(net: DiT, tangents: bool) -> list[torch.Tensor]:
    """Loss gradients of every parameter for a fixed point (with an explicit JVP in s if ``tangents``)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    s, y, w = 0.5 * t, torch.tensor([1, 5]), torch.rand(2, generator=g, dtype=torch.float64)
    net.zero_grad()
    if tangents:
        out, tout = net(x, t, s, y=y, guidance=w, tangents=(None, None, torch.ones_like(s)))
        loss = out.square().sum() + tout.square().sum()
    else:
        loss = net(x, t, s, y=y, guidance=w).square().sum()
    loss.backward()
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("tangents", [False, True], ids=["forward", "jvp"])
@pytest.mark.parametrize("blocks, recomputed", [(None, 4), (2, 2), (0, 0)])
def test_only_the_chosen_blocks_are_recomputed_and_gradients_do_not_change(monkeypatch, tangents, blocks, recomputed):
    net = net4()
    reference = run(net, tangents)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    net.set_activation_checkpointing(True, blocks=blocks)
    grads = run(net, tangents)
    block_calls = [fn for fn in calls if any(fn is b for b in net.blocks)]
    assert len(block_calls) == recomputed and all(fn is b for fn, b in zip(block_calls, net.blocks))
    for a, b in zip(grads, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_copies_keep_the_choice_and_switching_off_stops_it():
    net = net4()
    net.set_activation_checkpointing(True, blocks=1)
    twin = copy.deepcopy(net)                      # EMA tracks and teachers are deep copies
    assert [b.recompute for b in twin.blocks] == [True, False, False, False] and twin.activation_checkpointing
    net.set_activation_checkpointing(False)
    assert not net.activation_checkpointing and all(b.recompute for b in net.blocks)
    with pytest.raises(ValueError, match="blocks must be ≥ 0"):
        net.set_activation_checkpointing(True, blocks=-1)


def test_config_checks():
    smoke = recipes.get("smoke")("tvm")
    with pytest.raises(ConfigError, match=r"set train.activation_checkpointing=true with it"):
        check_config(apply_overrides(smoke, ["train.checkpoint_blocks=2"]))
    with pytest.raises(ConfigError, match=r"train.checkpoint_blocks must be ≥ 0"):
        apply_overrides(smoke, ["train.checkpoint_blocks=-1"])
    check_config(apply_overrides(smoke, ["train.checkpoint_blocks=2", "train.activation_checkpointing=true"]))


def test_the_objective_switch_reaches_every_backbone_copy():
    from fewstep.build import build_objective, resolve
    from fewstep.contracts import DataSpec

    cfg = resolve(apply_overrides(recipes.get("smoke")("tvm"), ["backbone.depth=3"]))
    objective = build_objective(cfg, DataSpec(name="synthetic", channels=1, resolution=32, num_classes=10,
                                              num_items=4))
    set_activation_checkpointing(objective, blocks=2)
    nets = [m for m in objective.modules() if isinstance(m, DiT)]
    assert len(nets) == 3                          # online, teacher, EMA track
    for net in nets:
        assert net.activation_checkpointing and [b.recompute for b in net.blocks] == [True, True, False]
