"""Stable Diffusion model pieces without a training loop (used by the trainer, the planner, export, sampling).

- `loading`: load a base model offline: a diffusers folder or a single-file checkpoint.
- `lora`: adapter layers on the UNet and text encoders (PEFT), their state, starting from an existing LoRA.
- `adapters`: the adapter types (lora, locon, loha, lokr, dora): PEFT tuner, adapted convolutions, tensor sizes.
- `lycoris`: a trained adapter's tensors in the LyCORIS/kohya key layout (`hada_*`, `lokr_*`, `dora_scale`).
- `loss`: the diffusion objective: noise, timesteps, targets, Min-SNR weighting.
- `conditioning`: text conditioning for SD 1.x/2.x and SDXL, with cached text-encoder outputs.
- `kohya`: the kohya/A1111 LoRA format: module names, tensors, header metadata.
- `lora_files`: reading and writing SD LoRA files (kohya `.safetensors` or diffusers).
"""
