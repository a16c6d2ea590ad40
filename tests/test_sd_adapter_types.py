"""SD adapter types (lora, locon, loha, lokr, dora) on the tiny SD1.5 and SDXL fixtures: trained from YAML (typed
keys and kohya's network_module/network_args), resumed exactly, exported in the LyCORIS/kohya key layout and
read back by loaders loratui did not write: diffusers' `load_lora_weights` (lora, locon) and the lycoris-lora
package's `create_lycoris_from_weights` (loha, lokr, dora; diffusers 0.42 drops kohya `dora_scale` keys). Each
loader must consume every tensor of the file and give each module the weight change the trained adapter has."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config

from loratui.config import load_config
from loratui.config.errors import ConfigError
from loratui.models.sd.adapters import NetworkSpec
from loratui.models.sd.lora import LoraPlan, inject_lora, load_lora_state, lora_layers
from loratui.runs.checkpoints import load_checkpoint
from loratui.train.sd.trainer import train

#: how each type is asked for: typed keys, or the kohya/LyCORIS keys users bring
CONFIGS = {
    "lora": {"network_type": "lora"},
    "locon": {"network_module": "networks.lora", "network_args": ["conv_dim=4", "conv_alpha=2"]},
    "loha": {"network_module": "lycoris.kohya", "network_args": ["algo=loha", "conv_dim=4", "conv_alpha=4"]},
    "lokr": {"network_type": "lokr", "lora_rank": 2, "alpha": 2, "factor": 4, "decompose_both": True},
    "dora": {"use_dora": True},
}
#: LoHa/LoKr at scale 1 (alpha = rank): lycoris 4.1.3's `merge_to` applies alpha / rank twice for them
LYCORIS_SCALE_ONE = {"loha": {"lora_rank": 4, "alpha": 4}, "lokr": {}}
DIFFUSERS_LOADS = ("lora", "locon")
FAMILY_NAMES = {"sd15": "sd15", "sdxl": "sdxl"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(tmp: Path, base: Path, data: Path, kind: str, **extra) -> Path:
    values = {"epochs": 1, "batch_size": 2, "save_steps": 1, "keep_last_n": 3}
    values.update({**CONFIGS[kind], **LYCORIS_SCALE_ONE.get(kind, {}), **extra})
    return seed_like_config(tmp, base, data, **values)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()  # noqa: SIM118


def _pipeline(folder: Path):
    from loratui.models.sd.loading import load_sd_pipeline

    return load_sd_pipeline(folder).pipeline


@torch.no_grad()
def _trained_deltas(base: Path, checkpoint: Path) -> dict[str, torch.Tensor]:
    """`<component>.<path>` -> W_merged - W_base of the adapter as trained (PEFT's own merge)."""
    ckpt = load_checkpoint(checkpoint, training_state=False)
    lora = ckpt.meta["lora"]
    plan = LoraPlan(
        targets=lora["targets"],
        rank=lora["rank"],
        alpha=lora["alpha"],
        network=NetworkSpec(**ckpt.meta["network"]),
    )
    pipe = _pipeline(base)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        components["text_encoder_2"] = pipe.text_encoder_2
    inject_lora(components, plan)
    load_lora_state(components, ckpt.lora_state)
    deltas = {}
    for name in plan.targets:
        for path, layer in lora_layers(components[name]).items():
            before = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=["default"])
            deltas[f"{name}.{path}"] = layer.get_base_layer().weight.detach() - before
            layer.unmerge()
    return deltas


def _diffusers_deltas(base: Path, exported: Path, caplog) -> dict[str, torch.Tensor]:
    pipe = _pipeline(base)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(exported), adapter_name="trained")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()]
    out = {}
    with torch.no_grad():
        for path, layer in lora_layers(pipe.unet).items():
            before = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=["trained"])
            out[f"unet.{path}"] = layer.get_base_layer().weight.detach() - before
            layer.unmerge()
    return out


