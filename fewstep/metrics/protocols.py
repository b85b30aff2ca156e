"""Evaluation protocols: how generated samples become uint8 images and how uint8 images are resized for
the Inception network, as three reference pipelines do it (docs/protocols.md has the full account and
the sources).

Every protocol feeds the same Inception weights (TF ``inception-2015-12-05``, 2048-d pool features) the
same normalisation, ``(x − 128)/128`` of RGB float pixels in [0, 255] at 299×299, grey images repeated to
three channels. They differ in two steps:

============  =========================================  =========================================
protocol      uint8 conversion of samples in [−1, 1]     resize to 299×299
============  =========================================  =========================================
``clean``     ``round((x + 1)·127.5)`` (fewstep's)        PIL bicubic on float pixels, clipped
              VAE outputs: truncated (TVM/EDM2)            (clean-fid ``clean``)
``adm``       ``floor((x + 1)·127.5)`` (guided-diffusion   TF1 ``resize_bilinear`` (no half-pixel
              ``image_sample.py``); VAE outputs:           centres, no antialiasing), inside ADM's
              ``floor(127.5·x + 128)`` (DiT ``sample_ddp``) TF Inception graph
``edm2``      ``floor(127.5·x + 128)`` (StyleGAN3          the same TF1 bilinear, emulated with
              ``metric_utils``, EDM2's pixel encoder);     ``grid_sample`` inside NVIDIA's Inception
              VAE outputs truncated (EDM2 ``StabilityVAE   translation (StyleGAN3, EDM2)
              Encoder``)
============  =========================================  =========================================

Reference statistics of a dataset are made from its stored uint8 images (the conversion above applies to
generated samples only), so statistics of different protocols differ through the resize; they record the
protocol, and statistics of another protocol are refused.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol.

    Attributes:
        name: ``clean``, ``adm`` or ``edm2``.
        pixels: :func:`fewstep.images.to_uint8` rounding of pixel-space samples.
        latents: the same for VAE-decoded samples of latent runs.
        resize: the Inception extractor's resize (``clean``: PIL bicubic; ``tf1-bilinear``).
        source: where the pipeline is defined.
    """

    name: str
    pixels: str
    latents: str
    resize: str
    source: str


PROTOCOLS: dict[str, Protocol] = {
    "clean": Protocol("clean", pixels="round", latents="truncate", resize="clean",
                      source="clean-fid 'clean' mode (Parmar et al. 2022); fewstep's PNG-style rounding"),
    "adm": Protocol("adm", pixels="floor", latents="half-up", resize="tf1-bilinear",
                    source="ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py) on samples "
                           "written by guided-diffusion scripts/image_sample.py (pixels) or DiT sample_ddp.py "
                           "(latents)"),
    "edm2": Protocol("edm2", pixels="half-up", latents="truncate", resize="tf1-bilinear",
                     source="StyleGAN3 metrics/metric_utils.py and EDM2 calculate_metrics.py with NVIDIA's "
                            "inception-2015-12-05.pkl"),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; unknown names fail naming the valid ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r} (valid: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


def extractor_options(extractor: str, protocol: str) -> dict:
    """Constructor options a protocol implies for an extractor: the Inception resize; none for others
    (the ``fmnist-classifier`` takes its images unresized; ``dinov2`` has its own resize)."""
    return {"resize": get_protocol(protocol).resize} if extractor == "inception" else {}


__all__ = ["PROTOCOLS", "Protocol", "extractor_options", "get_protocol"]
