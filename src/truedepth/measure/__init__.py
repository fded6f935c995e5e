"""Measuring models: quality (eval) and speed (bench)."""
