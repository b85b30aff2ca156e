"""``fewstep bench fid``: images/s of generate + extract at ``nfe`` jumps, fewstep's path next to clean-fid's.

Both paths see the same images: seeds ``0 … num − 1`` of one model, sampled with
:func:`fewstep.sample.sample` and quantised with :func:`fewstep.images.to_uint8`.

* fewstep: :func:`fewstep.evaluate_images.sample_statistics` (GPU resize as two matrix products, streaming float64
  sums, torch Fréchet distance).
* clean-fid: ``cleanfid.fid.compute_fid(gen=..., mode="clean")`` as released (per-image PIL resize on the
  CPU, features kept as numpy, ``scipy.linalg.sqrtm``), given the same network as
  ``custom_feat_extractor`` (its own loader would download to /tmp) and the same reference statistics
  (its stats lookup would download; it is patched to return ours). Its time runs from its first call of
  ``gen`` to its call of ``frechet_distance``, so both times cover generate + extract only.

Reference statistics come from ``ref_num`` images of seeds 10⁶ … of the same model. The model is a
randomly initialised DiT of the given flavour (default DiT-B/2 on 3×32×32, 256 tokens like ImageNet-256
latents) unless ``run`` names a trained one; with random weights the FIDs are meaningless but equal.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from fewstep.images import to_uint8
from fewstep.metrics.extractors import CleanResize, FeatureExtractor, InceptionExtractor
from fewstep.metrics.fid import frechet_distance
from fewstep.sample import parse_device, sample

log = logging.getLogger(__name__)


class RandomInception(FeatureExtractor):
    """torchvision's Inception-v3 with random weights behind the same preprocessing: a timing stand-in
    with the FID network's cost, for machines without the weights file (FIDs are not comparable)."""

    name = "random-inception"
    feature_dim = 2048

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        import torchvision

        torch.manual_seed(0)
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
        net.fc = torch.nn.Identity()
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.resizer = CleanResize(299)

    def preprocess(self, images):
        x = images.to(self.device)
        return self.resizer(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)

    def embed(self, x):
        return self.net((x.to(self.device, torch.float32) - 128) / 128)

    def metadata(self) -> dict:
        return {"extractor": self.name, "weights_sha256": None, "resize": "clean", "input_size": 299,
                "feature_dim": 2048}


def _objective(run: str | None, backbone: str, objective: str, resolution: int, num_classes: int, device):
    from fewstep.build import build_objective, load_objective, resolve
    from fewstep.config import RunConfig, TrainConfig, default_backbone_config, default_objective_config
    from fewstep.contracts import DataSpec

    if run:
        return load_objective(run, device=device)[0]
    cfg = resolve(RunConfig(recipe="bench", objective=default_objective_config(objective),
                            backbone=default_backbone_config(backbone), train=TrainConfig(ema_betas={})))
    spec = DataSpec(name="bench", channels=3, resolution=resolution, num_classes=num_classes, num_items=1)
    torch.manual_seed(0)
    return build_objective(cfg, spec).to(device).eval()


