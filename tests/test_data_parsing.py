"""Parsing layer: image reading/probing, image dataset scan, metadata.csv and text dataset formats."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import pattern, png_bomb_bytes, save, write_text
from PIL import Image

from loratui.data.image_dataset import ensure_trigger, has_trigger, scan_image_dataset
from loratui.data.image_io import ImageReadError, open_image_rgb, probe_image
from loratui.data.metadata_csv import read_metadata_csv, write_metadata_csv
from loratui.data.text_dataset import Message, RecordError, normalise_record, read_text_dataset


def codes(findings) -> dict[str, list]:
    """code -> examples."""
    return {f.code: f.examples for f in findings}


# --- open_image_rgb -----------------------------------------------------------------------------


def test_16bit_gray_scales_not_clips(tmp_path: Path) -> None:
    arr = np.array([[0, 32896, 65535, 257]], dtype=np.uint16)
    p = save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(p).mode.startswith("I;16")
    im = open_image_rgb(p)
    assert im.mode == "RGB"
    assert [im.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (1, 1, 1)]


def test_32bit_int_and_float_modes() -> None:
    from loratui.data.image_io import to_rgb

    i32 = Image.fromarray(np.array([[0, 65535, 257]], dtype=np.int32), "I")
    assert [to_rgb(i32).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (255, 255, 255), (1, 1, 1)]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_rgba_transparent_becomes_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((1, 1), (0, 0, 255, 255))
    p = save(im, tmp_path / "a.png")
    out = open_image_rgb(p)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 0, 255)


def test_la_and_palette_transparency_become_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 2), (0, 0))
    assert open_image_rgb(save(la, tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] * 256)
    p = save(pal, tmp_path / "p.png", transparency=0)
    assert open_image_rgb(p).getpixel((0, 0)) == (255, 255, 255)
    opaque = save(pal, tmp_path / "p_opaque.png")
    assert open_image_rgb(opaque).getpixel((0, 0)) == (10, 20, 30)


def test_cmyk_round_trip_close(tmp_path: Path) -> None:
    src = pattern((64, 64), seed=3)
    p = save(src.convert("CMYK"), tmp_path / "c.jpg", quality=100)
    assert Image.open(p).mode == "CMYK"
    out = np.asarray(open_image_rgb(p), dtype=np.int16)
    assert np.abs(out - np.asarray(src, dtype=np.int16)).mean() < 4


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 4, 4))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    p = save(im, tmp_path / "r.jpg", exif=exif, quality=100)
    assert probe_image(p).exif_orientation == 6
    out = open_image_rgb(p)
    assert out.size == (20, 40)
    r, g, b = out.getpixel((18, 1))  # rotated 90 degrees clockwise: marker at the top-right
    assert r > 200 and g < 60 and b < 60


def test_open_errors_name_the_file(tmp_path: Path) -> None:
    bad = write_text(tmp_path / "bad.png", b"not an image")
    with pytest.raises(ImageReadError, match="bad.png"):
        open_image_rgb(bad)
    trunc = save(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), tmp_path / "t.png"
    )
    trunc.write_bytes(trunc.read_bytes()[:2000])
    with pytest.raises(ImageReadError) as err:
        open_image_rgb(trunc)
    assert err.value.kind == "truncated" and "t.png" in str(err.value)
    bomb = write_text(tmp_path / "bomb.png", png_bomb_bytes())
    with pytest.raises(ImageReadError) as err:
        open_image_rgb(bomb)
    assert err.value.kind == "bomb"
    with pytest.raises(ImageReadError, match="not found"):
        open_image_rgb(tmp_path / "missing.png")


# --- probe_image --------------------------------------------------------------------------------


def test_probe_bomb_header_without_warning_or_decode(tmp_path: Path) -> None:
    for w, h in ((30000, 30000), (10000, 10000)):  # above 2x the limit (error) and above 1x (warning)
        p = write_text(tmp_path / f"b{w}.png", png_bomb_bytes(w, h))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            info = probe_image(p)
        assert (info.width, info.height, info.format) == (w, h, "PNG")
        assert info.is_bomb()
    assert not probe_image(save(pattern((8, 8)), tmp_path / "s.png")).is_bomb()


def test_probe_reports_modes_frames_bits(tmp_path: Path) -> None:
    g16 = save(Image.fromarray(np.zeros((4, 4), np.uint16)), tmp_path / "g.png")
    assert probe_image(g16).bits == 16
    frames = [pattern((16, 16), seed=i).convert("P") for i in range(3)]
    gif = save(frames[0], tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    info = probe_image(gif)
    assert info.n_frames == 3 and info.format == "GIF"
    rgba = probe_image(save(Image.new("RGBA", (3, 5)), tmp_path / "x.png"))
    assert (rgba.width, rgba.height, rgba.mode, rgba.has_alpha) == (3, 5, "RGBA", True)
    with pytest.raises(ImageReadError, match="empty"):
        probe_image(write_text(tmp_path / "e.png", b""))


# --- image dataset scan -------------------------------------------------------------------------


def test_scan_precedence_repeats_and_subfolders(tmp_path: Path) -> None:
    save(pattern(seed=1), tmp_path / "5_cat" / "a.png")
    write_text(tmp_path / "5_cat" / "a.txt", "sidecar caption")
    save(pattern(seed=2), tmp_path / "5_cat" / "b.png")
    write_text(tmp_path / "5_cat" / "b.caption", "mychar, b caption\nsecond line\n")
    save(pattern(seed=3), tmp_path / "2_dog" / "c.jpg")
    write_text(
        tmp_path / "metadata.csv", 'file_name,text\n5_cat/a.png,"mychar, from metadata"\n2_dog\\c.jpg,dog\n'
    )
    scan = scan_image_dataset(tmp_path, trigger_word="mychar")
    by = {i.rel: i for i in scan.items}
    assert by["5_cat/a.png"].caption == "mychar, from metadata"
    assert by["5_cat/a.png"].caption_source == "metadata.csv" and by["5_cat/a.png"].caption_line == 2
    assert by["5_cat/b.png"].caption == "mychar, b caption"  # first line only
    assert by["5_cat/b.png"].caption_source == ".caption"
    assert by["2_dog/c.jpg"].caption == "dog" and by["2_dog/c.jpg"].repeats == 2
    assert by["5_cat/a.png"].repeats == 5 and by["5_cat/a.png"].subset == "5_cat"
    assert scan.n_images == 3 and scan.n_samples == 12 and scan.steps_per_epoch(5) == 3
    found = codes(scan.findings)
    assert [e.path for e in found["caption_conflict"]] == ["5_cat/a.png"]
    assert [e.path for e in found["multiline_caption"]] == ["5_cat/b.caption"]
    assert [(e.path, e.line) for e in found["trigger_word_missing"]] == [("metadata.csv", 3)]
    assert found["kohya_folders"] == [] and "kohya_folders" in found


def test_scan_wrong_extension_and_duplicate_sidecars(tmp_path: Path) -> None:
    save(pattern(seed=1), tmp_path / "a.png")
    write_text(tmp_path / "a.caption", "cap a")
    save(pattern(seed=2), tmp_path / "b.png")
    write_text(tmp_path / "b.txt", "cap b")
    write_text(tmp_path / "b.caption", "other b")
    save(pattern(seed=3), tmp_path / "c.png")
    write_text(tmp_path / "c.png.txt", "cap c")
    default = scan_image_dataset(tmp_path)
    assert {i.rel: i.caption for i in default.items} == {"a.png": "cap a", "b.png": "cap b", "c.png": ""}
    found = codes(default.findings)
    assert [e.path for e in found["duplicate_caption_files"]] == ["b.png"]
    assert [e.path for e in found["wrong_caption_extension"]] == ["c.png"]  # c.png.txt is never read
    txt_only = scan_image_dataset(tmp_path, caption_extensions=(".txt",))
    found = codes(txt_only.findings)
    assert sorted(e.path for e in found["wrong_caption_extension"]) == ["a.png", "c.png"]
    assert "a.caption" in found["wrong_caption_extension"][0].detail
    assert "orphan_caption" not in found and "missing_caption" not in found


def test_scan_metadata_header_problems(tmp_path: Path) -> None:
    save(pattern(seed=1), tmp_path / "a.png")
    write_text(tmp_path / "metadata.csv", "image,caption\na.png,cat\n")
    found = codes(scan_image_dataset(tmp_path).findings)
    assert [(e.path, e.line) for e in found["metadata_bad_columns"]] == [("metadata.csv", 1)]
    assert [e.path for e in found["missing_caption"]] == ["a.png"]
    write_text(tmp_path / "metadata.csv", "a.png,cat\n")
    found = codes(scan_image_dataset(tmp_path).findings)
    assert "header line" in found["metadata_bad_columns"][0].detail


def test_scan_kohya_folder_names(tmp_path: Path) -> None:
    for folder in ("10_ok", "10mychar", "0_x", "abc_def", "7_"):
        save(pattern(seed=1), tmp_path / folder / "a.png")
    scan = scan_image_dataset(tmp_path)
    flagged = {e.path for e in codes(scan.findings)["malformed_kohya_folder"]}
    assert flagged == {"10mychar/", "0_x/", "abc_def/", "7_/"}
    assert {s.name: s.repeats for s in scan.subsets.values()} == {
        "10_ok": 10,
        "10mychar": 1,
        "0_x": 1,
        "abc_def": 1,
        "7_": 1,
    }


def test_plain_subfolders_are_not_kohya(tmp_path: Path) -> None:
    save(pattern(seed=1), tmp_path / "abc_def" / "a.png")
    save(pattern(seed=2), tmp_path / "b.png")
    scan = scan_image_dataset(tmp_path)
    assert "malformed_kohya_folder" not in codes(scan.findings)
    assert {i.subset for i in scan.items} == {"abc_def", "."}


def test_trigger_helpers() -> None:
    assert has_trigger("a photo of MyChar, smiling", "mychar")
    assert not has_trigger("mycharacter", "mychar")
    assert ensure_trigger("a dog", "mychar") == "mychar, a dog"
    assert ensure_trigger("mychar, a dog", "mychar") == "mychar, a dog"


# --- metadata.csv -------------------------------------------------------------------------------


def test_metadata_round_trip_and_line_numbers(tmp_path: Path) -> None:
    rows = [("a.png", 'a "quoted", comma'), ("sub/b.png", "line1\nline2"), ("c.png", "caf\u00e9")]
    write_metadata_csv(tmp_path / "metadata.csv", rows)
    table = read_metadata_csv(tmp_path / "metadata.csv", tmp_path)
    assert [(k, r.caption) for k, r in table.rows.items()] == rows
    assert table.findings == []
    write_text(
        tmp_path / "m2.csv",
        'filename,prompt\na.png,ok\nb.png,"unclosed\nc.png,"x"y\nd.png,one,two\na.png,again\n',
    )
    table = read_metadata_csv(tmp_path / "m2.csv", tmp_path)
    found = codes(table.findings)
    assert sorted(e.line for e in found["metadata_bad_quoting"]) == [3, 4]
    assert [e.line for e in found["metadata_wrong_column_count"]] == [5]
    assert [e.line for e in found["metadata_duplicate_row"]] == [6]
    assert set(table.rows) == {"a.png"}


def test_metadata_not_utf8_reports_line(tmp_path: Path) -> None:
    write_text(tmp_path / "metadata.csv", b"filename,prompt\na.png,ok\nb.png,caf\xe9\n")
    table = read_metadata_csv(tmp_path / "metadata.csv", tmp_path)
    assert [e.line for e in codes(table.findings)["metadata_not_utf8"]] == [3]


# --- text datasets ------------------------------------------------------------------------------

U, A, S = "user", "assistant", "system"


@pytest.mark.parametrize(
    ("record", "fmt", "messages"),
    [
        ({"prompt": "p", "response": "r"}, "prompt_response", [(U, "p"), (A, "r")]),
        (
            {"prompt": "p", "completion": "r", "system": "s"},
            "prompt_response",
            [(S, "s"), (U, "p"), (A, "r")],
        ),
        ({"question": "q", "answer": "a"}, "prompt_response", [(U, "q"), (A, "a")]),
        ({"input": "i", "output": "o"}, "prompt_response", [(U, "i"), (A, "o")]),
        (
            {"instruction": "do", "input": "this", "output": "done"},
            "alpaca",
            [(U, "do\n\nthis"), (A, "done")],
        ),
        (
            {"instruction": "do", "input": "", "output": "done", "system": "s"},
            "alpaca",
            [(S, "s"), (U, "do"), (A, "done")],
        ),
        (
            {"instruction": "i2", "output": "o2", "history": [["i1", "o1"]]},
            "alpaca",
            [(U, "i1"), (A, "o1"), (U, "i2"), (A, "o2")],
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "chat",
            [(S, "s"), (U, "u"), (A, "a")],
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}],
                    },
                    {"role": "assistant", "content": "a"},
                ]
            },
            "chat",
            [(U, "xy"), (A, "a")],
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "s"},
                    {"from": "human", "value": "h"},
                    {"from": "gpt", "value": "g"},
                ]
            },
            "sharegpt",
            [(S, "s"), (U, "h"), (A, "g")],
        ),
    ],
)
def test_formats_normalise(record: dict, fmt: str, messages: list[tuple[str, str]]) -> None:
    got_fmt, got_messages, text = normalise_record(record)
    assert got_fmt == fmt and text is None
    assert got_messages == [Message(r, c) for r, c in messages]  # type: ignore[arg-type]


def test_text_format() -> None:
    assert normalise_record({"text": "raw text", "meta": 1}) == ("text", None, "raw text")


@pytest.mark.parametrize(
    ("record", "code"),
    [
        ({"prompt": "p", "response": ""}, "empty_response"),
        ({"instruction": "i", "output": " "}, "empty_response"),
        ({"messages": [{"role": "user", "content": "u"}]}, "empty_response"),
        ({"prompt": "p"}, "missing_fields"),
        ({"prompt": "p", "response": 3}, "missing_fields"),
        ({"instruction": "i"}, "missing_fields"),
        ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]}, "bad_role"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "bad_role"),
        ({"text": ""}, "empty_text"),
        ({"foo": 1}, "unknown_format"),
        ([1, 2], "not_an_object"),
    ],
)
def test_record_errors(record: object, code: str) -> None:
    with pytest.raises(RecordError) as err:
        normalise_record(record)
    assert err.value.code == code


def test_jsonl_errors_have_line_numbers(tmp_path: Path) -> None:
    lines = [
        b'{"prompt": "a", "response": "b"}',
        b"",
        b'{"prompt": "broken"',
        b'{"text": "caf\xe9"}',
        b'{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}',
        b'{"prompt": "a", "response": "b"}',
    ]
    write_text(tmp_path / "d.jsonl", b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    scan = read_text_dataset(tmp_path / "d.jsonl")
    assert [(r.line, r.fmt) for r in scan.records] == [
        (1, "prompt_response"),
        (5, "chat"),
        (6, "prompt_response"),
    ]
    found = codes(scan.findings)
    assert [(e.path, e.line) for e in found["jsonl_parse_error"]] == [("d.jsonl", 3)]
    assert [e.line for e in found["text_not_utf8"]] == [4]
    assert [e.line for e in found["duplicate_record"]] == [6]
    assert [e.path for e in found["mixed_formats"]] == ["d.jsonl"]
    assert scan.format_of("d.jsonl") == "mixed"


def test_json_array_lines_are_exact(tmp_path: Path) -> None:
    records = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    write_text(tmp_path / "a.json", json.dumps(records, indent=2))
    write_text(tmp_path / "sub" / "b.json", json.dumps({"data": records[:1]}, indent=2))
    write_text(tmp_path / "c.json", '[{"text": "ok"},\n {"text": "x" oops}]')
    scan = read_text_dataset(tmp_path)
    by_file = {}
    for r in scan.records:
        by_file.setdefault(r.file, []).append(r.line)
    assert by_file == {"a.json": [2, 6, 10], "sub/b.json": [3], "c.json": [1]}
    assert [(e.path, e.line) for e in codes(scan.findings)["json_parse_error"]] == [("c.json", 2)]


def test_read_text_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_text_dataset(tmp_path / "nope.jsonl")
