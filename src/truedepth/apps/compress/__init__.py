"""`truedepth compress`: from a model and a target depth to a shallower, fine-tuned, evaluated, saved model.

Built on the public functions of apps.search, apps.finetune and measure. options.py: CompressOptions
(composed of the search's calibration group, the fine-tune's training group and the measuring texts) and
which options each stage depends on; checks.py: everything refused before any work; budget.py: each stage's
share of the time and the least time the search and a training step take; stages.py: the stages (search ->
generate -> finetune -> evaluate -> save) and their records in `DIR/stages/`; pipeline.py: runs or skips each
stage in order; report.py: compress.json, the model card and the plots.
"""

from .options import CompressOptions
from .pipeline import run_compress

__all__ = ["CompressOptions", "run_compress"]
