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
    "optim": "optimizer",
    "optimizer_kwargs": "optimizer_args",
    "lr_scheduler_type": "lr_scheduler",
    "num_cycles": "lr_scheduler_num_cycles",
    "flip": "flip_aug",
    "enable_bucket": "bucket",
    "reg_dir": "reg_data_dir",
    "class_data_dir": "reg_data_dir",
    "conditioning_data_dir": "mask_dir",
    "caption_dropout_rate": "caption_dropout",
    "shuffle_caption": "shuffle_tags",
    "quantization_bit_4": "load_in_4bit",
    "family": "model_family",
    "beta": "pref_beta",
    "dpo_beta": "pref_beta",
    "rl_beta": "pref_beta",
    "loss_type": "pref_loss",
    "dpo_loss": "pref_loss",
    "dpo_label_smoothing": "label_smoothing",
    "orpo_alpha": "orpo_lambda",
    "orpo_beta": "orpo_lambda",
    "rl": "method",
    "stage": "method",
    "training_method": "method",
    "desirable_weight": "kto_desirable_weight",
    "kto_chosen_weight": "kto_desirable_weight",
    "undesirable_weight": "kto_undesirable_weight",
    "kto_rejected_weight": "kto_undesirable_weight",
    "network_dim_conv": "conv_rank",
    "conv_dim": "conv_rank",
    "factor": "lokr_factor",
    "lokr_decompose_both": "decompose_both",
    "algo": "network_type",
    "adapter_type": "network_type",
    "use_fsdp": "fsdp",
    "v_parameterization": "prediction_type",
    "zsnr": "zero_terminal_snr",
    "ztsnr": "zero_terminal_snr",
    "report_to": "log_with",
    "log_tracker_name": "wandb_project",
    "fsdp_enabled": "fsdp",
    # kohya sd-scripts' Flux options (flux_train_network.py)
    "ae": "vae",
    "t5xxl_max_token_length": "t5_max_length",
    "fp8_base": "base_weights_dtype",
    "fp8_base_unet": "base_weights_dtype",
    "network_train_unet_only": "train_text_encoder",  # negated: see NEGATED_KEYS
}

#: boolean keys of other tools that mean the opposite of their canonical key
NEGATED_KEYS = frozenset({"network_train_unet_only"})

# Keys of other tools that loratui refuses with a reason and what to use instead (never silently dropped).
UNSUPPORTED_KEYS: dict[str, tuple[str, str]] = {
    "deepspeed": (
        "DeepSpeed is not supported",
        "for a model that does not fit one GPU use `fsdp: true` with `loratui train --gpus N` (FSDP shards "
        "the base, the LoRA and the optimizer state, like ZeRO-3); remove `deepspeed`",
    ),
    "wandb_api_key": (
        "API keys are not read from config files",
        "run `wandb login` or set WANDB_API_KEY in the environment; remove `wandb_api_key`",
    ),
    "fsdp_config": (
        "FSDP options are not read",
        "loratui wraps every decoder layer itself; set `fsdp: true` and remove `fsdp_config`",
    ),
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
        "pagedadamw8bit": "adamw8bit",
        "paged_adamw8bit": "adamw8bit",
        "adam": "adamw",
        "adamw_torch": "adamw",
        "adamw_torch_fused": "adamw",
        "prodigyopt": "prodigy",
        "adamwschedulefree": "schedulefree_adamw",
        "adamw_schedulefree": "schedulefree_adamw",
        "schedule_free_adamw": "schedulefree_adamw",
        "schedulefree": "schedulefree_adamw",
        "lion_32bit": "lion",
    },
    "lr_scheduler": {
        "cosine_with_hard_restarts": "cosine_with_restarts",
        "polynomial_decay": "polynomial",
    },
    "lora_dtype": {"float32": "fp32", "bfloat16": "bf16"},
    # `v_parameterization: true` (kohya) means v-prediction; false leaves the choice to the checkpoint
    "prediction_type": {
        "v": "v_prediction",
        "v-prediction": "v_prediction",
        "vpred": "v_prediction",
        "v_pred": "v_prediction",
        "eps": "epsilon",
        "true": "v_prediction",
        "false": "auto",
    },
    "method": {"supervised": "sft"},
    # `fp8_base: true` (kohya) stores the frozen base in fp8; false keeps bf16
    "base_weights_dtype": {
        "true": "fp8",
        "false": "bf16",
        "float8": "fp8",
        "fp8_e4m3fn": "fp8",
        "float8_e4m3fn": "fp8",
        "e4m3": "fp8",
        "bfloat16": "bf16",
        "4bit": "nf4",
        "int4": "nf4",
    },
    "model_family": {
        "sd1": "sd15",
        "sd1.5": "sd15",
        "sd21": "sd2",
        "sd2.1": "sd2",
        "sd-xl": "sdxl",
        "flux1": "flux",
        "flux.1": "flux",
        "flux-dev": "flux",
        "flux-schnell": "flux",
    },
    "pref_loss": {"dpo": "sigmoid"},
    "network_type": {"lycoris": "locon", "loha": "loha", "lokr": "lokr", "dora": "dora", "locon": "locon"},
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


