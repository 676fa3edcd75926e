"""The parallelism planner: parameter counts from the real model built on the meta device,
a per-rank memory model and a step-time model, ranked over the layouts a cluster allows."""
