"""The shared closed-form Gaussian oracle (docs/design/frontier.md §2): one set of exact flow-matching
quantities, and the "oracle backbones" every objective's tests plug into their objective.

Data: x | y ~ N(μ_y, σ²I) with D i.i.d. dimensions; the null label ∅ is its own Gaussian N(μ_∅, σ²I) (not
the mixture, so null-label fields are exact only for that Gaussian). With x_t = a_t·x + t·ε, a_t = 1 − t
(t = 1 noise), write S_t² = a_t²σ² + t² (``d``) and k_t = (t − a_tσ²)/S_t². Then

* marginal velocity      v*(z, t) = −μ + k_t·(z − a_t μ)                            (``velocity``);
* flow map               Φ_{t→s}(z) = a_s μ + (S_s/S_t)·(z − a_t μ)                 (``flow_map``);
* average velocity       u*(z, t, s) = (z − Φ_{t→s}(z))/(t − s) = g·(z − a_t μ) − μ,
                         g = ((1 + σ²)(t + s) − 2σ²)/(S_t·(S_t + S_s))            (``average_velocity``),
  smooth in (t, s) with u*(z, t, t) = v*(z, t), so ``torch.func.jvp`` differentiates it cleanly;
* flow-matching floor    E[(v* − (ε − x))² | z] = σ²/S_t² per dimension             (``fm_floor``);
* guided fields          v_∅ + w·(v_y − v_∅) (shared σ) is the velocity of N(μ_∅ + w(μ_y − μ_∅), σ²I)
                         (``guided_means``); with a guidance interval [t_min, t_max] (w inside, 1
                         outside) the flow map composes the three segments' maps (``interval_flow_map``).

The backbones: :class:`VelocityOracle` (v*, flow matching), :class:`AverageVelocityOracle` (u*, every
average-velocity objective: MeanFlow, iMF with its inputs and v-head, α-Flow, DMF, Shortcut),
:class:`FlowMapOracle` (TVM's F = u* of the guided Gaussian, scaled), :class:`TrigFlowOracle` (sCM's F from
Φ_{t→0}) and :class:`EDMOracle` (ECT's F from Φ_{t→t(σ_min)}). ``conftest.py`` exposes
:class:`GaussianProblem` as the ``gaussian`` fixture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fewstep.objectives.common import per_sample


# ---------------------------------------------------------------------------------------------------
# Closed forms (z, mu (B, …); t, s (B,))
# ---------------------------------------------------------------------------------------------------
def _b(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def d(t: Tensor, sigma: float) -> Tensor:
    """S_t² = (1 − t)²σ² + t²: the per-dimension variance of x_t around (1 − t)μ."""
    return (1 - t) ** 2 * sigma ** 2 + t ** 2


def fm_floor(t: Tensor, sigma: float) -> Tensor:
    """Irreducible flow-matching loss per dimension at time t: Var(ε − x | x_t) = σ²/S_t²."""
    return sigma ** 2 / d(t, sigma)


def velocity(z: Tensor, t: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """v*(z, t) = E[ε − x | x_t = z] for data N(μ, σ²I)."""
    tt = _b(t, z)
    return (tt - (1 - tt) * sigma ** 2) / d(tt, sigma) * (z - (1 - tt) * mu) - mu


def flow_map(z: Tensor, t: Tensor, s: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """Φ_{t→s}(z): the exact probability-flow map of N(μ, σ²I) from time t to s."""
    tt, ss = _b(t, z), _b(s, z)
    return (1 - ss) * mu + torch.sqrt(d(ss, sigma) / d(tt, sigma)) * (z - (1 - tt) * mu)


def average_velocity(z: Tensor, t: Tensor, s: Tensor, mu: Tensor, sigma: float) -> Tensor:
    """u*(z, t, s) = (z − Φ_{t→s}(z))/(t − s), in the smooth form (u*(z, t, t) = v*(z, t))."""
    tt, ss = _b(t, z), _b(s, z)
    sd_t, sd_s = torch.sqrt(d(tt, sigma)), torch.sqrt(d(ss, sigma))
    g = ((1 + sigma ** 2) * (tt + ss) - 2 * sigma ** 2) / (sd_t * (sd_t + sd_s))
    return g * (z - (1 - tt) * mu) - mu


def guided_means(means: Tensor, scale: float | Tensor) -> Tensor:
    """Rows y < K → μ_∅ + scale·(μ_y − μ_∅) (the guided field's Gaussian); row K (null) unchanged."""
    out = scale * means + (1 - scale) * means[-1:]
    out[-1] = means[-1]
    return out


def guided_velocity(z: Tensor, t: Tensor, mu_y: Tensor, mu_null: Tensor, w: Tensor, sigma: float) -> Tensor:
    """v_∅ + w·(v_y − v_∅) from the two Gaussian velocities (w (B,))."""
    v_y, v_null = velocity(z, t, mu_y, sigma), velocity(z, t, mu_null, sigma)
    return v_null + _b(w, z) * (v_y - v_null)


def guided_mean(mu_y: Tensor, mu_null: Tensor, w: Tensor) -> Tensor:
    """μ_∅ + w·(μ_y − μ_∅) per sample (w (B,))."""
    return mu_null + _b(w, mu_y) * (mu_y - mu_null)


def interval_flow_map(z: Tensor, t: Tensor, s: Tensor, mu_y: Tensor, mu_null: Tensor, sigma: float,
                      w: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
    """Exact flow map t → s of the guided field v_∅ + w_eff(τ)·(v_y − v_∅), w_eff = w on [t_min, t_max]
    and 1 outside: the three segments [t, t_max∧t], [·, t_min∨s], [·, s] each follow one Gaussian's map."""
    p1 = torch.minimum(torch.maximum(t_max, s), t)
    p2 = torch.minimum(torch.maximum(t_min, s), p1)
    ones = torch.ones_like(w)
    z = flow_map(z, t, p1, guided_mean(mu_y, mu_null, ones), sigma)
    z = flow_map(z, p1, p2, guided_mean(mu_y, mu_null, w), sigma)
    return flow_map(z, p2, s, guided_mean(mu_y, mu_null, ones), sigma)


def interval_average_velocity(z: Tensor, t: Tensor, s: Tensor, mu_y: Tensor, mu_null: Tensor, sigma: float,
                              w: Tensor, t_min: Tensor, t_max: Tensor) -> Tensor:
    """(z − interval_flow_map)/(t − s), and the guided velocity at w_eff(t) where s = t."""
    inside = (t >= t_min) & (t <= t_max)
    w_t = torch.where(inside, w, torch.ones_like(w))
    at_t = velocity(z, t, guided_mean(mu_y, mu_null, w_t), sigma)
    gap = torch.where(t > s, t - s, torch.ones_like(t))
    avg = (z - interval_flow_map(z, t, s, mu_y, mu_null, sigma, w, t_min, t_max)) / _b(gap, z)
    return torch.where(_b(t > s, z) > 0, avg, at_t)


def rk4_flow_map(velocity_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, s: Tensor,
                 steps: int = 200) -> Tensor:
    """Integrate dx/dτ = velocity_fn(x, τ) from τ = t to τ = s (both (B,), per sample) with classical RK4."""
    h = (s - t) / steps
    hb = h.reshape(-1, *([1] * (x.ndim - 1)))
    tau = t.clone()
    for _ in range(steps):
        k1 = velocity_fn(x, tau)
        k2 = velocity_fn(x + hb / 2 * k1, tau + h / 2)
        k3 = velocity_fn(x + hb / 2 * k2, tau + h / 2)
        k4 = velocity_fn(x + hb * k3, tau + h)
        x = x + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        tau = tau + h
    return x


def class_means(num_classes: int, shape=(1, 4, 4), seed: int = 0, dtype=torch.float64, null_scale: float = 0.0) -> Tensor:
    """(K + 1, *shape) N(0, 1) class means; the null row is ``null_scale`` times its own draw (0: zero mean)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn((num_classes + 1, *shape), generator=gen, dtype=dtype)
    means[num_classes] *= null_scale
    return means


def oracle_means(num_classes: int, shape=(1, 4, 4), seed: int = 0, null_scale: float = 0.5) -> Tensor:
    """:func:`class_means` with a non-zero null Gaussian (guided fields then differ from the class ones)."""
    return class_means(num_classes, shape, seed, null_scale=null_scale)


def gaussian_batch(means: Tensor, sigma: float, n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """(x, y): n labels uniform in [0, K) and x | y ~ N(μ_y, σ²I), float64 like ``means``."""
    gen = torch.Generator().manual_seed(seed)
    k = means.shape[0] - 1
    y = torch.randint(k, (n,), generator=gen)
    x = means[y] + sigma * torch.randn((n, *means.shape[1:]), generator=gen, dtype=means.dtype)
    return x, y


@dataclass
class GaussianProblem:
    """One Gaussian class problem: (K + 1, C, H, W) ``means`` (row K null) and data std ``sigma``.
    The ``gaussian`` fixture (conftest.py) gives every objective's tests the same one."""

    means: Tensor
    sigma: float

    @property
    def num_classes(self) -> int:
        return self.means.shape[0] - 1

    @property
    def dims(self) -> int:
        return self.means[0].numel()

    def batch(self, n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
        return gaussian_batch(self.means, self.sigma, n, seed)

    def mu(self, y: Tensor | None, like: Tensor) -> Tensor:
        """(B, C, H, W) means of labels y (null where ``None``)."""
        if y is None:
            y = torch.full((like.shape[0],), self.num_classes, dtype=torch.long)
        return self.means[y.cpu()].to(like.device, like.dtype)

    def velocity(self, z: Tensor, t: Tensor, y: Tensor | None, w: Tensor | float = 1.0) -> Tensor:
        """v_∅ + w·(v_y − v_∅) at (z, t): the exact (guided) marginal velocity."""
        w = torch.as_tensor(w, dtype=z.dtype).expand(z.shape[0]) if not torch.is_tensor(w) or w.ndim == 0 else w
        mu = guided_mean(self.mu(y, z), self.mu(None, z), w.to(z.dtype))
        return velocity(z, t, mu, self.sigma)

    def average_velocity(self, z: Tensor, t: Tensor, s: Tensor, y: Tensor | None, w: Tensor | float = 1.0) -> Tensor:
        w = torch.as_tensor(w, dtype=z.dtype).expand(z.shape[0]) if not torch.is_tensor(w) or w.ndim == 0 else w
        mu = guided_mean(self.mu(y, z), self.mu(None, z), w.to(z.dtype))
        return average_velocity(z, t, s, mu, self.sigma)


def standard_problem(num_classes: int = 3, shape=(1, 4, 4), sigma: float = 0.5) -> GaussianProblem:
    """The problem every objective's oracle tests use: K = 3 classes of 1×4×4 N(μ_y, 0.25·I), a null
    Gaussian of its own (non-zero mean), float64."""
    means = class_means(num_classes, shape)
    means[num_classes] = 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return GaussianProblem(means, sigma)


# ---------------------------------------------------------------------------------------------------
# Oracle backbones
# ---------------------------------------------------------------------------------------------------
class _Oracle(nn.Module):
    """Common state: the means table (a frozen parameter, so ``.double()`` and devices follow), σ, a
    constant ``error`` added to the output, and one trainable ``bias`` so optimizers and gradients have
    something to act on. Records the labels and train/eval mode of every call."""

    def __init__(self, means: Tensor, sigma: float, error: float = 0.0):
        super().__init__()
        self.means = nn.Parameter(means.clone(), requires_grad=False)
        self.sigma, self.error = sigma, error
        self.in_channels, self.input_size = means.shape[1], means.shape[2]
        self.num_classes = means.shape[0] - 1
        self.bias = nn.Parameter(torch.zeros(()))
        self.calls: list[Tensor | None] = []
        self.modes: list[bool] = []
        self.grad: list[bool] = []          # autograd enabled at every call (stop-gradient passes: False)
        self.seen_t: list[Tensor] = []

    def _record(self, t: Tensor, y: Tensor | None) -> Tensor:
        self.calls.append(y)
        self.modes.append(self.training)
        self.grad.append(torch.is_grad_enabled())
        self.seen_t.append(t.detach())
        if y is None:
            y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        return self.means[y]


class VelocityOracle(_Oracle):
    """A one-time 'backbone' v*(x, t | y) (+ error): the exact flow-matching velocity."""

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, **cond) -> Tensor:
        mu = self._record(t, y)
        return velocity(x, t, mu.to(x.dtype), self.sigma) + self.error * torch.ones_like(x) + self.bias


class AverageVelocityOracle(_Oracle):
    """A two-time 'backbone' u*(x, t, s | y) (+ error) for every average-velocity objective.

    With ``conditions=True`` it takes iMF's inputs (``omega`` = 1 − 1/w, ``t_min``, ``t_max``) and is the
    average velocity of the interval-guided field v_∅ + w_eff(τ)·(v_y − v_∅); its auxiliary head
    (``head="aux"``/``"both"``) is the instantaneous guided velocity at w_eff(t), whatever s (what iMF's
    v-head learns). ``gap_error`` adds gap_error·(t − s)·x: a map error that vanishes at s = t.
    """

    def __init__(self, means: Tensor, sigma: float, error: float = 0.0, conditions: bool = False,
                 gap_error: float = 0.0, aux_error: float = 0.0):
        super().__init__(means, sigma, error)
        self.conditions, self.gap_error, self.aux_error = conditions, gap_error, aux_error
        self.seen: list[dict] = []    # per call: t, s, head and the extra conditions

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, *,
                head: str = "main", **cond) -> Tensor | tuple[Tensor, Tensor]:
        self.seen.append({"t": t.detach(), "s": None if s is None else s.detach(), "head": head,
                          **{k: v.detach() for k, v in cond.items()}})
        mu = self._record(t, y).to(x.dtype)
        s = t if s is None else s
        if not self.conditions:
            u = average_velocity(x, t, s, mu, self.sigma)
            aux = velocity(x, t, mu, self.sigma)
        else:
            w = 1 / (1 - cond["omega"].to(x.dtype))
            mu_null = self.means[self.num_classes].to(x.dtype).expand_as(mu)
            u = interval_average_velocity(x, t, s, mu, mu_null, self.sigma, w, cond["t_min"], cond["t_max"])
            inside = (t >= cond["t_min"]) & (t <= cond["t_max"])
            aux = velocity(x, t, guided_mean(mu, mu_null, torch.where(inside, w, torch.ones_like(w))), self.sigma)
        u = u + self.error + self.gap_error * _b(t - s, x) * x + self.bias
        aux = aux + self.aux_error + self.bias
        return {"main": u, "aux": aux, "both": (u, aux)}[head]


class FlowMapOracle(_Oracle):
    """A two-time 'backbone' F(x, t, s, y, guidance=β) whose flow map x + (s − t)·k·F is exact (TVM):
    F = u*(x, t, s) of N(μ_w, σ²I), μ_w = μ_∅ + w·(μ_y − μ_∅), w = 1/β, divided by k = w when ``scaled``.
    ``gap_error`` adds gap_error·(t − s)·x (changes the map, not the velocity at gap 0)."""

    def __init__(self, means: Tensor, sigma: float, scaled: bool = True, error: float = 0.0,
                 gap_error: float = 0.0):
        super().__init__(means, sigma, error)
        self.scaled, self.gap_error = scaled, gap_error
        del self.bias   # TVM's tests check the teacher copy: no trainable offset

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        s = t if s is None else s
        dtype = torch.promote_types(x.dtype, self.means.dtype)
        x = x.to(dtype)
        beta = torch.ones_like(t) if guidance is None else guidance
        w = (1 / beta).to(dtype)
        mu = self._record(t, y).to(dtype)
        mu_w = guided_mean(mu, self.means[self.num_classes].to(dtype).expand_as(mu), w)
        F = average_velocity(x, t.to(dtype), s.to(dtype), mu_w, self.sigma)
        if self.scaled:
            F = F / _b(w, F)
        return F + self.error + self.gap_error * _b(t - s, x).to(dtype) * x

    def flow_map(self, x: Tensor, t: Tensor, s: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """The exact X(x_t, t, s) of the guided Gaussian, for reference."""
        mu = self.means[y]
        return flow_map(x, t, s, guided_mean(mu, self.means[self.num_classes].expand_as(mu), w), self.sigma)


class TrigFlowOracle(_Oracle):
    """A one-time backbone whose sCM consistency function is exactly Φ_{t→0} (plus ``error`` on its output).

    Called like the DiT with *our* (x_t, t); returns F* = (cos τ·x_τ − f*)/(σ_d sin τ) (``trigflow``) or
    v* = (x_t − f*)/t (``velocity``), with f* = Φ_{t→0}(x_t) and (x_τ, τ) the TrigFlow point. t ∈ (0, 1].
    """

    def __init__(self, means: Tensor, s: float, sigma_d: float, parameterization: str = "trigflow",
                 error: float = 0.0):
        super().__init__(means, s, error)
        self.s, self.sigma_d, self.parameterization = s, sigma_d, parameterization
        self.seen: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, **cond) -> Tensor:
        from fewstep.objectives.trigflow import state_scale, tau_from_t

        assert s is None and not cond, "sCM calls a one-time backbone"
        self.seen.append((x.detach(), t.detach()))
        mu = self._record(t, y).to(x.dtype)
        f = flow_map(x, t, torch.zeros_like(t), mu, self.s)
        if self.parameterization == "trigflow":
            tau = tau_from_t(t, self.sigma_d)
            x_tau = x / per_sample(state_scale(tau, self.sigma_d), x)
            out = (per_sample(torch.cos(tau), x) * x_tau - f) / per_sample(self.sigma_d * torch.sin(tau), x)
        else:
            out = (x - f) / per_sample(t, x)
        return out + self.error + self.bias


def trigflow_std(tau: Tensor, s: float, sigma_d: float) -> Tensor:
    """S(τ): the std of x_τ | y in TrigFlow, √(cos²τ·s² + sin²τ·σ_d²), (B,)."""
    return torch.sqrt(torch.cos(tau) ** 2 * s ** 2 + torch.sin(tau) ** 2 * sigma_d ** 2)


def exact_consistency(x_tau: Tensor, tau: Tensor, mu: Tensor, s: float, sigma_d: float) -> Tensor:
    """f*(x_τ, τ) in TrigFlow variables: Φ_{t(τ)→0} of the same point, = μ + (s/S(τ))·(x_τ − cos τ·μ)."""
    return mu + per_sample(s / trigflow_std(tau, s, sigma_d), x_tau) * (x_tau - per_sample(torch.cos(tau), mu) * mu)


def pf_velocity(x_tau: Tensor, tau: Tensor, mu: Tensor, s: float, sigma_d: float) -> Tensor:
    """dx_τ/dτ of the probability flow at x_τ (TrigFlow), = E[cos τ·z − sin τ·x₀ | x_τ]."""
    cos, sin = torch.cos(tau), torch.sin(tau)
    gain = sin * cos * (sigma_d ** 2 - s ** 2) / trigflow_std(tau, s, sigma_d) ** 2
    return -per_sample(sin, mu) * mu + per_sample(gain, x_tau) * (x_tau - per_sample(cos, mu) * mu)


def edm_slope(sigma: Tensor | float, std: float, sigma_min: float = 0.002) -> Tensor:
    """a(σ) = √(s² + σ_min²)/√(s² + σ²): the slope of the exact consistency function in EDM σ
    (f*(x_σ, σ) = μ + a(σ)·(x_σ − μ), Φ_{t(σ)→t(σ_min)} written in x_σ = x_t/(1 − t))."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return math.sqrt(std ** 2 + sigma_min ** 2) / (std ** 2 + sigma ** 2).sqrt()


def edm_residual_variance(sigma_t: Tensor, sigma_r: Tensor, std: float, sigma_min: float = 0.002) -> Tensor:
    """v per dimension of f*(x + σ_t ε, σ_t) − f*(x + σ_r ε, σ_r) (σ_r raised to σ_min):
    (a_t − a_r)²·s² + (a_t σ_t − a_r σ_r)²."""
    s_r = torch.as_tensor(sigma_r, dtype=torch.float64).clamp(min=sigma_min)
    a_t, a_r = edm_slope(sigma_t, std, sigma_min), edm_slope(s_r, std, sigma_min)
    return (a_t - a_r) ** 2 * std ** 2 + (a_t * sigma_t - a_r * s_r) ** 2


class EDMOracle(nn.Module):
    """A backbone F whose CM-preconditioned output is f* = Φ_{t→t(σ_min)} in EDM variables (plus
    c_out·offset, which keeps f(x, σ_min) = x). Inverts the preconditioning: given u = c_in·x_σ and our time
    t (σ = t/(1 − t)), returns F = (f* − c_skip·x_σ)/c_out (0 where c_out = 0) + offset.
    ``offset`` is a trainable scalar, so gradients can be checked."""

    def __init__(self, means: Tensor, std: float, offset: float = 0.0, sigma_data: float = 0.5,
                 sigma_min: float = 0.002):
        super().__init__()
        self.means = nn.Parameter(means.clone(), requires_grad=False)
        self.std, self.sigma_data, self.sigma_min = std, sigma_data, sigma_min
        self.offset = nn.Parameter(torch.tensor(float(offset), dtype=means.dtype))
        self.in_channels, self.input_size = means.shape[1], means.shape[2]
        self.num_classes = means.shape[0] - 1
        self.seen_t: list[Tensor] = []

    def forward(self, u: Tensor, t: Tensor, s: Tensor | None = None, y: Tensor | None = None, **cond) -> Tensor:
        from fewstep.objectives.edm import cm_preconditioning, sigma_from_t, t_from_sigma

        self.seen_t.append(t.detach())
        y = y if y is not None else torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)
        mu = self.means[y]
        t64 = t.double()
        sigma = sigma_from_t(t64)
        c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in cm_preconditioning(sigma, self.sigma_data, self.sigma_min))
        x_sigma = u.double() / c_in
        t_min = t_from_sigma(torch.full_like(t64, self.sigma_min))
        x_t = x_sigma * _b(1 - t64, x_sigma)                                 # our state of the same point
        f_star = flow_map(x_t, t64, t_min, mu, self.std) / _b(1 - t_min, x_t)   # back to EDM x_σ units
        safe = torch.where(c_out == 0, torch.ones_like(c_out), c_out)
        F = torch.where(c_out == 0, torch.zeros_like(f_star), (f_star - c_skip * x_sigma) / safe)
        return F + self.offset
