"""fewstep: train, sample and evaluate one- and few-step generative models.

Time convention everywhere: t = 1 is noise, t = 0 is data, x_t = (1 − t)·x + t·ε; a jump goes from t to
s ≤ t. See :mod:`fewstep.contracts` for the backbone and objective contracts.
"""
__version__ = "0.1.0"


def load(path, weights="ema", device=None):
    """Load a run, checkpoint or exported model for sampling: see :func:`fewstep.model.load`.

    ``fewstep.load(path).sample(range(16), nfe=1)`` → (16, C, H, W) uint8 images."""
    from fewstep.model import load as _load

    return _load(path, weights=weights, device=device)


__all__ = ["__version__", "load"]
