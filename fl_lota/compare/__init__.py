"""``fl-lota compare``: fine-tuning methods x merge methods, under one protocol.

For the federation of a run config (``sims/heterogeneous_tasks`` plus ``--conf``/``--set``):

1. **Tuning** (seed = the first seed; never on test data): each method's candidates from
   a small grid (``TuneSpec``: LoTA's sparse-phase rate, FFT's rate, LoRA's rank and rate)
   are trained alone on each task's training split minus a held-out validation split
   (``isolated.validation_task``) at the federation's budget; the candidate with the best
   task-average validation score wins. TIES's k and lambda are chosen the same way, by the
   validation score of a one-shot TIES merge of the winning single-task updates.
2. **Single-task references**: per seed, method and task, the method trained alone on the
   task from the base at the same budget, no merging (``isolated.isolated_run``), scored on
   the test split. ``normalized`` divides by these, the same method's, seed by seed.
3. **Federations**: per seed, every (method, merge) of the grid is its own ``flwr run``
   with that merge in every round and the tuned values.
4. **The table** (``compare_table``): absolute scores first, mean +- std over seeds, the
   budget, the tuned values, bytes per client and round in both directions.

Every finished unit is stored in the output folder with the settings that made it; run
again with the same ``--out`` and finished units are reused (a federation cut short resumes
from its checkpoint), so an interrupted comparison continues where it stopped. Before
starting, ``plan`` prints the runs, the budget and a time estimate measured on this machine.
"""

from __future__ import annotations

from fl_lota.compare.plan import (
    DEFAULT_GRID,
    DEFAULT_TUNE,
    RESERVED,
    ComparePlan,
    TuneSpec,
    effective_config,
    parse_grid,
    probe_speed,
)
from fl_lota.compare.runner import Comparison, run_compare
from fl_lota.compare.table import write_comparison

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_TUNE",
    "RESERVED",
    "ComparePlan",
    "Comparison",
    "TuneSpec",
    "effective_config",
    "parse_grid",
    "probe_speed",
    "run_compare",
    "write_comparison",
]
