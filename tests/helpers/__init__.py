"""Modules the tests import (tiny models, the layer-by-layer reference, CLI assertions) and the
worker scripts they start (vllm_worker.py; gpu_core.py runs on the device machine)."""
