"""Fréchet distance between feature Gaussians (FID when the features are Inception pool features).

    FD(μ₁, Σ₁, μ₂, Σ₂) = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr (Σ₁Σ₂)^{1/2}

(Dowson & Landau, 1982; FID: Heusel et al., 2017).

The trace of the matrix square root is computed without ``scipy.linalg.sqrtm``: the eigenvalues of Σ₁Σ₂
are those of the symmetric PSD matrix M = Σ₁^{1/2} Σ₂ Σ₁^{1/2} (AB and BA share their non-zero spectrum),
so Tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ(M), with Σ₁^{1/2} and λ(M) from two symmetric eigendecompositions in float64
(negative round-off eigenvalues are clipped to 0). This is exact for singular covariances too (e.g.
fewer samples than features), where ``sqrtm`` of the non-symmetric product is ill-conditioned.

Statistics are accumulated as streaming float64 sums (n, Σf, Σffᵀ), so 50k features never sit in memory
as a list, and sums from several processes combine with one all-reduce (as torchmetrics and edm2 do).
"""
from __future__ import annotations

import torch
from torch import Tensor


class FeatureStats:
    """Running float64 sums of features: count n, Σ f (D,) and Σ f fᵀ (D, D).

    Args:
        dim: feature dimension D.
        device: where the sums live (the extractor's device, so updates need no copy).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: Tensor) -> None:
        """Add a batch of features (B, D) (any float dtype; summed in float64)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (B, {self.dim}), got {tuple(features.shape)}")
        f = features.to(device=self.sum.device, dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f

    def all_reduce(self) -> "FeatureStats":
        """Sum the statistics over all processes of the default process group (no-op without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())
        return self

    def mean(self) -> Tensor:
        """μ (D,) float64."""
        self._check(1)
        return self.sum / self.n

    def cov(self) -> Tensor:
        """Unbiased covariance Σ (D, D) float64 (``numpy.cov`` convention, divisor n − 1)."""
        self._check(2)
        mu = self.mean()
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return (sigma + sigma.T) / 2

    def _check(self, at_least: int) -> None:
        if self.n < at_least:
            raise ValueError(f"need at least {at_least} feature vectors, have {self.n}")


def _sqrt_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    lam, q = torch.linalg.eigh(a)
    return (q * lam.clamp(min=0).sqrt()) @ q.T


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """Tr (Σ₁Σ₂)^{1/2} for symmetric PSD Σ₁, Σ₂ (float64 scalar tensor)."""
    s1 = _sqrt_psd(sigma1)
    m = s1 @ sigma2 @ s1
    lam = torch.linalg.eigvalsh((m + m.T) / 2)
    return lam.clamp(min=0).sqrt().sum()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂), computed in float64.

    Args:
        mu1, mu2: (D,) means (tensors or arrays).
        sigma1, sigma2: (D, D) symmetric PSD covariances.
    Returns:
        FD ≥ 0 up to round-off, in squared feature units.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(v).to(torch.float64) for v in (mu1, mu2, sigma1, sigma2))
    device = sigma1.device
    mu2, sigma2 = mu2.to(device), sigma2.to(device)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(),) * 2:
        raise ValueError(f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    diff = mu1.to(device) - mu2
    fd = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(fd)
