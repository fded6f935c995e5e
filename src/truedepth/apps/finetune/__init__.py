"""Fine-tune only the parallelized layers to win quality back."""
