"""The output size of a request, and the sizes its reference images are encoded at, each with the reason and a note
for every change the client did not ask for. Pure: no torch, no PIL (images are anything with .width / .height).

Output size (`output_size`), in this order:
1. `width` and `height` given: used as they are.
2. One of them given: the other follows the first reference's aspect ratio (square without one).
3. Neither: an aspect ratio (`aspect_ratio` "W:H", else the first reference's, else square) at an area
   (`megapixels` x 1024 x 1024, else 1 megapixel):
   - `snap: true`: Kontext's preferred resolution nearest that aspect ratio (diffusers' PREFERRED_KONTEXT_RESOLUTIONS,
     the sizes Kontext was trained at), scaled to `megapixels` when given;
   - otherwise, when the aspect ratio is the reference's and the reference already fits (each side a multiple of 16
     within the limits, its area within 2% of the target: every preferred resolution at 1 megapixel does), the
     reference's own size: an input that fits is never resized (diffusers issue #11942);
   - otherwise each side is sqrt(area x ratio) or sqrt(area / ratio), rounded to a multiple of 16 within 256..2048.
The first reference is encoded at the output size (its tokens line up with the output's). Every further reference
keeps its own aspect ratio and size when it fits (sides multiples of 16, area at most the output's); a larger one is
scaled down to the output's area (`reference_sizes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from kontext_server.request import MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE

MEGAPIXEL = 1024 * 1024  # what `megapixels: 1` means: diffusers' max_area default and BFL's ~1 MP sizes
DEFAULT_AREA = MEGAPIXEL
ASPECT_TOLERANCE = 0.02  # a relative aspect change below this is rounding to multiples of 16, not worth a note
FIT_TOLERANCE = 0.02  # an input whose area is within this of the target area already fits (preferred sizes: 1.3%)
MATCH_INPUT = "match_input_image"
# diffusers 0.42.1 pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS (tests/service/test_sizes.py checks it is
# the same): (width, height), the resolutions Kontext was trained at, all about 1 megapixel.
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


@dataclass
class OutputSize:
    width: int
    height: int
    notes: list[str] = field(default_factory=list)
    reason: str = ""  # why this size: the response's `size_reason`


def as_references(image) -> list:
    """The request's reference images as a list: None -> [], one image -> [image], a list -> itself."""
    if image is None:
        return []
    if isinstance(image, (list, tuple)):
        return list(image)
    return [image]


def _snap(v: float) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, int(round(v / SIDE_MULTIPLE)) * SIDE_MULTIPLE))


def _ratio(aspect: float) -> str:
    return f"{aspect:.2f}:1" if aspect >= 1 else f"1:{1 / aspect:.2f}"


def parse_aspect_ratio(spec: str | None) -> float | None:
    """"16:9" -> 16/9; None or "match_input_image" -> None (the input's)."""
    if spec is None or spec == MATCH_INPUT:
        return None
    w, _, h = spec.partition(":")
    return float(w) / float(h)


def _fits(image, area: float) -> bool:
    return (image.width % SIDE_MULTIPLE == 0 and image.height % SIDE_MULTIPLE == 0
            and MIN_SIDE <= image.width <= MAX_SIDE and MIN_SIDE <= image.height <= MAX_SIDE
            and abs(image.width * image.height / area - 1) <= FIT_TOLERANCE)


def _mp(area: float) -> str:
    return f"{area / MEGAPIXEL:g} megapixel{'s' if area != MEGAPIXEL else ''}"


def nearest_preferred(aspect: float) -> tuple[int, int]:
    """Kontext's preferred resolution nearest `aspect` (as diffusers picks it: ties go to the narrower one)."""
    return min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)[1:]


