"""Studies built on the library: finetune, search, sweep (each split into core and report)."""
