"""Effective-depth study: sweep transforms over delta and start."""
