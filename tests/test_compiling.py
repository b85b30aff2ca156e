"""``train.compile_tuning``: the Inductor option reaches every compiled region, and the settings that
cannot go together are refused with the reason."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fewstep.bench.step import StepResult, summary
from fewstep.build import build_objective, resolve
from fewstep.cli import app
from fewstep.compiling import compile_objective
from fewstep.config import ConfigError, apply_overrides
from fewstep.contracts import DataSpec
from fewstep.registry import recipes
from fewstep.train.checks import check_config


def objective(name="tvm"):
    cfg = resolve(apply_overrides(recipes.get("smoke")(name), ["backbone.depth=2"]))
    return build_objective(cfg, DataSpec(name="synthetic", channels=1, resolution=32, num_classes=10, num_items=4))


@pytest.fixture
def calls(monkeypatch):
    """Record torch.compile's keyword arguments (no compilation happens)."""
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    return seen


@pytest.mark.parametrize("tuning", [False, True])
def test_every_region_gets_the_tuning_option(calls, tuning):
    obj = objective()
    count = compile_objective(obj, tuning=tuning)
    assert count == len(calls) == 2 * 3                # two blocks of the online net, teacher and EMA track
    expected = {"options": {"coordinate_descent_tuning": True}} if tuning else {"mode": None}
    assert all(kw == {"dynamic": False, **expected} for kw in calls), calls


def test_tuning_and_a_mode_are_refused_together(calls):
    with pytest.raises(ValueError, match="torch.compile does not take together with mode='max-autotune"):
        compile_objective(nn.ModuleDict({"o": objective("fm")}), mode="max-autotune-no-cudagraphs", tuning=True)
    assert calls == []


def test_the_config_needs_compile_for_tuning():
    smoke = recipes.get("smoke")("tvm")
    with pytest.raises(ConfigError, match="set train.compile=true with it"):
        check_config(apply_overrides(smoke, ["train.compile_tuning=true"]))
    check_config(apply_overrides(smoke, ["train.compile_tuning=true", "train.compile=true"]))


def test_bench_lines_say_tuned():
    r = StepResult(objective="tvm", batch=32, compiled=True, checkpointing=False, s_per_step=0.32,
                   images_per_s=100.0, peak_gib=47.9, kernels_per_step=None, flops_per_step=1e15, mfu=None,
                   tuned=True)
    assert "batch 32 compiled (tuned): 0.3200 s/step" in summary([r], None)[0]


def test_bench_step_refuses_tuning_without_compile(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # never start a benchmark on a GPU here
    out = CliRunner().invoke(app, ["bench", "step", "--set", "train.compile_tuning=true"])
    assert out.exit_code == 2 and "train.compile_tuning tunes the kernels torch.compile generates: add --compile" \
        in " ".join(out.output.split())
    tuned = CliRunner().invoke(app, ["bench", "step", "--compile", "--set", "train.compile_tuning=true"])
    assert tuned.exit_code == 2 and "needs a CUDA GPU" in tuned.output   # the arguments pass; only the GPU lacks


class _Traced(Exception):
    """Raised by the recording backend instead of running the graph."""


def test_a_blocks_jvp_on_the_kernel_path_compiles_as_one_graph():
    """The JVP attention's routing (device, shapes, vmap check) must trace: a graph break there would
    split every compiled block at its attention on a GPU. On the CPU ``kernel_attention`` takes the
    GPU route; ``fullgraph=True`` refuses any break, and the recording backend never runs the graph."""
    from fewstep.backbones import DiT, DiTConfig
    from fewstep.kernels.attention import kernel_attention

    torch.manual_seed(0)
    net = DiT(DiTConfig(name="dit-debug", depth=1, hidden_size=32, num_heads=2, patch_size=2), in_channels=3,
              input_size=8, num_classes=5)
    block = net.blocks[0]
    x, tx, c, tc = torch.randn(2, 16, 32), torch.randn(2, 16, 32), torch.randn(2, 32), torch.randn(2, 32)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise _Traced
        return run

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=record, fullgraph=True, dynamic=False)
    with kernel_attention(), pytest.raises(_Traced):
        compiled(x, c, tx, tc)
    torch._dynamo.reset()
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert "fewstep.jvp_attention.default" in targets, sorted(targets)
