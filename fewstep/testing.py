"""The contract test-suite for objectives and backbones: run it in a plugin's own tests.

Two ways in. pytest mixins (tests are methods named ``test_*``; the mixin itself is not collected)::

    from fewstep.testing import ObjectiveContract, BackboneContract, tiny_objective

    class TestXPrediction(ObjectiveContract):
        def make_objective(self):
            return tiny_objective("xpred")          # or any Objective instance on a small backbone

Or plain functions, each raising :class:`ContractError` (an ``AssertionError``) whose message names the
component, the rule and the fix: :func:`check_objective` (all objective checks) and
:func:`check_backbone` (all backbone checks), or one check at a time (``check_loss`` …).

Objective checks: the config and ``needs`` declarations; loss shapes, dtypes and finiteness; gradients
reach every trainable parameter (on randomly perturbed weights, so zero-initialised layers do not hide
a cut graph); determinism under a fixed generator seed whatever the global RNG; inputs never modified
in place; the sampler's schedule and step shapes and per-seed independence; the checkpoint round trip
through :func:`fewstep.checkpoints.save_checkpoint` and :func:`fewstep.build.load_objective`; one
optimizer step with ``after_step`` (EMA teachers move, frozen copies stay frozen); and two steps of the
real trainer on CPU. Backbone checks: config round trip, output shape for every embedder switch, gradients,
purity (no in-place op on inputs, parameters or buffers; batch rows independent), forward-mode AD
(``torch.func.jvp`` in float64 against central differences) and the state-dict round trip.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from fewstep.config import (BackboneConfig, DataConfig, ObjectiveConfig, RunConfig, SampleConfig, TrainConfig,
                            replace_fields, to_dict)
from fewstep.contracts import Condition, DataSpec, LossOutput, Objective, ObjectiveNeeds
from fewstep.registry import RegistryError, backbones, datasets, objectives

TINY_SPEC = DataSpec(name="contract", channels=1, resolution=8, num_classes=3, num_items=64)
"""1×8×8 items, 3 classes: the default data of :func:`tiny_objective`."""


class ContractError(AssertionError):
    """A component breaks the fewstep contract; the message says which rule and how to fix it."""


def _fail(who: Any, message: str) -> None:
    name = who if isinstance(who, str) else (who.__name__ if isinstance(who, type) else type(who).__name__)
    raise ContractError(f"{name}: {message}")


# ---------------------------------------------------------------------------------------------------
# Building tiny components
# ---------------------------------------------------------------------------------------------------
def tiny_dit(**fields: Any) -> BackboneConfig:
    """A one-block, width-32, patch-4 DiT config (a few thousand parameters; milliseconds on a CPU)."""
    from fewstep.backbones.dit import DiTConfig

    return DiTConfig(**{"name": "dit-debug", "depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 4, **fields})


def tiny_objective(objective: str | type[Objective], *, spec: DataSpec = TINY_SPEC,
                   backbone: BackboneConfig | None = None, ema_betas: dict[str, float] | None = None,
                   seed: int = 0, **fields: Any) -> Objective:
    """An objective (registered name or class) with its default config and ``fields`` replaced, on a
    tiny backbone (default :func:`tiny_dit`) given the embedders it needs, as the trainer builds it."""
    from fewstep.build import resolve

    cls = objectives.get(objective) if isinstance(objective, str) else objective
    config = replace_fields(cls.Config(), fields, "objective") if fields else cls.Config()
    ema_betas = {"ema": 0.9} if ema_betas is None else ema_betas
    cfg = RunConfig(recipe="contract", objective=config, backbone=backbone or tiny_dit(),
                    train=TrainConfig(ema_betas=ema_betas))
    with _registered(cls):
        cfg = resolve(cfg)
    torch.manual_seed(seed)
    return cls(cfg.backbone.build(spec), config, num_classes=spec.num_classes, ema_betas=ema_betas)


@contextlib.contextmanager
def _registered(cls: type[Objective], name: str | None = None) -> Iterator[str]:
    """Make ``cls`` findable under ``name`` (default: its config's) for the block (registering it if needed)."""
    name = name or cls.Config().name
    try:
        current = objectives.get(name)
    except RegistryError:
        current = None
    if current is not None and current is not cls:
        _fail(cls, f"its Config.name {name!r} is registered to {current.__module__}.{current.__qualname__}; "
                   f"give the Config the objective's own name (the entry-point name)")
    if current is None:
        objectives.add(name, cls, source="fewstep.testing")
    try:
        yield name
    finally:
        if current is None:
            objectives.remove(name)


@contextlib.contextmanager
def _registered_backbone(config: BackboneConfig) -> Iterator[None]:
    if config.name in backbones:
        yield
        return
    backbones.add(config.name, lambda base=None: dataclasses.replace(config), source="fewstep.testing")
    try:
        yield
    finally:
        backbones.remove(config.name)


class _RandomData:
    """A dataset of ``spec.num_items`` random items (uniform in [−1, 1]) for trainer runs."""

    def __init__(self, spec: DataSpec, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.spec = spec
        self.x = torch.rand((spec.num_items, spec.channels, spec.resolution, spec.resolution), generator=gen) * 2 - 1
        self.y = torch.randint(max(spec.num_classes, 1), (spec.num_items,), generator=gen)

    def __len__(self) -> int:
        return self.spec.num_items

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def get_batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[idx], self.y[idx]


def spec_of(objective: Objective, num_items: int = 64) -> DataSpec:
    """The data spec an objective was built for (from its backbone's size and its classes)."""
    net = objective.backbone
    kind = "points" if net.input_size == 1 else "pixels"
    return DataSpec(name="contract", channels=net.in_channels, resolution=net.input_size,
                    num_classes=objective.num_classes, num_items=num_items, kind=kind)


def _batch(spec: DataSpec, batch: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, spec.channels, spec.resolution, spec.resolution), generator=gen) * 2 - 1
    y = torch.randint(spec.num_classes, (batch,), generator=gen) if spec.num_classes else None
    return x.to(device), (y.to(device) if y is not None else None)


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def perturbed(module: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """A deep copy whose trainable parameters get N(0, scale²) noise added (so zero-initialised output
    layers no longer zero every upstream gradient)."""
    twin = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    for p in twin.parameters():
        if p.requires_grad and p.is_floating_point():
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p))
    return twin


