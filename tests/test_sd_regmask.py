"""Regularization images (prior preservation) and masked loss on the tiny SD 1.5 and SDXL fixtures."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config

from loratui.config import ResolvedConfig, TrainConfig, load_config
from loratui.data.check import run_checks
from loratui.data.regularization import epoch_line, epoch_plan, reg_repeats
from loratui.train.loop.plan import StepPlan
from loratui.train.sd import setup
from loratui.train.sd import trainer as sd_trainer
from loratui.train.sd.dataset import load_dataset
from loratui.train.sd.trainer import LossContext, train


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Quiet:
    def event(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


# --- datasets ------------------------------------------------------------------------------------------------


def _train_and_reg(tmp: Path, n_train: int = 2, train_repeats: int = 2, n_reg: int = 3) -> tuple[Path, Path]:
    """kohya layout: train/2_obj (sidecar captions), reg/1_cls (class images)."""
    train = make_image_dataset(tmp / "train", n_train, metadata=False, subfolder=f"{train_repeats}_obj")
    reg = tmp / "reg" / "1_cls"
    reg.mkdir(parents=True)
    for i in range(n_reg):
        colour = (30 + 60 * i, 200 - 50 * i, 90)
        image = Image.new("RGB", (64, 64), (250, 250, 250))
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 10, 50, 54), fill=colour)
        image.save(reg / f"cls{i}.png")
        (reg / f"cls{i}.txt").write_text("a shape, plain background\n", encoding="utf-8")
    return train, tmp / "reg"


def _half_masked_images(root: Path, n: int = 2, *, alpha: bool) -> Path:
    """64x64 images (sidecar captions); mask: left half 0, right half 1 (alpha channel or mask_dir files)."""
    root.mkdir(parents=True, exist_ok=True)
    masks = root.parent / "masks"
    masks.mkdir(exist_ok=True)
    mask = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=0)
    for i in range(n):
        image = Image.new("RGB", (64, 64), (240, 230, 220))
        ImageDraw.Draw(image).rectangle((10 + 5 * i, 12, 54, 50), fill=(200, 40 * i, 60))
        if alpha:
            image.putalpha(mask)
        image.save(root / f"img{i}.png")
        mask.save(masks / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a red box {i}\n", encoding="utf-8")
    return root


def _context(tmp: Path, base: Path, data: Path, **overrides) -> tuple[LossContext, list[torch.nn.Parameter]]:
    """The SD trainer's loss of one micro-batch, set up like `train` does (CPU, fp32)."""
    values = {"metadata_path": None, "resolution": 64, "batch_size": 2, "epochs": 1, **overrides}
    resolved = load_config(seed_like_config(tmp, base, data, **values))
    cfg = resolved.config
    cfg.model_family = resolved.family
    job = SimpleNamespace(resolved=ResolvedConfig(cfg, {}, resolved.family), run=None, resume_from=None)
    accelerator, precision = setup.setup_accelerator(cfg)
    dataset = setup.setup_dataset(cfg, _Quiet())
    models = setup.setup_models(job, precision, accelerator.device)
    latents, text = setup.setup_caches(cfg, job, models, dataset, _Quiet())
    _lora, params = setup.setup_lora(cfg, models, _Quiet())
    setup.place_unet(models)
    models.forward_unet = models.unet  # on the CPU in fp32 accelerate adds no wrapper that changes numbers
    models.unet.train()
    with torch.no_grad():  # non-zero LoRA up weights, so every adapter tensor gets a gradient
        gen = torch.Generator().manual_seed(0)
        for param in params:
            param.add_(0.01 * torch.randn(param.shape, generator=gen))
    return LossContext(cfg, models, dataset, latents, text), params


def _loss_and_grads(context: LossContext, params, indices: list[int]) -> tuple[float, list[torch.Tensor]]:
    for param in params:
        param.grad = None
    loss = context.micro_loss(indices, epoch=0, step_samples=len(indices))
    loss.backward()
    return loss.item(), [
        param.grad.clone() if param.grad is not None else torch.zeros_like(param) for param in params
    ]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# --- regularization images ------------------------------------------------------------------------------------


def test_reg_repeats_follow_kohyas_balancing_walk():
    assert reg_repeats(10, [1, 1, 1]) == [4, 3, 3]  # later passes add one repeat per image
    assert reg_repeats(5, [10, 10]) == [10, 0]  # first pass adds the folder's repeats; stops when reached
    assert reg_repeats(15, [10, 10]) == [10, 10]
    assert reg_repeats(2, [1, 1, 1, 1]) == [1, 1, 0, 0]  # more class images than samples: some unused
    assert reg_repeats(4, []) == []


