"""Training: the Accelerate loop and its status line."""
from fewstep.train.loop import NonFiniteLossError, TrainResult, plan_batches, train

__all__ = ["NonFiniteLossError", "TrainResult", "plan_batches", "train"]
