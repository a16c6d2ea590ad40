"""Memory planner: meter live tensor bytes, predict peak GPU memory, recommend settings that fit.

torch, diffusers and transformers are imported inside functions, never at package import.

What the product calls (the CLI, the TUI and the trainers):

- `integration`: the CLI's facade: usable memory of `--vram`/`--card`/a GPU, the `train --dry-run`
  prediction, `--preset auto`, and the predictions of `loratui presets`.
- `facade`: the TUI's typed interface (`PlannerFacade`, `MemoryPlanner`): estimates and suggestions.
- `estimate`: `estimate_peak(config) -> Estimate` (behind both facades; the OOM ladder).
- `recommend`: settings that fit a budget (`loratui recommend`, the facades, the OOM give-up message).
- `meter`: `MemoryMeter`, live tensor bytes with a simulated card (`simulate_vram`, `LORATUI_SIMULATE_VRAM`).
- `cards`: the table of common GPUs behind `--card`.

How a prediction is made (called through the modules above):

- `estimate_types`: the `Estimate` result and the CUDA overheads every prediction adds.
- `arch`, `summary`: the architecture of a config (`arch_configs/`) and its parameter counts (meta device).
- `methods`: what the LLM training method changes (DPO/ORPO: two sequences per sample, DPO's reference pass).
- `regime`, `tracemode`, `probe`: the reference training step, built from `loratui.models`, traced on the meta
  device or a CPU.
- `fit`, `tables`: activation-memory models fitted from traces; shipped tables and the disk cache.
- `analytic`: the closed-form fallback when an architecture cannot be built.
- `sharding`: what each GPU holds when FSDP shards the model (`fsdp: true`).
- `flux`, `flux_probe`, `flux_search`: FLUX.1 / Chroma: the step from configs (transformer storage, block swap,
  caching; the real transformer traced at reduced depth), and the recommender's Flux axes.

Development only (the product never imports it):

- `dev.calibrate`: regenerates the shipped tables; `dev.preset_sections`: chooses the presets' LLM sections
  with the planner (`--write` rewrites them); `dev.flux_presets` chooses their `flux-dev` sections and
  `dev.flux_tables` regenerates the shipped Flux tables. Predicted-vs-measured checks on the trainers' real step
  live in `loratui.train.memory_check`, above this layer.

Byte sizes ("3GiB", "7.41 GiB") are parsed and formatted by `loratui.util.sizes`.
"""
