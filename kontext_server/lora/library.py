"""The adapters of `--lora-dir`: each `.safetensors` file is one adapter, named by its file stem.

What: `Library` lists the directory, reads a file with diffusers' `FluxLoraLoaderMixin.lora_state_dict` (every Flux
LoRA layout diffusers reads: diffusers / PEFT, kohya, xlabs, BFL, fal Kontext, all turned into diffusers' module
names), and validates it against the model: every target must be a linear of this transformer with the shapes the
file's matrices need, and the rank must fit the server's slots. Each problem is a typed `LoraError` that names the
adapter and says what is wrong; the HTTP layer turns it into a 422 for `loras.N.name`.

Scale: PEFT's. A module's update is B @ A x times alpha / rank (alpha / sqrt(rank) with rsLoRA), times the
request's scale. The alpha comes from the file's adapter metadata (a saved PEFT LoraConfig: lora_alpha, alpha_pattern,
rank_pattern), else from its network alphas (`<module>.alpha` keys), else it is the rank (scale 1), exactly as
diffusers' `load_lora_weights` decides it. kohya and xlabs files have their alphas folded into the weights by
diffusers' conversion.

Contract: reading a file is host work (no device, no model change); `index` is what start-up learnt of each file,
read by the planner on the event loop (replaced, never mutated).
"""
from __future__ import annotations

import collections
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kontext_server.request import LORA_NAME_PATTERN

log = logging.getLogger("flux.lora")

SUFFIX = ".safetensors"
_NAME = re.compile(LORA_NAME_PATTERN)


class LoraError(ValueError):
    """An adapter a request (or the operator) named cannot run. `name` is the adapter; `reason` says why."""
    kind = "lora_invalid"
    index: int | None = None  # the adapter's position in the request's `loras`, where a request named it

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"LoRA adapter {name!r}: {reason}")


class UnknownAdapter(LoraError):
    kind = "lora_unknown"


class InvalidAdapterFile(LoraError):
    """Not readable (corrupt, truncated, not safetensors) or not a LoRA of a FLUX transformer."""
    kind = "lora_bad_file"


class TargetMismatch(LoraError):
    """A target that is no linear of this model, or matrices whose shapes do not fit it."""
    kind = "lora_target_mismatch"


class RankTooLarge(LoraError):
    kind = "lora_rank_mismatch"


class NeedsRestart(LoraError):
    """A file added after start-up that targets modules no slot was made for."""
    kind = "lora_needs_restart"


class AdapterFused(LoraError):
    kind = "lora_fused"


@dataclass
class Target:
    """One module's update: `scale * B @ A`, A (rank, in), B (out, rank), in float32 on the host."""
    a: torch.Tensor
    b: torch.Tensor
    scale: float  # alpha / rank (PEFT's scaling), without the request's scale

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    name: str
    targets: dict[str, Target]  # diffusers module name within the transformer -> its update
    stamp: tuple  # the file's (size, mtime_ns) when read: a changed file is read again

    @property
    def rank(self) -> int:
        return max(t.rank for t in self.targets.values())

    @property
    def numel(self) -> int:
        return sum(t.a.numel() + t.b.numel() for t in self.targets.values())


@dataclass(frozen=True)
class Entry:
    """What start-up learnt of one file: its rank and targets, or why it cannot run."""
    name: str
    rank: int = 0
    targets: frozenset = frozenset()
    error: LoraError | None = None
    stamp: tuple = ()


@dataclass
class Library:
    """The adapters of one directory, validated against one transformer.

    `linears`: every nn.Linear of the transformer as loaded (before any optimisation fused or replaced one), by
    module name: (in_features, out_features). `max_rank`: the slots' rank (None: any rank; the service sets it after
    the start-up scan)."""
    directory: Path
    linears: dict[str, tuple[int, int]]
    max_rank: int | None = None
    index: dict[str, Entry] = field(default_factory=dict)

    # ---- the directory ---------------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def names_on_disk(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in self.directory.iterdir()
                      if p.is_file() and p.name.endswith(SUFFIX) and _NAME.match(p.name[:-len(SUFFIX)]))

    def scan(self) -> dict[str, Entry]:
        """Read every file once (start-up): its rank and targets, or its error. A bad file is reported, and refused
        to requests, but does not stop the server."""
        index = {}
        for name in self.names_on_disk():
            try:
                adapter = self.read(name, check_rank=False)
                index[name] = Entry(name, adapter.rank, frozenset(adapter.targets), None, adapter.stamp)
            except LoraError as exc:
                log.warning("%s", exc)
                index[name] = Entry(name, error=exc)
        self.index = index
        return index

    def check_rank(self, entry_or_adapter) -> None:
        if self.max_rank == 0:
            raise NeedsRestart(entry_or_adapter.name, "the server started with no usable adapter, so it has no "
                                                      "slots: a restart makes them")
        if self.max_rank is not None and entry_or_adapter.rank > self.max_rank:
            raise RankTooLarge(entry_or_adapter.name,
                               f"rank {entry_or_adapter.rank} is larger than the server's slots "
                               f"(rank {self.max_rank}, --lora-max-rank)")

    def lookup(self, name: str) -> None:
        """The cheap check before a request is queued (event loop): an adapter start-up found bad, or one that is
        neither in the start-up index nor on disk, raises its LoraError. The full read happens on the worker."""
        entry = self.index.get(name)
        if entry is not None:
            if entry.error is not None:
                raise entry.error
            self.check_rank(entry)
            return
        if not self.path(name).is_file():
            known = ", ".join(sorted(self.index)) or "none"
            raise UnknownAdapter(name, f"no file {name}{SUFFIX} in the LoRA directory (adapters: {known})")

    # ---- one file ----------------------------------------------------------------------------------------------------
    def stamp(self, name: str) -> tuple:
        st = self.path(name).stat()
        return (st.st_size, st.st_mtime_ns)

    def read(self, name: str, check_rank: bool = True) -> Adapter:
        """The adapter's updates in diffusers' module names, validated against the model (LoraError otherwise)."""
        if not _NAME.match(name):
            raise UnknownAdapter(name, "not a valid adapter name (letters, digits, '.', '_', '-')")
        path = self.path(name)
        if not path.is_file():
            raise UnknownAdapter(name, f"no file {name}{SUFFIX} in the LoRA directory")
        stamp = self.stamp(name)
        state_dict, alphas, metadata = _read_state_dict(name, path)
        adapter = Adapter(name, _targets(name, state_dict, alphas, metadata, self.linears), stamp)
        if check_rank:
            self.check_rank(adapter)
        return adapter


