"""Causal language model pieces without a training loop (used by the trainer, the planner, export, sampling).

- `loading`: load a causal LM and its tokenizer offline: an HF folder, a cached hub id, or a GGUF file.
- `lora`: the PEFT LoRA config and how it is added (new, or continued from `init_lora`).
- `families`: which layers get a LoRA per model family (defaults, MoE experts, refusals); no torch import.
- `loss`: the token loss, in full or a chunk of tokens at a time.
- `batches`: training data: read, tokenize with loss masks, truncate, split, pack, collate micro-batches.
- `chat`: chat formatting and loss masks of training records.
- `generate`: text generation with the chat template used in training.
- `adapter_files`: PEFT adapter folders.
"""
