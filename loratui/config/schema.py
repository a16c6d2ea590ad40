"""The one typed training config shared by the image (SD) and text (LLM) trainers.

Field names here are the canonical YAML keys; `aliases.py` maps the other spellings users bring from
kohya, diffusers and LLM tools. Every field carries a description that the docs and `--dry-run` show.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

TaskType = Literal["image-generation", "text-generation"]
ModelFamily = Literal["auto", "sd15", "sd2", "sdxl", "flux", "chroma", "llm"]
BaseWeightsDtype = Literal["bf16", "fp8", "nf4"]
TimestepSampling = Literal["uniform", "sigma", "sigmoid", "logit_normal", "shift", "flux_shift"]
Precision = Literal["auto", "no", "fp16", "bf16"]
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree_adamw", "came", "lion"]
LoraDtype = Literal["fp32", "bf16"]
Scheduler = Literal[
    "constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial", "rex"
]
PredictionType = Literal["auto", "epsilon", "v_prediction"]
Method = Literal["sft", "dpo", "orpo", "kto"]
PrefLoss = Literal["sigmoid", "ipo"]
NetworkType = Literal["lora", "locon", "loha", "lokr", "dora"]
Logger = Literal["tensorboard", "wandb"]
#: seeds are 32-bit, as every library that takes one accepts (larger ones overflow inside torch/numpy)
MAX_SEED = 2**32 - 1
#: words of other tools' `fsdp` setting (transformers' TrainingArguments, axolotl) that mean "shard"
FSDP_OPTION_WORDS = {
    "true",
    "yes",
    "on",
    "1",
    "full_shard",
    "shard_grad_op",
    "hybrid_shard",
    "auto_wrap",
    "offload",
}


def _number_types(annotation: Any) -> set[type]:
    """int/float/bool among a field's annotation (``int | None`` -> {int})."""
    if get_origin(annotation) in (Union, types.UnionType):
        return {t for arg in get_args(annotation) for t in _number_types(arg)}
    return {annotation} & {int, float, bool}


