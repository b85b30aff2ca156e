"""Sample-quality metrics (plain functions of sample sets)."""
from fewstep.metrics.sliced_wasserstein import random_directions, sliced_wasserstein

__all__ = ["random_directions", "sliced_wasserstein"]