#: what diffusers' `_convert_unet_lora_key` renames after `_maybe_map_sgm_blocks_to_diffusers`
_SGM_NAMES = {
    "input_blocks": "down_blocks",
    "middle_block": "mid_block",
    "output_blocks": "up_blocks",
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _lycoris_names(tensors: dict[str, torch.Tensor], unet, family: str) -> dict[str, torch.Tensor]:
    """SDXL files use the original (SGM) block names; diffusers' own mapping turns them into its UNet's."""
    if family != "sdxl":
        return dict(tensors)
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), unet.config)
    out = {}
    for key, value in mapped.items():
        name, _, suffix = key.partition(".")
        for sgm, diffusers_name in _SGM_NAMES.items():
            name = name.replace(sgm, diffusers_name)
        out[f"{name}.{suffix}"] = value
    return out


def _lycoris_network(model: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str):
    """lycoris-lora's loader on `model` for the modules named `<prefix>_<path>`; returns the network."""
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    saved = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = prefix
    try:
        network, _ = create_lycoris_from_weights(1.0, None, model, weights_sd=dict(weights))
    finally:
        LycorisNetwork.LORA_PREFIX = saved
    for module in network.loras:  # the loader read the file's tensors, not its own initial values
        for key, value in module.custom_state_dict().items():
            assert torch.equal(value.float(), weights[f"{module.lora_name}.{key}"].float()), key
    return network


@torch.no_grad()
def _lycoris_deltas(base: Path, exported: Path, family: str) -> dict[str, torch.Tensor]:
    """Load the file with lycoris-lora onto the base UNet (and text encoder), check that every key was
    consumed, merge, and diff each module's weight."""
    tensors, _ = _read(exported)
    pipe = _pipeline(base)
    unet = pipe.unet.float()
    text = torch.nn.Module()  # kohya names keep CLIP's `text_model.` level (flattened in transformers 5)
    text.text_model = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
    parts = {
        "unet": (unet, "lora_unet"),
        "text_encoder": (text, "lora_te1" if family == "sdxl" else "lora_te"),
    }
    weights = _lycoris_names(tensors, unet, family)
    consumed, out = set(), {}
    for component, (model, prefix) in parts.items():
        before = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
        network = _lycoris_network(
            model, {k: v for k, v in weights.items() if k.startswith(prefix + "_")}, prefix
        )
        consumed |= {f"{m.lora_name}.{k}" for m in network.loras for k in m.custom_state_dict()}
        network.merge_to(1.0)
        paths = {f"{prefix}_{n}".replace(".", "_"): n for n in before}
        modules = dict(model.named_modules())
        for m in network.loras:
            path = paths[m.lora_name]
            live = (
                path.removeprefix("text_model.")
                if component != "unet" and not hasattr(pipe.text_encoder, "text_model")
                else path
            )
            out[f"{component}.{live}"] = modules[path].weight - before[path]
    te2 = [k for k in weights if k.startswith("lora_te2_")]
    assert consumed == set(weights) - set(te2), sorted((set(weights) - set(te2)) ^ consumed)[:5]
    return out


