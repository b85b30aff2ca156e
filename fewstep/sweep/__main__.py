"""``python -m fewstep.sweep SWEEP_DIR MEMBER --seed K [--eval-batch N]``: run one unit (member, training seed)
of a prepared sweep (:func:`fewstep.sweep.worker.main`; the sweep starts its subprocesses this way)."""
import sys

from fewstep.sweep.worker import main

sys.exit(main())
