"""Evaluation: three inference modes, multiple-choice benchmarks, generation, attention pictures."""
