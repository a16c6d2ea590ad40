"""`loratui caption --model WD_TAGGER_FOLDER`: a tiny ONNX tagger with random weights, built here with the
`onnx` helper API (NHWC input -> Transpose -> GlobalAveragePool -> MatMul -> Sigmoid, as the WD taggers'
input/output contract), checked against probabilities computed independently with onnxruntime."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import tree_digest, write_text
from PIL import Image
from test_tui_wizard import workdir  # noqa: F401  (fixture)
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.data.image_dataset import scan_image_dataset

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

runner = CliRunner()
SIZE = 64
# (name, category): 9 rating, 0 general, 4 character; row i of the csv names output i of the model
TAGS = [
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("1girl", 0), ("long_hair", 0), ("blue_eyes", 0), ("simple_background", 0), ("^_^", 0),
    ("smile", 0), ("white_shirt", 0), ("outdoors", 0), ("short_hair", 0), (">_<", 0),
    ("hatsune_miku", 4), ("kirisame_marisa", 4), ("saber_(fate)", 4),
]  # fmt: skip
COLOURS = {
    "a.png": (250, 20, 20), "b.png": (20, 240, 30), "c.png": (30, 40, 250),
    "d.png": (128, 128, 128), "e.png": (250, 250, 10),
}  # fmt: skip


def build_tagger(folder: Path, tags: list[tuple[str, int]] = TAGS, n_out: int | None = None) -> Path:
    """model.onnx (input [batch, SIZE, SIZE, 3] float32, output [batch, n_out] probabilities) + csv."""
    from onnx import TensorProto, helper, numpy_helper

    n_out = n_out or len(tags)
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((3, n_out)) * 6.0).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Mul", ["flat", "scale"], ["unit"]),
        helper.make_node("MatMul", ["unit", "weight"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", n_out])],
        initializer=[
            numpy_helper.from_array(np.array([1 / 255.0], dtype=np.float32), "scale"),
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(tags):
            writer.writerow([1000 + i, name, category, 500 - i])
    return folder


def make_images(root: Path, names: list[str] | None = None) -> Path:
    for name in names or list(COLOURS):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (SIZE, SIZE), COLOURS[name]).save(path)
    return root


def reference_probs(model_dir: Path, image: Path) -> np.ndarray:
    """The model's probabilities for a square SIZE x SIZE image, computed here without loratui."""
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    bgr = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)[:, :, ::-1]
    return session.run(None, {"input": bgr[None].copy()})[0][0]


def expected_tags(
    probs: np.ndarray, general: float, character: float, spaces: bool = True, rating: bool = False
) -> list[str]:
    order = np.argsort(-probs, kind="stable")
    chars = [TAGS[i][0] for i in order if TAGS[i][1] == 4 and probs[i] >= character]
    gen = [TAGS[i][0] for i in order if TAGS[i][1] == 0 and probs[i] >= general]
    top_rating = [TAGS[i][0] for i in order if TAGS[i][1] == 9][:1] if rating else []
    kaomoji = {"^_^", ">_<"}
    return [t if not spaces or t in kaomoji else t.replace("_", " ") for t in top_rating + chars + gen]


def invoke(*args: str) -> object:
    return runner.invoke(app, ["caption", *args])


def read_txt(root: Path, stem: str) -> list[str]:
    text = (root / f"{stem}.txt").read_text(encoding="utf-8").strip()
    return [t.strip() for t in text.split(",") if t.strip()]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tagger(tmp_path_factory.mktemp("wd") / "wd-tiny-tagger-v3")


