"""Speed: timing, decode/prefill benchmarks, the TP benchmark, and their reports."""
