"""What a service is started with (the CLI and the settings fill it in; tests build it directly)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kontext_server import settings
from kontext_server.service.memory_tiers import SETTING, parse_budget

NEW_SHAPE_POLICIES = ("compile", "eager")


@dataclass
class ServiceConfig:
    model: str = "tiny"  # tiny | synthetic-full | a hub id | a local directory (kontext_server.models.sources)
    transformer: str | None = None  # a single-file transformer in BFL's layout (kontext_server.models.single_file)
    device: str | None = None  # None: cuda if available, else cpu
    optimizations: str = "auto"  # all | none | auto | comma list (see optimizations/registry.py)
    compile_mode: str = "default"
    compile_vae: bool = True
    compile_scope: str = "regional"  # regional (per block) | full (one graph)
    inductor_flags: str = "light"  # inductor flag preset: none | light | seed (adds coordinate-descent tuning)
    cache_dir: Path | None = None
    # Request shapes to compile / capture at start-up: (width, height) for text-to-image, (width, height, True) for an
    # edit (its reference image doubles the transformer's sequence, a different compiled shape).
    warmup_sizes: list[tuple] = field(default_factory=list)
    # A request at a shape no warm-up compiled: "compile" compiles it on that request's time (tens of seconds for the
    # full model, with the worker and every queued request waiting); "eager" runs it uncompiled and says so.
    new_shapes: str = "compile"
    # Seconds a start waits for another process compiling into the same cache directory before compiling itself
    # (kontext_server/service/compile_lock.py).
    compile_lock_wait: float = field(default_factory=lambda: settings.COMPILE_LOCK_WAIT.get_float())
    # Context parallelism (kontext_server/parallel): each request split over this many ranks of one host (processes
    # this one starts; one GPU each), with this ring degree (the rest Ulysses), and collectives that give up after
    # cp_timeout seconds.
    context_parallel: int = field(default_factory=lambda: settings.CONTEXT_PARALLEL.get_int())
    cp_ring: int = field(default_factory=lambda: settings.CP_RING_DEGREE.get_int())
    cp_timeout: float = field(default_factory=lambda: settings.CP_TIMEOUT.get_float())
    # LoRA adapters (kontext_server/lora): the directory of .safetensors files, names loaded at start-up, how many stay
    # loaded on the device, the slots' rank (None: the largest in the directory), and one adapter fused into the
    # weights at start-up ("NAME" or "NAME:SCALE").
    lora_dir: Path | None = None
    lora_preload: list[str] = field(default_factory=list)
    max_loras: int = 8
    lora_max_rank: int | None = None
    lora_fuse: str | None = None
    # GPU memory the model may use (kontext_server/service/memory_tiers.py): "24GB", "16GiB", "auto" (the device's
    # free memory); None: no budget, everything on the device as it is loaded.
    memory_budget: str | None = None

    def __post_init__(self):
        if self.new_shapes not in NEW_SHAPE_POLICIES:
            raise ValueError(f"new_shapes must be one of {NEW_SHAPE_POLICIES}, not {self.new_shapes!r}")
        if self.context_parallel < 1 or self.cp_ring < 1 or self.context_parallel % self.cp_ring:
            raise ValueError(f"context_parallel ({self.context_parallel}) must be at least 1 and a multiple of the "
                             f"ring degree ({self.cp_ring})")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        if self.lora_dir is not None:
            self.lora_dir = Path(self.lora_dir)
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, not {self.max_loras}")
        if self.lora_max_rank is not None and self.lora_max_rank < 1:
            raise ValueError(f"lora_max_rank must be at least 1, not {self.lora_max_rank}")
        if self.memory_budget is not None:
            if parse_budget(self.memory_budget) is None:
                self.memory_budget = None
            elif self.context_parallel > 1:
                raise ValueError(f"{SETTING} is not supported with --context-parallel {self.context_parallel}: "
                                 "every rank would hold its own tier (not done); leave one of them unset")
        if (self.lora_preload or self.lora_fuse) and self.lora_dir is None:
            raise ValueError("--lora-preload and --lora-fuse name adapters of --lora-dir: give --lora-dir")