def output_size(width: int | None, height: int | None, image=None, *, aspect_ratio: str | None = None,
                megapixels: float | None = None, snap: bool = False) -> OutputSize:
    """The size to generate at, for the request's size fields (None: not given) and its reference image(s) (the
    first one sets the aspect ratio; None without). The request's validation already refused conflicting fields."""
    refs = as_references(image)
    image = refs[0] if refs else None
    input_aspect = image.width / image.height if image is not None else 1.0
    asked_aspect = parse_aspect_ratio(aspect_ratio)
    aspect = asked_aspect if asked_aspect is not None else input_aspect
    source = (f"the input's {image.width}x{image.height}" if image is not None and asked_aspect is None
              else f"aspect_ratio {aspect_ratio}" if asked_aspect is not None else "a square")
    shape = f"the aspect ratio of {source}" if source.startswith("the input") else source
    area = (megapixels or 1.0) * MEGAPIXEL
    if width and height:
        out = OutputSize(width, height, reason="width and height as given")
    elif width:
        out = OutputSize(width, _snap(width / aspect), reason=f"width as given, height from {shape}")
    elif height:
        out = OutputSize(_snap(height * aspect), height, reason=f"height as given, width from {shape}")
    elif snap:
        w, h = nearest_preferred(aspect)
        reason = f"snap: Kontext's preferred resolution nearest to {shape} ({_ratio(aspect)})"
        if megapixels is not None and megapixels != 1.0:
            scale = math.sqrt(area / (w * h))
            w, h = _snap(w * scale), _snap(h * scale)
            reason += f", scaled to {_mp(area)}"
        out = OutputSize(w, h, reason=reason)
    elif image is not None and asked_aspect is None and _fits(image, area):
        out = OutputSize(image.width, image.height,
                         reason=f"the input's own size: it already fits ({_mp(area)}, sides multiples of "
                                f"{SIDE_MULTIPLE})")
    else:
        out = OutputSize(_snap(math.sqrt(area * aspect)), _snap(math.sqrt(area / aspect)),
                         reason=f"{shape} ({_ratio(aspect)}) at {_mp(area)}")
    got = out.width / out.height
    if not (width and height) and not snap and abs(got / aspect - 1) > ASPECT_TOLERANCE:
        out.notes.append(f"size: {out.width}x{out.height} does not keep the aspect ratio of {source} "
                         f"({_ratio(aspect)}): each side is limited to {MIN_SIDE}..{MAX_SIDE}")
    if image is not None and (image.width, image.height) != (out.width, out.height):
        out.notes.append(f"image: resized from {image.width}x{image.height} to {out.width}x{out.height} "
                         "(the reference image is encoded at the output size)")
    return out


def request_size(req, image=None) -> OutputSize:
    """`output_size` for an InferenceRequest's fields and its decoded reference image(s)."""
    return output_size(req.width, req.height, image, aspect_ratio=req.aspect_ratio, megapixels=req.megapixels,
                       snap=req.snap)


def reference_size(image, out_width: int, out_height: int) -> tuple[int, int]:
    """The size a second, third or fourth reference is encoded at: its own when it fits (sides multiples of 16, area
    at most the output's), else scaled to at most the output's area and rounded down to multiples of 16 (at least
    16), keeping its aspect ratio."""
    w, h = image.width, image.height
    limit = out_width * out_height
    if w % SIDE_MULTIPLE == 0 and h % SIDE_MULTIPLE == 0 and w * h <= limit:
        return w, h
    scale = min(1.0, math.sqrt(limit / (w * h)))
    return (max(SIDE_MULTIPLE, int(w * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE),
            max(SIDE_MULTIPLE, int(h * scale) // SIDE_MULTIPLE * SIDE_MULTIPLE))


def reference_sizes(images, out_width: int, out_height: int) -> list[tuple[int, int]]:
    """The encoded size of every reference: the first at the output size, the others by `reference_size`."""
    refs = as_references(images)
    return [(out_width, out_height)] + [reference_size(im, out_width, out_height) for im in refs[1:]]


def reference_notes(images, out_width: int, out_height: int) -> list[str]:
    """A note for each further reference that was resized (the first one's note comes from output_size)."""
    notes = []
    for i, (im, size) in enumerate(zip(as_references(images), reference_sizes(images, out_width, out_height))):
        if i and (im.width, im.height) != size:
            notes.append(f"images.{i}: resized from {im.width}x{im.height} to {size[0]}x{size[1]} (a further "
                         "reference keeps its aspect ratio, at most the output's area, sides multiples of 16)")
    return notes


def image_notes(image) -> list[str]:
    """What decoding changed: an alpha channel is dropped (Kontext edits RGB images)."""
    notes = []
    refs = as_references(image)
    for i, im in enumerate(refs):
        mode = getattr(im, "info", {}).get("source_mode")
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            name = "image" if len(refs) == 1 else f"images.{i}"
            notes.append(f"{name}: its alpha channel was dropped ({mode} -> RGB): transparent areas are edited as "
                         "their stored colour")
    return notes
