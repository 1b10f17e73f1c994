"""Solver pieces of the SNLP program: the correction step (``scan``) and friends."""
