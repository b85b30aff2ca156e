"""The VAE: a diffusers ``AutoencoderKL`` (the ``fewstep[latent]`` extra), imported only here, lazily.

Encoding (``docs/design/tvm.md`` §3): pixels ``u8 / 127.5 − 1`` → encoder in fp32 → posterior mean and std (raw, no
0.18215 factor). Decoding (``docs/design/tvm.md`` §4): undo the per-channel normalisation, run the decoder (fp16 on
CUDA, fp32 on the CPU), map ``y`` to ``(y·0.5 + 0.5)`` clamped to [0, 1], ×255, truncated to uint8.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.data.base import DataError, DataNotFoundError
from fewstep.data.latents import LatentFormat
from fewstep.images import to_uint8


def _autoencoder_class() -> Any:
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise DataError(f"latent datasets need diffusers' AutoencoderKL ({exc}); install it with "
                        f"pip install 'fewstep[latent]'") from exc
    return AutoencoderKL


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).expanduser().exists()


def load_vae(name: str, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """Load an ``AutoencoderKL`` from a local directory (with ``config.json``, or a pipeline folder with a
    ``vae/`` sub-folder) or a Hub id (``stabilityai/sd-vae-ft-ema``), in eval mode on ``device``.

    Offline (``HF_HUB_OFFLINE=1``) a Hub id is read from the local cache only; a VAE that is neither
    there nor local fails with a :class:`~fewstep.data.base.DataError` saying how to get it.
    """
    cls = _autoencoder_class()
    if _looks_local(name):
        path = Path(name).expanduser()
        if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise DataNotFoundError(f"VAE directory {path} has no config.json (expected a diffusers "
                                    f"AutoencoderKL saved with save_pretrained, or a Hub id such as "
                                    f"stabilityai/sd-vae-ft-ema)")
        vae = cls.from_pretrained(str(path), torch_dtype=dtype)
    else:
        from fewstep.data.hf import hub_offline

        from fewstep.data.hf import hub_unreachable

        offline = hub_offline()
        try:
            try:   # the local cache first: a VAE downloaded before needs no network
                vae = cls.from_pretrained(name, torch_dtype=dtype, local_files_only=True)
            except (OSError, ValueError):
                if offline:
                    raise
                if (reason := hub_unreachable()) is not None:
                    raise DataError(f"cannot download VAE {name!r}: {reason}. It is the network, not the VAE: "
                                    f"connect this machine, or download it elsewhere (`hf download {name}`) and "
                                    f"pass --vae DIR (FEWSTEP_VAE=DIR for decoding)") from None
                vae = cls.from_pretrained(name, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            if offline:
                raise DataError(
                    f"VAE {name!r} is not in the local Hugging Face cache and the Hub is offline "
                    f"(HF_HUB_OFFLINE is set). On a machine with a network run `hf download {name}` (or "
                    f"save it with AutoencoderKL.from_pretrained({name!r}).save_pretrained(DIR)) and pass "
                    f"--vae DIR, or set FEWSTEP_VAE=DIR for decoding") from exc
            raise DataError(f"could not load VAE {name!r} from the Hugging Face Hub: {exc}") from exc
    if not all(hasattr(vae, a) for a in ("encode", "decode", "config")):
        raise DataError(f"{name!r} is not a VAE with encode/decode (got {type(vae).__name__})")
    return vae.to(device=device or "cpu").eval().requires_grad_(False)


def vae_factor(vae: Any) -> int:
    """Pixels per latent cell along each side (8 for the SD VAEs): 2^(number of down blocks − 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_posterior(vae: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """Pixels x (B, 3, R, R) in [−1, 1] → posterior mean and std, each (B, C, R/f, R/f) float32."""
    param = next(vae.parameters())
    posterior = vae.encode(x.to(param.device, param.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def decode_raw(vae: Any, z: Tensor) -> Tensor:
    """Raw latents z (B, C, h, w) → decoder output y (B, 3, h·f, w·f) float32, ≈ [−1, 1] (not clamped)."""
    param = next(vae.parameters())
    return vae.decode(z.to(param.device, param.dtype)).sample.float()


class LatentDecoder:
    """Normalised latents → uint8 images, as ``docs/design/tvm.md`` §4; the VAE is loaded on the first call.

    Args:
        fmt: the latent format (normalisation constants and the VAE to decode with).
        vae: an ``AutoencoderKL`` (moved to ``device`` and ``dtype``) or where to load one (default:
            ``$FEWSTEP_VAE``, else ``fmt.vae``).
        device: where to decode (default: CUDA when present).
        dtype: decoder dtype (default fp16 on CUDA, as the official code; fp32 on the CPU).
        batch_size: latents per decoder call.
        rounding: how decoder outputs become uint8 (:func:`fewstep.images.to_uint8`; ``truncate`` as the
            official TVM/EDM2 code; an evaluation protocol may choose another, docs/protocols.md).
    """

    def __init__(self, fmt: LatentFormat, *, vae: Any = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, batch_size: int = 32, rounding: str = "truncate"):
        self.fmt = fmt
        self.rounding = rounding
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.batch_size = batch_size
        module = vae is not None and not isinstance(vae, (str, os.PathLike))
        self._vae = vae.to(self.device, self.dtype) if module else None
        self.source = str(vae) if isinstance(vae, (str, os.PathLike)) else (os.environ.get("FEWSTEP_VAE") or fmt.vae)

    @property
    def vae(self) -> Any:
        if self._vae is None:
            self._vae = load_vae(self.source, self.device, self.dtype)
        return self._vae

    def __call__(self, x: Tensor) -> Tensor:
        """x (N, C, h, w) normalised latents → (N, 3, R, R) uint8 (``rounding``; truncated by default, ``docs/design/tvm.md`` §4)."""
        want = tuple(self.fmt.latent_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"latents must be (N, {', '.join(map(str, want))}), got {tuple(x.shape)}")
        out = []
        for chunk in x.split(self.batch_size):
            z = self.fmt.denormalize(chunk.to(self.device, torch.float32))
            out.append(to_uint8(decode_raw(self.vae, z), rounding=self.rounding))
        return torch.cat(out) if out else torch.zeros((0, 3, self.fmt.resolution, self.fmt.resolution), dtype=torch.uint8)
