"""Model formats of other engines: vLLM (plugin) and GGUF (export for llama.cpp)."""
