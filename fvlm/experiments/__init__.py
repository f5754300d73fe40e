"""The Phase 1 plan (docs/phase1_plan.md, "the plan" in this package): ablation sweeps, the scaling
grid, and the runner."""
