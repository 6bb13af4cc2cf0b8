"""Memory tiers: what stays on the GPU under `--memory-budget`, decided from the budget and the model's sizes.

What: `parse_budget` reads the setting (a size such as 24GB, 16GiB or 12000MB, or `auto`: the device's free memory at
start-up); `plan_tier` places every component of the pipeline, resident on the device or offloaded to host memory
and streamed in by diffusers' group offloading when it runs. Each step takes the first option that fits beside what
is placed already, the working memory of the largest planned request (memory_sizes.py estimates it) and a margin for
the allocator:
1. the VAE and CLIP: resident (small, used by every request); a budget that cannot hold them beside the main
   transformer streamed block by block is refused at start-up, with the minimum it needs;
2. the main transformer (the fp8 copy where low-precision GEMMs are prepared, else the exact one): resident; else
   resident with its AdaLN modulation weights on the host (with the modulation table they are read once per request,
   not per step); else offloaded, block by block with CUDA streams (the next block is copied in while one computes);
3. T5: resident; else offloaded, leaf by leaf with CUDA streams: it runs once per request, so offloaded it costs one
   pass of its weights over PCIe per request. Never kept on the CPU to run there: T5-XXL on the host's cores takes
   seconds per request, and streaming needs only two of its leaves on the device;
4. the exact transformer beside an fp8 one: resident; else offloaded like (2). Chosen over refusing exact-tier
   requests: the exact tier is the server's default request, and it still gets the exact image, only slower;
5. the VAE: decoding whole, or tiled (`enable_tiling`) with the largest tile whose decode fits.
T5 and the exact transformer are made resident only where the whole (untiled) decode still fits beside them; the
main transformer may push the VAE to tiles.
Contract: pure (no torch): sizes in, a MemoryTier out, whose `as_dict` /health shows. The working memory is an
estimate: a request larger than the design size can still run out of memory (503 `out_of_memory`, and the server
keeps serving). Budgets are in bytes; GB and GiB both mean 2**30 (cards are sold by GiB: a 24 GB card holds 24 GiB).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

GIB = 2**30
SETTING = "--memory-budget (FLUX_MEMORY_BUDGET)"
# The pipeline's attribute names, and the fp8 copy's name (it is a transformer variant, not a pipeline attribute).
TRANSFORMER, TRANSFORMER_FP8, T5, CLIP, VAE = "transformer", "transformer_fp8", "text_encoder_2", "text_encoder", "vae"
RESIDENT, OFFLOADED = "resident", "offloaded"
# Part of the budget kept free for the caching allocator's fragmentation and the CUDA-graph pool's static outputs.
MARGIN_FRACTION = 0.05
VAE_TILES = (512, 256)  # tile sides tried, largest first (diffusers' AutoencoderKL tiles above this side)
LABELS = {TRANSFORMER: "exact transformer", TRANSFORMER_FP8: "fp8 transformer", T5: "T5 text encoder",
          CLIP: "CLIP text encoder", VAE: "VAE"}
_UNITS = {"b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30, "g": 2**30,
          "tb": 2**40, "tib": 2**40}


class BudgetTooSmall(ValueError):
    """The budget cannot hold even the smallest tier of the loaded model (a start-up error)."""


@dataclass(frozen=True)
class Budget:
    spec: str  # as given
    bytes: int | None  # None: auto (the device's free memory, read when the model is loaded)

    @property
    def auto(self) -> bool:
        return self.bytes is None


def parse_budget(spec: str | None) -> Budget | None:
    """None (unset or empty: no budget), or the Budget; ValueError naming the setting for anything else."""
    if spec is None or not str(spec).strip():
        return None
    text = str(spec).strip().lower().replace(" ", "")
    if text == "auto":
        return Budget(str(spec), None)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]+)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"{SETTING}: expected a size with its unit, such as 24GB, 16GiB or 12000MB, or auto "
                         f"(the device's free memory); got {spec!r}")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"{SETTING}: must be more than 0, got {spec!r}")
    return Budget(str(spec), n)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def offload_how(level: str, streams: bool) -> str:
    """The mechanism, as /health says it: diffusers' group offloading at `level` (block or leaf)."""
    return (f"group offloading, {level} level, " + ("CUDA streams (the next group is copied in while one computes)"
                                                   if streams else "no streams (a CPU: diffusers allows none)")
            + "; diffusers.hooks.apply_group_offloading")


def variant_component(precision: str) -> str:
    """The component name of a transformer variant: "transformer" for the exact one, "transformer_<p>" else."""
    return TRANSFORMER if precision == "exact" else f"{TRANSFORMER}_{precision}"