@pytest.mark.parametrize(("general", "character"), [(0.35, 0.85), (0.6, 0.5)])
def test_thresholds_order_and_rating_left_out(tmp_path: Path, tagger: Path, general, character) -> None:
    root = make_images(tmp_path / "ds")
    result = invoke(
        str(root), "--model", str(tagger), "--format", "txt", "--batch-size", "2",
        "--general-threshold", str(general), "--character-threshold", str(character),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    seen_general = seen_character = False
    for name in COLOURS:
        probs = reference_probs(tagger, root / name)
        want = expected_tags(probs, general, character)
        got = read_txt(root, Path(name).stem)
        assert got == want, (name, probs.round(3).tolist())
        assert not {"general", "sensitive", "questionable", "explicit"} & set(got)
        # some tags pass and some fall below the threshold, so the threshold really decides
        gen_probs = [p for p, (_, c) in zip(probs, TAGS, strict=True) if c == 0]
        seen_general |= min(gen_probs) < general <= max(gen_probs)
        seen_character |= any(c == 4 and p >= character for p, (_, c) in zip(probs, TAGS, strict=True))
    assert seen_general and seen_character


def test_rating_underscores_exclude_and_prefix(tmp_path: Path, tagger: Path) -> None:
    root = make_images(tmp_path / "ds")
    args = ["--format", "txt", "--general-threshold", "0.05", "--character-threshold", "0.05"]
    result = invoke(
        str(root), "--model", str(tagger), *args, "--include-rating", "--keep-underscores",
        "--exclude-tags", "simple background, smile", "--prefix", "mychar, ",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in COLOURS:
        probs = reference_probs(tagger, root / name)
        want = expected_tags(probs, 0.05, 0.05, spaces=False, rating=True)
        want = [t for t in want if t not in ("simple_background", "smile")]
        got = read_txt(root, Path(name).stem)
        assert got == ["mychar", *want]
        assert got[1] in {"general", "sensitive", "questionable", "explicit"}
    spaced = make_images(tmp_path / "spaced")
    assert invoke(str(spaced), "--model", str(tagger), *args).exit_code == 0
    tags = {t for name in COLOURS for t in read_txt(spaced, Path(name).stem)}
    assert "long hair" in tags and "simple background" in tags and "long_hair" not in tags
    assert "^_^" in tags and ">_<" in tags  # kaomojis keep their underscore


def test_existing_captions_keep_append_overwrite(tmp_path: Path, tagger: Path) -> None:
    root = make_images(tmp_path / "ds", ["a.png", "b.png", "c.png"])
    write_text(root / "metadata.csv", 'filename,prompt\na.png,"mychar, red theme, 1girl"\n')
    write_text(root / "b.txt", "hand written caption")
    low = ["--general-threshold", "0.05", "--character-threshold", "0.05"]
    # keep (default): existing captions untouched, only c.png captioned
    kept = invoke(str(root), "--model", str(tagger), *low)
    assert kept.exit_code == 0, kept.output
    by = {i.rel: i for i in scan_image_dataset(root).items}
    assert by["a.png"].caption == "mychar, red theme, 1girl"
    assert by["b.png"].caption == "hand written caption" and by["b.png"].caption_source == ".txt"
    new_c = by["c.png"].caption
    assert new_c == ", ".join(expected_tags(reference_probs(tagger, root / "c.png"), 0.05, 0.05))
    snapshot = tree_digest(root)
    again = invoke(str(root), "--model", str(tagger), *low, "--mode", "keep")
    assert again.exit_code == 0 and tree_digest(root) == snapshot
    # append: the existing text first and unchanged, new tags after it, no duplicates
    appended = invoke(str(root), "--model", str(tagger), *low, "--mode", "append", "--prefix", "mychar, ")
    assert appended.exit_code == 0, appended.output
    by = {i.rel: i for i in scan_image_dataset(root).items}
    for rel, old in (("a.png", "mychar, red theme, 1girl"), ("b.png", "mychar, hand written caption")):
        parts = [p.strip() for p in by[rel].caption.split(",")]
        new = expected_tags(reference_probs(tagger, root / rel), 0.05, 0.05)
        assert by[rel].caption.startswith(old)
        assert len(parts) == len({p.lower() for p in parts})
        assert set(new) <= set(parts)
        assert parts[len(old.split(",")) :] == [t for t in new if t not in old.split(", ")]
    assert (root / "b.txt").read_text() == "hand written caption"  # the sidecar itself is kept
    assert by["c.png"].caption == "mychar, " + new_c
    # overwrite: replaced by the tagger's output
    redone = invoke(str(root), "--model", str(tagger), *low, "--mode", "overwrite")
    assert redone.exit_code == 0, redone.output
    by = {i.rel: i for i in scan_image_dataset(root).items}
    for rel in ("a.png", "b.png", "c.png"):
        assert by[rel].caption == ", ".join(expected_tags(reference_probs(tagger, root / rel), 0.05, 0.05))
    assert invoke(str(root), "--model", str(tagger), "--mode", "append", "--overwrite").exit_code == 2
    assert invoke(str(root), "--model", str(tagger), "--mode", "merge").exit_code == 2


def test_broken_tagger_folders_are_explained(tmp_path: Path) -> None:
    root = make_images(tmp_path / "ds", ["a.png"])
    snapshot = tree_digest(root)
    no_csv = build_tagger(tmp_path / "no_csv")
    (no_csv / "selected_tags.csv").unlink()
    result = invoke(str(root), "--model", str(no_csv))
    assert result.exit_code == 2
    assert "selected_tags.csv is missing" in result.output
    wrong = build_tagger(tmp_path / "wrong", n_out=len(TAGS) + 2)
    result = invoke(str(root), "--model", str(wrong))
    assert result.exit_code == 2
    assert f"lists {len(TAGS)} tags but" in result.output and f"outputs {len(TAGS) + 2}" in result.output
    bad_header = build_tagger(tmp_path / "bad_header")
    write_text(bad_header / "selected_tags.csv", "id,tag\n1,smile\n")
    result = invoke(str(root), "--model", str(bad_header))
    assert result.exit_code == 2 and "selected_tags.csv:1" in result.output
    no_model = build_tagger(tmp_path / "no_model")
    (no_model / "model.onnx").unlink()
    result = invoke(str(root), "--model", str(no_model))
    assert result.exit_code == 2 and "model.onnx is missing" in result.output
    assert (
        invoke(str(root), "--model", str(build_tagger(tmp_path / "ok")), "--general-threshold", "2").exit_code
        == 2
    )
    assert tree_digest(root) == snapshot


def test_batched_equals_single_and_white_padding(tagger: Path) -> None:
    from loratui.data.wd_tagger import WDTagger, prepare_image

    model = WDTagger(tagger, device="cpu")
    assert model.size == SIZE
    images = [Image.new("RGB", (SIZE, SIZE), c) for c in COLOURS.values()]
    batched = model.probabilities(images)
    single = np.concatenate([model.probabilities([im]) for im in images])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    wide = prepare_image(Image.new("RGB", (SIZE, SIZE // 2), (10, 20, 30)), SIZE)
    assert wide.shape == (SIZE, SIZE, 3) and wide.dtype == np.float32
    assert wide[0, SIZE // 2].tolist() == [255.0, 255.0, 255.0]  # padded on white
    assert wide[SIZE // 2, SIZE // 2].tolist() == [30.0, 20.0, 10.0]  # BGR


def test_missing_onnxruntime_names_the_extra(tagger: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from loratui.data.caption_models import ModelNotAvailable, load_captioner

    real_import = builtins.__import__

    def no_ort(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ort)
    with pytest.raises(ModelNotAvailable, match=r'pip install "loratui\[tagger\]"'):
        load_captioner(tagger)


def test_wizard_caption_step_detects_and_runs_the_tagger(tagger: Path, workdir: Path) -> None:  # noqa: F811
    """The caption step offers a WD tagger folder, says what it found, and appends tags to captions."""
    from test_tui_wizard import SIZE, flat, make_app, step

    from loratui.tui.messages import CaptionsWritten
    from loratui.tui.testing import distinct, run_async, wait_for
    from loratui.tui.wizard_state import WizardState

    before = (workdir / "data/style/img0.txt").read_text()

    @run_async
    async def drive() -> list:
        seen: list = []
        app = make_app(WizardState(values={"train_data_dir": "data/style", "base_model": "models/sd15"}))
        async with app.run_test(size=SIZE, message_hook=seen.append) as pilot:
            for _ in range(3):
                await pilot.press("ctrl+n")
            await wait_for(pilot, lambda: len(step(app).rows) == 5)
            app.screen.query_one("#caption-model").value = "tagger"
            await pilot.pause(0.1)
            assert app.screen.query_one("#model-folder").display
            app.screen.query_one("#model-folder").value = str(tagger)
            await pilot.pause(0.1)
            assert f"WD tagger (booru tags, {len(TAGS)} tags)" in flat(app)
            app.screen.query_one("#policy").value = "append"
            await pilot.pause(0.1)
            await pilot.click("#run-captioning")
            await wait_for(pilot, lambda: distinct(seen, CaptionsWritten), timeout=60)
            await pilot.pause(0.1)
            assert "Wrote 5 captions" in flat(app)
        return seen

    drive()
    rows = {i.rel: i for i in scan_image_dataset(workdir / "data/style").items}
    assert rows["img0.png"].caption.startswith(before.strip() + ", ")  # appended after the existing text
    assert (workdir / "data/style/img0.txt").read_text() == before  # the sidecar itself is kept
    assert rows["nocap.png"].caption  # tags written where there was no caption


def test_folder_kind_is_read_from_its_files(tmp_path: Path, tagger: Path) -> None:
    import shutil

    from loratui.data.wd_tagger import is_wd_tagger_folder

    full = tmp_path / "full_repo"  # the tagger repository as downloaded: a timm config.json beside the csv
    shutil.copytree(tagger, full)
    write_text(full / "config.json", '{"architecture": "vit_base_patch16_224", "num_classes": 17}')
    assert is_wd_tagger_folder(full) and is_wd_tagger_folder(tagger)
    only_model = tmp_path / "only_model"
    only_model.mkdir()
    shutil.copy(tagger / "model.onnx", only_model / "model.onnx")
    assert is_wd_tagger_folder(only_model)  # so the missing csv is reported
    write_text(only_model / "config.json", '{"model_type": "blip"}')
    assert not is_wd_tagger_folder(only_model)  # a transformers folder with an ONNX export beside it
    root = make_images(tmp_path / "ds", ["a.png"])
    result = invoke(str(root), "--model", str(full), "--format", "txt")
    assert result.exit_code == 0, result.output
    assert read_txt(root, "a") == expected_tags(reference_probs(tagger, root / "a.png"), 0.35, 0.85)
