"""Other spellings of config keys and enum values that users bring from kohya, diffusers and LLM tools."""

from __future__ import annotations

KEY_ALIASES: dict[str, str] = {
    "alpha": "lora_alpha",
    "network_alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "network_dropout": "lora_dropout",
    "enable_activation_offloading": "activation_offload",
    "activation_offloading": "activation_offload",
    "chunked_cross_entropy": "chunked_loss",
    "rank": "lora_rank",
    "r": "lora_rank",
    "network_dim": "lora_rank",
    "lora_r": "lora_rank",
    "lora_target": "target_modules",
    "lora_target_modules": "target_modules",
    "lr": "learning_rate",
    "unet_lr": "learning_rate",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation": "gradient_accumulation_steps",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "max_train_epochs": "epochs",
    "max_train_steps": "max_steps",
    "pretrained_model_name_or_path": "base_model",
    "model_name_or_path": "base_model",
    "data_dir": "train_data_dir",
    "dataset": "train_data_dir",
    "metadata": "metadata_path",
    "metadata_file": "metadata_path",
    "output": "output_dir",
    "precision": "mixed_precision",
    "scheduler": "lr_scheduler",
    "warmup_steps": "lr_warmup_steps",
    "checkpointing_steps": "save_steps",
    "save_every_n_steps": "save_steps",
    "sample_every_n_steps": "sample_every_steps",
    "max_length": "max_seq_len",
    "cutoff_len": "max_seq_len",
    "seq_len": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "optimizer_type": "optimizer",
    "flip": "flip_aug",
    "enable_bucket": "bucket",
    "caption_dropout_rate": "caption_dropout",
    "shuffle_caption": "shuffle_tags",
    "quantization_bit_4": "load_in_4bit",
    "family": "model_family",
}

# Values normalised before validation, per canonical key (lower-cased lookup).
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "task_type": {
        "image": "image-generation",
        "sd": "image-generation",
        "text-to-image": "image-generation",
        "image_generation": "image-generation",
        "text": "text-generation",
        "llm": "text-generation",
        "causal_lm": "text-generation",
        "text_generation": "text-generation",
    },
    "mixed_precision": {
        "fp32": "no",
        "float32": "no",
        "none": "no",
        "false": "no",
        "float16": "fp16",
        "half": "fp16",
        "bfloat16": "bf16",
    },
    "optimizer": {
        "adamw8bit": "adamw8bit",
        "adamw_8bit": "adamw8bit",
        "adam8bit": "adamw8bit",
        "adamw_bnb_8bit": "adamw8bit",
        "paged_adamw_8bit": "adamw8bit",
        "adam": "adamw",
        "adamw_torch": "adamw",
    },
    "model_family": {"sd1": "sd15", "sd1.5": "sd15", "sd21": "sd2", "sd2.1": "sd2", "sd-xl": "sdxl"},
    "lr_scheduler": {"cosine_with_restarts": "cosine"},
    "lora_dtype": {"float32": "fp32", "bfloat16": "bf16"},
    "prediction_type": {"v": "v_prediction", "v-prediction": "v_prediction", "eps": "epsilon"},
}


def canonical_key(key: str) -> str:
    """The canonical name of a config key (unchanged if it is not an alias)."""
    return KEY_ALIASES.get(key, key)


def normalise_value(key: str, value: object) -> object:
    """Map alternative enum spellings (e.g. mixed_precision: fp32 -> no)."""
    table = VALUE_ALIASES.get(key)
    if table and isinstance(value, str | bool):
        lowered = str(value).strip().lower()
        return table.get(lowered, lowered if isinstance(value, str) else value)
    return value