def _peak_gib(device: torch.device, reset: bool = False) -> float | None:
    """Peak CUDA memory allocated since the last reset, GiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench_fid(*, num: int = 10_000, batch: int = 256, nfe: int = 1, inception: str | None = None,
              extractor: str = "inception", backbone: str = "dit-b", objective: str = "fm", resolution: int = 32,
              num_classes: int = 1000, run: str | None = None, ref_num: int | None = None, device: str = "auto",
              autocast: bool = True, cleanfid: bool = True) -> dict[str, Any]:
    """Time both paths on the same images and compare their FIDs; returns the numbers printed."""
    from fewstep.evaluate_images import sample_statistics

    dev = parse_device(device)
    autocast = autocast and dev.type == "cuda"
    obj = _objective(run, backbone, objective, resolution, num_classes, dev)
    ex = RandomInception(dev) if extractor == "random-inception" else InceptionExtractor(inception, device=dev)
    params = sum(p.numel() for p in obj.backbone.parameters())
    net = obj.backbone
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log.info(f"device {name}; model {run or backbone} "
             f"({params / 1e6:.1f} M params, {net.in_channels}×{net.input_size}×{net.input_size}), {nfe} NFE; "
             f"extractor {ex.name}; {num} images, batch {batch}")
    kw = dict(batch=batch, weights="online", autocast=autocast)

    ref_num = ref_num or num
    ref, _ = sample_statistics(obj, range(10 ** 6, 10 ** 6 + ref_num), nfe, ex, **kw)
    ref_mu, ref_sigma = ref.mean(), ref.cov()
    sample_statistics(obj, range(batch), nfe, ex, **kw)            # warm-up (kernels, cuDNN algorithms)
    _peak_gib(dev, reset=True)
    t0 = _sync(dev)
    stats, _ = sample_statistics(obj, range(num), nfe, ex, **kw)
    t1 = _sync(dev)
    fid = frechet_distance(stats.mean(), stats.cov(), ref_mu, ref_sigma)
    t2 = _sync(dev)
    out: dict[str, Any] = {"device": str(dev), "num": num, "batch": batch, "nfe": nfe, "extractor": ex.name,
                           "params_m": round(params / 1e6, 2),
                           "fewstep": {"images_per_s": num / (t1 - t0), "seconds": t1 - t0, "fid": fid,
                                       "fd_seconds": t2 - t1, "peak_gib": _peak_gib(dev)}}
    log.info(f"fewstep : {num / (t1 - t0):9.1f} images/s ({t1 - t0:.2f} s), FID {fid:.6f}, FD {t2 - t1:.2f} s"
             + _mem(out["fewstep"]))
    if not cleanfid:
        return out
    try:
        import cleanfid.fid as cf
    except ImportError as exc:
        log.info(f"clean-fid : not importable ({exc}); only fewstep's path was measured. "
                 "Install it with: pip install --no-deps clean-fid==0.1.35 (needs torchvision, scipy, requests, tqdm)")
        out["cleanfid"] = {"error": f"not importable: {exc}"}
        return out
    out["cleanfid"] = _cleanfid(cf, obj, ex, dev, num, batch, nfe, autocast, ref_mu, ref_sigma)
    c = out["cleanfid"]
    out["ratio"] = out["fewstep"]["images_per_s"] / c["images_per_s"]
    out["fid_abs_diff"] = abs(fid - c["fid"])
    out["same_fid"] = out["fid_abs_diff"] <= 1e-3
    log.info(f"clean-fid: {c['images_per_s']:9.1f} images/s ({c['seconds']:.2f} s), FID {c['fid']:.6f}, "
             f"FD {c['fd_seconds']:.2f} s{_mem(c)}{' (' + c['note'] + ')' if c.get('note') else ''}")
    log.info(f"speed-up {out['ratio']:.2f}×; |ΔFID| = {out['fid_abs_diff']:.2e} "
             f"({'same to 1e-3' if out['same_fid'] else 'DIFFERENT (> 1e-3)'})")
    return out


def _cleanfid(cf, obj, ex, dev, num, batch, nfe, autocast, ref_mu, ref_sigma) -> dict[str, Any]:
    """clean-fid's ``compute_fid(gen=...)`` on the same seeds and network; times and FID."""
    state: dict[str, Any] = {"next": 0, "t_first": None, "t_fd": None, "note": None}

    def gen(z):                      # clean-fid asks for batches of z; seeds continue 0, 1, 2 … (extra trimmed)
        if state["t_first"] is None:
            state["t_first"] = _sync(dev)
        seeds = list(range(state["next"], state["next"] + z.shape[0]))
        state["next"] += z.shape[0]
        u8 = to_uint8(sample(obj, seeds, nfe, weights="online", batch_size=len(seeds), autocast=autocast).images)
        return (u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8).to(dev).float()

    def features(x):                 # clean-fid resized to 299 and passes [0, 255] floats
        return ex.embed(x)

    original_fd, original_ref = cf.frechet_distance, cf.get_reference_statistics

    def timed_fd(mu1, sigma1, mu2, sigma2, *args, **kwargs):
        state["t_fd"] = _sync(dev)
        try:
            return original_fd(mu1, sigma1, mu2, sigma2, *args, **kwargs)
        except TypeError as exc:     # SciPy ≥ 1.18 removed sqrtm(disp=...)
            state["note"] = f"clean-fid's frechet_distance failed ({exc}); FD by fewstep from its statistics"
            return frechet_distance(mu1, sigma1, mu2, sigma2)

    _peak_gib(dev, reset=True)
    cf.frechet_distance = timed_fd
    cf.get_reference_statistics = lambda *a, **k: (ref_mu.cpu().numpy(), ref_sigma.cpu().numpy())
    try:
        fid = float(cf.compute_fid(gen=gen, mode="clean", dataset_name="fewstep_bench", dataset_res=0,
                                   dataset_split="custom", num_gen=num, z_dim=1, batch_size=batch, device=dev,
                                   custom_feat_extractor=features, use_dataparallel=False, verbose=False,
                                   num_workers=0))
    finally:
        cf.frechet_distance, cf.get_reference_statistics = original_fd, original_ref
    t_end = _sync(dev)
    seconds = state["t_fd"] - state["t_first"]
    return {"images_per_s": num / seconds, "seconds": seconds, "fid": fid, "fd_seconds": t_end - state["t_fd"],
            "peak_gib": _peak_gib(dev), "note": state["note"]}


def _mem(path: dict) -> str:
    return f", peak {path['peak_gib']:.2f} GiB" if path.get("peak_gib") is not None else ""
