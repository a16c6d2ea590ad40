"""Keys that only one task type reads, and which of them a user set for a run of the other type.

An image run never reads `packing` or `max_seq_len`; a text run never reads `resolution` or `trigger_word`.
`ignored_settings(resolved)` lists the keys a user set (config file, `--set`, flags, preset, wizard) that have
no effect for the resolved task, each with a one-line reason, so that they are reported instead of dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from loratui.config.loader import ResolvedConfig
from loratui.config.schema import TrainConfig

IMAGE = "image-generation"
TEXT = "text-generation"

#: keys only text (LLM) runs read -> why an image run ignores them
TEXT_ONLY: dict[str, str] = {
    "max_seq_len": "captions are cut at the text encoder's own token limit",
    "load_in_4bit": "4-bit (QLoRA) loading applies to LLM base models only",
    "train_on_prompt": "image samples have no prompt/answer split",
    "packing": "image batches are never packed into token sequences",
    "chat_template": "image runs render no chat",
    "trust_remote_code": "image models are loaded without code from the model folder",
    "chunked_loss": "the chunked loss is computed over an LLM's output head",
    "method": "preference training (dpo, orpo, kto) applies to LLM runs only",
    "pref_beta": "preference training applies to LLM runs only",
    "pref_loss": "preference training applies to LLM runs only",
    "label_smoothing": "preference training applies to LLM runs only",
    "orpo_lambda": "preference training applies to LLM runs only",
    "kto_desirable_weight": "preference training applies to LLM runs only",
    "kto_undesirable_weight": "preference training applies to LLM runs only",
    "fsdp": "FSDP shards an LLM's decoder layers; image runs use data parallelism (--gpus N)",
    "lora_dtype": "image LoRA weights are always kept in fp32",
    "activation_offload": "activation offload is applied to the LLM trainer's decoder only",
}

#: keys that only some `method`s of a text run read -> (the methods that read it, why the others ignore it)
METHOD_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "train_on_prompt": (("sft",), "preference losses score the answers only"),
    "packing": (("sft",), "preference pairs are not packed (each answer is scored as a whole sequence)"),
    "val_split": (("sft",), "preference runs hold out no pairs for an evaluation loss"),
    "pref_beta": (("dpo", "kto"), "beta weighs the distance to the reference model (DPO, KTO)"),
    "pref_loss": (("dpo",), "the loss variant is DPO's"),
    "label_smoothing": (("dpo",), "label smoothing is a DPO loss option"),
    "orpo_lambda": (("orpo",), "lambda weighs ORPO's odds-ratio term"),
    "kto_desirable_weight": (("kto",), "the weights are KTO's"),
    "kto_undesirable_weight": (("kto",), "the weights are KTO's"),
}

#: keys only image (SD) runs read -> why a text run ignores them
IMAGE_ONLY: dict[str, str] = {
    "metadata_path": "text datasets carry their prompts and answers in the JSON/JSONL records",
    "train_text_encoder": "an LLM has no separate text encoder",
    "text_encoder_lr": "an LLM has no separate text encoder",
    "resolution": "text runs have no images (the length limit is max_seq_len)",
    "bucket": "text runs have no images",
    "bucket_no_upscale": "text runs have no images",
    "random_crop": "text runs have no images",
    "flip_aug": "text runs have no images",
    "caption_extension": "text runs read no caption files",
    "caption_dropout": "text runs have no captions",
    "shuffle_tags": "text runs have no caption tags",
    "keep_tokens": "text runs have no caption tags",
    "trigger_word": "text runs have no captions to prepend it to",
    "reg_data_dir": "prior preservation with class images is for image runs",
    "prior_loss_weight": "prior preservation with class images is for image runs",
    "masked_loss": "loss masks weigh image pixels",
    "mask_dir": "loss masks weigh image pixels",
    "alpha_mask": "loss masks weigh image pixels",
    "cache_latents": "text runs have no VAE latents",
    "cache_latents_to_disk": "text runs have no VAE latents",
    "cache_text_encoder_outputs": "an LLM has no separate text encoder",
    "min_snr_gamma": "Min-SNR weighting applies to the diffusion loss only",
    "noise_offset": "noise offset applies to the diffusion loss only",
    "prediction_type": "the prediction type applies to diffusion models only",
    "zero_terminal_snr": "the noise schedule applies to diffusion models only",
    "network_type": "LLM runs train PEFT LoRA adapters (LoCon/LoHa/LoKr/DoRA are image adapter types)",
    "use_dora": "DoRA is available for image runs (LLM runs train PEFT LoRA adapters)",
    "conv_rank": "an LLM has no convolutions",
    "conv_alpha": "an LLM has no convolutions",
    "lokr_factor": "LoKr is an image adapter type",
    "decompose_both": "LoKr is an image adapter type",
    "use_tucker": "an LLM has no convolutions",
    "ema_decay": "the EMA of the adapter weights is kept for image runs",
    "ema_update_every": "the EMA of the adapter weights is kept for image runs",
    "ema_on_cpu": "the EMA of the adapter weights is kept for image runs",
    "export_ema": "the EMA of the adapter weights is kept for image runs",
    "val_data_dir": "text runs hold out val_split of their samples instead",
    "val_every_steps": "text runs evaluate val_split at every epoch's end",
}

#: keys only Flux-family (FLUX.1, Chroma) runs read -> why SD and text runs ignore them
FLUX_ONLY: dict[str, str] = {
    "vae": "only Flux runs read a separate autoencoder file (SD checkpoints and folders carry their own VAE)",
    "clip_l": "only Flux runs read a separate CLIP-L file",
    "t5xxl": "only Flux and Chroma runs use a T5-XXL text encoder",
    "base_weights_dtype": "fp8/NF4 storage of the frozen base applies to the Flux transformer (LLMs: load_in_4bit)",
    "blocks_to_swap": "block swap moves Flux transformer blocks",
    "t5_max_length": "only Flux and Chroma runs use a T5-XXL text encoder",
    "timestep_sampling": "flow-matching timestep sampling applies to Flux runs",
    "sigmoid_scale": "flow-matching timestep sampling applies to Flux runs",
    "discrete_flow_shift": "flow-matching timestep sampling applies to Flux runs",
    "guidance_scale": "the guidance embedding is FLUX.1-dev's",
    "model_prediction_type": "it says how a Flux transformer's output is read",
    "apply_t5_attn_mask": "only Flux and Chroma runs use a T5-XXL text encoder",
    "cache_text_encoder_outputs_to_disk": "text-encoder outputs are cached in memory "
    "(cache_text_encoder_outputs), never on disk",
}

#: keys SD (UNet) runs read that Flux-family runs do not -> why
SD_ONLY: dict[str, str] = {
    "prediction_type": "Flux models predict the flow-matching velocity; prediction_type is an SD (UNet) setting",
    "zero_terminal_snr": "Flux uses a flow-matching schedule, not SD's beta schedule",
    "min_snr_gamma": "Min-SNR weighting is defined on SD's noise schedule; Flux weighs timesteps by "
    "timestep_sampling",
    "conv_rank": "the Flux transformer has no convolutions",
    "conv_alpha": "the Flux transformer has no convolutions",
    "use_tucker": "the Flux transformer has no convolutions",
}

#: keys a Flux variant does not read -> (variants that ignore it, why)
VARIANT_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "guidance_scale": (("schnell", "chroma"), "only FLUX.1-dev has a guidance embedding"),
    "clip_l": (("chroma",), "Chroma has no CLIP-L text encoder (T5-XXL only)"),
    "train_text_encoder": (("chroma",), "Chroma's only text encoder is T5-XXL, which stays frozen"),
    "text_encoder_lr": (("chroma",), "Chroma's only text encoder is T5-XXL, which stays frozen"),
    "apply_t5_attn_mask": (
        ("dev", "schnell"),
        "FLUX.1 runs read T5 without an attention mask, as FLUX.1 was trained (Chroma runs always mask)",
    ),
    "cache_text_encoder_outputs_to_disk": (
        ("dev", "schnell", "chroma"),
        "text-encoder outputs are cached in memory (cache_text_encoder_outputs: true), never on disk",
    ),
}
VARIANT_NAMES = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell", "chroma": "Chroma"}

#: what each task ignores
IGNORED_BY_TASK: dict[str, dict[str, str]] = {IMAGE: TEXT_ONLY, TEXT: IMAGE_ONLY}

_NOT_USER_SOURCES = ("default", "inferred")


@dataclass(frozen=True)
class IgnoredSetting:
    """A key the user set that the run's task type does not read."""

    key: str
    source: str  # where it was set: "config x.yaml:7", "--set", "flag", "preset 12gb[sd15]", ...
    reason: str
    task_type: str
    scope: str | None = None  # "with this optimizer/schedule"; default: the task type

    def message(self) -> str:
        """One line: what is ignored, where it was set, and why."""
        kind = "image" if self.task_type == IMAGE else "text"
        scope = self.scope or f"for {kind} runs"
        return f"`{self.key}` ({self.source}) does nothing {scope}: {self.reason}; remove it"