def test_reg_images_double_the_steps_per_epoch_in_dataset_check_and_dry_run(tmp_path):
    train_dir, reg_dir = _train_and_reg(tmp_path)  # 2 images x 2 repeats; 3 class images x 1 repeat
    cfg = TrainConfig(
        train_data_dir=str(train_dir), reg_data_dir=str(reg_dir), resolution=64, batch_size=2, base_model="x"
    )
    dataset = load_dataset(cfg)
    assert (dataset.num_images, len(dataset), dataset.num_reg_samples) == (2, 8, 4)  # reg: 2+1+1
    assert [r.repeats for r in dataset.records if r.is_reg] == [2, 1, 1]
    cached = dataset.views_for_caching()  # the latent cache encodes the regularization images too
    assert len(cached) == 5 and sum(view.record.is_reg for view in cached) == 3
    plain = load_dataset(cfg.model_copy(update={"reg_data_dir": None}))
    assert StepPlan(len(plain), 2, 3).total_steps == 6
    assert StepPlan(len(dataset), 2, 3).total_steps == 12  # kohya: reg samples join the epoch
    report = run_checks(train_dir, task="image", batch_size=2, reg_data_dir=reg_dir)
    assert (report.summary["reg_samples"], report.summary["steps_per_epoch"]) == (4, 4)
    assert "reg_images" in report.codes() and not report.has_errors
    counts = epoch_plan(cfg)
    assert (counts.samples_per_epoch, counts.steps_per_epoch) == (8, 4)
    assert "+ 4 regularization samples" in epoch_line(counts, 3, None)
    assert epoch_line(counts, 3, None).endswith("12 steps in all")
    meta = dataset.reg_metadata()
    assert meta["ss_num_reg_images"] == "4" and meta["ss_prior_loss_weight"] == "1.0"
    # reg captions never get the trigger word (prior preservation is about the class, not the subject)
    triggered = load_dataset(cfg.model_copy(update={"trigger_word": "zxq"}))
    reg_index = next(i for i, r in enumerate(triggered.sample_records) if triggered.records[r].is_reg)
    assert "zxq" not in triggered.view(reg_index, 0).caption
    assert "zxq" in triggered.view(0, 0).caption


def test_check_reports_problems_in_the_reg_folder(tmp_path):
    train_dir, reg_dir = _train_and_reg(tmp_path)
    (reg_dir / "1_cls" / "cls0.txt").unlink()
    extra = reg_dir / "1_cls"
    for i in range(3, 9):  # more class images than training samples: some never used
        Image.new("RGB", (64, 64), (i * 20, 90, 90)).save(extra / f"cls{i}.png")
        (extra / f"cls{i}.txt").write_text("a shape\n", encoding="utf-8")
    report = run_checks(train_dir, task="image", reg_data_dir=reg_dir)
    missing = report.by_code("missing_caption")
    assert missing is not None and str(reg_dir / "1_cls" / "cls0.png") in [e.path for e in missing.examples]
    assert report.by_code("reg_images_unused") is not None
    assert report.exit_code == 1


def test_prior_loss_weight_scales_the_reg_samples_loss_and_gradient(tiny_sd15, tmp_path):
    train_dir, reg_dir = _train_and_reg(tmp_path / "data")
    results = {}
    for weight in (0.0, 0.5, 1.0):
        context, params = _context(
            tmp_path / f"w{weight}", tiny_sd15, train_dir, reg_data_dir=str(reg_dir), prior_loss_weight=weight
        )
        ds = context.dataset
        reg = [i for i, r in enumerate(ds.sample_records) if ds.records[r].is_reg][:2]
        train_idx = [i for i, r in enumerate(ds.sample_records) if not ds.records[r].is_reg][:2]
        results[weight] = (_loss_and_grads(context, params, reg), _loss_and_grads(context, params, train_idx))
    (reg0, grads0), _ = results[0.0]
    (reg1, grads1), train1 = results[1.0]
    (reg_half, grads_half), train_half = results[0.5]
    assert reg1 > 0 and reg0 == 0.0
    assert max(g.abs().max().item() for g in grads0) == 0.0
    assert max(g.abs().max().item() for g in grads1) > 0
    assert reg_half == pytest.approx(0.5 * reg1, rel=1e-5)
    assert _max_diff(grads_half, [0.5 * g for g in grads1]) <= 1e-6 * max(
        g.abs().max().item() for g in grads1
    )
    assert train_half[0] == pytest.approx(train1[0], rel=1e-6)  # training samples weigh 1 whatever the weight