def _assert_same_change(loaded: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> None:
    trained = {k: v for k, v in trained.items() if not k.startswith("text_encoder_2.")}
    assert set(loaded) == set(trained)
    assert any(d.abs().max() > 1e-6 for d in trained.values())  # the adapter learned something
    for key, delta in trained.items():
        torch.testing.assert_close(loaded[key].reshape(delta.shape), delta, atol=1e-5, rtol=1e-4, msg=key)


def _train(config: Path, **kwargs):
    job = make_job(config, **kwargs)
    assert train(job) == "finished"
    return job


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_adapter_type_trains_resumes_and_loads_elsewhere(kind, family, request, tmp_path, caplog):
    base = request.getfixturevalue(f"tiny_{family}")
    data = make_image_dataset(tmp_path / "data", 4)
    job = _train(_config(tmp_path / "a", base, data, kind))

    # resume: a new run continues from the first step's checkpoint; same tensors as the straight run
    first_step = job.run.path / "checkpoints" / "step-1"
    resumed_job = _train(_config(tmp_path / "b", base, data, kind), resume_from=first_step)
    assert [e["step"] for e in events_of(resumed_job.run, "step")] == [2]  # only the second step ran
    straight = load_file(str(job.run.latest_checkpoint() / "lora.safetensors"))
    resumed = load_file(str(resumed_job.run.latest_checkpoint() / "lora.safetensors"))
    assert set(straight) == set(resumed)
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6

    exported = Path(job.resolved.config.output_dir) / "my_style_lora.safetensors"
    tensors, meta = _read(exported)
    suffixes = {k.split(".", 1)[1] for k in tensors}
    expected = {
        "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
        "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
        "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
    }[kind]
    assert suffixes <= expected and {"alpha"} < suffixes
    convs = [k for k in tensors if "_resnets_" in k or "_in_layers_" in k or "_out_layers_" in k]
    assert bool(convs) == (kind in ("locon", "loha", "lokr"))
    args = json.loads(meta["ss_network_args"])
    assert all(isinstance(v, str) for v in args.values())
    if kind in ("lora", "locon"):
        assert meta["ss_network_module"] == "networks.lora" and "algo" not in args
    else:
        assert meta["ss_network_module"] == "lycoris.kohya"
        assert args["algo"] == ("lora" if kind == "dora" else kind)
    if kind == "locon":
        assert (args["conv_dim"], args["conv_alpha"]) == ("4", "2")
    if kind == "lokr":
        assert (args["factor"], args["decompose_both"]) == ("4", "True")
        assert {"lokr_w2_a", "lokr_w2_b"} <= suffixes  # the low-rank factor is exported as a pair
    if kind == "dora":
        assert args["dora_wd"] == "True"

    trained = _trained_deltas(base, job.run.latest_checkpoint())
    if kind in DIFFUSERS_LOADS:
        loaded = _diffusers_deltas(base, exported, caplog)
    else:
        loaded = _lycoris_deltas(base, exported, family)
    _assert_same_change(loaded, trained)


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_text_encoder_adapters_load_in_lycoris(kind, tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 2)
    config = _config(tmp_path, tiny_sd15, data, kind, train_text_encoder=True, save_steps=None)
    job = _train(config)
    exported = Path(job.resolved.config.output_dir) / "my_style_lora.safetensors"
    loaded = _lycoris_deltas(tiny_sd15, exported, "sd15")
    assert any(k.startswith("text_encoder.") for k in loaded)
    _assert_same_change(loaded, _trained_deltas(tiny_sd15, job.run.latest_checkpoint()))


def test_network_args_record_full_target_names(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 2)
    targets = ["to_q", "ff.net.0.proj", "ff.net.2"]
    config = seed_like_config(tmp_path, tiny_sd15, data, epochs=1, batch_size=2, target_modules=targets)
    job = _train(config)
    _, meta = _read(Path(job.resolved.config.output_dir) / "my_style_lora.safetensors")
    assert json.loads(meta["ss_network_args"])["target_modules"] == "to_q,ff.net.0.proj,ff.net.2"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("base_model: x\ntask_type: image\n" + text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'network_module: lycoris.kohya\nnetwork_args: ["algo=lokr", "factor=8", "conv_dim=4", "conv_alpha=1"]\n',
            {"network_type": "lokr", "lokr_factor": 8, "conv_rank": 4, "conv_alpha": 1.0},
        ),
        (
            "network_module: lycoris.kohya\nnetwork_args: [algo=loha, use_tucker=True]\n",
            {"network_type": "loha", "use_tucker": True},
        ),
        (
            "network_module: lycoris.kohya\nnetwork_args: [algo=lora, dora_wd=True]\n",
            {"network_type": "dora"},
        ),
        (
            "network_module: networks.lora\nnetwork_args: [conv_dim=8]\n",
            {"network_type": "locon", "conv_rank": 8},
        ),
        ("network_module: lycoris.kohya\n", {"network_type": "locon"}),
        ("use_dora: true\n", {"adapter_type": "dora"}),
        (
            "network_type: lokr\nfactor: 16\ndecompose_both: true\n",
            {"lokr_factor": 16, "decompose_both": True},
        ),
    ],
)
def test_kohya_network_keys_map_to_typed_keys(tmp_path, text, expected):
    cfg = load_config(_write(tmp_path, text)).config
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("network_module: networks.dylora\n", "network_module 'networks.dylora' is not supported"),
        ("network_module: lycoris.kohya\nnetwork_args: [algo=ia3]\n", "algo=ia3 is not supported"),
        ("network_module: lycoris.kohya\nnetwork_args: [algo=lokr, rank_dropout=0.1]\n", "rank_dropout=0.1"),
        ("network_type: lora\nconv_dim: 4\n", "set network_type: locon"),
        ("network_type: loha\nuse_dora: true\n", "use_dora works with network_type lora or dora"),
        ("network_type: locon\nfactor: 4\n", "LoKr options; set network_type: lokr"),
        ("network_type: lokr\nnetwork_module: lycoris.kohya\nnetwork_args: [algo=loha]\n", "disagrees"),
    ],
)
def test_network_key_mistakes_are_reported_with_their_line(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    message = str(caught.value)
    assert fragment in message and "c.yaml:" in message


# --- the memory planner --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"network_type": "lora"},
        {"network_type": "locon", "conv_rank": 4},
        {"network_type": "loha"},
        {"network_type": "loha", "use_tucker": True},
        {"network_type": "lokr", "lora_rank": 2},
        {"network_type": "lokr", "lora_rank": 2, "lokr_factor": 4, "decompose_both": True},
        {"network_type": "dora", "train_text_encoder": True},
    ],
)
def test_planner_counts_the_trainable_tensors_of_each_type(tiny_sd15, options):
    """The planner's tensor sizes (no torch model) are exactly the ones PEFT creates in the trainer."""
    from loratui.config import TrainConfig
    from loratui.memory.arch import arch_from_config
    from loratui.memory.estimate import regime_for
    from loratui.memory.summary import build_summary
    from loratui.models.sd.adapters import spec_from_config
    from loratui.models.sd.lora import plan_targets

    cfg = TrainConfig(base_model=str(tiny_sd15), model_family="sd15", **options)
    regime, _ = regime_for(cfg, "cpu", "sd")
    summary = build_summary(arch_from_config(cfg, family="sd15"))
    predicted = summary.adapter_numels(
        regime.network, cfg.lora_rank, None, train_text_encoder=cfg.train_text_encoder
    )

    pipe = _pipeline(tiny_sd15)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    spec = spec_from_config(cfg)
    targets = plan_targets(
        None, components, train_text_encoder=cfg.train_text_encoder, convs=spec.adapts_convs
    )
    params = inject_lora(components, LoraPlan(targets, cfg.lora_rank, cfg.effective_alpha, network=spec))
    actual: dict[int, int] = {}
    for param in params:
        actual[param.numel()] = actual.get(param.numel(), 0) + 1
    assert predicted == sorted(actual.items())