def schedule_notes(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(key, why it does nothing) for learning-rate settings the optimizer or the schedule does not use."""
    notes: list[tuple[str, str]] = []
    decaying = cfg.lr_scheduler not in ("constant", "constant_with_warmup")
    if cfg.optimizer == "adafactor" and cfg.optimizer_args.get("relative_step"):
        why = "Adafactor with relative_step=True computes its own step size"
        notes += [("learning_rate", why), ("lr_scheduler", why)]
    elif cfg.optimizer == "schedulefree_adamw" and decaying:
        why = (
            f"schedule-free AdamW replaces the schedule by iterate averaging; a decaying {cfg.lr_scheduler} "
            "schedule only shrinks its steps (use constant, with lr_warmup_steps if wanted)"
        )
        notes.append(("lr_scheduler", why))
    if cfg.lr_scheduler != "cosine_with_restarts":
        notes.append(("lr_scheduler_num_cycles", "only cosine_with_restarts reads it"))
    if cfg.lr_scheduler != "polynomial":
        notes.append(("lr_scheduler_power", "only the polynomial schedule reads it"))
    return notes


def flux_variant_of(resolved: ResolvedConfig) -> str | None:
    """dev / schnell / chroma of a Flux-family run's base model (read from its files), or None."""
    from loratui.config.base_model import inspect_base_model

    if resolved.family == "chroma":
        return "chroma"
    base = resolved.config.base_model
    return inspect_base_model(base).variant if base else None


def _family_keys(resolved: ResolvedConfig, ignored: dict[str, str], scopes: dict[str, str]) -> None:
    """Add the keys an image run of this model family (and Flux variant) does not read."""
    from loratui.config.base_model import FLUX_FAMILIES

    if resolved.family not in FLUX_FAMILIES:
        ignored.update(FLUX_ONLY)
        scopes.update({key: "for SD runs" for key in FLUX_ONLY})
        return
    ignored.update(SD_ONLY)
    scopes.update({key: "for Flux runs" for key in SD_ONLY})
    variant = flux_variant_of(resolved)
    for key, (variants, why) in VARIANT_KEYS.items():
        if variant in variants:
            ignored[key] = why
            scopes[key] = f"for {VARIANT_NAMES[variant]}"


def _set_by_user(source: str) -> bool:
    return not source.startswith(_NOT_USER_SOURCES)


def ignored_settings(resolved: ResolvedConfig) -> list[IgnoredSetting]:
    """Keys set explicitly (file, `--set`, flags, preset) that do nothing for the resolved task, in schema
    order. Values equal to the default are left out: they change nothing either way."""
    cfg = resolved.config
    ignored = dict(IGNORED_BY_TASK[cfg.task_type])
    scopes: dict[str, str] = {}
    if cfg.task_type == TEXT:
        for key, (methods, why) in METHOD_KEYS.items():
            if cfg.method not in methods:
                ignored[key] = f"{why}, and this run's method is {cfg.method}"
        ignored.update(FLUX_ONLY)
    else:
        _family_keys(resolved, ignored, scopes)
    found = []
    for key, reason in ignored.items():
        source = resolved.sources.get(key)
        if source is None or not _set_by_user(source):
            continue
        if getattr(cfg, key) == TrainConfig.model_fields[key].get_default(call_default_factory=True):
            continue
        found.append(IgnoredSetting(key, source, reason, cfg.task_type, scopes.get(key)))
    for key, reason in schedule_notes(cfg):
        source = resolved.sources.get(key)
        if source is None or not _set_by_user(source) or key in ignored:
            continue
        if key != "lr_scheduler" and getattr(cfg, key) == TrainConfig.model_fields[key].get_default():
            continue
        what = (
            f"lr_scheduler {cfg.lr_scheduler}"
            if key.startswith("lr_scheduler_")
            else f"optimizer {cfg.optimizer}"
        )
        found.append(IgnoredSetting(key, source, reason, cfg.task_type, f"with {what}"))
    order = list(TrainConfig.model_fields)
    return sorted(found, key=lambda item: order.index(item.key))
