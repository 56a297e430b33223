"""Per-module ranks from one DyLoRA run: score every component on calibration data, choose the ranks
under a parameter budget (a global greedy in prefix order), and keep them as a rank-pattern file.

pattern (the JSON file) | scores (loss, taylor, norm, gradnorm) | calib (many configurations per pass) |
greedy (budget, allocation) | report (tables) | run (what `qdylora allocate` does).
"""
