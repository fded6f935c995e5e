"""Quality: perplexity, lm-evaluation-harness tasks (icl, tasks/) and the offline texts (data)."""
