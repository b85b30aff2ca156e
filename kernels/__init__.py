"""Attention and (later) fused kernels; every backbone's attention goes through :func:`attention`."""
from fewstep.kernels.attention import attention, explicit_attention, last_path, uses_forward_ad

__all__ = ["attention", "explicit_attention", "last_path", "uses_forward_ad"]
