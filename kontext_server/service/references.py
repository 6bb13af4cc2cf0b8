"""Several reference images in one FluxKontextPipeline call, without forking the pipeline.

What: diffusers 0.42.1's FluxKontextPipeline takes one reference image: `prepare_latents` VAE-encodes it, packs its
latents into tokens and gives them position ids (index 1, then row and column from 0), and the denoising loop appends
those tokens to the output's and drops their predictions (a list of images crashes it: diffusers issue #11824).
`more_references(pipe, tensors)` wraps that one method for one call: the pipeline's own code still encodes the first
reference, and each further one is encoded once by the same `_encode_vae_image` (through the run's timed VAE, so it
counts as `image_encode`), packed by `_pack_latents` at its own size and appended with its own position ids. Nothing
else of the pipeline changes: the loop already concatenates whatever `prepare_latents` returned.

The position scheme (docs/design.md, "Several reference images"): every reference keeps index 1, the only index
FLUX.1 Kontext [dev] was trained with for a reference, and the references are tiled in the (row, column) plane so
that no two reference tokens share a position: the first at (0, 0), exactly as with one reference, each next one to
the right of or below the canvas so far, whichever keeps it closer to square (`tile_offsets`; ComfyUI's
"offset" method places them the same way). The alternative, a new index per reference (1, 2, 3, 4 with rows and
columns from 0 each), gives the first RoPE axis values the model never saw.
Contract: worker thread only; the wrapper is an instance attribute removed when the context exits.
"""
from __future__ import annotations

import contextlib

import torch

REFERENCE_INDEX = 1  # ids[..., 0] of every reference token (the output's tokens have 0)
# What each extra 1024x1024 reference costs a 1024x1024 fast-tier request, measured with
# tools/multi_reference_cost.py (benchmarks/2026-12-06-h100-multi-reference: H100, synthetic-full), per reference
# beyond the first, for requests of 2 / 3 / 4 references.
MEASURED_COST_PER_EXTRA_REFERENCE: dict | None = {
    "gpu": "H100 80GB (synthetic-full, fast tier)",
    "seconds": {"2": 2.10, "3": 2.27, "4": 2.56},
    "peak_memory_gib": {"2": 0.05, "3": 0.05, "4": 0.06},
}


def health_info() -> dict:
    """What /health says about reference images: the limit, the position scheme and the measured cost."""
    from kontext_server.request import MAX_REFERENCES

    return {"max_per_request": MAX_REFERENCES, "positions": "index 1, tiled in the row / column plane",
            "tokens_per_1024x1024_reference": (1024 // 16) ** 2,
            "cost_per_extra_reference_1024": MEASURED_COST_PER_EXTRA_REFERENCE
            or "to be measured (tools/multi_reference_cost.py on the GPU)"}


def tile_offsets(grids: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(rows, columns) of each reference's token grid -> its (row, column) offset: the first at (0, 0), each next
    to the right of the canvas so far when putting it below would make the canvas taller than wide, else below."""
    rows = cols = 0
    out = []
    for h, w in grids:
        offset = (0, cols) if h + rows > w + cols else (rows, 0)
        rows, cols = max(rows, offset[0] + h), max(cols, offset[1] + w)
        out.append(offset)
    return out


def reference_ids(pipe, batch_size: int, rows: int, cols: int, offset: tuple[int, int], device, dtype):
    """The position ids of one reference's tokens: index 1, rows and columns shifted by `offset`."""
    ids = pipe._prepare_latent_image_ids(batch_size, rows, cols, device, dtype)
    ids[..., 0] = REFERENCE_INDEX
    ids[..., 1] += offset[0]
    ids[..., 2] += offset[1]
    return ids


@contextlib.contextmanager
def more_references(pipe, extra: list[torch.Tensor]):
    """For one call of `pipe`: after the first reference (the call's `image`), encode each tensor of `extra`
    ((1, 3, H, W) in [0, 1], H and W multiples of 16) and append its tokens and position ids."""
    if not extra:
        yield
        return
    original = pipe.prepare_latents  # the bound method of the pipeline's class

    def prepare_latents(image, batch_size, num_channels_latents, height, width, dtype, device, generator=None,
                        latents=None):
        latents, image_latents, latent_ids, image_ids = original(image, batch_size, num_channels_latents, height,
                                                                 width, dtype, device, generator, latents)
        grids = [(image.shape[2] // 16, image.shape[3] // 16)] + [(t.shape[2] // 16, t.shape[3] // 16) for t in extra]
        offsets = tile_offsets(grids)
        all_latents, all_ids = [image_latents], [image_ids]
        for t, (rows, cols), offset in zip(extra, grids[1:], offsets[1:]):
            pixels = pipe.image_processor.preprocess(t, t.shape[2], t.shape[3])  # [0, 1] -> [-1, 1], as the first
            lat = pipe._encode_vae_image(image=pixels.to(device=device, dtype=dtype), generator=generator)
            if batch_size > lat.shape[0]:
                lat = lat.repeat(batch_size // lat.shape[0], 1, 1, 1)
            all_latents.append(pipe._pack_latents(lat, batch_size, num_channels_latents, lat.shape[2], lat.shape[3]))
            all_ids.append(reference_ids(pipe, batch_size, rows, cols, offset, device, dtype))
        return latents, torch.cat(all_latents, dim=1), latent_ids, torch.cat(all_ids, dim=0)

    pipe.__dict__["prepare_latents"] = prepare_latents
    try:
        yield
    finally:
        pipe.__dict__.pop("prepare_latents", None)
