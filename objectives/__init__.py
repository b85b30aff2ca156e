"""In-tree objectives; importing this package registers them (``fewstep list objectives``)."""
from fewstep.objectives.ect import ECT, ECTConfig
from fewstep.objectives.fm import FlowMatching, FlowMatchingConfig
from fewstep.objectives.meanflow import MeanFlow, MeanFlowConfig
from fewstep.objectives.scm import SCM, SCMConfig
from fewstep.objectives.tvm import TVMConfig, TVMObjective

__all__ = ["ECT", "ECTConfig", "FlowMatching", "FlowMatchingConfig", "MeanFlow", "MeanFlowConfig", "SCM",
           "SCMConfig", "TVMConfig", "TVMObjective"]