@dataclass(frozen=True)
class TransformerSizes:
    """A transformer variant's weights: all of them, those outside its repeated blocks (embedders, final norm and
    projection), its largest block, and its AdaLN modulation linears."""
    total: int
    outside_blocks: int
    largest_block: int
    modulation: int

    @property
    def streamed(self) -> int:
        """What it holds on the device while it runs offloaded: everything outside the blocks, the block computing
        and the one being copied in."""
        return self.outside_blocks + 2 * self.largest_block


@dataclass(frozen=True)
class ComponentSizes:
    """The weights of each component and the working memory of the design request (memory_sizes.measure)."""
    transformer: TransformerSizes  # the exact one
    transformer_fp8: TransformerSizes | None  # the fp8 copy (estimated before it is made); None: no copy
    text_encoder_2: int
    text_encoder_2_largest_leaf: int
    text_encoder: int
    vae: int
    step_working: int  # activations of one transformer call at the design size
    text_working: int  # T5's activations at its token count
    vae_decode_per_pixel: float  # the VAE decode's working memory per output pixel
    design_pixels: int  # output pixels of the design request
    design: str  # what the design request is, e.g. "a 1024x1024 edit (8,704 tokens)"

    def vae_decode(self, tile: int | None = None) -> int:
        return int(self.vae_decode_per_pixel * (self.design_pixels if tile is None
                                                else min(self.design_pixels, tile * tile)))


@dataclass(frozen=True)
class Placement:
    where: str  # RESIDENT or OFFLOADED
    how: str  # the mechanism
    why: str
    device_bytes: int  # what it holds on the device: all of it resident, at most this much while it runs offloaded
    modulation_on_host: bool = False  # resident, but its AdaLN modulation weights stay on the host

    @property
    def resident(self) -> bool:
        return self.where == RESIDENT


@dataclass(frozen=True)
class MemoryTier:
    budget: int
    spec: str
    placements: dict[str, Placement]
    vae_tile: int | None  # tile side in pixels (None: decoded whole)
    vae_why: str
    resident_bytes: int
    peak_estimate: int
    margin: int
    design: str
    notes: list[str] = field(default_factory=list)

    def offloaded(self) -> dict[str, str]:
        """Component -> how it is offloaded (what optimisations and the planner are told)."""
        return {name: p.how for name, p in self.placements.items() if not p.resident}

    def summary(self) -> str:
        parts = []
        for name, p in self.placements.items():
            if p.modulation_on_host:
                parts.append(f"{name} resident (modulation weights on the host)")
            else:
                parts.append(f"{name} {p.where}")
        parts.append(f"VAE tiled at {self.vae_tile} px" if self.vae_tile else "VAE decoded whole")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"budget": self.spec, "budget_gib": round(self.budget / GIB, 2), "summary": self.summary(),
                "placements": {name: {"where": p.where, "how": p.how, "why": p.why,
                                      "device_gib": round(p.device_bytes / GIB, 3),
                                      **({"modulation_on_host": True} if p.modulation_on_host else {})}
                               for name, p in self.placements.items()},
                "vae": {"tiled": self.vae_tile is not None, "tile_px": self.vae_tile, "why": self.vae_why},
                "resident_gib": round(self.resident_bytes / GIB, 2),
                "peak_estimate_gib": round(self.peak_estimate / GIB, 2), "margin_gib": round(self.margin / GIB, 2),
                "design_request": self.design, "notes": list(self.notes)}