def _grad_report(who: Any, module: nn.Module, allow_no_grad: tuple[str, ...]) -> None:
    """Every trainable parameter must hold a finite, not all-zero gradient."""
    import fnmatch

    trainable = [(n, p) for n, p in module.named_parameters()
                 if p.requires_grad and not any(fnmatch.fnmatch(n, pat) for pat in allow_no_grad)]
    missing = [n for n, p in trainable if p.grad is None]
    bad = [n for n, p in trainable if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    zero = [n for n, p in trainable if p.grad is not None and not bool(p.grad.any())]
    for names, what in ((missing, "get no gradient (not reached by the loss: unused, detached, or "
                                  "an embedder the loss never feeds)"),
                        (bad, "get non-finite gradients"),
                        (zero, "get an all-zero gradient (the loss does not depend on them)")):
        if names:
            _fail(who, f"{len(names)} trainable parameter(s) {what}: {', '.join(names[:8])}"
                       f"{' …' if len(names) > 8 else ''}")


def _check_untouched(who: Any, what: str, tensors: dict[str, Tensor | None], run: Any) -> Any:
    """Run ``run()`` and fail if it changed any of ``tensors`` (version counter or values)."""
    saved = {k: (v._version, v.clone()) for k, v in tensors.items() if v is not None}
    out = run()
    for k, (version, value) in saved.items():
        v = tensors[k]
        if v._version != version or not torch.equal(v, value):
            _fail(who, f"{what} modified its input {k!r} in place (an in-place op such as mul_, +=, "
                       f"x[...] = or clamp_ on an input); inputs must stay untouched (JVP/DDP safety) — "
                       f"compute on a copy or out of place")
    return out


# ---------------------------------------------------------------------------------------------------
# Objective checks
# ---------------------------------------------------------------------------------------------------
def check_objective_config(cls: type[Objective]) -> None:
    """``Config`` is a dataclass subclass of ObjectiveConfig with defaults whose fields ``--set`` can
    parse and round-trip; ``needs`` is an ObjectiveNeeds; ``forward`` and ``step`` are implemented."""
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        _fail(str(cls), "an objective must be a subclass of fewstep.api.Objective")
    C = cls.Config
    if C is ObjectiveConfig or not (dataclasses.is_dataclass(C) and issubclass(C, ObjectiveConfig)):
        _fail(cls, "set `Config` to a @dataclass(kw_only=True) subclass of fewstep.api.ObjectiveConfig")
    no_default = [f.name for f in dataclasses.fields(C)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if no_default:
        _fail(cls, f"Config fields {no_default} have no default (give `name` the objective's registered "
                   f"name as its default and every other field a default)")
    try:
        cfg = C()
        again = replace_fields(C(), to_dict(cfg), "objective")
    except Exception as exc:  # noqa: BLE001 — reported with the reason
        _fail(cls, f"Config() or its dict round trip (saved configs and --set) fails: {type(exc).__name__}: {exc}")
    if again != cfg:
        _fail(cls, f"Config changes on a dict round trip: {cfg} → {again}")
    if not isinstance(getattr(cls, "needs", None), ObjectiveNeeds):
        _fail(cls, "set the class attribute `needs = ObjectiveNeeds(...)`")
    for method in ("forward", "step"):
        if getattr(cls, method) is getattr(Objective, method):
            _fail(cls, f"implement {method}() (see fewstep.api.Objective.{method})")


def check_loss(objective: Objective, batch: int = 4, seed: int = 0) -> LossOutput:
    """One training forward on a random batch: LossOutput with a finite 0-d float ``loss``, (B,)
    ``per_sample`` and scalar, detached ``logs`` (with the ``progress_log`` entry); flops_per_sample ≥ 3 F
    and linear in F."""
    spec, dev = spec_of(objective), _device(objective)
    x, y = _batch(spec, batch, seed, dev)
    out = objective.train()(x, y, _gen(dev, seed), 0)
    if not isinstance(out, LossOutput):
        _fail(objective, f"forward must return a LossOutput, got {type(out).__name__}")
    loss, per = out.loss, out.per_sample
    if not (torch.is_tensor(loss) and loss.ndim == 0 and loss.is_floating_point()):
        got = f"shape {tuple(loss.shape)} {loss.dtype}" if torch.is_tensor(loss) else repr(loss)
        _fail(objective, f"LossOutput.loss must be a 0-d float tensor (the batch mean), got {got}")
    if not (torch.is_tensor(per) and per.shape == (batch,) and per.is_floating_point()):
        got = f"shape {tuple(per.shape)} {per.dtype}" if torch.is_tensor(per) else repr(per)
        _fail(objective, f"LossOutput.per_sample must be a float tensor of shape (B,) = ({batch},), got {got}")
    for key, value in out.logs.items():
        if torch.is_tensor(value) and (value.numel() != 1 or value.requires_grad):
            _fail(objective, f"log {key!r} must be a detached scalar, got shape {tuple(value.shape)}"
                             f"{' with a graph (call .detach())' if value.requires_grad else ''}")
        if not torch.is_tensor(value) and not isinstance(value, (int, float)):
            _fail(objective, f"log {key!r} must be a float or a 0-d tensor, got {type(value).__name__}")
    if not bool(torch.isfinite(loss)) or not bool(torch.isfinite(per).all()):
        logs = {k: round(float(v), 6) for k, v in out.logs.items()}
        _fail(objective, f"loss is {loss.item()} on a random batch: not finite (per-sample {per.tolist()}, "
                         f"logs {logs}); check divisions by t or t − s, logs of 0 and square roots near 0")
    key = getattr(objective, "progress_log", "loss")
    if key != "loss" and key not in out.logs:
        _fail(objective, f"progress_log is {key!r}, which the logs do not have (logged: {', '.join(sorted(out.logs))})")
    f1, f2 = objective.flops_per_sample(1.0), objective.flops_per_sample(2.0)
    if not (math.isfinite(f1) and f1 >= 3.0 and math.isclose(f2, 2 * f1, rel_tol=1e-9)):
        _fail(objective, f"flops_per_sample(F) must be ≥ 3 F (a forward and its backward) and linear in F, "
                         f"got {f1} for F = 1 and {f2} for F = 2")
    return out


def check_gradients(objective: Objective, batch: int = 4, seed: int = 0, allow_no_grad: tuple[str, ...] = ()) -> None:
    """The loss has a graph and every trainable parameter gets a finite, non-zero gradient (weights
    perturbed first); EMA tracks and teachers are frozen. ``allow_no_grad``: fnmatch patterns of
    parameter names exempt from the check."""
    obj = perturbed(objective, seed=seed).train()
    spec, dev = spec_of(obj), _device(obj)
    x, y = _batch(spec, batch, seed, dev)
    out = obj(x, y, _gen(dev, seed), 0)
    if not out.loss.requires_grad:
        _fail(objective, "the loss has no gradient graph: it was detached (.detach(), .item(), torch.no_grad "
                         "around the student pass) or does not use the backbone")
    out.loss.backward()
    frozen = [m for m, _ in obj.teacher_tracks()] + list(obj.ema.values())
    thawed = [n for m in frozen for n, p in m.named_parameters() if p.requires_grad]
    if thawed:
        _fail(objective, f"EMA tracks / teachers must be frozen (use fewstep.api.frozen_copy); trainable: {thawed[:5]}")
    _grad_report(objective, obj, allow_no_grad)


def check_determinism(objective: Objective, batch: int = 4, seed: int = 0) -> None:
    """The same generator seed gives the same loss whatever the global RNG; another seed differs."""
    spec, dev = spec_of(objective), _device(objective)
    x, y = _batch(spec, batch, seed, dev)
    obj = objective.train()
    runs = []
    for global_seed, gen_seed in ((1234, seed), (4321, seed), (1234, seed + 1)):
        torch.manual_seed(global_seed)
        with torch.no_grad():
            runs.append(obj(x, y, _gen(dev, gen_seed), 0).per_sample.detach().clone())
    if not torch.equal(runs[0], runs[1]):
        _fail(objective, f"two forwards with the same generator seed gave different losses ({runs[0].tolist()} "
                         f"vs {runs[1].tolist()}): draw every random number from the `generator` argument, "
                         f"never the global RNG (torch.randn/rand without generator=, dropout)")
    if torch.equal(runs[0], runs[2]):
        _fail(objective, "forwards with different generator seeds gave identical losses: the noise and times "
                         "must be drawn from the `generator` argument")


def check_inputs_untouched(objective: Objective, batch: int = 4, seed: int = 0) -> None:
    """forward and step leave their input tensors unchanged (no in-place ops on inputs)."""
    spec, dev = spec_of(objective), _device(objective)
    x, y = _batch(spec, batch, seed, dev)
    obj = objective.train()
    _check_untouched(objective, "forward", {"x": x, "y": y}, lambda: obj(x, y, _gen(dev, seed), 0))
    t, s = torch.full((batch,), 0.75, device=dev), torch.full((batch,), 0.25, device=dev)
    noise = torch.randn(x.shape, generator=_gen(dev, seed), device=dev)
    cond = Condition(y=y)
    with torch.no_grad():
        _check_untouched(objective, "step", {"x": x, "t": t, "s": s, "cond.y": y, "noise": noise},
                         lambda: obj.eval().step(x, t, s, cond, net=obj.backbone,
                                                 noise=noise if obj.needs.renoise else None))


def check_sampler(objective: Objective, nfes: tuple[int, ...] = (1, 2, 4), seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """default_schedule(nfe) is nfe + 1 non-increasing times in [0, 1]; each step returns a finite
    float tensor shaped like x; sample() works and image i depends only on seed i."""
    from fewstep.sample import sample

    obj = objective.eval()
    spec = spec_of(obj)
    shape = (len(seeds), spec.channels, spec.resolution, spec.resolution)
    evals = obj.evaluations_per_step(Condition())
    if not isinstance(evals, int) or evals < 1:
        _fail(objective, f"evaluations_per_step must return an int ≥ 1, got {evals!r}")
    for nfe in nfes:
        sched = list(obj.default_schedule(nfe))
        ok = (len(sched) == nfe + 1 and all(isinstance(v, float) for v in sched) and 0 < sched[0] <= 1
              and 0 <= sched[-1] < sched[0] and all(b <= a for a, b in zip(sched, sched[1:])))
        if not ok:
            _fail(objective, f"default_schedule({nfe}) must be {nfe + 1} non-increasing floats from noise "
                             f"(≤ 1) to data (≥ 0), got {sched}")
    dev = _device(obj)
    x = torch.randn(shape, generator=_gen(dev, 0), device=dev)
    y = torch.arange(len(seeds), device=dev) % spec.num_classes if spec.num_classes else None
    sched = obj.default_schedule(2)
    for weights in ("online", *obj.ema.keys()):
        for t_cur, t_next in zip(sched, sched[1:]):
            t, s = torch.full((len(seeds),), t_cur, device=dev), torch.full((len(seeds),), t_next, device=dev)
            noise = torch.randn(shape, generator=_gen(dev, 1), device=dev) if obj.needs.renoise else None
            with torch.no_grad():
                out = obj.step(x, t, s, Condition(y=y), net=obj.sampling_net(weights), noise=noise)
            if not (torch.is_tensor(out) and out.shape == x.shape and out.is_floating_point()):
                got = f"shape {tuple(out.shape)} {out.dtype}" if torch.is_tensor(out) else repr(out)
                _fail(objective, f"step({t_cur:.3g} → {t_next:.3g}) must return a float tensor shaped like x "
                                 f"{tuple(x.shape)}, got {got}")
            if not bool(torch.isfinite(out).all()):
                _fail(objective, f"step({t_cur:.3g} → {t_next:.3g}) with {weights} weights returned non-finite values")
            x = out.float()
    for nfe in nfes[:2]:
        full = sample(obj, list(seeds), nfe, batch_size=len(seeds)).images
        alone = sample(obj, [seeds[-1]], nfe).images
        if full.shape != shape or not bool(torch.isfinite(full).all()):
            _fail(objective, f"sample(nfe={nfe}) must give finite images of shape {shape}, got {tuple(full.shape)}")
        if not torch.allclose(full[-1], alone[0], atol=1e-5, rtol=1e-4):
            _fail(objective, f"sample(nfe={nfe}): image of seed {seeds[-1]} changes with the other samples in its "
                             f"batch (max diff {(full[-1] - alone[0]).abs().max():.3g}); step must treat samples "
                             f"independently (no batch statistics)")


def check_save_load(objective: Objective, directory: str | Path | None = None) -> None:
    """Save as the trainer does and reload with ``load_objective``: same class, config, every tensor
    of the state dict and the same samples from every weights track."""
    from fewstep.build import load_objective
    from fewstep.checkpoints import save_checkpoint
    from fewstep.sample import sample

    obj = perturbed(objective).eval()
    obj.after_step()                                   # EMA tracks and teachers now differ from online
    net, spec = obj.backbone, spec_of(obj)
    if not isinstance(getattr(net, "config", None), BackboneConfig):
        _fail(objective, "the backbone has no `config` (a BackboneConfig): checkpoints rebuild backbones from it")
    cfg = RunConfig(recipe="contract", objective=obj.config, backbone=net.config,
                    train=TrainConfig(ema_betas=dict(obj.ema_betas)))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_registered(type(obj), obj.config.name))
        stack.enter_context(_registered_backbone(net.config))
        root = Path(directory) if directory is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        save_checkpoint(root / "contract-run", 1, objective_state=obj.state_dict(), optimizer_state=None,
                        rng_states=[], manifest={"nimg": 0, "kimg": 0.0, "data_position": 0, "config": to_dict(cfg),
                                                 "data_spec": dataclasses.asdict(spec)})
        try:
            loaded, cfg2, _ = load_objective(root / "contract-run")
        except Exception as exc:  # noqa: BLE001 — reported with the reason
            _fail(objective, f"a saved checkpoint does not load back ({type(exc).__name__}: {exc})")
    if type(loaded) is not type(obj) or loaded.config != obj.config:
        _fail(objective, f"reloaded as {type(loaded).__name__} with config {loaded.config}, expected {obj.config}")
    want, got = obj.state_dict(), loaded.state_dict()
    differ = sorted(k for k in want if k not in got or not torch.equal(want[k], got[k]))
    if differ or set(got) != set(want):
        _fail(objective, f"state dict changes on a save/load round trip: {differ[:5] or sorted(set(got) ^ set(want))[:5]}")
    for weights in ("online", *obj.ema.keys()):
        a = sample(obj, [0, 1], 2, weights=weights).images
        b = sample(loaded, [0, 1], 2, weights=weights).images
        if not torch.equal(a, b):
            _fail(objective, f"the reloaded objective samples differently with {weights} weights (max diff "
                             f"{(a - b).abs().max():.3g}): keep every tensor the model uses in a parameter or a "
                             f"persistent buffer (loading materialises modules from the meta device)")


def check_training_step(objective: Objective, batch: int = 4, seed: int = 0) -> None:
    """One AdamW step and ``after_step`` as in the trainer: parameters change and stay finite, EMA
    tracks and teachers move towards the online weights, and the next forward is finite."""
    obj = copy.deepcopy(objective).train()
    spec, dev = spec_of(obj), _device(obj)
    params = [p for p in obj.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    if obj.needs.teacher == "ema" and not obj.teacher_tracks():
        _fail(objective, "needs.teacher is 'ema' but teacher_tracks() returns no (module, beta) pair, so the "
                         "teacher is never updated")
    tracks = {f"teacher {i}": m for i, (m, _) in enumerate(obj.teacher_tracks())}
    tracks.update({f"EMA track {k!r}": m for k, m in obj.ema.items()})
    owned = {id(m) for m in obj.modules()}
    for name, module in tracks.items():
        if id(module) not in owned:
            _fail(objective, f"{name} is not a submodule of the objective: assign it as an attribute in "
                             f"__init__ so it is moved to the device and saved in checkpoints")
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in tracks.items()}
    online = [p.detach().clone() for p in params]
    for step in range(2):
        x, y = _batch(spec, batch, seed + step, dev)
        out = obj(x, y, _gen(dev, seed + step), step * batch)
        if not bool(torch.isfinite(out.loss)):
            _fail(objective, f"loss is {out.loss.item()} at training step {step}")
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        obj.after_step()
        if step == 0:
            if all(torch.equal(a, b) for a, b in zip(online, params)):
                _fail(objective, "an optimizer step left every trainable parameter unchanged")
            if not all(bool(torch.isfinite(p).all()) for p in params):
                _fail(objective, "parameters became non-finite after one optimizer step")
            for name, m in tracks.items():
                if all(torch.equal(a, b) for a, b in zip(before[name], m.parameters())):
                    _fail(objective, f"{name} did not move after after_step(): return EMA teachers from "
                                     f"teacher_tracks() and call super().after_step() if you override it")


def check_trainer(objective: Objective, directory: str | Path | None = None, batch: int = 4) -> None:
    """Two optimizer steps of the real trainer (:func:`fewstep.train.train`) on random data on the CPU,
    then load the final checkpoint."""
    from fewstep.build import load_objective
    from fewstep.train import train

    net, spec = objective.backbone, spec_of(objective)
    if not isinstance(getattr(net, "config", None), BackboneConfig):
        _fail(objective, "the backbone has no `config` (a BackboneConfig): the trainer builds backbones from it")
    data_name = "fewstep-contract-data"
    cfg = RunConfig(recipe="contract", objective=objective.config, backbone=net.config,
                    data=DataConfig(name=data_name),
                    train=TrainConfig(total_kimg=2 * batch / 1000, batch=batch, lr=1e-3, precision="fp32",
                                      ema_betas=dict(objective.ema_betas), status_kimg=batch / 1000,
                                      checkpoint_kimg=0, sample_kimg=0, keep_checkpoints=1),
                    sample=SampleConfig(nfe=(1,), num_images=4, weights="online"))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_registered(type(objective), objective.config.name))
        stack.enter_context(_registered_backbone(net.config))
        datasets.add(data_name, lambda data_cfg: _RandomData(dataclasses.replace(spec, name=data_name)),
                     source="fewstep.testing")
        stack.callback(datasets.remove, data_name)
        root = Path(directory) if directory is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        try:
            result = train(cfg, root / "contract-train", show_progress=False)
            load_objective(root / "contract-train")
        except Exception as exc:  # noqa: BLE001 — reported with the reason
            raise ContractError(f"{type(objective).__name__}: the trainer failed on a 2-step CPU run: "
                                f"{type(exc).__name__}: {exc}") from exc
    if getattr(result, "skipped_steps", 0):
        _fail(objective, f"the trainer skipped {result.skipped_steps} of 2 steps for a non-finite loss or gradient")
    if result.step != 2 or result.loss is None or not math.isfinite(result.loss):
        _fail(objective, f"the trainer ran {result.step} steps with final loss {result.loss}; expected 2 finite steps")


OBJECTIVE_CHECKS = ("config", "loss", "gradients", "determinism", "inputs", "sampler", "save_load",
                    "training_step", "trainer")


def check_objective(objective: Objective, *, batch: int = 4, skip: tuple[str, ...] = (),
                    allow_no_grad: tuple[str, ...] = ()) -> None:
    """Every objective check (:data:`OBJECTIVE_CHECKS`, minus ``skip``) on a small objective instance
    (e.g. from :func:`tiny_objective`); raises :class:`ContractError` at the first failure."""
    run = {"config": lambda: check_objective_config(type(objective)),
           "loss": lambda: check_loss(objective, batch),
           "gradients": lambda: check_gradients(objective, batch, allow_no_grad=allow_no_grad),
           "determinism": lambda: check_determinism(objective, batch),
           "inputs": lambda: check_inputs_untouched(objective, batch),
           "sampler": lambda: check_sampler(objective),
           "save_load": lambda: check_save_load(objective),
           "training_step": lambda: check_training_step(objective, batch),
           "trainer": lambda: check_trainer(objective, batch=batch)}
    for name in OBJECTIVE_CHECKS:
        if name not in skip:
            run[name]()


# ---------------------------------------------------------------------------------------------------
# Backbone checks
# ---------------------------------------------------------------------------------------------------
def switch_variants(config: BackboneConfig) -> list[BackboneConfig]:
    """``config`` under every combination of the embedder switches it has (``gap_embedder``,
    ``guidance_embedder``: the trainer sets them per objective, so each must work). A ``time_mode="h"``
    config embeds only the gap, so it keeps ``gap_embedder=True``."""
    names = [n for n in ("gap_embedder", "guidance_embedder") if isinstance(getattr(config, n, None), bool)]
    variants = [dataclasses.replace(config, **dict(zip(names, values)))
                for values in itertools.product((False, True), repeat=len(names))]
    if getattr(config, "time_mode", None) == "h":
        variants = [v for v in variants if v.gap_embedder]
    return variants


def _inputs(config: BackboneConfig, spec: DataSpec, batch: int, seed: int, dtype: torch.dtype = torch.float32,
            ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, dict[str, Tensor]]:
    """(x, t, s, y, cond) for one call: s iff a gap embedder, labels (with the null label) iff classes,
    ``guidance`` iff a guidance embedder."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, spec.channels, spec.resolution, spec.resolution), generator=gen, dtype=dtype)
    t = 0.05 + 0.9 * torch.rand(batch, generator=gen, dtype=dtype)
    s = t * torch.rand(batch, generator=gen, dtype=dtype) if getattr(config, "gap_embedder", False) else None
    y = torch.randint(spec.num_classes + 1, (batch,), generator=gen) if spec.num_classes else None
    cond = ({"guidance": 0.1 + 0.9 * torch.rand(batch, generator=gen, dtype=dtype)}
            if getattr(config, "guidance_embedder", False) else {})
    for name in getattr(config, "conditions", ()):   # extra scalar conditions (docs/design/frontier.md §1)
        cond[name] = torch.rand(batch, generator=gen, dtype=dtype)
    return x, t, s, y, cond


def _outputs(net: nn.Module, config: BackboneConfig, *args: Any, **kwargs: Any) -> Tensor:
    """The backbone's output; with an auxiliary head, the main and auxiliary outputs stacked along a new
    first dimension (so every check covers both heads)."""
    if getattr(config, "aux_head", False):
        return torch.stack(net(*args, head="both", **kwargs))
    return net(*args, **kwargs)


def check_backbone_config(config: BackboneConfig, spec: DataSpec) -> nn.Module:
    """A BackboneConfig dataclass that round-trips through its dict, matches its registered factory
    (when registered) and builds an ``nn.Module`` with the spec's in_channels, input_size, num_classes."""
    who = type(config).__name__
    if not (dataclasses.is_dataclass(config) and isinstance(config, BackboneConfig)):
        _fail(who, "a backbone config must be a @dataclass(kw_only=True) subclass of fewstep.api.BackboneConfig")
    try:
        again = replace_fields(config, to_dict(config), "backbone")
    except Exception as exc:  # noqa: BLE001
        _fail(who, f"config does not round-trip through its dict (saved configs and --set): {exc}")
    if again != config:
        _fail(who, f"config changes on a dict round trip: {config} → {again}")
    if config.name in backbones:
        made = backbones.get(config.name)(None)
        if not isinstance(made, type(config)) or made.name != config.name:
            _fail(who, f"the factory registered as {config.name!r} returns {made!r}, not a {who} named {config.name!r}")
    net = config.build(spec)
    if not isinstance(net, nn.Module):
        _fail(who, f"build(spec) must return an nn.Module, got {type(net).__name__}")
    want = {"in_channels": spec.channels, "input_size": spec.resolution, "num_classes": spec.num_classes}
    got = {k: getattr(net, k, None) for k in want}
    if got != want:
        _fail(who, f"the built module must expose {want} (from the DataSpec), got {got}")
    return net


def check_backbone_forward(net: nn.Module, config: BackboneConfig, spec: DataSpec, batch: int = 4) -> None:
    """Output shaped like x, float32, finite: with every input the config embeds, with ``s=None``
    (one-time call) and with ``y=None`` (all null labels)."""
    x, t, s, y, cond = _inputs(config, spec, batch, 0)
    for s_, y_ in {(s is None, y is None): (s, y), (True, y is None): (None, y), (s is None, True): (s, None)}.values():
        out = perturbed(net)(x, t, s_, y_, **cond)
        call = f"F(x, t, s={'None' if s_ is None else 's'}, y={'None' if y_ is None else 'y'}{', guidance' if cond else ''})"
        if not (torch.is_tensor(out) and out.shape == x.shape and out.dtype == x.dtype):
            got = f"{tuple(out.shape)} {out.dtype}" if torch.is_tensor(out) else repr(out)
            _fail(net, f"{call} must return a tensor shaped like x {tuple(x.shape)} in float32, got {got}")
        if not bool(torch.isfinite(out).all()):
            _fail(net, f"{call} returned non-finite values")


def check_backbone_gradients(net: nn.Module, config: BackboneConfig, spec: DataSpec, batch: int = 4,
                             allow_no_grad: tuple[str, ...] = ()) -> None:
    """With every embedder fed, each trainable parameter gets a finite, non-zero gradient."""
    x, t, s, y, cond = _inputs(config, spec, batch, 1)
    twin = perturbed(net).train()
    out = _outputs(twin, config, x, t, s, y, **cond)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    _grad_report(net, twin, allow_no_grad)


def check_backbone_purity(net: nn.Module, config: BackboneConfig, spec: DataSpec, batch: int = 4) -> None:
    """No in-place op on inputs, parameters or buffers (JVP and DDP safety); deterministic; each
    output row depends only on its own input row."""
    x, t, s, y, cond = _inputs(config, spec, batch, 3)
    twin = perturbed(net).train()
    state = {k: (v._version, v.detach().clone()) for k, v in itertools.chain(twin.named_parameters(), twin.named_buffers())}
    out = _check_untouched(net, "forward", {"x": x, "t": t, "s": s, "y": y, **cond}, lambda: twin(x, t, s, y, **cond))
    changed = [k for k, v in itertools.chain(twin.named_parameters(), twin.named_buffers())
               if v._version != state[k][0] or not torch.equal(v.detach(), state[k][1])]
    if changed:
        _fail(net, f"forward modified its own parameters/buffers {changed[:5]} (running statistics, in-place "
                   f"weight updates): a backbone must be a pure function of its inputs (no BatchNorm)")
    if not torch.equal(out, twin(x, t, s, y, **cond)):
        _fail(net, "two forwards on the same inputs differ (dropout or other global randomness in training mode)")
    row = lambda v: v[1:2] if torch.is_tensor(v) else v  # noqa: E731
    alone = twin(row(x), row(t), row(s), row(y), **{k: row(v) for k, v in cond.items()})
    if not torch.allclose(out[1:2], alone, atol=1e-5, rtol=1e-4):
        _fail(net, f"output row 1 changes with the other rows of its batch (max diff {(out[1:2] - alone).abs().max():.3g}): "
                   f"no batch statistics across samples")


def check_backbone_jvp(net: nn.Module, config: BackboneConfig, spec: DataSpec, batch: int = 2) -> None:
    """``torch.func.jvp`` through the backbone (in float64) w.r.t. x, t and s (when embedded) matches
    central differences: the backbone is forward-AD safe, as JVP objectives need. A backbone that sets
    ``supports_tangents`` must give the same JVP from ``forward(..., tangents=(tx, tt, ts))``."""
    twin = perturbed(net).double().eval()
    x, t, s, y, cond = _inputs(config, spec, batch, 4, torch.float64)
    primals = (x, t) if s is None else (x, t, s)
    gen = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in primals)
    if s is not None:   # keep s ≤ t along the direction
        tangents = (tangents[0], tangents[1].abs(), -tangents[2].abs())

    def F(*p: Tensor) -> Tensor:
        return twin(p[0], p[1], p[2] if len(p) > 2 else None, y, **cond)

    try:
        _, tangent = torch.func.jvp(F, primals, tangents)
    except Exception as exc:  # noqa: BLE001 — reported with the reason
        _fail(net, f"torch.func.jvp through the backbone failed ({type(exc).__name__}: {exc}); use ops with "
                   f"forward-AD support and no in-place ops on inputs (see fewstep.kernels.attention)")
    h = 1e-6
    plus = F(*(p + h * v for p, v in zip(primals, tangents)))
    minus = F(*(p - h * v for p, v in zip(primals, tangents)))
    fd = (plus - minus) / (2 * h)
    err = (tangent - fd).abs().max().item()
    if not err <= 1e-6 * (1 + fd.abs().max().item()):
        _fail(net, f"the JVP differs from central differences by {err:.3g} (scale {fd.abs().max():.3g}): a custom "
                   f"autograd Function without a correct forward-AD rule, or detached inputs?")
    if getattr(twin, "supports_tangents", False):   # its own tangent rules: the same JVP
        full = tuple(tangents) + (None,) * (3 - len(tangents))
        try:
            _, own = twin(x, t, s, y, tangents=full, **cond)
        except Exception as exc:  # noqa: BLE001
            _fail(net, f"supports_tangents is set but forward(..., tangents=) failed ({type(exc).__name__}: {exc})")
        err = (own - tangent).abs().max().item()
        if not err <= 1e-9 * (1 + tangent.abs().max().item()):
            _fail(net, f"forward(..., tangents=) differs from torch.func.jvp by {err:.3g}: a wrong tangent rule")
        if getattr(config, "aux_head", False):   # the auxiliary output rides along, without a tangent
            _, _, aux = twin(x, t, s, y, tangents=full, head="both", **cond)
            if not torch.allclose(aux, twin(x, t, s, y, head="aux", **cond), rtol=0, atol=1e-12):
                _fail(net, "forward(..., tangents=, head='both') returns an auxiliary output that differs from "
                           "forward(..., head='aux')")


