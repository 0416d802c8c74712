"""Experiments built from the library's pieces: ``compare`` (SFT vs RL), ``variance`` (estimator variance), ``report``."""