class TrainConfig(BaseModel):
    """A fully resolved training configuration (both task types)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- what and where ---------------------------------------------------------------------------
    task_type: TaskType = Field(
        "image-generation", description="image-generation (SD) or text-generation (LLM)."
    )
    base_model: str = Field(
        "", description="Base model: diffusers folder, .safetensors checkpoint, HF folder or id."
    )
    model_family: ModelFamily = Field(
        "auto", description="sd15, sd2, sdxl, flux, chroma or llm; auto detects it."
    )
    train_data_dir: str = Field(
        "", description="Dataset folder (images + captions) or JSON/JSONL file/folder."
    )
    metadata_path: str | None = Field(None, description="metadata.csv with filename,prompt columns (images).")
    output_dir: str = Field("./output/lora", description="Where the exported LoRA is written.")
    output_name: str | None = Field(
        None, description="Name of the exported file; default: output_dir's name."
    )
    runs_dir: str = Field(
        "runs", description="Where run directories (events, checkpoints, logs) are created."
    )
    run_name: str | None = Field(None, description="Run directory prefix; default: output_name.")

    # --- LoRA ---------------------------------------------------------------------------------------
    lora_rank: int = Field(8, ge=1, le=1024, description="LoRA rank (network_dim).")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; scale = alpha / rank. Default: rank."
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Modules to adapt; default per family. 'all-linear' for LLMs."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
    train_text_encoder: bool = Field(False, description="SD: also train LoRA on the text encoder(s).")
    text_encoder_lr: float | None = Field(
        None, gt=0, description="SD: text-encoder LR (default: learning_rate)."
    )
    init_lora: str | None = Field(None, description="Start from this existing LoRA (file or adapter folder).")
    network_type: NetworkType = Field(
        "lora",
        description="SD adapter: lora, locon (LoRA on conv layers too), loha, lokr (LyCORIS) or dora.",
    )
    use_dora: bool = Field(
        False, description="SD: DoRA (weight-decomposed LoRA); same as network_type: dora."
    )
    conv_rank: int | None = Field(
        None, ge=1, le=1024, description="SD locon/loha/lokr: rank on 3x3 conv layers (default: lora_rank)."
    )
    conv_alpha: float | None = Field(
        None, gt=0, description="SD locon/loha/lokr: alpha on 3x3 conv layers (default: conv_rank)."
    )
    lokr_factor: int = Field(
        -1, ge=-1, description="SD lokr: Kronecker factor of each dimension; -1 picks the most square split."
    )
    decompose_both: bool = Field(False, description="SD lokr: low-rank decompose both Kronecker factors.")
    use_tucker: bool = Field(
        False, description="SD loha/lokr: Tucker (effective conv) decomposition of 3x3 convolutions."
    )

    # --- optimisation ---------------------------------------------------------------------------
    batch_size: int = Field(1, ge=1, description="Samples per micro-batch (per device).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the dataset (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Scheduler = Field(
        "constant",
        description="constant, constant_with_warmup, cosine, linear, cosine_with_restarts, polynomial or rex.",
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    lr_scheduler_num_cycles: int = Field(
        1, ge=1, description="cosine_with_restarts: number of cosine cycles (hard restarts)."
    )
    lr_scheduler_power: float = Field(1.0, gt=0, description="polynomial: power of the decay (1 = linear).")
    optimizer: Optimizer = Field(
        "adamw",
        description="adamw, adamw8bit (bitsandbytes), prodigy, adafactor, schedulefree_adamw, came or lion "
        '(the last five: pip install "loratui[optim]").',
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra optimizer arguments, e.g. {d_coef: 2, decouple: true} (kohya's list of "
        '"key=value" strings is accepted).',
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, description="Gradient clipping norm; null disables it.")
    max_nonfinite_steps: int = Field(
        3,
        ge=1,
        description="Stop the run after this many optimizer steps in a row with a nan/inf loss or gradient "
        "(each one is skipped; with fp16 the grad scaler skips them).",
    )
    mixed_precision: Precision = Field("auto", description="auto, no (fp32), fp16 or bf16.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations to save memory (~30% slower)."
    )
    seed: int = Field(
        42, ge=0, le=MAX_SEED, description="Seed for weights init, data order, noise and augmentations."
    )

    # --- checkpoints, logging, sampling ---------------------------------------------------------
    save_steps: int | None = Field(None, ge=1, description="Write a checkpoint every N optimizer steps.")
    keep_last_n: int = Field(3, ge=1, description="Checkpoints kept on disk.")
    log_every_steps: int = Field(1, ge=1, description="Write a progress event every N steps.")
    sample_prompts: list[str] = Field(default_factory=list, description="Prompts rendered during training.")
    sample_every_steps: int | None = Field(None, ge=1, description="Render sample_prompts every N steps.")
    log_with: list[Logger] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Scalar loggers: tensorboard, wandb (Weights & Biases, offline unless WANDB_MODE/"
        "WANDB_API_KEY is set), both, or none ([]).",
    )
    wandb_project: str = Field("loratui", description="W&B project name (log_with: wandb).")
    wandb_run_name: str | None = Field(None, description="W&B run name; default: the run directory's name.")

    # --- EMA and validation (images) ----------------------------------------------------------
    ema_decay: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="Keep an EMA of the LoRA weights with this decay (e.g. 0.999); off if unset.",
    )
    ema_update_every: int = Field(
        1, ge=1, description="Fold the weights into the EMA every N optimizer steps."
    )
    ema_on_cpu: bool = Field(False, description="Keep the EMA copy in CPU memory instead of on the GPU.")
    export_ema: bool = Field(False, description="Export the EMA weights as the run's LoRA (needs ema_decay).")
    val_data_dir: str | None = Field(
        None, description="Image folder for the validation loss (instead of holding out val_split)."
    )
    val_every_steps: int | None = Field(
        None, ge=1, description="Images: validation loss every N steps (default: every epoch and at the end)."
    )

    # --- images (SD) ------------------------------------------------------------------------
    resolution: int = Field(512, ge=64, le=4096, description="Training resolution (multiple of 8).")
    bucket: bool = Field(False, description="Aspect-ratio bucketing instead of centre crop.")
    bucket_no_upscale: bool = Field(True, description="Never upscale images to fill a bucket.")
    random_crop: bool = Field(False, description="Random instead of centre crop.")
    flip_aug: bool = Field(False, description="Random horizontal flip.")
    caption_extension: str = Field(".txt", description="Sidecar caption extension (.txt or .caption).")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of an empty caption.")
    shuffle_tags: bool = Field(False, description="Shuffle comma-separated tags.")
    keep_tokens: int = Field(0, ge=0, description="Leading tags kept in place when shuffling.")
    trigger_word: str | None = Field(None, description="Prepended to captions that lack it.")
    reg_data_dir: str | None = Field(
        None,
        description="Regularization (class) images with captions for prior preservation; kohya N_name folders.",
    )
    prior_loss_weight: float = Field(
        1.0, ge=0.0, description="Loss weight of the regularization images (prior preservation)."
    )
    masked_loss: bool = Field(
        False, description="Weight the loss per latent pixel by a mask (from mask_dir or alpha_mask)."
    )
    mask_dir: str | None = Field(
        None, description="Grayscale masks named like the training images (white: trained, black: ignored)."
    )
    alpha_mask: bool = Field(False, description="Use each image's alpha channel as its loss mask.")
    cache_latents: bool = Field(False, description="Encode images once and keep the VAE off the GPU.")
    cache_latents_to_disk: bool = Field(False, description="Store cached latents on disk next to the run.")
    cache_text_encoder_outputs: bool = Field(False, description="Encode captions once (frozen text encoder).")
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (e.g. 5).")
    noise_offset: float = Field(
        0.0, ge=0.0, description="Noise offset (e.g. 0.05) for darker/brighter images."
    )
    prediction_type: PredictionType = Field(
        "auto",
        description="epsilon or v_prediction; auto from the model (a single file's `v_pred` marker key, a "
        "folder's scheduler config).",
    )
    zero_terminal_snr: bool | None = Field(
        None,
        description="SD: zero-terminal-SNR noise schedule (betas rescaled so the last alpha_bar is 0; needs "
        "v_prediction); samples use trailing steps and guidance rescale 0.7. null: on when the checkpoint "
        "carries the `ztsnr` marker key.",
    )

    # --- FLUX.1 / Chroma -----------------------------------------------------------------------
    vae: str | None = Field(None, description="Flux: the autoencoder file (ae.safetensors) when separate.")
    clip_l: str | None = Field(None, description="Flux: the CLIP-L text encoder file when separate.")
    t5xxl: str | None = Field(
        None,
        description="Flux/Chroma: the T5-XXL text encoder file (t5xxl_fp16 / t5xxl_fp8_e4m3fn) when separate.",
    )
    base_weights_dtype: BaseWeightsDtype = Field(
        "bf16",
        description="Flux: how the frozen transformer is stored: bf16, fp8 (e4m3, upcast per layer) or nf4.",
    )
    blocks_to_swap: int = Field(
        0, ge=0, description="Flux: transformer blocks kept in CPU memory and brought to the GPU in turn."
    )
    t5_max_length: int | None = Field(
        None, ge=1, le=512, description="Flux: T5 tokens per caption; null: 512 for dev, 256 for schnell."
    )
    timestep_sampling: TimestepSampling = Field(
        "sigmoid",
        description="Flux: timestep sampling: uniform, sigma (kohya's: the 1000 training sigmas, uniformly, "
        "shifted by discrete_flow_shift), sigmoid (logit-normal with sigmoid_scale), "
        "logit_normal, shift (sigmoid then discrete_flow_shift) or flux_shift (resolution-dependent shift).",
    )
    sigmoid_scale: float = Field(1.0, gt=0, description="Flux: scale of the sigmoid/shift timestep sampling.")
    apply_t5_attn_mask: bool = Field(
        False,
        description="kohya's Flux option, accepted: FLUX.1 runs read T5 without an attention mask (as the model "
        "was trained); Chroma runs always mask. Reported when set.",
    )
    cache_text_encoder_outputs_to_disk: bool = Field(
        False,
        description="kohya's option, accepted: text-encoder outputs are cached in memory "
        "(cache_text_encoder_outputs), not on disk. Reported when set.",
    )
    discrete_flow_shift: float = Field(
        3.0, gt=0, description="Flux: shift for timestep_sampling: shift and sigma."
    )
    guidance_scale: float = Field(
        1.0,
        ge=0,
        description="Flux dev: the guidance embedding's value during training (ignored by schnell).",
    )
    model_prediction_type: str = Field(
        "raw",
        description="Flux: how the transformer output is read: raw (the flow velocity FLUX.1 was trained to "
        "predict; kohya's recommended setting). Accepted for kohya configs; other values are refused.",
    )

    # --- text (LLM) --------------------------------------------------------------------------
    max_seq_len: int = Field(1024, ge=16, le=1_048_576, description="Maximum tokens per sample.")
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: load the base model in 4-bit NF4 (needs bitsandbytes; CUDA, or CPU from bitsandbytes 0.50).",
    )
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens.")
    packing: bool = Field(False, description="Pack short samples into max_seq_len sequences.")
    val_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of samples (images: of images) held out for the eval loss."
    )
    chat_template: str | None = Field(None, description="Jinja chat template; default: the tokenizer's.")

    # --- preference training (LLM) -------------------------------------------------------------
    method: Method = Field(
        "sft",
        description="LLM: sft (prompt/response); dpo / orpo on prompt/chosen/rejected pairs; kto on pairs or "
        "prompt/completion/label records.",
    )
    pref_beta: float = Field(
        0.1,
        gt=0,
        description="DPO, KTO: beta, how far the adapter may move from the reference (0.1 typical).",
    )
    pref_loss: PrefLoss = Field("sigmoid", description="DPO loss: sigmoid (DPO) or ipo.")
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="DPO (sigmoid): share of pairs assumed mislabelled (conservative DPO).",
    )
    orpo_lambda: float = Field(
        0.1, gt=0, description="ORPO: weight of the odds-ratio term added to the chosen answer's NLL."
    )
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO: loss weight of desirable answers.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO: loss weight of undesirable answers.")

    # --- safety and recovery ----------------------------------------------------------------
    allow_pickle: bool = Field(False, description="Allow loading pickle weights (.ckpt/.bin): runs code.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped with the model folder.")
    oom_recovery: bool = Field(True, description="Lower settings and carry on after out-of-memory.")
    oom_allow_quality_reduction: bool = Field(True, description="OOM ladder may lower resolution/seq length.")
    simulate_vram: str | None = Field(None, description="Simulate a card of this size, e.g. 3GiB (testing).")
    oom_max_restarts: int = Field(
        3, ge=0, description="Worker restarts from the last checkpoint when in-process OOM recovery fails."
    )
    oom_cache: bool = Field(
        True, description="Start from settings that fitted this model on this GPU before."
    )
    chunked_loss: bool = Field(
        True,
        description="LLM: compute the output head and the loss in chunks of tokens, never the full logits "
        "(Liger's fused kernel on CUDA when installed).",
    )
    lora_dtype: LoraDtype = Field("fp32", description="LLM: dtype of the LoRA weights (fp32 or bf16).")
    activation_offload: bool = Field(
        False, description="LLM: keep saved activations in host memory until backward (CUDA; OOM ladder)."
    )
    fsdp: bool = Field(
        False,
        description="LLM, several GPUs: shard the frozen base, the LoRA and the optimizer state over the "
        "processes (FSDP2; `--gpus N --fsdp`).",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: object, info: ValidationInfo) -> object:
        """`batch_size: true` is a mistake, not 1: refuse booleans for number fields."""
        if isinstance(value, bool) and info.field_name:
            kinds = _number_types(cls.model_fields[info.field_name].annotation)
            if kinds and bool not in kinds:
                number = "a whole number" if int in kinds else "a number"
                raise ValueError(f"expected {number}, not {str(value).lower()}")
        return value

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_options(cls, value: object) -> object:
        """Other tools' FSDP settings (`fsdp: "full_shard auto_wrap"`, `fsdp: [full_shard]`) mean FSDP on."""
        words = value.split() if isinstance(value, str) else value
        if isinstance(words, list) and all(isinstance(w, str) for w in words):
            known = {w.strip().lower() for w in words if w.strip()}
            if known & {"false", "no", "off", "0"} or not known:
                return False
            unknown = known - FSDP_OPTION_WORDS
            if unknown:
                raise ValueError(
                    f"unknown FSDP option(s) {sorted(unknown)}; use fsdp: true (loratui shards every decoder "
                    "layer, the parameters and the optimizer state)"
                )
            if "offload" in known:
                raise ValueError("FSDP CPU offload is not supported; use fsdp: true")
            return True
        return value

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _optimizer_args(cls, value: Any) -> Any:
        from loratui.config.aliases import parse_optimizer_args

        return parse_optimizer_args(value)

    @field_validator("log_with", mode="before")
    @classmethod
    def _loggers(cls, value: object) -> object:
        """`log_with: wandb`, `"tensorboard,wandb"`, `all` (kohya, transformers) and `none` are accepted."""
        if isinstance(value, str):
            value = [part.strip() for part in value.replace(",", " ").split() if part.strip()]
        if isinstance(value, list):
            words = [str(v).strip().lower() for v in value]
            if words in (["none"], ["no"], ["false"]):
                return []
            if "all" in words:
                return ["tensorboard", "wandb"]
            return list(dict.fromkeys(words))
        return value

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("sample_prompts", mode="before")
    @classmethod
    def _one_prompt(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("resolution", mode="before")
    @classmethod
    def _square_resolution(cls, value: object) -> object:
        """Accept kohya's "512,512" and [512, 512] for square resolutions."""
        if isinstance(value, str) and "," in value:
            value = [v.strip() for v in value.split(",")]
        if isinstance(value, list | tuple) and len(value) == 2 and str(value[0]) == str(value[1]):
            return value[0]
        return value

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing_is_for_sigmoid(cls, value: float, info: ValidationInfo) -> float:
        if value and info.data.get("pref_loss") == "ipo":
            raise ValueError("label_smoothing applies to pref_loss: sigmoid only; set it to 0 for ipo")
        return value

    @field_validator("model_prediction_type")
    @classmethod
    def _raw_prediction(cls, value: str) -> str:
        if value.strip().lower() != "raw":
            raise ValueError(
                f"{value!r}: the Flux trainer reads the transformer output as the flow velocity (kohya's raw); "
                "additive and sigma_scaled are not offered: use raw or remove the key"
            )
        return "raw"

    @field_validator("caption_extension")
    @classmethod
    def _dot_extension(cls, value: str) -> str:
        return value if value.startswith(".") else "." + value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(
                f"{value} is not a multiple of 8; use e.g. {value // 8 * 8} or {value // 8 * 8 + 8}"
            )
        return value

    @model_validator(mode="after")
    def _mask_source_given(self) -> TrainConfig:
        """masked_loss needs masks: from mask_dir or from the images' alpha channel."""
        if self.masked_loss and not self.mask_dir and not self.alpha_mask:
            raise ValueError(
                "masked_loss needs masks: set mask_dir (grayscale files named like the images) or alpha_mask: true"
            )
        return self

    @property
    def uses_loss_masks(self) -> bool:
        """True when the loss is weighted per latent pixel (mask_dir or alpha_mask given)."""
        return bool(self.mask_dir) or self.alpha_mask

    @model_validator(mode="after")
    def _network_options_fit(self) -> TrainConfig:
        """Adapter options that the chosen network type does not read are mistakes, not no-ops."""
        kind = self.network_type
        if self.use_dora and kind not in ("lora", "dora"):
            raise ValueError(f"use_dora works with network_type lora or dora, not {kind}; drop use_dora")
        if kind in ("loha", "lokr") and self.use_rslora:
            raise ValueError(f"use_rslora is a LoRA option; network_type {kind} scales by alpha / rank")
        if kind in ("loha", "lokr") and self.lora_dropout:
            raise ValueError(f"lora_dropout is not available for network_type {kind}; set lora_dropout: 0")
        conv_keys = [k for k in ("conv_rank", "conv_alpha") if getattr(self, k) is not None]
        if conv_keys and kind in ("lora", "dora"):
            raise ValueError(
                f"{', '.join(conv_keys)}: conv layers are adapted by locon, loha and lokr only; "
                "set network_type: locon (or loha/lokr)"
            )
        lokr_keys = [k for k in ("lokr_factor", "decompose_both") if getattr(self, k) != _DEFAULTS[k]]
        if lokr_keys and kind != "lokr":
            raise ValueError(f"{', '.join(lokr_keys)}: LoKr options; set network_type: lokr")
        if self.use_tucker and kind not in ("loha", "lokr"):
            raise ValueError("use_tucker applies to network_type loha or lokr")
        return self

    @model_validator(mode="after")
    def _ema_and_validation_fit(self) -> TrainConfig:
        """EMA options without ema_decay, and two validation sources at once, are mistakes."""
        ema_keys = [k for k in ("ema_on_cpu", "export_ema") if getattr(self, k)]
        if self.ema_update_every != 1:
            ema_keys.append("ema_update_every")
        if ema_keys and self.ema_decay is None:
            raise ValueError(f"{', '.join(ema_keys)}: EMA options; set ema_decay (e.g. 0.999) to keep an EMA")
        if self.val_data_dir and self.val_split:
            raise ValueError("set val_split or val_data_dir, not both")
        if self.val_every_steps and not (self.val_data_dir or self.val_split):
            raise ValueError(
                "val_every_steps: set val_split (e.g. 0.1) or val_data_dir to measure a validation loss"
            )
        return self

    @model_validator(mode="after")
    def _ztsnr_needs_v_prediction(self) -> TrainConfig:
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "zero_terminal_snr needs v-prediction: at the last timestep the input is pure noise, so an "
                "epsilon model learns nothing there and cannot start sampling from it; set prediction_type: "
                "v_prediction (or auto for a v-pred checkpoint)"
            )
        return self

    @property
    def adapter_type(self) -> str:
        """network_type, with use_dora folded in (lora + use_dora = dora)."""
        return "dora" if self.use_dora else self.network_type

    @property
    def effective_alpha(self) -> float:
        """lora_alpha, defaulting to the rank."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step on one device."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def name(self) -> str:
        """The output name: output_name or the output folder's name."""
        from pathlib import PurePath

        return self.output_name or PurePath(self.output_dir).name or "lora"


FIELD_NAMES: tuple[str, ...] = tuple(TrainConfig.model_fields)
_DEFAULTS = {name: field.default for name, field in TrainConfig.model_fields.items()}
PATH_FIELDS: tuple[str, ...] = (
    "base_model",
    "train_data_dir",
    "metadata_path",
    "init_lora",
    "reg_data_dir",
    "mask_dir",
    "vae",
    "clip_l",
    "t5xxl",
)
