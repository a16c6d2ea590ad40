"""Builders for small good and bad datasets used by the data tests (everything generated in tmp dirs)."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RES = 512


def pattern(size: tuple[int, int] = (RES, RES), seed: int = 0) -> Image.Image:
    """A deterministic smooth RGB picture (an upscaled random 5x5 colour grid), distinct per seed."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), "RGB")
    return grid.resize(size, Image.Resampling.BICUBIC)


def noise(size: tuple[int, int] = (RES, RES), seed: int = 0) -> Image.Image:
    """Random RGB noise (large files, so truncation hits pixel data)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def save(im: Image.Image, path: Path, **kwargs: object) -> Path:
    """Save an image, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bomb_bytes(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose IHDR declares width x height RGB pixels (nothing huge is written)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def write_text(path: Path, text: str | bytes) -> Path:
    """Write a caption/text file (bytes written as is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> blake2b of the bytes, for every file under root (to prove nothing changed)."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return out


def build_good_image_dataset(root: Path, n: int = 3) -> Path:
    """n captioned 512x512 images (PNG and JPEG) with the trigger word `mychar`."""
    for i in range(n):
        ext = ".png" if i % 2 == 0 else ".jpg"
        save(pattern(seed=100 + i), root / f"img{i}{ext}")
        write_text(root / f"img{i}.txt", f"mychar, a picture, style {i}")
    return root


# Files of the bad image dataset, relative to the root (used by the test assertions).
K = "10_good"
BAD_IMAGE_FILES = {
    "corrupt": f"{K}/corrupt.png",
    "trunc_png": f"{K}/trunc_png.png",
    "trunc_jpg": f"{K}/trunc_jpg.jpg",
    "tiny": f"{K}/tiny.png",
    "cmyk": f"{K}/cmyk.jpg",
    "gray16": f"{K}/gray16.png",
    "rgba": f"{K}/rgba.png",
    "anim": f"{K}/anim.gif",
    "rotated": f"{K}/rotated.jpg",
    "bomb": f"{K}/bomb.png",
    "dup_src": f"{K}/ok1.png",
    "dup": f"{K}/dup.png",
    "near_src": f"{K}/ok2.jpg",
    "near": f"{K}/near.jpg",
    "orphan": f"{K}/orphan.txt",
    "latin1": f"{K}/latin1.png",
    "latin1_caption": f"{K}/latin1.txt",
    "empty": f"{K}/empty.png",
    "empty_caption": f"{K}/empty.txt",
    "nocap": f"{K}/nocap.png",
    "wrongext": f"{K}/wrongext.png",
    "wrongext_caption": f"{K}/wrongext.caption",
    "wide": f"{K}/wide.png",
    "meta1": f"{K}/m1.png",
    "meta2": f"{K}/m2.png",
    "meta3": f"{K}/m3.png",
    "notrigger": f"{K}/notrigger.png",
    "longcap": f"{K}/longcap.png",
    "malformed_nounderscore": "10mychar/",
    "malformed_zero": "0_x/",
    "malformed_plain": "abc_def/",
}
METADATA_CSV = (
    "filename,prompt\n"
    f'{K}/m1.png,"mychar, sitting"\n'  # line 2: conflicts with m1.txt
    f'{K}/m2.png,"bad "quote\n'  # line 3: broken quoting
    f"{K}/m3.png,mychar,too,many\n"  # line 4: wrong column count
    f'{K}/m1.png,"mychar, sitting"\n'  # line 5: duplicate row
    f"{K}/ghost.png,mychar ghost\n"  # line 6: missing image
)


def build_bad_image_dataset(root: Path) -> Path:
    """A kohya-style dataset with one example of every image/caption problem (see BAD_IMAGE_FILES)."""
    k = root / K
    cap = "mychar, a picture"

    def captioned(name: str, im: Image.Image, text: str | bytes = cap, **kw: object) -> None:
        save(im, k / name, **kw)
        write_text(k / (Path(name).stem + ".txt"), text)

    captioned("ok1.png", pattern(seed=1))
    captioned("ok2.jpg", pattern(seed=2), quality=92)
    (k / "dup.png").write_bytes((k / "ok1.png").read_bytes())
    write_text(k / "dup.txt", cap)
    near = pattern(seed=2).resize((600, 600)).point(lambda v: min(255, v + 3))
    captioned("near.jpg", near, quality=80)
    write_text(k / "corrupt.png", b"this is not an image at all" * 10)
    write_text(k / "corrupt.txt", cap)
    buf = k / "trunc_png.png"
    save(noise(seed=3), buf)
    buf.write_bytes(buf.read_bytes()[: int(buf.stat().st_size * 0.6)])
    write_text(k / "trunc_png.txt", cap)
    buf = k / "trunc_jpg.jpg"
    save(noise(seed=4), buf, quality=95)
    buf.write_bytes(buf.read_bytes()[: int(buf.stat().st_size * 0.6)])
    write_text(k / "trunc_jpg.txt", cap)
    captioned("tiny.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    captioned("cmyk.jpg", pattern(seed=5).convert("CMYK"), quality=95)
    gray = (np.linspace(0, 65535, RES * RES).reshape(RES, RES)).astype(np.uint16)
    captioned("gray16.png", Image.fromarray(gray))
    rgba = pattern(seed=6).convert("RGBA")
    rgba.putalpha(128)
    captioned("rgba.png", rgba)
    frames = [pattern(seed=7).convert("P"), pattern(seed=8).convert("P")]
    save(frames[0], k / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    write_text(k / "anim.txt", cap)
    exif = Image.Exif()
    exif[0x0112] = 6
    captioned("rotated.jpg", pattern(seed=9), exif=exif)
    write_text(k / "bomb.png", png_bomb_bytes())
    write_text(k / "bomb.txt", cap)
    write_text(k / "orphan.txt", "mychar, nobody")
    captioned("latin1.png", pattern(seed=10), text="mychar, caf\xe9 au lait".encode("latin-1"))
    captioned("empty.png", pattern(seed=11), text="  \n")
    save(pattern(seed=12), k / "nocap.png")
    save(pattern(seed=13), k / "wrongext.png")
    write_text(k / "wrongext.caption", cap)
    captioned("wide.png", pattern((800, 100), seed=14))
    captioned("m1.png", pattern(seed=15), text="a different sidecar caption, mychar")
    save(pattern(seed=16), k / "m2.png")
    save(pattern(seed=17), k / "m3.png")
    captioned("notrigger.png", pattern(seed=18), text="a picture of someone")
    captioned(
        "longcap.png", pattern(seed=19), text="mychar, " + ", ".join(f"tag{i} detail" for i in range(60))
    )
    write_text(root / "metadata.csv", METADATA_CSV)
    save(pattern(seed=20), root / "10mychar" / "a.png")
    write_text(root / "10mychar" / "a.txt", cap)
    save(pattern(seed=21), root / "0_x" / "c.png")
    write_text(root / "0_x" / "c.txt", cap)
    save(pattern(seed=22), root / "abc_def" / "b.png")
    write_text(root / "abc_def" / "b.txt", cap)
    return root


GOOD_TEXT_LINES = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Name a colour.", "response": "Blue."},
    {"prompt": "Say hi.", "response": "Hi!"},
]


def build_good_text_dataset(path: Path) -> Path:
    """A clean prompt/response JSONL file."""
    write_text(path, "\n".join(json.dumps(r) for r in GOOD_TEXT_LINES) + "\n")
    return path


# line number -> what is wrong (train.jsonl of the bad text dataset)
BAD_JSONL_LINES: list[bytes] = [
    json.dumps({"prompt": "What is 2+2?", "response": "4"}).encode(),  # 1 ok
    json.dumps({"prompt": "Capital of France?", "response": "Paris"}).encode(),  # 2 ok
    b'{"prompt": "broken", "response": "x"',  # 3 parse error
    json.dumps({"prompt": "Empty answer", "response": "  "}).encode(),  # 4 empty response
    json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    ).encode(),
    json.dumps({"prompt": "What is 2+2?", "response": "4"}).encode(),  # 6 duplicate of line 1
    b'{"prompt": "caf\xe9", "response": "latin-1 bytes"}',  # 7 not UTF-8
    json.dumps({"prompt": "no response field"}).encode(),  # 8 missing field
    json.dumps({"foo": "bar"}).encode(),  # 9 unknown format
]


def build_bad_text_dataset(root: Path) -> Path:
    """A folder with a broken JSONL file and a broken JSON array file."""
    write_text(root / "train.jsonl", b"\n".join(BAD_JSONL_LINES) + b"\n")
    records = [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Sub", "output": ""},
    ]
    write_text(root / "extra.json", json.dumps(records, indent=2))
    return root
