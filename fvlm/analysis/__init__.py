"""Analysis: scaling-law fits, figures, the export (docs/scaling_data_export.md) and the decision
report of the plan (docs/phase1_plan.md, "the plan" in this package)."""