def check_backbone_save_load(config: BackboneConfig, spec: DataSpec, batch: int = 4) -> None:
    """state_dict → safetensors → a copy built on the meta device, ``to_empty`` and ``load_state_dict``
    (how checkpoints are loaded) gives the same outputs."""
    from safetensors.torch import load_file, save_file

    net = perturbed(config.build(spec)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f"{tmp}/w.safetensors")
        with torch.device("meta"):
            again = config.build(spec)
        again = again.to_empty(device="cpu")
        try:
            again.load_state_dict(load_file(f"{tmp}/w.safetensors"), strict=True)
        except Exception as exc:  # noqa: BLE001
            _fail(net, f"its state dict does not load into a fresh build ({exc})")
    x, t, s, y, cond = _inputs(config, spec, batch, 6)
    if not torch.equal(net(x, t, s, y, **cond), again.eval()(x, t, s, y, **cond)):
        _fail(net, "a backbone rebuilt on the meta device and loaded from its state dict computes something "
                   "else: keep every tensor in a parameter or a persistent buffer")
    flops = getattr(net, "forward_flops", None)
    if flops is not None and not (flops(1) > 0 and math.isclose(flops(2), 2 * flops(1), rel_tol=1e-9)):
        _fail(net, f"forward_flops(batch) must be > 0 and linear in batch, got {flops(1)} and {flops(2)}")