def plan_tier(budget: int, sizes: ComponentSizes, *, fp8: bool, modulation_table: bool, spec: str = "",
              streams: bool = True, margin_fraction: float = MARGIN_FRACTION) -> MemoryTier:
    """Place every component for `budget` bytes (module docstring). `fp8`: a low-precision copy will be prepared
    (it is then the main transformer); `modulation_table`: the modulation table will be prepared (only then can the
    modulation weights live on the host); `streams`: the device has CUDA streams (what the placements say).
    BudgetTooSmall when even the smallest tier does not fit."""
    spec = spec or gib(budget)
    block_how, leaf_how = offload_how("block", streams), offload_how("leaf", streams)
    margin = int(budget * margin_fraction)
    avail = budget - margin
    work = sizes.step_working
    decode_whole, decode_min = sizes.vae_decode(), sizes.vae_decode(VAE_TILES[-1])
    main_name = TRANSFORMER_FP8 if fp8 else TRANSFORMER
    main = sizes.transformer_fp8 if fp8 else sizes.transformer
    if main is None:
        raise ValueError("fp8 planned without the fp8 copy's sizes")
    small = sizes.vae + sizes.text_encoder
    t5_streamed = 2 * sizes.text_encoder_2_largest_leaf
    minimum = small + main.streamed + max(work, decode_min)
    if minimum > avail:
        raise BudgetTooSmall(
            f"{SETTING} {spec} ({gib(budget)}) is too small for this model: its smallest tier needs "
            f"{gib(math.ceil(minimum / (1 - margin_fraction)))} (the VAE and CLIP {gib(small)}, the "
            f"{LABELS[main_name]} streamed block by block {gib(main.streamed)}, the working memory of {sizes.design} "
            f"{gib(max(work, decode_min))}, and {margin_fraction:.0%} for the allocator)")
    placements: dict[str, Placement] = {}
    used = small
    placements[VAE] = Placement(RESIDENT, "on the device", "small, used by every request", sizes.vae)
    placements[CLIP] = Placement(RESIDENT, "on the device", "small, used by every request", sizes.text_encoder)

    def beside() -> str:
        return f"beside {gib(used)} placed, {gib(work)} working memory and {gib(margin)} margin in {gib(budget)}"

    # 2. the main transformer
    if used + main.total + max(work, decode_min) <= avail:
        placements[main_name] = Placement(RESIDENT, "on the device", f"{gib(main.total)} fits {beside()}", main.total)
        used += main.total
    elif modulation_table and main.modulation and used + main.total - main.modulation + max(work, decode_min) <= avail:
        kept = main.total - main.modulation
        placements[main_name] = Placement(
            RESIDENT, "on the device; its AdaLN modulation weights in pinned host memory, copied in layer by layer "
                      "when the modulation table fills (once per request)",
            f"{gib(main.total)} does not fit {beside()}; without its modulation weights ({gib(main.modulation)}, "
            f"read once per request by the modulation table) {gib(kept)} does", kept, modulation_on_host=True)
        used += kept
    else:
        placements[main_name] = Placement(
            OFFLOADED, block_how,
            f"{gib(main.total)} does not fit {beside()}: each block is copied in per step"
            + (" while the previous one computes" if streams else ""), main.streamed)
    # 3. T5: resident only where the whole decode still fits beside it
    t5_work = max(work, decode_whole, sizes.text_working)
    if used + sizes.text_encoder_2 + t5_work <= avail:
        placements[T5] = Placement(RESIDENT, "on the device", f"{gib(sizes.text_encoder_2)} fits {beside()}",
                                   sizes.text_encoder_2)
        used += sizes.text_encoder_2
    else:
        placements[T5] = Placement(
            OFFLOADED, leaf_how,
            f"{gib(sizes.text_encoder_2)} does not fit {beside()} (with the whole VAE decode); it runs once per "
            f"request: its weights cross to the device once per request", t5_streamed)
    # 4. the exact transformer beside the fp8 one
    notes: list[str] = []
    exact = sizes.transformer
    exact_peak = 0
    if fp8:
        if used + exact.total + max(work, decode_whole) <= avail:
            placements[TRANSFORMER] = Placement(RESIDENT, "on the device", f"{gib(exact.total)} fits {beside()}",
                                                exact.total)
            used += exact.total
        else:
            placements[TRANSFORMER] = Placement(
                OFFLOADED, block_how,
                f"{gib(exact.total)} does not fit {beside()}: exact-tier requests stream it block by block per step "
                f"(slower, the same image; refusing them would turn away the server's default request)",
                exact.streamed)
            exact_peak = used + exact.streamed + work
            if exact_peak > avail:
                notes.append(f"an exact-tier request at the design size needs about {gib(exact_peak)}: more than "
                             f"the budget less its margin; it may be answered 503 out_of_memory")
    # 5. the VAE decode
    tile, vae_why = None, f"the whole decode of {sizes.design} ({gib(decode_whole)}) fits beside {gib(used)} placed"
    if used + decode_whole > avail:
        tile = next((t for t in VAE_TILES if used + sizes.vae_decode(t) <= avail), VAE_TILES[-1])
        vae_why = (f"the whole decode of {sizes.design} ({gib(decode_whole)}) does not fit beside {gib(used)} "
                   f"placed: tiles of {tile} px ({gib(sizes.vae_decode(tile))}), blended at their seams; images of "
                   f"at most {tile} px a side decode whole")
    main_streamed = 0 if placements[main_name].resident else main.streamed
    peak = max(used + main_streamed + work, used + sizes.vae_decode(tile),
               used + sizes.text_working + (0 if placements[T5].resident else t5_streamed), exact_peak)
    return MemoryTier(budget=budget, spec=spec, placements=placements, vae_tile=tile, vae_why=vae_why,
                      resident_bytes=used, peak_estimate=peak, margin=margin, design=sizes.design, notes=notes)