def test_a_run_with_reg_images_sees_them_and_resumes_exactly(tiny_sd15, tmp_path, monkeypatch):
    train_dir, reg_dir = _train_and_reg(tmp_path / "data")
    seen: list[int] = []
    original = LossContext.micro_loss

    def spy(self, indices, epoch, step_samples):
        seen.extend(int(self.dataset.records[self.dataset.sample_records[i]].is_reg) for i in indices)
        return original(self, indices, epoch, step_samples)

    common = {
        "metadata_path": None,
        "reg_data_dir": str(reg_dir),
        "prior_loss_weight": 0.7,
        "batch_size": 2,
        "epochs": 2,
        "save_steps": 100,
        "resolution": 64,
    }
    straight = make_job(seed_like_config(tmp_path / "a", tiny_sd15, train_dir, **common))
    monkeypatch.setattr(LossContext, "micro_loss", spy)
    assert train(straight) == "finished"
    monkeypatch.setattr(LossContext, "micro_loss", original)
    assert len(seen) == 16 and sum(seen) == 8  # 2 epochs x (4 training + 4 regularization samples)
    started = events_of(straight.run, "run_started")[0]
    assert (started["total_steps"], started["samples_per_epoch"], started["reg_samples"]) == (8, 8, 4)

    config = seed_like_config(tmp_path / "b", tiny_sd15, train_dir, **common)
    first = make_job(config)
    assert train(first, stop_after_step=3) == "stopped"
    second = make_job(config, resume_from=first.run.latest_checkpoint(), run=first.run)
    assert train(second) == "finished"
    a = load_file(str(straight.run.latest_checkpoint() / "lora.safetensors"))
    b = load_file(str(first.run.latest_checkpoint() / "lora.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


# --- masked loss ---------------------------------------------------------------------------------------------


def _perturbed_target(monkeypatch, columns: slice) -> None:
    """Add a large value to the training target in latent `columns` only."""
    original = sd_trainer.training_target

    def perturbed(*args, **kwargs):
        target = original(*args, **kwargs).clone()
        target[..., columns] += 5.0
        return target

    monkeypatch.setattr(sd_trainer, "training_target", perturbed)


@pytest.mark.parametrize(
    ("family", "source"), [("sd15", "mask_dir"), ("sdxl", "alpha_mask")], ids=["sd15-mask_dir", "sdxl-alpha"]
)
def test_masked_out_latent_pixels_get_no_loss_and_no_gradient(
    family, source, tiny_sd15, tiny_sdxl, tmp_path, monkeypatch
):
    base = tiny_sd15 if family == "sd15" else tiny_sdxl
    data = _half_masked_images(tmp_path / "data", alpha=source == "alpha_mask")
    mask_option = {"mask_dir": str(tmp_path / "masks")} if source == "mask_dir" else {"alpha_mask": True}
    masked, params = _context(tmp_path / "m", base, data, **mask_option)
    plain, plain_params = _context(tmp_path / "p", base, data)
    latent_width = 64 // 8
    left = slice(0, latent_width // 2)  # the mask is 0 over the left half of every image
    reference = _loss_and_grads(masked, params, [0, 1])
    reference_plain = _loss_and_grads(plain, plain_params, [0, 1])
    with monkeypatch.context() as patch:
        _perturbed_target(patch, left)
        changed = _loss_and_grads(masked, params, [0, 1])
        changed_plain = _loss_and_grads(plain, plain_params, [0, 1])
    assert changed[0] == pytest.approx(reference[0], rel=1e-6)
    assert _max_diff(changed[1], reference[1]) <= 1e-7
    # without the mask, the same change moves the loss and the gradient: the test can fail
    assert changed_plain[0] > 2 * reference_plain[0]
    assert _max_diff(changed_plain[1], reference_plain[1]) > 1e-4
    # the right half is trained: a change there moves the masked loss
    with monkeypatch.context() as patch:
        _perturbed_target(patch, slice(latent_width // 2, latent_width))
        assert _loss_and_grads(masked, params, [0, 1])[0] > 2 * reference[0]


def test_mask_follows_its_image_through_buckets_crops_and_flips(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, size in enumerate([(150, 90), (90, 140), (120, 120)]):
        image = Image.new("RGB", size, (255, 255, 255))
        mask = Image.new("L", size, 0)
        box = (0, size[1] // 5, size[0] // 3, size[1] - size[1] // 4)  # the left third: asymmetric
        ImageDraw.Draw(image).rectangle(box, fill=(0, 0, 0))
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        image.save(root / f"img{i}.png")
        mask.save(masks / f"img{i}.png")
        (root / f"img{i}.txt").write_text("a box\n", encoding="utf-8")
    cfg = TrainConfig(
        train_data_dir=str(root),
        mask_dir=str(masks),
        masked_loss=True,
        resolution=64,
        bucket=True,
        bucket_no_upscale=False,
        random_crop=True,
        flip_aug=True,
        base_model="x",
    )
    dataset = load_dataset(cfg)
    flips = crops = 0
    for epoch in range(6):
        for index in range(len(dataset)):
            view = dataset.view(index, epoch)
            flips += view.flip
            crops += view.crop_top_left != (0, 0)
            dark = dataset.pixels(view)[0] < 0  # the black box
            mask = dataset.mask(view)[0] > 0.5
            assert mask.shape == dark.shape
            agreement = (mask == dark).float().mean().item()
            assert agreement > 0.97, (view, agreement)
            mirrored = (mask.flip(-1) == dark).float().mean().item()
            assert mirrored < 0.9  # the box is off-centre: an unflipped mask would not match
    assert flips > 0 and crops > 0


def test_a_masked_run_with_flips_resumes_exactly(tiny_sd15, tmp_path):
    data = _half_masked_images(tmp_path / "data", 3, alpha=False)
    common = {
        "metadata_path": None,
        "mask_dir": str(tmp_path / "masks"),
        "flip_aug": True,
        "batch_size": 2,
        "epochs": 2,
        "save_steps": 100,
        "resolution": 64,
    }
    straight = make_job(seed_like_config(tmp_path / "a", tiny_sd15, data, **common))
    assert train(straight) == "finished"
    config = seed_like_config(tmp_path / "b", tiny_sd15, data, **common)
    first = make_job(config)
    assert train(first, stop_after_step=2) == "stopped"
    second = make_job(config, resume_from=first.run.latest_checkpoint(), run=first.run)
    assert train(second) == "finished"
    a = load_file(str(straight.run.latest_checkpoint() / "lora.safetensors"))
    b = load_file(str(first.run.latest_checkpoint() / "lora.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_check_reports_missing_and_mis_sized_masks(tmp_path):
    data = _half_masked_images(tmp_path / "data", 3, alpha=False)
    masks = tmp_path / "masks"
    (masks / "img1.png").unlink()
    Image.new("L", (32, 64), 255).save(masks / "img2.png")
    report = run_checks(data, task="image", mask_dir=masks)
    assert [e.path for e in report.by_code("missing_mask").examples] == ["img1.png"]
    mismatch = report.by_code("mask_size_mismatch")
    assert [e.path for e in mismatch.examples] == ["img2.png"] and "32x64" in mismatch.examples[0].detail
    assert report.exit_code == 1
    clean = run_checks(
        _half_masked_images(tmp_path / "ok" / "data", 2, alpha=False),
        task="image",
        mask_dir=tmp_path / "ok" / "masks",
    )
    assert not ({"missing_mask", "mask_size_mismatch"} & clean.codes())
    opaque = run_checks(data, task="image", alpha_mask=True)
    assert opaque.by_code("no_alpha_mask").count == 3
    cfg = TrainConfig(train_data_dir=str(data), mask_dir=str(masks), resolution=64, base_model="x")
    with pytest.raises(ValueError, match=r"(?s)img1.png: no mask.*img2.png: mask 32x64, image 64x64"):
        load_dataset(cfg)
    warnings: list[str] = []
    skipped = load_dataset(cfg, allow_errors=True, warn=warnings.append)  # --skip-checks: trained whole
    assert [r.mask_path is not None for r in skipped.records] == [True, False, False]
    assert any("trained whole" in w for w in warnings)


def test_masked_loss_needs_a_mask_source_and_kohya_keys_are_aliases(tmp_path):
    with pytest.raises(ValueError, match="mask_dir"):
        TrainConfig(masked_loss=True)
    path = tmp_path / "c.yaml"
    path.write_text(
        "base_model: x\ntrain_data_dir: d\nconditioning_data_dir: m\nmasked_loss: true\nclass_data_dir: r\n",
        encoding="utf-8",
    )
    cfg = load_config(path).config
    assert cfg.mask_dir.endswith("m") and cfg.reg_data_dir.endswith("r") and cfg.uses_loss_masks


# --- planner -------------------------------------------------------------------------------------------------


def test_planner_counts_the_mask_tensors_and_notes_reg_images():
    from loratui.memory.estimate import estimate_peak
    from loratui.models.sd.masks import mask_bytes

    cfg = TrainConfig(
        base_model="runwayml/stable-diffusion-v1-5", model_family="sd15", resolution=512, batch_size=4
    )
    plain = estimate_peak(cfg, device="cpu")
    masked = estimate_peak(cfg.model_copy(update={"alpha_mask": True}), device="cpu")
    assert plain.phase == masked.phase == "micro-batch forward/backward"
    expected = 4 * (512 * 512 + 64 * 64) * 4
    assert mask_bytes(4, 512) == expected
    assert masked.breakdown["loss_masks"] == expected
    assert masked.total_bytes - plain.total_bytes == expected
    double = estimate_peak(cfg.model_copy(update={"alpha_mask": True, "batch_size": 8}), device="cpu")
    assert double.breakdown["loss_masks"] == 2 * expected
    reg = estimate_peak(cfg.model_copy(update={"reg_data_dir": "/r"}), device="cpu")
    assert reg.total_bytes == plain.total_bytes  # same batch composition: per step memory unchanged
    assert any("regularization images" in note for note in reg.notes)


def test_dry_run_and_check_show_the_steps_with_reg_images(tiny_sd15, tmp_path):
    import json

    from typer.testing import CliRunner

    from loratui.cli.app import app

    train_dir, reg_dir = _train_and_reg(tmp_path / "data")
    config = seed_like_config(
        tmp_path / "c",
        tiny_sd15,
        train_dir,
        metadata_path=None,
        reg_data_dir=str(reg_dir),
        batch_size=2,
        epochs=3,
    )
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--config", str(config), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)["data"]
    assert (data["train_samples"], data["reg_samples"], data["steps_per_epoch"]) == (4, 4, 4)
    text = runner.invoke(app, ["train", "--config", str(config), "--dry-run"], env={"COLUMNS": "300"})
    assert "+ 4 regularization samples" in text.output and "12 steps in all" in text.output
    check = runner.invoke(app, ["check", "--config", str(config), "--json"])
    summary = json.loads(check.output)["summary"]
    assert (summary["reg_samples"], summary["steps_per_epoch"]) == (4, 4)


def test_split_micro_batches_give_the_same_gradient_with_reg_images_and_masks(tiny_sd15, tmp_path):
    """The OOM ladder's first rung: weights and masks belong to samples, not to micro-batches."""
    data = _half_masked_images(tmp_path / "data", 2, alpha=False)
    _train, reg_dir = _train_and_reg(tmp_path / "r")
    context, params = _context(
        tmp_path / "c",
        tiny_sd15,
        data,
        mask_dir=str(tmp_path / "masks"),
        reg_data_dir=str(reg_dir),
        prior_loss_weight=0.3,
        resolution=128,  # at 64 px the tiny UNet's 1x1 bottleneck amplifies batched rounding (test_sd_train)
    )
    indices = list(range(len(context.dataset)))  # 2 training + 2 regularization samples
    assert len(indices) == 4 and context.dataset.num_reg_samples == 2
    whole, whole_grads = _loss_and_grads(context, params, indices)
    for param in params:
        param.grad = None
    split = 0.0
    for part in (indices[:1], indices[1:3], indices[3:]):
        loss = context.micro_loss(part, epoch=0, step_samples=len(indices))
        loss.backward()
        split += loss.item()
    split_grads = [p.grad.clone() for p in params]
    assert split == pytest.approx(whole, rel=1e-5)
    assert _max_diff(split_grads, whole_grads) <= 1e-4 * max(g.abs().max().item() for g in whole_grads)


def test_resume_refuses_changed_masks_or_reg_images(tmp_path):
    import json

    from loratui.data.fingerprint import input_fingerprints
    from loratui.train.loop.resume_inputs import ChangedInputs, check_resume_inputs

    data = _half_masked_images(tmp_path / "data", 2, alpha=False)
    _train, reg_dir = _train_and_reg(tmp_path / "r")
    cfg = TrainConfig(
        train_data_dir=str(data), mask_dir=str(tmp_path / "masks"), reg_data_dir=str(reg_dir), base_model="x"
    )
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "meta.json").write_text(json.dumps({"inputs": input_fingerprints(cfg)}), encoding="utf-8")
    assert check_resume_inputs(cfg, checkpoint, allow_changed_data=False) == []
    Image.new("L", (64, 64), 128).save(tmp_path / "masks" / "img0.png")
    with pytest.raises(ChangedInputs, match="mask_dir"):
        check_resume_inputs(cfg, checkpoint, allow_changed_data=False)
    (checkpoint / "meta.json").write_text(json.dumps({"inputs": input_fingerprints(cfg)}), encoding="utf-8")
    (reg_dir / "1_cls" / "cls0.txt").write_text("another caption\n", encoding="utf-8")
    with pytest.raises(ChangedInputs, match="reg_data_dir"):
        check_resume_inputs(cfg, checkpoint, allow_changed_data=False)
