"""In-tree objectives; importing this package registers them (``fewstep list objectives``)."""
from fewstep.objectives.alphaflow import AlphaFlow, AlphaFlowConfig
from fewstep.objectives.dmf import DMF, DMFConfig
from fewstep.objectives.ect import ECT, ECTConfig
from fewstep.objectives.fm import FlowMatching, FlowMatchingConfig
from fewstep.objectives.imf import IMF, IMFConfig
from fewstep.objectives.meanflow import MeanFlow, MeanFlowConfig
from fewstep.objectives.scm import SCM, SCMConfig
from fewstep.objectives.shortcut import Shortcut, ShortcutConfig
from fewstep.objectives.tvm import TVMConfig, TVM

__all__ = ["DMF", "ECT", "IMF", "AlphaFlow", "AlphaFlowConfig", "DMFConfig", "ECTConfig", "FlowMatching",
           "FlowMatchingConfig", "IMFConfig", "MeanFlow", "MeanFlowConfig", "SCM", "SCMConfig", "Shortcut",
           "ShortcutConfig", "TVMConfig", "TVM"]
