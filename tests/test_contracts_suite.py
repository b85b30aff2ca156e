"""The contract suite (fewstep.testing) over every in-tree objective and backbone, and on deliberately
broken ones: each breakage must fail with a message that names it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fewstep.backbones.dit import DiTConfig
from fewstep.backbones.mlp import MLP, MLPConfig
from fewstep.config import BackboneConfig
from fewstep.contracts import DataSpec, LossOutput
from fewstep.objectives.fm import FlowMatching, FlowMatchingConfig
from fewstep.registry import backbones, datasets, objectives
from fewstep.testing import (BackboneContract, ContractError, ObjectiveContract, check_backbone, check_determinism,
                             check_gradients, check_inputs_untouched, check_loss, check_objective,
                             check_objective_config, check_sampler, check_save_load, check_training_step,
                             tiny_dit, tiny_objective)

POINTS = DataSpec(name="points", channels=2, resolution=1, num_classes=4, num_items=64, kind="points")
UNCONDITIONAL = DataSpec(name="rgb", channels=3, resolution=8, num_classes=0, num_items=64)


def tiny_mlp() -> MLPConfig:
    return MLPConfig(name="mlp", width=32, depth=1)


# ---------------------------------------------------------------------------------------------------
# Every in-tree objective passes (class-conditional tiny DiT; some also on points and unconditional)
# ---------------------------------------------------------------------------------------------------
class TestFM(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("fm", guidance=2.0)       # CFG at sampling: 2 evaluations per step


class TestTVM(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("tvm")


class TestMeanFlow(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("meanflow")


class TestSCM(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("scm", warmup_kimg=0.004)   # tangent warm-up ends within the 2-step runs


class TestECT(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("ect", stage_kimg=0.004)


class TestTVMOnPoints(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("tvm", backbone=tiny_mlp(), spec=POINTS)


class TestMeanFlowUnconditional(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("meanflow", spec=UNCONDITIONAL, ema_betas={})


class TestIMF(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("imf")                      # auxiliary v-head, guidance inputs


class TestIMFBoundaryOnPoints(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("imf", v_source="boundary", backbone=tiny_mlp(), spec=POINTS)


class TestAlphaFlow(ObjectiveContract):
    def make_objective(self):                            # α = 1 at the start of the default curriculum
        return tiny_objective("alphaflow")


class TestAlphaFlowIntermediate(ObjectiveContract):
    def make_objective(self):                            # 0 < α < 1: the extra no-grad forward
        return tiny_objective("alphaflow", alpha_constant=0.5)


class TestAlphaFlowMeanFlowPhase(ObjectiveContract):
    def make_objective(self):                            # α = 0: the JVP phase; consistency sampler
        return tiny_objective("alphaflow", alpha_constant=0.0, sampler="consistency")


class TestDMF(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("dmf")


class TestDMFOnPointsRestart(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("dmf", sampler="restart", backbone=MLPConfig(name="mlp", width=32, depth=3), spec=POINTS)


class TestShortcut(ObjectiveContract):
    def make_objective(self):
        return tiny_objective("shortcut", guidance=1.5, levels=3)


def test_every_in_tree_objective_has_a_contract_class():
    classes = (TestFM, TestTVM, TestMeanFlow, TestSCM, TestECT, TestIMF, TestAlphaFlow, TestDMF, TestShortcut)
    covered = {type(cls().make_objective()).Config().name for cls in classes}
    in_tree = {e.name for e in objectives.entries() if e.source == "fewstep"}
    assert in_tree <= covered, f"add a contract test class for {sorted(in_tree - covered)}"


# ---------------------------------------------------------------------------------------------------
# Every in-tree backbone passes, under every embedder switch
# ---------------------------------------------------------------------------------------------------
class TestDiT(BackboneContract):
    def make_config(self):
        return tiny_dit()


class TestDiTTVMVariant(BackboneContract):
    spec = UNCONDITIONAL

    def make_config(self):
        return tiny_dit(norm="rmsnorm", qk_norm=True, mod_norm=True, init="spectral", time_scale=1000.0)


class TestMLP(BackboneContract):
    spec = POINTS

    def make_config(self):
        return tiny_mlp()


class TestDiTGapOnlyWithConditionsAndAuxHead(BackboneContract):
    def make_config(self):                               # iMF's network: h only, ω/t_min/t_max, v-head
        return tiny_dit(depth=2, time_mode="h", gap_embedder=True, conditions=("omega", "t_min", "t_max"),
                        aux_head=True)


class TestDiTTwoAbsoluteTimes(BackboneContract):
    def make_config(self):                               # α-Flow's network: t and s
        return tiny_dit(time_mode="t+s")


class TestDiTSplit(BackboneContract):
    def make_config(self):                               # DMF's network: t for block 0, s for block 1
        return tiny_dit(depth=2, time_mode="split", split_depth=1)


class TestMLPFrontierModes(BackboneContract):
    spec = POINTS

    def make_config(self):
        return MLPConfig(name="mlp", width=32, depth=2, time_mode="split", conditions=("omega",), aux_head=True)


def test_every_in_tree_backbone_family_has_a_contract_class():
    families = {type(backbones.get(e.name)(None)) for e in backbones.entries() if e.source == "fewstep"}
    assert families <= {DiTConfig, MLPConfig}


# ---------------------------------------------------------------------------------------------------
# Broken objectives fail with messages that say what is wrong
# ---------------------------------------------------------------------------------------------------
def broken(name: str, **methods):
    """A FlowMatching subclass registered under ``name`` (its own Config) with some methods replaced."""
    config = dataclasses.make_dataclass(f"{name}Config", [("name", str, dataclasses.field(default=name))],
                                        bases=(FlowMatchingConfig,), kw_only=True)
    return type(name, (FlowMatching,), {"Config": config, **methods})


def _fm_forward(self, x, y, generator=None, nimg=0):
    return FlowMatching.forward(self, x, y, generator, nimg)


def wrong_shape_forward(self, x, y, generator=None, nimg=0):
    out = _fm_forward(self, x, y, generator, nimg)
    return LossOutput(out.loss, out.per_sample[:, None], out.logs)


def detached_forward(self, x, y, generator=None, nimg=0):
    out = _fm_forward(self, x, y, generator, nimg)
    return LossOutput(out.loss.detach(), out.per_sample, out.logs)


def nan_forward(self, x, y, generator=None, nimg=0):
    out = _fm_forward(self, x, y, generator, nimg)
    gap = out.per_sample - out.per_sample                        # like t − s at s = t
    per = gap / gap                                              # 0/0
    return LossOutput(out.loss * per.mean(), per, out.logs)


def global_rng_forward(self, x, y, generator=None, nimg=0):
    return _fm_forward(self, x, y, None, nimg)                   # torch.randn without generator=


def inplace_forward(self, x, y, generator=None, nimg=0):
    x.clamp_(-1, 1)                                              # values unchanged, still in place
    return _fm_forward(self, x, y, generator, nimg)


def wrong_shape_step(self, x, t, s, cond, net=None, noise=None):
    return FlowMatching.step(self, x, t, s, cond, net, noise).flatten(1)


def batch_mixing_step(self, x, t, s, cond, net=None, noise=None):
    out = FlowMatching.step(self, x, t, s, cond, net, noise)
    return out - out.mean(0, keepdim=True)


def ignores_s_forward(self, x, y, generator=None, nimg=0):   # a two-time objective that never feeds s
    t = torch.rand(x.shape[0], generator=generator, device=x.device)
    eps = torch.randn(x.shape, generator=generator, device=x.device)
    v = self.backbone((1 - t[:, None, None, None]) * x + t[:, None, None, None] * eps, t, None, y=y)
    per = ((v - (eps - x)) ** 2).flatten(1).mean(1)
    return LossOutput(per.mean(), per.detach())


@pytest.mark.parametrize("cls, check, message", [
    (broken("wrong-shape", forward=wrong_shape_forward), check_loss,
     r"per_sample must be a float tensor of shape \(B,\) = \(4,\), got shape \(4, 1\)"),
    (broken("detached", forward=detached_forward), check_gradients, "the loss has no gradient graph: it was detached"),
    (broken("nan", forward=nan_forward), check_loss, r"loss is nan on a random batch: not finite"),
    (broken("bad-progress-log", progress_log="loss_raw"), check_loss,
     r"progress_log is 'loss_raw', which the logs do not have \(logged: "),
    (broken("global-rng", forward=global_rng_forward), check_determinism,
     "same generator seed gave different losses.*never the global RNG"),
    (broken("in-place", forward=inplace_forward), check_inputs_untouched, "forward modified its input 'x' in place"),
    (broken("step-shape", step=wrong_shape_step), check_sampler,
     r"step\(1 → 0.5\) must return a float tensor shaped like x \(3, 1, 8, 8\), got shape \(3, 64\)"),
    (broken("batch-mixing", step=batch_mixing_step), check_sampler, "changes with the other samples in its batch"),
])
def test_broken_objectives_fail_with_a_clear_message(cls, check, message):
    with pytest.raises(ContractError, match=message):
        check(tiny_objective(cls))


def test_unfed_embedder_is_named():
    cls = broken("no-gap", forward=ignores_s_forward, needs=dataclasses.replace(FlowMatching.needs, time_inputs=2))
    with pytest.raises(ContractError, match=r"get no gradient .*gap_embedder\.mlp\.0\.weight"):
        check_gradients(tiny_objective(cls))


def test_bad_declarations_are_named():
    no_default = dataclasses.make_dataclass("C", [("name", str, dataclasses.field(default="x")), ("k", int)],
                                            bases=(FlowMatchingConfig,), kw_only=True)
    with pytest.raises(ContractError, match=r"Config fields \['k'\] have no default"):
        check_objective_config(type("NoDefault", (FlowMatching,), {"Config": no_default}))
    with pytest.raises(ContractError, match="registered to fewstep.objectives.fm.FlowMatching"):
        tiny_objective(type("Impostor", (FlowMatching,), {}))      # Config name "fm" belongs to FlowMatching
    forgetful = broken("forgetful", needs=dataclasses.replace(FlowMatching.needs, teacher="ema"))
    with pytest.raises(ContractError, match=r"needs.teacher is 'ema' but teacher_tracks\(\) returns no"):
        check_training_step(tiny_objective(forgetful))


def test_non_persistent_state_fails_the_round_trip():
    def init(self, backbone, config, num_classes, ema_betas=None):
        FlowMatching.__init__(self, backbone, config, num_classes, ema_betas)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def step(self, x, t, s, cond, net=None, noise=None):
        return FlowMatching.step(self, x, t, s, cond, net, noise) * self.scale

    with pytest.raises(ContractError, match="samples differently with online weights.*persistent buffer"):
        check_save_load(tiny_objective(broken("volatile", __init__=init, step=step)))


def test_check_objective_runs_every_check_and_cleans_up():
    check_objective(tiny_objective(broken("fm-on-points"), backbone=tiny_mlp(), spec=POINTS))
    # the class under test and the trainer's random dataset were registered only for the checks
    assert "fm-on-points" not in objectives and "fewstep-contract-data" not in datasets
    with pytest.raises(ContractError, match="loss has no gradient graph"):
        check_objective(tiny_objective(broken("detached-too", forward=detached_forward)), skip=("trainer",))


# ---------------------------------------------------------------------------------------------------
# Broken backbones
# ---------------------------------------------------------------------------------------------------
class _Identity(torch.autograd.Function):   # no forward-AD rule: torch.func.jvp cannot go through it
    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return g


def broken_mlp(name: str, forward) -> BackboneConfig:
    net_cls = type(f"{name}Net", (MLP,), {"forward": forward})
    cfg_cls = dataclasses.make_dataclass(f"{name}Config", [("name", str, dataclasses.field(default=name))],
                                         bases=(MLPConfig,), kw_only=True,
                                         namespace={"build": lambda self, d: net_cls(self, d.channels, d.resolution, d.num_classes)})
    return cfg_cls(width=16, depth=1)


def _mlp(self, x, t, s=None, y=None, **cond):
    return MLP.forward(self, x, t, s, y, **cond)


@pytest.mark.parametrize("forward, message", [
    (lambda self, x, t, s=None, y=None, **c: _mlp(self, x.mul_(1.0), t, s, y, **c), "modified its input 'x' in place"),
    (lambda self, x, t, s=None, y=None, **c: _mlp(self, x, t, s, y, **c)[:, :1], r"must return a tensor shaped like x"),
    (lambda self, x, t, s=None, y=None, **c: _mlp(self, x, t, s, y, **c) + _mlp(self, x, t, s, y, **c).mean(0),
     "output row 1 changes with the other rows"),
    (lambda self, x, t, s=None, y=None, **c: _Identity.apply(_mlp(self, x, t, s, y, **c)), "torch.func.jvp through the backbone failed"),
    (lambda self, x, t, s=None, y=None, **c: _mlp(self, x, t.detach(), s, y, **c), "the JVP differs from central differences"),
])
def test_broken_backbones_fail_with_a_clear_message(forward, message):
    with pytest.raises(ContractError, match=message):
        check_backbone(broken_mlp("broken-mlp", forward), POINTS, skip=("save_load",))


def test_backbone_with_running_statistics_is_impure():
    def forward(self, x, t, s=None, y=None, **c):
        self.calls += 1
        return _mlp(self, x, t, s, y, **c)

    def build(self, d):
        net = MLP(self, d.channels, d.resolution, d.num_classes)
        net.forward = forward.__get__(net)
        net.register_buffer("calls", torch.zeros(()))
        return net

    cfg = dataclasses.make_dataclass("CountingConfig", [("name", str, dataclasses.field(default="counting"))],
                                     bases=(MLPConfig,), kw_only=True, namespace={"build": build})(width=16, depth=1)
    with pytest.raises(ContractError, match=r"modified its own parameters/buffers \['calls'\]"):
        check_backbone(cfg, POINTS, skip=("gradients", "jvp", "save_load"))


def test_a_wrong_tangent_rule_is_caught(monkeypatch):
    """Backbones that set supports_tangents must give torch.func.jvp's JVP from forward(..., tangents=)."""
    import fewstep.backbones.dit_tangents as dit_tangents
    from fewstep.testing import TINY_SPEC, check_backbone_jvp, tiny_dit

    cfg = tiny_dit(gap_embedder=True)
    net = cfg.build(TINY_SPEC)
    check_backbone_jvp(net, cfg, TINY_SPEC)
    right = dit_tangents.gelu_tanh_jvp

    def wrong(x, tx):
        out, tout = right(x, tx)
        return out, None if tout is None else tout * 1.01

    monkeypatch.setattr(dit_tangents, "gelu_tanh_jvp", wrong)
    with pytest.raises(ContractError, match="differs from torch.func.jvp"):
        check_backbone_jvp(net, cfg, TINY_SPEC)
