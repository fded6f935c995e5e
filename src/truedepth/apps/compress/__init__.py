"""`truedepth compress`: from a model and a target depth to a shallower, fine-tuned, evaluated, saved model.

core.py: options, the checks before any work, the stages (search -> finetune -> evaluate -> save) and
their records in `DIR/stages/`; run.py: runs or skips each stage in order; report.py: compress.json,
the model card and the plots.
"""