def check_backbone(config: BackboneConfig, spec: DataSpec, *, batch: int = 4, skip: tuple[str, ...] = (),
                   allow_no_grad: tuple[str, ...] = ()) -> None:
    """Every backbone check (:data:`BACKBONE_CHECKS`, minus ``skip``) for each embedder-switch variant."""
    for variant in switch_variants(config):
        net = check_backbone_config(variant, spec)
        checks = {"forward": lambda: check_backbone_forward(net, variant, spec, batch),
                  "gradients": lambda: check_backbone_gradients(net, variant, spec, batch, allow_no_grad),
                  "purity": lambda: check_backbone_purity(net, variant, spec, batch),
                  "jvp": lambda: check_backbone_jvp(net, variant, spec),
                  "save_load": lambda: check_backbone_save_load(variant, spec, batch)}
        for name, check in checks.items():
            if name not in skip:
                check()


BACKBONE_CHECKS = ("config", "forward", "gradients", "purity", "jvp", "save_load")


# ---------------------------------------------------------------------------------------------------
# pytest mixins
# ---------------------------------------------------------------------------------------------------
def _skip(skip: tuple[str, ...], name: str) -> None:
    if name in skip:
        import pytest

        pytest.skip(f"contract check {name!r} skipped by this test class")


class ObjectiveContract:
    """Mixin for a pytest class ``Test…``: define :meth:`make_objective`; one test per check.

    Attributes: ``batch`` (training batch of the checks), ``skip`` (names from
    :data:`OBJECTIVE_CHECKS`), ``allow_no_grad`` (fnmatch patterns of parameters exempt from the
    gradient check).
    """

    batch: int = 4
    skip: tuple[str, ...] = ()
    allow_no_grad: tuple[str, ...] = ()

    def make_objective(self) -> Objective:
        """A small objective instance, e.g. ``tiny_objective("myname")``."""
        raise NotImplementedError("define make_objective() returning a small objective (see fewstep.testing.tiny_objective)")

    def test_config(self) -> None:
        _skip(self.skip, "config")
        check_objective_config(type(self.make_objective()))

    def test_loss(self) -> None:
        _skip(self.skip, "loss")
        check_loss(self.make_objective(), self.batch)

    def test_gradients(self) -> None:
        _skip(self.skip, "gradients")
        check_gradients(self.make_objective(), self.batch, allow_no_grad=self.allow_no_grad)

    def test_determinism(self) -> None:
        _skip(self.skip, "determinism")
        check_determinism(self.make_objective(), self.batch)

    def test_inputs_untouched(self) -> None:
        _skip(self.skip, "inputs")
        check_inputs_untouched(self.make_objective(), self.batch)

    def test_sampler(self) -> None:
        _skip(self.skip, "sampler")
        check_sampler(self.make_objective())

    def test_save_load(self, tmp_path: Path) -> None:
        _skip(self.skip, "save_load")
        check_save_load(self.make_objective(), tmp_path)

    def test_training_step(self) -> None:
        _skip(self.skip, "training_step")
        check_training_step(self.make_objective(), self.batch)

    def test_trainer(self, tmp_path: Path) -> None:
        _skip(self.skip, "trainer")
        check_trainer(self.make_objective(), tmp_path, self.batch)