def _literal(text: str) -> object:
    """A kohya `optimizer_args` value: Python literal when it is one (2, 0.01, True, (0.9, 0.99)), else text."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        return {"true": True, "false": False, "none": None}.get(lowered, text)
    return list(value) if isinstance(value, tuple) else value


def parse_optimizer_args(value: object) -> object:
    """`optimizer_args` as a dict: a mapping is kept, kohya's list of `key=value` strings (or one string of them,
    space-separated) is parsed with literal values. Raises ValueError naming an entry that is not key=value."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        return value  # the schema's type error names the key
    out: dict[str, object] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"optimizer_args entry {item!r} is not key=value (e.g. d_coef=2)")
        out[key.strip()] = _literal(text.strip())
    return out


# --- kohya / LyCORIS network keys ---------------------------------------------------------------------------

#: the `network_module` values kohya sd-scripts users write, and the network type each one means by default
NETWORK_MODULES = {"networks.lora": "lora", "lycoris.kohya": "locon"}
#: `network_args` keys -> canonical config keys (values are converted by the schema)
NETWORK_ARG_KEYS = {
    "conv_dim": "conv_rank",
    "conv_rank": "conv_rank",
    "conv_alpha": "conv_alpha",
    "factor": "lokr_factor",
    "decompose_both": "decompose_both",
    "use_tucker": "use_tucker",
    "use_cp": "use_tucker",
    "dropout": "lora_dropout",
    "rs_lora": "use_rslora",
}
#: LyCORIS `algo` values -> network_type
NETWORK_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "dora": "dora"}
NETWORK_KEYS = ("network_module", "network_args")


def parse_network_args(value: object) -> dict[str, str]:
    """kohya's `network_args` (a list of `key=value` strings, one such string, or a mapping) as a dict."""
    if isinstance(value, dict):
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    items = value.split() if isinstance(value, str) else list(value or [])
    out = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        if not sep:
            raise ValueError(f"network_args entry {item!r} is not key=value (e.g. algo=lokr)")
        out[key.strip()] = val.strip()
    return out


def expand_network_keys(module: object, args: object) -> dict[str, object]:
    """Canonical keys for kohya's `network_module` + `network_args`. Raises ValueError naming the entry."""
    module_name = str(module).strip() if module is not None else None
    if module_name is not None and module_name not in NETWORK_MODULES:
        raise ValueError(
            f"network_module {module_name!r} is not supported; use networks.lora or lycoris.kohya "
            "(or network_type: lora | locon | loha | lokr | dora)"
        )
    parsed = parse_network_args(args)
    values: dict[str, object] = {}
    kind = NETWORK_MODULES.get(module_name or "networks.lora", "lora")
    algo = parsed.pop("algo", None)
    if algo is not None:
        if module_name == "networks.lora":
            raise ValueError("network_args algo= is read by lycoris.kohya: set network_module: lycoris.kohya")
        if algo.lower() not in NETWORK_ALGOS:
            raise ValueError(f"network_args algo={algo} is not supported; use lora, locon, loha or lokr")
        kind = NETWORK_ALGOS[algo.lower()]
    dora = parsed.pop("dora_wd", None)
    if dora is not None and dora.lower() in ("true", "1", "yes"):
        if kind not in ("lora", "locon"):
            raise ValueError(f"network_args dora_wd=True works with algo=lora only, not {kind}")
        kind = "dora"
    for key, val in parsed.items():
        canon = NETWORK_ARG_KEYS.get(key)
        if canon is None:
            raise ValueError(
                f"network_args {key}={val} is not supported; supported: algo, dora_wd, "
                + ", ".join(sorted(NETWORK_ARG_KEYS))
            )
        values[canon] = val
    if kind == "lora" and "conv_rank" in values:
        kind = "locon"  # kohya's networks.lora trains conv layers when conv_dim is given
    values["network_type"] = kind
    return values
