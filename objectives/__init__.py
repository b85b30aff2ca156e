"""In-tree objectives; importing this package registers them (``fewstep list objectives``)."""
from fewstep.objectives.fm import FlowMatching, FlowMatchingConfig
from fewstep.objectives.meanflow import MeanFlow, MeanFlowConfig
from fewstep.objectives.scm import SCM, SCMConfig
from fewstep.objectives.tvm import TVMConfig, TVMObjective
from fewstep.registry import objectives as _registry

__all__ = ["FlowMatching", "FlowMatchingConfig", "MeanFlow", "MeanFlowConfig", "SCM", "SCMConfig", "TVMConfig", "TVMObjective"]

for _name, _what in {
    "ect": "discrete consistency training, ECT/iCT (Geng et al. 2024)",
}.items():
    _registry.plan(_name, f"{_what} is planned for the next fewstep release and not in this version")
