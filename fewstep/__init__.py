"""fewstep: train, sample and evaluate one- and few-step generative models.

Time convention everywhere: t = 1 is noise, t = 0 is data, x_t = (1 − t)·x + t·ε; a jump goes from t to
s ≤ t. See :mod:`fewstep.contracts` for the backbone and objective contracts.
"""
__version__ = "0.1.0"
