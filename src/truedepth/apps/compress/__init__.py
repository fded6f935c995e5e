"""`truedepth compress`: from a model and a target depth to a shallower, fine-tuned, evaluated, saved model.

Stages (core.py): search -> finetune -> evaluate -> save; each is recorded in `DIR/stages/` and a
rerun skips the finished ones. report.py writes compress.json, the model card and the plots.
"""
