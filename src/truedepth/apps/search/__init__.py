"""Search for the layer groups that cost least at a target depth (`truedepth search`).

options.py: its options (the calibration group is shared with compress); space.py: the candidate groups and
skips and the depths they reach; scoring.py: calibration windows and PlanScorer; beam.py: the beam build,
refinement, the contiguous baseline and the final choice; pipeline.py: a search end to end; report.py: the
held-out report, the printed summary and the plot.

The names below are the package's public API (what `apps.compress` and scripts use).
"""

from .options import CalibrationOptions, SearchOptions
from .pipeline import run_search, search_copy
from .report import plot
from .space import candidate_elements, max_reduction

__all__ = [
    "CalibrationOptions",
    "SearchOptions",
    "candidate_elements",
    "max_reduction",
    "plot",
    "run_search",
    "search_copy",
]
