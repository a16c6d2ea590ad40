"""Test helpers for the Stable Diffusion tests: datasets, configs, and a diffusers -> LDM converter.

The converter writes a tiny diffusers pipeline as one single-file checkpoint in the original (LDM/SGM)
layout, the way users download real models (`v1-5-pruned.safetensors`), so single-file loading can be
tested without real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from PIL import Image, ImageDraw

# --- datasets -------------------------------------------------------------------------------------------

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (150, 60, 200), (30, 190, 190)]
SHAPES = ["circle", "square", "triangle", "stripes"]


def draw_shape(shape: str, colour: tuple[int, int, int], size: tuple[int, int] = (72, 64)) -> Image.Image:
    """A deterministic picture: one coloured shape on a light background."""
    image = Image.new("RGB", size, (245, 240, 230))
    draw = ImageDraw.Draw(image)
    w, h = size
    box = (w // 5, h // 5, w - w // 5, h - h // 5)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(w // 2, h // 6), (w // 6, h - h // 6), (w - w // 6, h - h // 6)], fill=colour)
    else:
        for x in range(0, w, 8):
            draw.rectangle((x, 0, x + 3, h), fill=colour)
    return image


def make_image_dataset(
    root: Path,
    n: int = 6,
    *,
    metadata: bool = True,
    subfolder: str | None = None,
    sizes: list[tuple[int, int]] | None = None,
) -> Path:
    """`n` images with captions: metadata.csv (default) or sidecar .txt files; optional kohya subfolder."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / subfolder if subfolder else root
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        shape, colour = SHAPES[i % len(SHAPES)], COLOURS[i % len(COLOURS)]
        size = sizes[i % len(sizes)] if sizes else (72, 64)
        name = f"img{i:02d}.png"
        draw_shape(shape, colour, size).save(folder / name)
        caption = f"a {shape}, flat colour, plain background, sample {i}"
        rel = f"{subfolder}/{name}" if subfolder else name
        if metadata:
            rows.append(f'{rel},"{caption}"')
        else:
            (folder / f"img{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    if metadata:
        (root / "metadata.csv").write_text("filename,prompt\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def write_config(path: Path, **values: object) -> Path:
    """A YAML config written the way users write them (learning_rate as a string like `2e-4`)."""
    lines = []
    for key, value in values.items():
        if key == "learning_rate" and isinstance(value, str):
            lines.append(f"{key}: {value}")
        else:
            lines.append(yaml.safe_dump({key: value}, default_flow_style=True).strip().strip("{}"))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def seed_like_config(tmp: Path, base_model: Path, data: Path, **overrides: object) -> Path:
    """A config shaped like examples/sd15_style.yaml, small enough for CPU tests."""
    values: dict[str, object] = {
        "train_data_dir": str(data),
        "metadata_path": str(data / "metadata.csv"),
        "base_model": str(base_model),
        "lora_rank": 8,
        "alpha": 16,
        "batch_size": 4,
        "epochs": 2,
        "learning_rate": "2e-4",
        "output_dir": str(tmp / "output" / "my_style_lora"),
        "save_steps": 2,
        "resolution": 64,
        "runs_dir": str(tmp / "runs"),
        "seed": 7,
    }
    values.update(overrides)
    tmp.mkdir(parents=True, exist_ok=True)
    return write_config(tmp / "config.yaml", **{k: v for k, v in values.items() if v is not None})


def make_job(config_path: Path, *, resume_from: Path | None = None, overwrite: bool = False, run=None):
    """A WorkerJob like the launcher builds: run directory + resolved config + launch options."""
    from loratui.config import load_config
    from loratui.runs.rundir import create_run_dir
    from loratui.train.job import WorkerJob

    resolved = load_config(config_path)
    cfg = resolved.config
    if run is None:
        run = create_run_dir(Path(cfg.runs_dir), cfg.run_name or cfg.name)
    if cfg.model_family == "auto":
        cfg.model_family = resolved.family
    from loratui.runs.config_file import write_run_config

    write_run_config(run.path, resolved)
    return WorkerJob(run=run, resolved=resolved, resume_from=resume_from, overwrite=overwrite)


def events_of(run, kind: str | None = None) -> list[dict]:
    from loratui.runs.events import read_events

    events = read_events(run.events_path)
    return [e for e in events if kind is None or e["type"] == kind]


# --- diffusers -> LDM (original single-file layout) ------------------------------------------------------

_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def _unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) for every UNet sub-block, from the block layout in `config`."""
    pairs: list[tuple[str, str]] = []
    layers = config["layers_per_block"]
    down, up = config["down_block_types"], config["up_block_types"]
    for i, kind in enumerate(down):
        for j in range(layers):
            ldm = 1 + i * (layers + 1) + j
            pairs.append((f"input_blocks.{ldm}.0.", f"down_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"input_blocks.{ldm}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < len(down) - 1:
            pairs.append(
                (f"input_blocks.{(i + 1) * (layers + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv.")
            )
    for i, kind in enumerate(up):
        for j in range(layers + 1):
            ldm = i * (layers + 1) + j
            pairs.append((f"output_blocks.{ldm}.0.", f"up_blocks.{i}.resnets.{j}."))
            if "CrossAttn" in kind:
                pairs.append((f"output_blocks.{ldm}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < len(up) - 1:
            slot = 2 if "CrossAttn" in kind else 1
            pairs.append(
                (f"output_blocks.{i * (layers + 1) + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0.")
            )
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` keys."""
    simple = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    prefixes = _unet_prefix_map(config)
    out = {}
    for key, value in state.items():
        new = None
        for hf, ldm in simple.items():
            if key.startswith(hf):
                new = ldm + key[len(hf) :]
        if new is None:
            for ldm, hf in prefixes:
                if key.startswith(hf):
                    rest = key[len(hf) :]
                    if ".resnets." in hf:
                        for ldm_name, hf_name in _RESNET:
                            rest = rest.replace(hf_name, ldm_name)
                    new = ldm + rest
                    break
        if new is None:
            raise KeyError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*` keys."""
    n = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    pairs = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(n):
        for j in range(layers):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(layers + 1):
            pairs.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for j in range(2):
        pairs.append((f"mid.block_{j + 1}.", f"mid_block.resnets.{j}."))
    attn = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for ldm, hf in pairs:
            new = new.replace(hf, ldm)
        if "mid.attn_1." in new:
            for ldm, hf in attn:
                new = new.replace("mid.attn_1." + hf, "mid.attn_1." + ldm)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_openclip(state: dict[str, torch.Tensor], prefix: str, hidden: int) -> dict[str, torch.Tensor]:
    """transformers CLIP text state dict -> OpenCLIP keys under `prefix` (SD 2.x, SDXL's second encoder)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    else:
        out[prefix + "text_projection"] = torch.eye(hidden)
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text state dict -> `<prefix>text_model.*` keys (SD 1.x, SDXL's first encoder)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def pipeline_to_ldm_file(folder: Path, dest: Path) -> Path:
    """Write the tiny diffusers pipeline in `folder` as one LDM/SGM-layout .safetensors checkpoint."""
    from safetensors.torch import load_file, save_file

    def weights(sub: str) -> dict[str, torch.Tensor]:
        files = sorted((folder / sub).glob("*.safetensors"))
        return load_file(str(files[0]))

    def config(sub: str) -> dict:
        return json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    unet_cfg = config("unet")
    state = unet_to_ldm(weights("unet"), unet_cfg)
    state.update(vae_to_ldm(weights("vae"), config("vae")))
    te = weights("text_encoder")
    te_hidden = config("text_encoder")["hidden_size"]
    if "text_encoder_2" in index:
        state.update(clip_to_ldm(te, "conditioner.embedders.0.transformer."))
        hidden2 = config("text_encoder_2")["hidden_size"]
        state.update(clip_to_openclip(weights("text_encoder_2"), "conditioner.embedders.1.model.", hidden2))
    elif unet_cfg.get("use_linear_projection") or unet_cfg["cross_attention_dim"] == 1024:
        state.update(clip_to_openclip(te, "cond_stage_model.model.", te_hidden))
    else:
        state.update(clip_to_ldm(te, "cond_stage_model.transformer."))
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dest))
    return dest
