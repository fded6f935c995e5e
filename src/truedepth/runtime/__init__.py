"""Running models: the lean decode loop (generate) and tensor parallelism (distributed)."""
