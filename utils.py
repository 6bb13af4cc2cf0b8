"""Small shared helpers: image codec (decode untrusted input safely, encode output), stage timing and CUDA-event
timing."""
from __future__ import annotations

import base64
import binascii
import io
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from kontext_server import png_writer

# Limits on untrusted images. The byte limit bounds memory before decoding; the pixel limit stops
# decompression bombs (a tiny PNG that expands to gigabytes) before any pixel data is decoded.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_SIDE = 16384
ALLOWED_INPUT_FORMATS = {"PNG", "JPEG", "WEBP"}
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DEFAULT_QUALITY = 95  # jpeg / webp encoding quality when a request gives none
# zlib level of PNG outputs (kontext_server/png_writer.py). Level 6 takes longer for smaller files
# (tools/request_overhead.py measures both on the same images); the response is base64 over a fast link, so the time
# the client waits is the better trade. PNG stays lossless at every level.
PNG_COMPRESS_LEVEL = 1


class ImageInputError(ValueError):
    """The input image is unusable; `status` is the HTTP status to answer with (422, or 413 when too big)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# Formats people send that the decoder refuses, by their first bytes: the error names the format.
_OTHER_FORMATS = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"),
                  (b"<svg", "SVG"), (b"<?xml", "SVG / XML"))
_WHITESPACE = re.compile(r"\s+")


def sniff_format(raw: bytes) -> str | None:
    """The name of a refused format from its magic bytes (GIF, BMP, TIFF, PDF, SVG, HEIF / AVIF), else None."""
    for magic, name in _OTHER_FORMATS:
        if raw.startswith(magic):
            return name
    if raw[4:8] == b"ftyp":
        return "HEIF / AVIF"
    return None


def decode_image(data: str) -> Image.Image:
    """base64 or data-URL string -> RGB PIL image, or ImageInputError saying what is wrong.

    Line-wrapped base64 (MIME, Python's encodebytes) is accepted: whitespace is not data. The image's mode before
    the RGB conversion is kept in `image.info["source_mode"]` (an RGBA input loses its alpha: callers say so)."""
    return decode_image_bytes(decode_base64_image(data))


def decode_base64_image(data: str) -> bytes:
    """base64 or data-URL string -> the image file's bytes (not yet decoded), or ImageInputError (413 when the
    text is too long to hold at most MAX_IMAGE_BYTES)."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise ImageInputError("data URL must be base64-encoded (data:image/png;base64,...)")
    # base64 inflates by 4/3: reject oversize input before decoding it. Whitespace (line breaks of wrapped base64)
    # is not data; the body it comes in is already bounded by the server's body limit. Unwrapped base64 (what clients
    # send) decodes directly; the whitespace pass (a regex over the whole text) runs only when that fails.
    # Text over twice the limit is refused before that pass: no line wrapping doubles base64's length.
    limit = MAX_IMAGE_BYTES * 4 // 3 + 8
    raw = _b64decode(data) if len(data) <= limit else None
    if raw is None:
        if len(data) <= 2 * limit:
            data = _WHITESPACE.sub("", data)
        if len(data) > limit:
            raise ImageInputError(f"image is larger than the {MAX_IMAGE_BYTES // (1024 * 1024)} MB limit", status=413)
        raw = _b64decode(data)
        if raw is None:
            raise ImageInputError("image is not valid base64")
    return raw


