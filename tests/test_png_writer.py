"""kontext_server/png_writer.py: standard PNGs that decode pixel for pixel, with their metadata, in parallel strips."""
from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from kontext_server import png_writer


def photo_like(w: int, h: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    base = [128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0), 128 + 80 * np.sin((x + y) / 91.0), (x * y / 512) % 256,
            200 - 0 * x]
    noise = np.random.default_rng(seed).normal(0, 3, (h, w, channels))
    return (np.stack(base[:channels], -1) + noise).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("RGBA", 4), ("L", 1)])
@pytest.mark.parametrize("w,h", [(1, 1), (17, 5), (300, 129), (640, 1024)])
def test_every_mode_and_size_decodes_back_to_the_same_pixels(mode, channels, w, h):
    pixels = photo_like(w, h, channels)
    img = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
    back = Image.open(io.BytesIO(png_writer.encode_png(img)))
    back.load()
    assert back.mode == mode and back.size == (w, h)
    assert np.array_equal(np.asarray(back), np.asarray(img))


def test_a_tall_image_is_deflated_in_several_strips_joined_into_one_valid_zlib_stream(monkeypatch):
    monkeypatch.setattr(png_writer.os, "cpu_count", lambda: 4)
    calls = []
    real = png_writer._deflate
    monkeypatch.setattr(png_writer, "_deflate", lambda rows, level, last: calls.append(last) or real(rows, level, last))
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (512, 256, 3), dtype=np.uint8))
    data = png_writer.encode_png(img)
    assert calls.count(False) == 3 and calls.count(True) == 1  # 4 strips, only the last finishes the stream
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    raw = zlib.decompress(idat)  # checks the stream's header and its Adler-32 over all strips
    assert len(raw) == 512 * (1 + 256 * 3) and raw[0] == png_writer.SUB_FILTER
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(img))


def test_text_and_exif_are_readable_by_pil():
    exif = Image.Exif()
    exif[0x0110] = "FLUX.1-Kontext-dev"
    data = png_writer.encode_png(Image.new("RGB", (8, 8)), text={"Comment": "AI-generated ünïcode"},
                                 exif=exif.tobytes())
    back = Image.open(io.BytesIO(data))
    back.load()
    assert back.text["Comment"] == "AI-generated ünïcode"
    assert back.getexif()[0x0110] == "FLUX.1-Kontext-dev"


def test_a_photo_like_image_is_no_more_than_a_tenth_larger_than_pils_own_png_at_the_same_level():
    img = Image.fromarray(photo_like(512, 512))
    ours = png_writer.encode_png(img, 1)
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    assert len(ours) <= 1.1 * buf.tell()


def test_modes_it_does_not_write_are_refused_for_pil_to_handle():
    with pytest.raises(ValueError, match="modes"):
        png_writer.encode_png(Image.new("P", (4, 4)))
