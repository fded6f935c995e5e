"""The `truedepth` command: one small module per command (add_arguments, run). Nothing imports cli/."""

from .main import main

__all__ = ["main"]
