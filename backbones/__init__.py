"""Backbones; importing this package registers the DiT flavours in :data:`fewstep.registry.backbones`."""
from fewstep.backbones.dit import DiT, DiTConfig, tvm_variant

__all__ = ["DiT", "DiTConfig", "tvm_variant"]