def selectable(library: dict[str, dict]) -> list[str]:
    """The adapters a request may select by name alone (the OpenAI routes' `model`, listed by GET /v1/models): those
    of `library` (LoraManager.library_report's shape: name -> rank and targets, or error, or fused) that can run and
    are not fused into the weights already."""
    return [name for name, e in library.items() if "error" not in e and not e.get("fused")]


def _read_state_dict(name: str, path: Path):
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    try:
        out = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    except Exception as exc:  # safetensors' header / data errors, diffusers' conversion errors: all a bad file
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise InvalidAdapterFile(name, f"cannot be read as a FLUX LoRA ({type(exc).__name__}: {msg})") from None
    state_dict, alphas, metadata = out
    return state_dict, alphas or {}, metadata or None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern that matches
    the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets(name: str, state_dict: dict, alphas: dict, metadata: dict | None,
             linears: dict[str, tuple[int, int]]) -> dict[str, Target]:
    mats: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    other = []
    for key, value in state_dict.items():
        module, sep, rest = key.partition(".lora_")
        if key.startswith("text_encoder"):
            raise InvalidAdapterFile(name, "it has text-encoder LoRA layers, which the server does not run "
                                           "(transformer adapters only)")
        module = module.removeprefix("transformer.")
        if sep and rest in ("A.weight", "B.weight"):
            if not torch.is_tensor(value) or value.dim() != 2:
                raise InvalidAdapterFile(name, f"{key} is not a matrix")
            mats[module][rest[0]] = value
        elif "lora_magnitude_vector" in key:
            raise InvalidAdapterFile(name, "it is a DoRA adapter, which the server does not run")
        elif sep and rest == "B.bias":
            raise InvalidAdapterFile(name, "it has LoRA biases (lora_B.bias), which the server does not run")
        else:
            other.append(key)
    if other:
        raise InvalidAdapterFile(name, f"not a LoRA for this model: {len(other)} key(s) that are no LoRA matrices "
                                       f"(e.g. {other[0]!r})")
    if not mats:
        raise InvalidAdapterFile(name, "it holds no LoRA weights for the transformer")

    meta = None
    if metadata:
        meta = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")} \
            or dict(metadata)
    alpha_of = {k.removeprefix("transformer.").removesuffix(".alpha"): float(v) for k, v in alphas.items()}
    common_alpha = collections.Counter(alpha_of.values()).most_common(1)[0][0] if alpha_of else None

    targets = {}
    for module, pair in sorted(mats.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidAdapterFile(name, f"{module} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"], pair["B"]
        shape = linears.get(module)
        if shape is None:
            raise TargetMismatch(name, f"targets {module!r}, which is no linear layer of this model "
                                       "(an adapter for another model?)")
        rank = a.shape[0]
        if b.shape[1] != rank or a.shape[1] != shape[0] or b.shape[0] != shape[1]:
            raise TargetMismatch(name, f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                                       f"this model's ({shape[1]} x {shape[0]}) layer (an adapter for another "
                                       "model?)")
        if meta is not None:  # a saved PEFT LoraConfig, as diffusers' load_lora_adapter uses it
            alpha = float(_pattern_value(meta.get("alpha_pattern"), module, meta.get("lora_alpha", rank)))
            denominator = math.sqrt(rank) if meta.get("use_rslora") else rank
        else:
            alpha = alpha_of.get(module, common_alpha if common_alpha is not None else float(rank))
            denominator = rank
        a32, b32 = a.detach().float().contiguous(), b.detach().float().contiguous()
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            raise InvalidAdapterFile(name, f"{module}: its matrices hold NaN or infinite values")
        targets[module] = Target(a32, b32, alpha / denominator)
    return targets
