"""Attention and the fused Triton JVP-attention kernels; every backbone's attention goes through
:func:`fewstep.kernels.attention.attention`.

The function ``attention`` is deliberately not re-exported here: binding it on the package would
shadow the submodule ``fewstep.kernels.attention`` (so ``import fewstep.kernels.attention as m``
would yield the function, and patching the module would silently miss).
"""
from fewstep.kernels.attention import (
    detached_tangents, explicit_attention, kernel_attention, last_path, triton_available, uses_forward_ad)

__all__ = ["detached_tangents", "explicit_attention", "kernel_attention", "last_path", "triton_available",
           "uses_forward_ad"]