class BackboneContract:
    """Mixin for a pytest class ``Test…``: define :meth:`make_config` (and ``spec`` if the default
    1×8×8, 3-class data does not suit); every check runs for each embedder-switch variant."""

    spec: DataSpec = TINY_SPEC
    batch: int = 4
    skip: tuple[str, ...] = ()
    allow_no_grad: tuple[str, ...] = ()

    def make_config(self) -> BackboneConfig:
        """A small backbone config, e.g. ``MyConfig(name="mynet", width=32)``."""
        raise NotImplementedError("define make_config() returning a small BackboneConfig")

    def _each(self, name: str, check: Any) -> None:
        _skip(self.skip, name)
        for variant in switch_variants(self.make_config()):
            check(check_backbone_config(variant, self.spec), variant)

    def test_config(self) -> None:
        self._each("config", lambda net, cfg: None)

    def test_forward(self) -> None:
        self._each("forward", lambda net, cfg: check_backbone_forward(net, cfg, self.spec, self.batch))

    def test_gradients(self) -> None:
        self._each("gradients", lambda net, cfg: check_backbone_gradients(net, cfg, self.spec, self.batch,
                                                                          self.allow_no_grad))

    def test_purity(self) -> None:
        self._each("purity", lambda net, cfg: check_backbone_purity(net, cfg, self.spec, self.batch))

    def test_jvp(self) -> None:
        self._each("jvp", lambda net, cfg: check_backbone_jvp(net, cfg, self.spec))

    def test_save_load(self) -> None:
        self._each("save_load", lambda net, cfg: check_backbone_save_load(cfg, self.spec, self.batch))
