"""Shared pytest fixtures.

Sections: offline environment, tiny models. Add new fixtures in their own section below.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loratui.tiny_models import build_tiny_blip, build_tiny_llama, build_tiny_sd

# --------------------------------------------------------------------------------------------------
# Offline environment: nothing in the test-suite may reach the Hugging Face hub.
# --------------------------------------------------------------------------------------------------

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Set at import as well: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported,
# which can happen while test modules are collected (before any fixture runs).
os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="session", autouse=True)
def offline_env() -> Iterator[None]:
    """Keep the hub-offline / no-telemetry / quiet-tokenizers variables set for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        yield


@pytest.fixture()
def subprocess_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment for tests that start the supervisor / worker processes: this checkout importable, one
    thread each, a private OOM cache, and no simulated card inherited from the caller."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LORATUI_SIMULATE_VRAM", raising=False)


# --------------------------------------------------------------------------------------------------
# Tiny random-weight models (built once per session from the configs bundled in loratui.tiny_models).
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session folder holding the tiny model builds."""
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_sd15(tiny_models_dir: Path) -> Path:
    """Tiny SD 1.5-layout diffusers pipeline folder (epsilon prediction, PNDM scheduler)."""
    return build_tiny_sd(tiny_models_dir / "sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sd2v(tiny_models_dir: Path) -> Path:
    """Tiny SD 2.x-layout (768-v) diffusers pipeline folder (v-prediction, DDIM scheduler)."""
    return build_tiny_sd(tiny_models_dir / "sd2-v", "sd2-v")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_models_dir: Path) -> Path:
    """Tiny SDXL-layout diffusers pipeline folder (two text encoders, text_time embeddings)."""
    return build_tiny_sd(tiny_models_dir / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_llama(tiny_models_dir: Path) -> Path:
    """Tiny Llama causal LM folder with a pad token and a chat template."""
    return build_tiny_llama(tiny_models_dir / "llama")


@pytest.fixture(scope="session")
def tiny_llama_nopad(tiny_models_dir: Path) -> Path:
    """Tiny Llama folder whose tokenizer has no pad token (like the original Llama releases)."""
    return build_tiny_llama(tiny_models_dir / "llama-nopad", pad_token=False)


@pytest.fixture(scope="session")
def tiny_blip(tiny_models_dir: Path) -> Path:
    """Tiny BLIP captioning model + processor folder (64x64 images)."""
    return build_tiny_blip(tiny_models_dir / "blip")


# --- fake GPU ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[object], None]]:
    """`fake_nvml(spec)`: NVML answers from `spec` (a dict as in loratui.gpu.fake_nvml, a JSON path, or "none"
    for no driver) until the test ends."""
    import json

    from loratui.gpu import nvml

    def use(spec: object) -> None:
        if isinstance(spec, dict):
            path = tmp_path / "nvml.json"
            path.write_text(json.dumps(spec))
            spec = str(path)
        monkeypatch.setenv("LORATUI_FAKE_NVML", str(spec))
        nvml.reset()

    yield use
    nvml.reset()


# --- tiny LLMs of the current model families ---------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_llm(tiny_models_dir: Path) -> Callable[[str], Path]:
    """Builds (once per session) the tiny causal LM of a family in `loratui.tiny_models.LLM_FAMILIES`
    (llama3, qwen2.5, qwen3, qwen3-moe, gemma2, gemma3, mistral, phi3): `tiny_llm("qwen3")` -> its folder."""
    from loratui.tiny_models import build_tiny_llm

    return lambda family: build_tiny_llm(tiny_models_dir / f"llm-{family}", family)


# --- tiny Flux-family models (FLUX.1 dev / schnell, Chroma) ---------------------------------------------------


@pytest.fixture(scope="session")
def tiny_flux(tiny_models_dir: Path) -> Callable[[str], Path]:
    """Builds (once per session) the tiny Flux pipeline folder of a variant: `tiny_flux("dev")`, `"schnell"`,
    `"chroma"` -> its folder (diffusers FluxPipeline / ChromaPipeline layout)."""
    from loratui.tiny_models import build_tiny_flux

    return lambda variant: build_tiny_flux(tiny_models_dir / f"flux-{variant}", variant)


@pytest.fixture(scope="session")
def tiny_flux_dev(tiny_flux: Callable[[str], Path]) -> Path:
    """Tiny FLUX.1-dev-layout FluxPipeline folder (guidance embedding, CLIP-L + T5, 16-channel AE)."""
    return tiny_flux("dev")
