"""One `.safetensors` file: its header checked against its size, and its tensors read one at a time.

What: `SafetensorsFile.open(path)` parses the header (8-byte length, JSON) and checks it against the file: a file
that is not safetensors, or is shorter than its header says (an interrupted download or copy), raises
ModelLoadError naming the file and what is wrong, before anything is loaded. `read(name, device)` reads one tensor.
`StagedReader(file, device)` reads many tensors to a GPU through reused pinned buffers.
`check_directory(path)` does the header check for every weight file of a diffusers directory (and that every shard
an index names exists), so a truncated shard is named at start-up instead of failing deep inside from_pretrained.

Why not safetensors' own loader: `safe_open` memory-maps the file, and every page a tensor is copied from then counts
in the process's resident set (RssFile) as long as the map lives, on top of the copy (RssAnon): loading a 24 GB file
shows as ~48 GB of peak RSS. `read` takes the bytes with one `readinto` into the tensor's own storage: the page
cache is not mapped into the process, so the host high-water mark is what is really held (one tensor when the target
is the GPU, the weights once on the CPU).
Limits: little-endian files only (as safetensors writes them); no mmap, so a tensor is always copied once (to a GPU:
once into a pinned buffer, then to the device).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from kontext_server.models import ModelLoadError

# safetensors' dtype names -> torch. Anything else in a header is reported by name (e.g. a packed 4-bit format).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit: a larger "length" means this is not a safetensors file


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # the header's name, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]
    begin: int  # byte offsets inside the data section
    end: int

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.dtype)


@dataclass
class SafetensorsFile:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # where the data section begins in the file
    size: int

    @classmethod
    def open(cls, path: str | Path) -> "SafetensorsFile":
        """Parse and check the header; ModelLoadError (naming the file) when it is not a complete safetensors file."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(9)
                if head[:2] == b"PK":
                    raise _bad(path, "not a safetensors file: a zip archive, as torch.save writes a pickled "
                                     "checkpoint (.ckpt / .pt); use the .safetensors file of the model")
                if len(head) < 9:
                    raise _bad(path, f"not a safetensors file: it holds only {size} bytes")
                (n,) = struct.unpack("<Q", head[:8])
                if n > MAX_HEADER_BYTES or head[8:9] != b"{":
                    raise _bad(path, "not a safetensors file (it does not start with a header length and a JSON "
                                     "header)")
                f.seek(8)
                if 8 + n > size:
                    raise _bad(path, f"truncated: its header alone needs {8 + n} bytes, the file holds {size}")
                raw = f.read(n)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _bad(path, "not a safetensors file (its header is not JSON)") from None
        if not isinstance(header, dict):
            raise _bad(path, "not a safetensors file (its header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, entry in header.items():
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                info = TensorInfo(name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), begin, end)
            except (KeyError, TypeError, ValueError):
                raise _bad(path, f"corrupt header: entry {name!r} has no dtype, shape or data offsets") from None
            tensors[name] = info
        data_start = 8 + n
        held = size - data_start
        needed = max((t.end for t in tensors.values()), default=0)
        if needed > held:
            raise _bad(path, f"truncated: its header lists {needed:,} bytes of tensor data, the file holds {held:,} "
                             f"({held / max(needed, 1):.0%}); an interrupted download or copy? Download it again")
        for t in tensors.values():
            item = _itemsize(t)
            if item is not None and t.end - t.begin != item * _numel(t.shape):
                raise _bad(path, f"corrupt header: tensor {t.name!r} ({t.dtype}, shape {list(t.shape)}) spans "
                                 f"{t.end - t.begin} bytes")
        return cls(path=path, tensors=tensors, metadata=metadata, data_start=data_start, size=size)

    def read(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """One tensor, read into its own CPU storage (no file mapping), then moved to `device`."""
        info, dtype = self.tensors[name], self.dtype_of(name)
        buf = torch.empty(info.end - info.begin, dtype=torch.uint8)
        if buf.numel():
            with open(self.path, "rb") as f:
                self.read_into(f, name, buf)
        t = buf.view(dtype).reshape(info.shape)
        return t if torch.device(device).type == "cpu" else t.to(device)

    def dtype_of(self, name: str) -> torch.dtype:
        """The tensor's torch dtype, or ModelLoadError naming the stored one this server cannot read."""
        info = self.tensors[name]
        if info.torch_dtype is None:
            raise _bad(self.path, f"tensor {name!r} is stored as {info.dtype}, which this server cannot read")
        return info.torch_dtype

    def read_into(self, f, name: str, buf: torch.Tensor) -> None:
        """The tensor's bytes from the open file `f` into the CPU uint8 tensor `buf` (exactly its size)."""
        f.seek(self.data_start + self.tensors[name].begin)
        if f.readinto(memoryview(buf.numpy())) != buf.numel():
            raise _bad(self.path, f"truncated while reading {name!r} (the file changed since it was checked?)")


class StagedReader:
    """Reads one file's tensors to a device. To a CUDA device: through two reused pinned buffers, so that the read of
    one tensor overlaps the asynchronous copy of the one before and host memory holds two buffers of the largest
    tensor, never the weights; pinned memory also copies at the link's speed, where pageable memory is staged again by
    the driver. To the CPU: `SafetensorsFile.read`. Use as a context manager; tensors returned are ordered on the
    current stream (use them there, or synchronise)."""

    def __init__(self, file: "SafetensorsFile", device: str | torch.device):
        self.file, self.device = file, torch.device(device)
        self._f = None
        if self.device.type == "cuda":
            largest = max((t.end - t.begin for t in file.tensors.values()), default=0)
            self._bufs = [torch.empty(max(largest, 1), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self._done: list = [None, None]
            self._n = 0
            self._f = open(file.path, "rb")

    def __enter__(self) -> "StagedReader":
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            for ev in self._done:
                if ev is not None:
                    ev.synchronize()
            self._f.close()
            self._f = None

    def read(self, name: str) -> torch.Tensor:
        if self._f is None:
            return self.file.read(name, self.device)
        info, dtype = self.file.tensors[name], self.file.dtype_of(name)
        n = info.end - info.begin
        out = torch.empty(n, dtype=torch.uint8, device=self.device)
        if n:
            slot = self._n % 2
            self._n += 1
            if self._done[slot] is not None:
                self._done[slot].synchronize()  # its previous copy has left the buffer
            buf = self._bufs[slot][:n]
            self.file.read_into(self._f, name, buf)
            out.copy_(buf, non_blocking=True)
            self._done[slot] = torch.cuda.Event()
            self._done[slot].record()
        return out.view(dtype).reshape(info.shape)


def check_directory(root: Path, skip: tuple[str, ...] = ()) -> None:
    """Header-check every `.safetensors` file under a diffusers directory (symlinks followed: an HF cache snapshot),
    and that every shard a `*.safetensors.index.json` names is there. `skip`: top-level subfolders not loaded (a
    transformer given by --transformer). ModelLoadError names the first bad file."""
    for index in sorted(root.rglob("*.safetensors.index.json")):
        if index.relative_to(root).parts[0] in skip:
            continue
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _bad(index, f"unreadable shard index ({exc})") from None
        for shard in sorted(shards):
            if not (index.parent / shard).exists():
                raise _bad(index.parent / shard, f"missing: {index.name} lists it as a shard (an incomplete "
                                                 "download or copy?)")
    for path in sorted(root.rglob("*.safetensors")):
        if path.relative_to(root).parts[0] in skip:
            continue
        if path.is_symlink() and not path.exists():
            raise _bad(path, f"a link to {path.readlink()}, which does not exist (the cache's blob is missing: an "
                             "incomplete download or copy of the Hugging Face cache?)")
        SafetensorsFile.open(path)


def _bad(path: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {what}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(info: TensorInfo) -> int | None:
    dtype = info.torch_dtype
    return None if dtype is None else torch.empty((), dtype=dtype).element_size()