@pytest.mark.slow  # bench/bench_adapter_types.py measures the same (all five types, two micro-batch sizes)
def test_planner_follows_the_cpu_meter_for_each_type(tiny_sd15, tmp_path, monkeypatch):
    """Predicted peak vs the metered peak of the trainer's real step (CPU), per adapter type: within 5 %, and
    the types differ as they should (LoHa and LoKr keep a full-size delta per module, DoRA the weight norm)."""
    from loratui.memory.tables import clear_memory_cache
    from loratui.train.memory_check.accuracy import session_rows
    from loratui.train.memory_check.realstep import write_image_dataset

    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    data = write_image_dataset(tmp_path / "images", 4, 64)
    peaks = {}
    try:
        for kind in ("lora", "loha", "lokr", "dora"):
            (row,) = session_rows(
                "tiny-sd15", "sd", "sd15", tiny_sd15, data, 64, False, 8, batches=(2,), network_type=kind
            )
            assert abs(row.error) <= 0.05, (kind, row)
            peaks[kind] = row.predicted
    finally:
        clear_memory_cache()
    assert peaks["lora"] < min(peaks["loha"], peaks["lokr"], peaks["dora"])


def test_planner_falls_back_when_an_adapter_trace_fails(tiny_sd15, tmp_path, monkeypatch):
    """Where the adapter's reference step cannot be traced, LoRA's fit plus one full-size weight change per
    adapted module stands in; on the tiny SD1.5 it lands near the traced LoHa prediction."""
    from loratui.config import TrainConfig
    from loratui.memory import tables
    from loratui.memory.estimate import estimate_peak

    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    tables.clear_memory_cache()
    cfg = TrainConfig(base_model=str(tiny_sd15), model_family="sd15", network_type="loha", resolution=64)
    try:
        traced = estimate_peak(cfg, family="sd15", device="cpu")
        real_get_fit = tables.get_fit

        def failing(spec, regime, source, what="step"):
            if regime.network != "lora":
                raise RuntimeError("trace failed")
            return real_get_fit(spec, regime, source, what)

        monkeypatch.setattr(tables, "get_fit", failing)
        fallback = estimate_peak(cfg, family="sd15", device="cpu")
        lora = estimate_peak(cfg.model_copy(update={"network_type": "lora"}), family="sd15", device="cpu")
    finally:
        tables.clear_memory_cache()
    assert any("loha step memory" in note for note in fallback.notes)
    assert lora.total_bytes < fallback.total_bytes
    assert fallback.total_bytes == pytest.approx(traced.total_bytes, rel=0.10)


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "loha", "rank": 4, "alpha": 1.0, "conv_rank": 2, "conv_alpha": 3.0},
        {"kind": "lokr", "rank": 2, "alpha": 0.5, "factor": 4},
        {"kind": "lokr", "rank": 64, "alpha": 3.0},  # both Kronecker factors full: the scale is folded in
        {"kind": "dora", "rank": 4, "alpha": 2.0},
    ],
)
def test_exported_scale_matches_at_any_alpha(tiny_sd15, options):
    """alpha != rank: the lycoris-lora package's forward pass (which applies alpha / rank once, like ComfyUI and
    A1111) with the exported tensors gives each module the trained output change."""
    import torch.nn.functional as F
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    from loratui.models.sd.lora import module_scales, plan_targets
    from loratui.models.sd.lycoris import to_lycoris_state

    kind, rank, alpha = options.pop("kind"), options.pop("rank"), options.pop("alpha")
    spec = NetworkSpec(kind, **options)
    unet = _pipeline(tiny_sd15).unet.float()
    base = {n: m.weight.detach().clone() for n, m in unet.named_modules() if hasattr(m, "weight")}
    targets = plan_targets(None, {"unet": unet}, train_text_encoder=False, convs=spec.adapts_convs)
    plan = LoraPlan(targets, rank, alpha, network=spec)
    torch.manual_seed(0)
    params = inject_lora({"unet": unet}, plan)
    with torch.no_grad():
        for param in params:
            param.normal_(0, 0.2)
    layers = lora_layers(unet)
    deltas = {}
    with torch.no_grad():
        for path, layer in layers.items():
            layer.merge(adapter_names=["default"])
            deltas[path] = layer.get_base_layer().weight.detach() - base[path]
            layer.unmerge()
    from loratui.models.sd.lora import lora_state

    state = to_lycoris_state(lora_state({"unet": unet}, plan), module_scales({"unet": unet}, plan), "sd15")

    fresh = _pipeline(tiny_sd15).unet.float()
    prefix = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        network, _ = create_lycoris_from_weights(1.0, None, fresh, weights_sd=dict(state))
    finally:
        LycorisNetwork.LORA_PREFIX = prefix
    assert len(network.loras) == len(layers)
    modules = dict(fresh.named_modules())
    originals = {path: (modules[path], modules[path].forward) for path in layers}
    network.apply_to()
    torch.manual_seed(1)
    with torch.no_grad():
        for path, (module, plain_forward) in originals.items():
            if isinstance(module, torch.nn.Conv2d):
                x = torch.randn(1, module.in_channels, 6, 6)
                change = F.conv2d(x, deltas[path], None, module.stride, module.padding)
            else:
                x = torch.randn(3, module.in_features)
                change = F.linear(x, deltas[path])
            torch.testing.assert_close(module(x) - plain_forward(x), change, atol=1e-5, rtol=1e-4, msg=path)


def test_lycoris_files_are_not_converted_to_diffusers(tmp_path):
    from safetensors.torch import save_file

    from loratui.export.sd_export import convert_lora_file
    from loratui.models.sd.lora_files import ExportError

    path = tmp_path / "loha.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.hada_w1_a": torch.zeros(4, 2), f"{name}.alpha": torch.tensor(2.0)}, str(path))
    with pytest.raises(ExportError, match="LyCORIS file"):
        convert_lora_file(path, fmt="diffusers", out=None, dtype=None, overwrite=False)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