def _b64decode(data: str) -> bytes | None:
    try:
        return base64.b64decode(data.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def decode_image_bytes(raw: bytes) -> Image.Image:
    """Image file bytes (a multipart upload, or decoded base64) -> RGB PIL image, or ImageInputError saying what is
    wrong. The same limits as decode_image: size first, then the header's pixel count before any pixel is decoded."""
    if len(raw) > MAX_IMAGE_BYTES:
        raise ImageInputError(f"image is larger than the {MAX_IMAGE_BYTES // (1024 * 1024)} MB limit", status=413)
    other = sniff_format(raw)
    if other is not None:
        raise ImageInputError(f"image is {other}; accepted formats are PNG, JPEG and WebP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=sorted(ALLOWED_INPUT_FORMATS))
            w, h = img.size  # header only: no pixel data decoded yet
            if w < 1 or h < 1 or w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
                raise ImageInputError(
                    f"image is {w}x{h}; at most {MAX_IMAGE_PIXELS} pixels and {MAX_IMAGE_SIDE} per side are accepted")
            img.load()  # decodes now, so truncated data fails here and not inside the GPU worker
            rgb = img.convert("RGB")
            rgb.info["source_mode"] = img.mode
            return rgb
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageInputError("image declares too many pixels (decompression bomb)") from None
    except Exception as exc:  # PIL raises many types for bad data (UnidentifiedImageError, OSError, SyntaxError...)
        # PIL's messages name its file object ("<_io.BytesIO object at 0x...>"): not the client's business
        detail = re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>", "", str(exc)).strip() or type(exc).__name__
        raise ImageInputError(f"image could not be decoded as PNG, JPEG or WebP ({detail})") from None


# EXIF tags the provenance metadata uses (kontext_server/provenance.py), by name
EXIF_TAGS = {"ImageDescription": 0x010E, "Make": 0x010F, "Model": 0x0110, "Software": 0x0131}
# The same in PNG text chunks: PNG's own keywords where one fits (Software, Description), else the EXIF name
PNG_TEXT_KEYS = {"ImageDescription": "Description"}


def encode_image_bytes(img: Image.Image, fmt: str, quality: int = DEFAULT_QUALITY,
                       metadata: dict[str, str] | None = None, png_compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """The image as a png / jpeg / webp file; `quality` (0-100) applies to jpeg and webp only, `png_compress_level`
    (zlib 0-9) to png only. PNG in modes L / RGB / RGBA goes through kontext_server/png_writer.py, the rest through
    PIL. `metadata` (EXIF tag names of EXIF_TAGS -> text) is written as EXIF in every format and, in PNG, also as
    text chunks, with `Source` (the model) and a `Comment` saying the image is AI-generated."""
    pil_fmt = OUTPUT_FORMATS[fmt]
    if pil_fmt == "PNG" and img.mode in png_writer.MODES:
        return png_writer.encode_png(img, png_compress_level, text=png_text(metadata),
                                     exif=exif_block(metadata).tobytes() if metadata else None)
    buf = io.BytesIO()
    kwargs = {"quality": quality} if pil_fmt in ("JPEG", "WEBP") else {"compress_level": png_compress_level}
    if metadata:
        kwargs["exif"] = exif_block(metadata)
        if pil_fmt == "PNG":
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            for key, value in png_text(metadata).items():
                info.add_itxt(key, value)
            kwargs["pnginfo"] = info
    img.save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()


def exif_block(metadata: dict[str, str]) -> Image.Exif:
    exif = Image.Exif()
    for name, value in metadata.items():
        exif[EXIF_TAGS[name]] = value
    return exif


def png_text(metadata: dict[str, str] | None) -> dict[str, str]:
    """The PNG text chunks for `metadata`: each tag under PNG's keyword or its EXIF name, plus Source and Comment."""
    if not metadata:
        return {}
    text = {PNG_TEXT_KEYS.get(name, name): value for name, value in metadata.items()}
    if "Model" in metadata:
        text["Source"] = metadata["Model"]
        text["Comment"] = f"AI-generated image ({metadata.get('Make', '')} {metadata['Model']})".strip()
    return text


_encoders: ThreadPoolExecutor | None = None


def map_images(fn, images: list) -> list:
    """[fn(image) for image in images], the images in parallel when there are several (a request's num_images):
    PIL's encoders and zlib release the GIL, so n images cost about one image's wall time on n free cores. Called
    from the thread pool; the results keep the images' order, and the first exception is raised."""
    global _encoders
    if len(images) <= 1:
        return [fn(im) for im in images]
    if _encoders is None:
        _encoders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="flux-encode")
    return list(_encoders.map(fn, images))


def encode_image(img: Image.Image, fmt: str, quality: int = DEFAULT_QUALITY) -> str:
    """encode_image_bytes, base64-encoded."""
    return base64.b64encode(encode_image_bytes(img, fmt, quality)).decode("ascii")


@dataclass
class StageTimer:
    """Accumulates per-stage device time without synchronising inside the hot loop.

    On CUDA each mark records an event; `finish()` synchronises once and sums elapsed times. On CPU marks
    are host clock readings (the work is synchronous there).
    """

    cuda: bool
    _open: dict = field(default_factory=dict)
    _spans: list = field(default_factory=list)  # (stage, start_mark, end_mark)
    counts: dict = field(default_factory=dict)

    def _mark(self):
        if self.cuda:
            import torch

            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, stage: str) -> None:
        self._open[stage] = self._mark()

    def stop(self, stage: str) -> None:
        begin = self._open.pop(stage, None)
        if begin is not None:
            self._spans.append((stage, begin, self._mark()))
            self.counts[stage] = self.counts.get(stage, 0) + 1

    def finish(self) -> dict[str, float]:
        """Milliseconds per stage (summed over calls)."""
        if self.cuda and self._spans:
            import torch

            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for stage, a, b in self._spans:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1000.0
            out[stage] = out.get(stage, 0.0) + ms
        return out


def module_bytes(module) -> int:
    """Bytes held by a module's parameters and buffers, counting quantised tensor subclasses (torchao's Float8Tensor
    and friends) by their inner tensors (fp8 data + scales), so an fp8 copy reports what it really occupies."""
    import torch

    def tensor_bytes(t) -> int:
        if isinstance(t, torch.nn.Parameter):
            t = t.data
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # a tensor subclass: its inner tensors
            names, _ = t.__tensor_flatten__()
            return sum(tensor_bytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}  # shared tensors count once
    return sum(tensor_bytes(t) for t in tensors.values())


def cuda_ms(fn) -> float:
    """Milliseconds of the GPU work `fn` enqueues: CUDA events recorded around it, then a wait for it to finish.
    The tools' one way of timing a single call or graph replay."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)
