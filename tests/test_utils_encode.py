"""Output encoding: PNG at the server's zlib level, several images encoded in parallel in order."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

import utils


def smooth(w=256, h=256) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8))


def test_png_outputs_go_through_the_servers_writer_at_its_fast_zlib_level_and_stay_lossless(monkeypatch):
    from kontext_server import png_writer

    img = smooth()
    levels = []
    real = png_writer.encode_png
    monkeypatch.setattr(png_writer, "encode_png", lambda im, level, **kw: levels.append(level) or real(im, level, **kw))
    data = utils.encode_image_bytes(img, "png")
    assert utils.PNG_COMPRESS_LEVEL == 1 and levels == [1]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(img))


def test_several_images_are_encoded_in_parallel_and_keep_their_order():
    seen = set()
    both_running = threading.Barrier(2, timeout=5)

    def fn(i):
        seen.add(threading.current_thread().name)
        both_running.wait()  # passes only when two calls run at the same time
        time.sleep(0.01)
        return i * 10

    assert utils.map_images(fn, [1, 2]) == [10, 20]
    assert all(name.startswith("flux-encode") for name in seen)
    assert utils.map_images(lambda i: i + 1, [5]) == [6]  # one image: on the calling thread


def test_an_encoding_error_of_one_image_is_raised():
    def fn(i):
        if i == 2:
            raise ValueError("bad image 2")
        return i

    with pytest.raises(ValueError, match="bad image 2"):
        utils.map_images(fn, [1, 2, 3])


def test_base64_inputs_decode_the_same_whether_wrapped_in_lines_or_not_and_whitespace_runs_only_when_needed(
        monkeypatch):
    import base64

    raw = utils.encode_image_bytes(smooth(64, 64), "png")
    plain, wrapped = base64.b64encode(raw).decode(), base64.encodebytes(raw).decode()
    calls = []
    real = utils._WHITESPACE

    class Counting:
        def sub(self, *a):
            calls.append(1)
            return real.sub(*a)

    monkeypatch.setattr(utils, "_WHITESPACE", Counting())
    assert utils.decode_base64_image(plain) == raw and calls == []  # the direct decode: no pass over the text
    assert utils.decode_base64_image(wrapped) == raw and calls == [1]
    with pytest.raises(utils.ImageInputError, match="not valid base64"):
        utils.decode_base64_image("not base64!")
    calls.clear()
    too_long = "A" * (2 * (utils.MAX_IMAGE_BYTES * 4 // 3 + 8) + 1)
    with pytest.raises(utils.ImageInputError, match="larger than") as err:
        utils.decode_base64_image(too_long)
    assert err.value.status == 413 and calls == []  # refused before any pass over the text
