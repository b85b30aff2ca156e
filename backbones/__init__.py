"""Backbones; importing this package registers every in-tree flavour in :data:`fewstep.registry.backbones`
(the DiT family from :mod:`.dit`, the residual MLP for points from :mod:`.mlp`)."""
from fewstep.backbones import mlp  # noqa: F401  (registers "mlp")
from fewstep.backbones.dit import DiT, DiTConfig, tvm_variant

__all__ = ["DiT", "DiTConfig", "tvm_variant"]
