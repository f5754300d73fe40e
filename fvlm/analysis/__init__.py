"""Analysis: scaling-law fits, figures, the export and the decision report."""
