"""Sample-quality metrics (plain functions of sample sets or their statistics) and feature extractors.

Importing this package registers the in-tree extractors (``inception``, ``random-projection``) in
:data:`fewstep.registry.extractors`; nothing here imports torchvision or clean-fid.
"""
from fewstep.metrics.extractors import (CleanResize, FeatureExtractor, InceptionExtractor, RandomProjection,
                                        make_extractor, pil_bicubic_weights)
from fewstep.metrics.fid import FeatureStats, frechet_distance, trace_sqrt_product
from fewstep.metrics.inception import InceptionWeightsError, locate_inception
from fewstep.metrics.sliced_wasserstein import random_directions, sliced_wasserstein

__all__ = ["CleanResize", "FeatureExtractor", "FeatureStats", "InceptionExtractor", "InceptionWeightsError",
           "RandomProjection", "frechet_distance", "locate_inception", "make_extractor", "pil_bicubic_weights",
           "random_directions", "sliced_wasserstein", "trace_sqrt_product"]
from fewstep.metrics import classifier  # noqa: F401,E402  (registers fmnist-classifier)
from fewstep.metrics import dinov2  # noqa: F401,E402  (registers dinov2)
