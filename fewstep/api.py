"""The public API for plugins: the one module a plugin imports (``from fewstep import api``).

Everything listed in ``__all__`` is stable within an ``API_VERSION``; the rest of fewstep may change.
A plugin is one module that subclasses :class:`Objective` (or writes a backbone config + module, or a
metric) and one entry-point line in its ``pyproject.toml``::

    [project.entry-points."fewstep.objectives"]
    xpred = "fewstep_xpred:XPrediction"

Groups: ``fewstep.objectives`` (an :class:`Objective` subclass), ``fewstep.backbones`` (a function
``(base: BackboneConfig | None) -> BackboneConfig``; keep the switches of a ``base`` of your own family),
``fewstep.datasets`` (a function ``(DataConfig) -> dataset with a .spec``), ``fewstep.recipes``
(a function ``(objective: str) -> RunConfig``), ``fewstep.metrics`` and ``fewstep.extractors`` (see
:mod:`fewstep.metrics`). The entry-point name is the name users type; ``fewstep list`` shows it with
your distribution's name. ``docs/plugins.md`` walks through a complete example, and
:mod:`fewstep.testing` is the contract suite to run in your own tests.

**Time convention.** ``t = 1`` is noise, ``t = 0`` is data, ``x_t = (1 − t)·x + t·ε`` with ε ~ N(0, I)
(:func:`interpolate`), the conditional velocity is ``v = ε − x`` (:func:`velocity`); a jump goes from
``t`` to ``s ≤ t``. Objectives from papers with another convention convert at their own boundary.
Labels are int64 in ``[0, num_classes)``; ``num_classes`` is the null label (label dropout, CFG).

**How the trainer uses an objective** (``fewstep train``; :mod:`fewstep.train.loop`):

1. ``resolve(cfg)`` gives the backbone a gap embedder iff ``needs.time_inputs == 2``, a guidance
   embedder iff ``needs.guidance_input``, and ``needs.time_mode``, ``needs.conditions`` and
   ``needs.aux_head`` (from ``YourObjective.needs_for(config)``, which returns ``needs`` unless a
   setting changes them); ``cfg.backbone.build(spec)`` builds it and
   ``YourObjective(backbone, config, num_classes=spec.num_classes, ema_betas=...)`` wraps it (the
   constructor may add teachers or small nets of its own). A new run with ``train.init_from`` then
   loads another run's weights into the backbone, its EMA tracks and teachers (step 0 only; your own
   extra modules keep their initialisation). Accelerate then wraps the objective, so every JVP runs
   inside the DDP/FSDP forward.
2. Each micro-batch: ``out = objective(x, y, generator, nimg)`` with x (B, C, H, W) float32 (pixels in
   [−1, 1]), y (B,) int64 or ``None``, ``generator`` a ``torch.Generator`` on x's device that must drive
   every random draw, and ``nimg`` the images seen so far (warm-ups are in images, never steps).
   ``out.loss`` must be a finite scalar (a step with a non-finite loss or gradient is skipped and
   logged; ``train.max_bad_steps`` such steps in a row stop the run with a clear error);
   ``out.logs`` are scalar diagnostics averaged into the status line and ``log.jsonl``.
3. After each optimizer step: ``objective.after_step()`` (updates the EMA teachers returned by
   ``teacher_tracks()`` and the evaluation EMAs).
4. Checkpoints hold ``objective.state_dict()``; loading rebuilds the objective on the ``meta`` device,
   materialises it with ``to_empty`` and loads the state dict, so every tensor the objective needs
   must be a parameter or a persistent buffer.
5. Sampling (:func:`sample`) chains ``objective.step(x, t, s, cond, net=..., noise=...)`` over
   ``objective.default_schedule(nfe)`` under ``torch.no_grad``; ``noise`` (fresh, per seed) is passed
   only when ``needs.renoise``; ``evaluations_per_step(cond)`` counts backbone calls per jump.
6. ``flops_per_sample(forward_flops)`` converts one backbone forward's FLOPs into the training cost of
   one sample (forward 1 F, backward 2 F, JVP ≈ 2 F, backward through a JVP ≈ 4 F) for TFLOP/s and MFU.
"""
from __future__ import annotations

from torch import Tensor

from fewstep.config import BackboneConfig, DataConfig, ObjectiveConfig, RunConfig, SampleConfig, TrainConfig
from fewstep.contracts import Backbone, Condition, DataSpec, LossOutput, Objective, ObjectiveNeeds
from fewstep.ema import ema_update, frozen_copy
from fewstep.objectives.common import drop_labels, interpolate, logit_normal, mean_flat, per_sample, rand, randn
from fewstep.objectives.jvp import jvp
from fewstep.registry import (Registry, RegistryError, backbones, datasets, extractors, metrics, objectives,
                              recipes)
from fewstep.sample import SampleResult, sample

API_VERSION = 1
"""Bumped whenever a name in ``__all__`` changes incompatibly."""

NOISE_TIME = 1.0
"""The time of pure noise (the sampler starts here)."""

DATA_TIME = 0.0
"""The time of data (the sampler ends here)."""


def velocity(x: Tensor, noise: Tensor) -> Tensor:
    """The conditional velocity ``dx_t/dt = noise − x`` of :func:`interpolate` (same shape)."""
    return noise - x


__all__ = [
    # contracts
    "API_VERSION", "Backbone", "BackboneConfig", "Condition", "DataSpec", "LossOutput", "Objective",
    "ObjectiveConfig", "ObjectiveNeeds", "ema_update", "frozen_copy",
    # run configuration (recipes)
    "DataConfig", "RunConfig", "SampleConfig", "TrainConfig",
    # time convention and helpers for losses
    "DATA_TIME", "NOISE_TIME", "drop_labels", "interpolate", "jvp", "logit_normal", "mean_flat", "per_sample",
    "rand", "randn", "velocity",
    # registries
    "Registry", "RegistryError", "backbones", "datasets", "extractors", "metrics", "objectives", "recipes",
    # sampling
    "SampleResult", "sample",
]
