"""The contracts every component meets: backbones, objectives, datasets.

Time convention (one for the whole toolkit): ``t = 1`` is noise, ``t = 0`` is data, and
``x_t = (1 − t)·x + t·ε`` with ε ~ N(0, I). A jump goes from time ``t`` to an earlier time ``s ≤ t``.
Objectives defined in other conventions (TrigFlow, EDM σ, SiT's reversed t) convert at their own boundary.

Labels: class ids are int64 in ``[0, num_classes)``; the id ``num_classes`` is the *null* label used for
label dropout and unconditional (CFG) evaluations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fewstep.config import ObjectiveConfig
from fewstep.ema import ema_update, frozen_copy


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """What a dataset yields, so backbones and recipes are configured from it.

    Attributes:
        name: dataset name as given to ``--data``.
        channels: C of each (C, H, W) item.
        resolution: H = W of each item (after any padding).
        num_classes: number of classes (0 for unconditional data).
        num_items: number of items in the split.
        kind: ``pixels`` (values in [−1, 1]), ``latents``, or ``points`` (low-dimensional toy data
            stored as (C, 1, 1) items, C = dimension).
    """

    name: str
    channels: int
    resolution: int
    num_classes: int
    num_items: int
    kind: Literal["pixels", "latents", "points"] = "pixels"


# ---------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------
@runtime_checkable
class Backbone(Protocol):
    """A network ``F(x, t, s, y, **cond)``; it embeds its inputs and knows nothing about objectives.

    Shapes: ``x`` (B, C, H, W); ``t`` and ``s`` (B,) floats in [0, 1]; ``y`` (B,) int64 labels with
    ``num_classes`` meaning null, or ``None`` (all null). ``s=None`` means a one-time call (the gap
    embedder, if any, is skipped). Extra per-sample conditions arrive as keyword tensors of shape (B,),
    e.g. ``guidance`` (a scalar in [0, 1], TVM feeds β = 1/w). Returns a tensor shaped like ``x``.
    Must be JVP-safe: a pure function of its inputs, with no in-place ops on them.
    """

    in_channels: int
    input_size: int
    num_classes: int

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None,
                **cond: Tensor) -> Tensor: ...


# ---------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectiveNeeds:
    """What an objective requires, so the trainer, sampler and sweeps treat all objectives alike.

    Attributes:
        time_inputs: 1 if the backbone is called as F(x, t); 2 if as F(x, t, s) (gap embedder).
        jvp: whether the loss runs forward-mode AD through the backbone.
        teacher: ``none``; ``stopgrad`` (targets from the online net without gradient); ``ema``
            (targets from an EMA teacher the objective owns).
        cfg: ``none``; ``sampling`` (CFG mixes conditional and null passes at sampling: 2 evaluations
            per step); ``distilled`` (guidance is learned in training; one evaluation per step).
        guidance_input: whether the backbone needs a guidance embedder.
        renoise: whether :meth:`Objective.step` needs fresh noise (consistency models jump to the data
            end and re-noise to ``s``); the sampler then passes per-seed ``noise``.
        time_mode: how a two-time backbone embeds (t, s): ``t+h`` (t and the gap t − s), ``h`` (the gap
            only), ``t+s`` (both absolute times) or ``split`` (t for early blocks, s for late ones);
            docs/design/frontier.md §1.
        conditions: names of extra per-sample scalar conditions the backbone must embed (keyword
            inputs, each (B,) float), e.g. iMF's ``("omega", "t_min", "t_max")``.
        aux_head: whether the backbone needs an auxiliary output head (``head="aux"``/``"both"``).
    """

    time_inputs: Literal[1, 2]
    jvp: bool
    teacher: Literal["none", "stopgrad", "ema"]
    cfg: Literal["none", "sampling", "distilled"]
    guidance_input: bool = False
    renoise: bool = False
    time_mode: Literal["t+h", "h", "t+s", "split"] = "t+h"
    conditions: tuple[str, ...] = ()
    aux_head: bool = False


@dataclass
class LossOutput:
    """Result of one objective forward.

    Attributes:
        loss: scalar to back-propagate (mean of ``per_sample`` unless the objective says otherwise).
        per_sample: (B,) per-sample losses, detached or not.
        logs: scalar diagnostics (floats or 0-d tensors), e.g. unweighted terms, weight means.
        t: optional (B,) time of each sample (t = 1 noise), for diagnostics: the trainer reports the t
            range of samples whose loss is non-finite.
    """

    loss: Tensor
    per_sample: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    t: Tensor | None = None


@dataclass
class Condition:
    """Per-sample conditioning for one sampling jump.

    Attributes:
        y: (B,) int64 labels (``num_classes`` = null) or ``None`` for unconditional models.
        guidance: (B,) CFG scale w ≥ 1, or ``None`` for the objective's default.
    """

    y: Tensor | None = None
    guidance: Tensor | None = None


class Objective(nn.Module):
    """Base class: an ``nn.Module`` that owns the backbone, its EMA tracks and any teacher.

    Accelerate prepares the objective (not the backbone), so every JVP runs inside the DDP/FSDP
    forward. Subclasses set ``Config`` and ``needs`` and implement :meth:`forward` and :meth:`step`.

    Args:
        backbone: the trained network (see :class:`Backbone`).
        config: the objective's own config dataclass.
        num_classes: number of data classes (0 = unconditional); label ``num_classes`` is null.
        ema_betas: evaluation EMA tracks, name → per-step decay. Never used in the loss. The trainer
            may set a track's decay before each :meth:`after_step` (half-life and power-function
            tracks, :mod:`fewstep.schedules`), so read it there rather than caching it.
    """

    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    needs: ClassVar[ObjectiveNeeds]
    #: The log entry that shows training progress (sweeps plot it in ``loss_curves.png``). ``"loss"``
    #: unless the optimised loss hides progress, e.g. under adaptive weights that normalise it to ≈ 1.
    progress_log: ClassVar[str] = "loss"

    @classmethod
    def needs_for(cls, config: ObjectiveConfig) -> ObjectiveNeeds:
        """What this objective needs with ``config`` (``needs`` unless a setting changes it, e.g. iMF
        without its auxiliary head); the trainer builds the backbone from it."""
        return cls.needs

    def __init__(self, backbone: nn.Module, config: ObjectiveConfig, num_classes: int,
                 ema_betas: dict[str, float] | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.num_classes = num_classes
        self.ema_betas = dict(ema_betas or {})
        for name in self.ema_betas:
            if not name.isidentifier() or name == "online":
                raise ValueError(f"EMA track name {name!r} must be an identifier other than 'online'")
        self.ema = nn.ModuleDict({name: frozen_copy(backbone) for name in self.ema_betas})

    # -- training -------------------------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor | None, generator: torch.Generator | None = None,
                nimg: int = 0) -> LossOutput:
        """Loss on a batch of data ``x`` (B, C, H, W) with labels ``y`` (B,) or ``None``.

        ``generator`` (on x's device) drives every random draw; ``nimg`` is the number of training images
        seen so far, for warm-ups and curricula (schedules are in images, never steps).
        """
        raise NotImplementedError

    def teacher_tracks(self) -> list[tuple[nn.Module, float]]:
        """(module, beta) pairs of EMA teachers the loss uses; updated after every optimizer step."""
        return []

    @torch.no_grad()
    def after_step(self) -> None:
        """Called after every optimizer step: updates teacher and evaluation EMAs."""
        for module, beta in self.teacher_tracks():
            ema_update(module, self.backbone, beta)
        for name, beta in self.ema_betas.items():
            ema_update(self.ema[name], self.backbone, beta)

    def flops_per_sample(self, forward_flops: float) -> float:
        """Model FLOPs of one training sample given one backbone forward's FLOPs (forward = 1 F,
        backward = 2 F). Objectives with JVPs and teachers override this."""
        return 3.0 * forward_flops

    # -- sampling -------------------------------------------------------------------------------
    def sampling_net(self, weights: str = "online") -> nn.Module:
        """The backbone to sample with: ``online`` or the name of an EMA track."""
        if weights == "online":
            return self.backbone
        if weights not in self.ema:
            valid = ", ".join(["online", *self.ema.keys()])
            raise KeyError(f"no weights named {weights!r} (valid: {valid})")
        return self.ema[weights]

    def step(self, x: Tensor, t: Tensor, s: Tensor, cond: Condition, net: nn.Module | None = None,
             noise: Tensor | None = None) -> Tensor:
        """One jump from time ``t`` to ``s ≤ t`` (both (B,)); returns the new x, shaped like ``x``.

        ``net`` is the backbone to use (default: the online one); ``noise`` is fresh N(0, I) noise shaped
        like ``x``, given only to objectives that declare ``needs.renoise``.
        """
        raise NotImplementedError

    def evaluations_per_step(self, cond: Condition) -> int:
        """Backbone evaluations one :meth:`step` costs (2 for CFG at sampling)."""
        return 1

    def default_schedule(self, nfe: int) -> list[float]:
        """Descending times from 1 (noise) to 0 (data) for ``nfe`` jumps; uniform by default."""
        if nfe < 1:
            raise ValueError(f"nfe must be ≥ 1, got {nfe}")
        return [1.0 - i / nfe for i in range(nfe + 1)]
