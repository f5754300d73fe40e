"""The Phase 1 plan: ablation sweeps, the scaling grid, and the runner."""
