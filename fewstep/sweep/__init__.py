"""Objective comparison sweeps: one recipe, several objectives (and overrides), the same budget and evaluation.

``fewstep sweep`` (:func:`run_sweep`) trains each :class:`Member` of a :class:`SweepSpec` in
``<sweep>/<member>/``, resumes or skips what is done, scores every NFE with one metric and writes
``results.csv``, ``results.md``, ``metric_vs_nfe.png``, ``loss_curves.png`` and ``samples-<member>.png``.
See ``docs/sweeps.md``.
"""
from fewstep.sweep.report import Row, collect, write_report
from fewstep.sweep.run import SweepResult, run_sweep
from fewstep.sweep.spec import (Member, SweepError, SweepSpec, load_sweep_file, member_config, parse_objectives,
                                spec_from_dict, spec_to_dict)
from fewstep.sweep.worker import MemberState, member_state, run_member

__all__ = ["Member", "MemberState", "Row", "SweepError", "SweepResult", "SweepSpec", "collect", "load_sweep_file",
           "member_config", "member_state", "parse_objectives", "run_member", "run_sweep", "spec_from_dict",
           "spec_to_dict", "write_report"]
