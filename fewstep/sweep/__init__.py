"""Objective comparison sweeps: one recipe, several objectives (and overrides), several training seeds, one
budget and evaluation.

``fewstep sweep`` (:func:`run_sweep`) trains each :class:`Member` once per seed in
``<sweep>/<member>/seed-<seed>/``, resumes or skips what is done, evaluates every NFE with the sweep's metrics
(during training too, with ``eval_every_kimg``) and writes ``results.csv``, ``results.md`` (means, standard
deviations, 95 % intervals and ranks that separate only non-overlapping intervals), ``metric_vs_nfe.png``,
``loss_curves.png``, ``learning_curves.png`` and ``samples-<member>.png``. See ``docs/sweeps.md``.
"""
from fewstep.sweep.report import MemberSummary, Row, collect, summarize_members, write_report
from fewstep.sweep.run import SweepResult, run_sweep
from fewstep.sweep.spec import (Member, SweepError, SweepSpec, load_sweep_file, member_config, parse_objectives,
                                spec_from_dict, spec_to_dict)
from fewstep.sweep.worker import UnitState, run_unit, unit_dir, unit_state

__all__ = ["Member", "MemberSummary", "Row", "SweepError", "SweepResult", "SweepSpec", "UnitState", "collect",
           "load_sweep_file", "member_config", "parse_objectives", "run_sweep", "run_unit", "spec_from_dict",
           "spec_to_dict", "summarize_members", "unit_dir", "unit_state", "write_report"]
