"""Memory planner: meter live tensor bytes, predict peak GPU memory, recommend settings that fit.

Modules (torch, diffusers and transformers are imported inside functions, never at package import):

- `sizes`: parse and format byte sizes ("3GiB", "8GB").
- `meter`: `MemoryMeter`, a dispatch-mode meter of live tensor storage with a simulated budget.
- `arch`, `summary`: architecture configs of a training config and their parameter counts (meta device).
- `regime`, `tracemode`, `probe`: the reference training step traced on the meta device or a CPU.
- `fit`, `tables`, `calibrate`: activation-memory models fitted from traces; caches and shipped tables.
- `estimate`, `analytic`: `estimate_peak(config) -> Estimate`, and the closed-form fallback.
- `cards`, `recommend`, `integration`: card table, settings search, hooks for the CLI.
- `realstep`, `accuracy`: the trainers' real step under the meter, predicted-vs-metered comparisons.
"""
