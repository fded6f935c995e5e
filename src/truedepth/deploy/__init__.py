"""Model formats of other engines: vLLM (a plugin that serves saved truedepth models)."""
