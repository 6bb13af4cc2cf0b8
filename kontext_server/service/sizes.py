"""The output size of a request, and what happens to its reference image, with a note for every change the client
did not ask for.

Rules: both sides given: used as they are. One side given: the other follows the input's aspect ratio (square
without an input), snapped to a multiple of 16 within the limits. None given: the input's aspect ratio at about
1 Mpixel (1024x1024 without an input). The reference image is encoded at the output size, so it is resized when the
two differ: the notes say so, and say when the limits could not keep the input's aspect ratio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kontext_server.request import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE

DEFAULT_AREA = 1024 * 1024
ASPECT_TOLERANCE = 0.02  # a relative aspect change below this is rounding to multiples of 16, not worth a note


@dataclass
class OutputSize:
    width: int
    height: int
    notes: list[str] = field(default_factory=list)


def _snap(v: float) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, int(round(v / SIDE_MULTIPLE)) * SIDE_MULTIPLE))


def _ratio(aspect: float) -> str:
    return f"{aspect:.2f}:1" if aspect >= 1 else f"1:{1 / aspect:.2f}"


def output_size(width: int | None, height: int | None, image=None) -> OutputSize:
    """The size to generate at, for the request's width / height (None: not given) and reference image (or None)."""
    aspect = image.width / image.height if image is not None else 1.0
    if width and height:
        out = OutputSize(width, height)
    elif width:
        out = OutputSize(width, _snap(width / aspect))
    elif height:
        out = OutputSize(_snap(height * aspect), height)
    else:
        out = OutputSize(_snap(math.sqrt(DEFAULT_AREA * aspect)), _snap(math.sqrt(DEFAULT_AREA / aspect)))
    got = out.width / out.height
    if not (width and height) and abs(got / aspect - 1) > ASPECT_TOLERANCE:
        source = f"the input's {image.width}x{image.height}" if image is not None else "a square"
        out.notes.append(f"size: {out.width}x{out.height} does not keep the aspect ratio of {source} "
                         f"({_ratio(aspect)}): each side is limited to {MIN_SIDE}..{MAX_SIDE}")
    if image is not None and (image.width, image.height) != (out.width, out.height):
        out.notes.append(f"image: resized from {image.width}x{image.height} to {out.width}x{out.height} "
                         "(the reference image is encoded at the output size)")
    return out


def image_notes(image) -> list[str]:
    """What decoding changed: an alpha channel is dropped (Kontext edits RGB images)."""
    mode = getattr(image, "info", {}).get("source_mode") if image is not None else None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return [f"image: its alpha channel was dropped ({mode} -> RGB): transparent areas are edited as their "
                "stored colour"]
    return []
