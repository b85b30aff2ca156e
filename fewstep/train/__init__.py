"""Training: the Accelerate loop, its status line and its fault guards."""
from fewstep.train.guards import NonFiniteLossError
from fewstep.train.loop import TrainResult, check_config, plan_batches, train

__all__ = ["NonFiniteLossError", "TrainResult", "check_config", "plan_batches", "train"]
