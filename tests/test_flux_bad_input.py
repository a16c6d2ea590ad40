"""Bad input for Flux runs, fast: a missing T5 file is named with where it usually lives, and a schnell
model's guidance setting is ignored with a warning (never passed to the transformer)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratui.config.schema import TrainConfig
from loratui.models.flux.detect import missing_part
from loratui.train.flux.setup import setup_models
from loratui.train.flux.trainer import FluxLossContext


@pytest.mark.parametrize(("variant", "model"), [("dev", "FLUX.1-dev"), ("schnell", "FLUX.1-schnell")])
def test_missing_t5_names_the_file_the_key_and_where_it_lives(variant: str, model: str) -> None:
    message = str(missing_part("t5xxl", Path(f"/models/flux1-{variant}.safetensors"), variant))
    assert message.startswith(f"{model} needs the T5-XXL text encoder, which flux1-{variant}.safetensors")
    assert "set `t5xxl: PATH`" in message
    assert "t5xxl_fp16.safetensors" in message and "t5xxl_fp8_e4m3fn.safetensors" in message
    assert "comfyanonymous/flux_text_encoders" in message and "ComfyUI/models/text_encoders" in message


def test_schnell_ignores_guidance_with_a_warning(tiny_flux: object, tmp_path: Path) -> None:
    schnell = tiny_flux("schnell")  # type: ignore[operator]
    cfg = TrainConfig(
        base_model=str(schnell), train_data_dir=str(tmp_path), model_family="flux", guidance_scale=3.5
    )
    job = SimpleNamespace(resolved=SimpleNamespace(config=cfg, family="flux"))
    models = setup_models(job, "fp32", torch.device("cpu"))  # type: ignore[arg-type]
    assert not models.parts.has_guidance
    assert models.notes == ["guidance_scale 3.5 is ignored: schnell has no guidance embedding"]

    seen: dict = {}

    def transformer(**kwargs):
        seen.update(kwargs)
        return (kwargs["hidden_states"],)

    models.forward_transformer = transformer
    config = models.transformer.config
    cond = SimpleNamespace(
        t5=torch.zeros(1, 4, config.joint_attention_dim), pooled=torch.zeros(1, config.pooled_projection_dim)
    )
    noisy = torch.zeros(1, config.in_channels // 4, 4, 4)
    out = FluxLossContext.predict(SimpleNamespace(models=models), noisy, torch.tensor([0.5]), cond)  # type: ignore[arg-type]
    assert out.shape == noisy.shape and "guidance" not in seen and "pooled_projections" in seen
