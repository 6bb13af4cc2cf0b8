"""Row-wise fp8 quantisation of weights, with low-rank updates merged in, many weights per launch: the LoRA fp8
merge's writes (kontext_server/lora/fp8_merge.py), bit for bit the quantisation that built the fp8 copy.

What: for each segment (a block of rows of one weight), W8 = Q(W + sum_j s_j B_j A_j), written in place into the
fp8 rows and scales of a linear. The update is accumulated in fp32 over W (one addmm per adapter, in order) and
rounded once to W's dtype, then quantised per row: what quantising the merged model would give. A segment with no
update is plain Q(W): the restore of the base weights.
Why a kernel: a change of adapters rewrites hundreds of linears. In torch ops that is per linear an addmm (W read,
W + BA written in bf16) and then torchao's quantisation (an abs, an amax, casts, a division, a clamp: several passes,
some in fp32), a dozen launches each: the switch was bound by the host's launches and by the passes. Here a launch
covers many segments (a table of their addresses; up to CHUNK_SEGMENTS). Two kernels: with no update (a restore),
`restore_rows_fp8_kernel` holds each row in registers, read once and written once; with updates,
`merge_rows_fp8_kernel` reads each tile of rows twice (the amax, then the write; the update's small GEMM recomputed
by a tensor-core dot). `Launch(gemm_first=True)` is the other way to add updates: cuBLAS's addmm writes W + s B A
into scratch rows, which the one-pass kernel quantises; with `update_rows=True` cuBLAS writes s B A alone and the
one-pass kernel adds W as it quantises (W read once: torch's addmm into other rows first copies W there; s B A is then
rounded to W's dtype on its own, before the sum).

Two roundings, chosen by SCALE_IN_WEIGHT_DTYPE:
- True, torchao's (`Float8Tensor.from_hp` with PerRow on its torch path): scale = amax / 448 rounded to the weight's
  dtype, then to fp32; fp8 = clamp(w / scale, -448, 448);
- False, this repository's `quantize_rows`: scale = max(amax, 1e-12) / 448 in fp32; fp8 = clamp(w * (1 / scale)).
Every division is IEEE round-to-nearest (`div_rn`), as torch's are; the casts round to nearest even, as torch's do.
The merge uses this kernel for a linear only where `quantize_weight_rows` reproduces the linear's stored bytes and
scales exactly (checked at install): a difference in rounding can only make it unused, never wrong.
Vector loads and stores: the addresses and sizes come from a table in memory, so Triton cannot see that they are
aligned, and without a hint it loads a bf16 weight two bytes at a time and stores fp8 one byte at a time. A launch
whose every segment is aligned (weight and fp8 pointers to ALIGN bytes, row strides and widths to ALIGN elements;
FLUX's linears are) is compiled with ALIGNED and those hints (`tl.multiple_of`) and moves 16 bytes per access; any
other launch runs without them (same values, narrower accesses). An update's tiles are not hinted: they are small,
and Triton's pipeliner fails on a hinted A tile under a runtime rank mask.
Limits: bf16 or fp16 weights and updates; rows with unit column stride; update ranks up to 256; at most MAX_UPDATES
updates per segment. The merged values (not the restore) may differ from a torch addmm in the last bit of W's dtype
where the GEMM's summation order differs, and with gemm-first where s B A's own rounding to W's dtype moves the sum.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

MAX_UPDATES = 3
MAX_RANK = 256
FIELDS = 8 + 5 * MAX_UPDATES  # int64s per segment in the table (see Launch.add)
TILED = {"BM": 64, "BK": 128, "num_warps": 4}  # merge_rows_fp8_kernel's tile (bench/bench_fp8_merge.py compares)
ONE_PASS_MAX_K = 16384  # restore_rows_fp8_kernel holds a row in registers
ONE_PASS_ROWS = 8  # rows per program of restore_rows_fp8_kernel
SCRATCH_BYTES = 1 << 29  # Launch(gemm_first=True): merged (or update) rows held at once before their quantisation
#                           is launched (with an arena: the arena's size, see scratch_arena)
CHUNK_SEGMENTS = 64  # segments per launch: the GPU starts on the first ones while the host adds the rest
SEGMENT_ROWS = 3072  # longer blocks of rows are split: a launch's programs then have like work
ALIGN = 16  # an ALIGNED launch's pointers are multiples of ALIGN bytes, its strides and widths of ALIGN elements
_ALIGN = tl.constexpr(ALIGN)  # the same, as the kernels see it
VECTOR_ACCESS = True  # False: every launch without the alignment hints (bench/bench_fp8_merge.py compares)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _merged_tile(w_ptr, w_stride, rows, rmask, cols, cmask, entry, scales_ptr, seg, n_updates,
                 R: tl.constexpr, MAX_U: tl.constexpr, DTYPE: tl.constexpr):
    """W[rows, cols] + sum_j s_j B_j[rows] A_j[:, cols] in fp32, rounded to W's dtype (and back to fp32)."""
    m = tl.load(w_ptr + rows[:, None] * w_stride + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    rr = tl.arange(0, R)
    for j in range(n_updates):
        u = entry + 8 + 5 * j
        a_ptr = tl.load(u).to(tl.pointer_type(DTYPE))
        a_stride = tl.load(u + 1)
        b_ptr = tl.load(u + 2).to(tl.pointer_type(DTYPE))
        b_stride = tl.load(u + 3)
        r = tl.load(u + 4)
        b = tl.load(b_ptr + rows[:, None] * b_stride + rr[None, :], mask=rmask[:, None] & (rr[None, :] < r),
                    other=0.0)
        a = tl.load(a_ptr + rr[:, None] * a_stride + cols[None, :], mask=(rr[:, None] < r) & cmask[None, :],
                    other=0.0)
        m += tl.dot(b, a) * tl.load(scales_ptr + seg * MAX_U + j)
    return m.to(DTYPE).to(tl.float32)


@triton.jit
def _segment(entry, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """A segment's fields from the table (Launch.add): weight, fp8 rows and scales pointers, the two row strides,
    rows, columns; with ALIGNED, what the loads and stores' widths depend on is hinted as a multiple of ALIGN."""
    w_ptr, q_ptr = tl.load(entry).to(tl.pointer_type(DTYPE)), tl.load(entry + 1).to(tl.pointer_type(tl.float8e4nv))
    w_stride, q_stride, k = tl.load(entry + 3), tl.load(entry + 4), tl.load(entry + 6)
    if ALIGNED:
        w_ptr, q_ptr = tl.multiple_of(w_ptr, _ALIGN), tl.multiple_of(q_ptr, _ALIGN)
        w_stride, q_stride = tl.multiple_of(w_stride, _ALIGN), tl.multiple_of(q_stride, _ALIGN)
        k = tl.multiple_of(k, _ALIGN)
    return w_ptr, q_ptr, tl.load(entry + 2).to(tl.pointer_type(tl.float32)), w_stride, q_stride, tl.load(entry + 5), k


@triton.jit
def _row_scale(amax, DTYPE: tl.constexpr, SCALE_IN_WEIGHT_DTYPE: tl.constexpr):
    """A row's fp32 scale from its amax, in torchao's rounding (True) or quantize_rows' (see the module docstring)."""
    if SCALE_IN_WEIGHT_DTYPE:
        scale = tl.math.div_rn(amax, 448.0).to(DTYPE).to(tl.float32)
    else:
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    return scale


@triton.jit
def _to_fp8(m, scale, inv, SCALE_IN_WEIGHT_DTYPE: tl.constexpr):
    """Values over their row's scale (an IEEE division: torchao) or times its inverse `inv` (quantize_rows), clamped
    to e4m3's range, in e4m3."""
    if SCALE_IN_WEIGHT_DTYPE:
        q = tl.math.div_rn(m, tl.zeros_like(m) + scale)
    else:
        q = m * inv
    return tl.clamp(q, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def merge_rows_fp8_kernel(table_ptr, scales_ptr, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                          FIELDS: tl.constexpr, MAX_U: tl.constexpr, DTYPE: tl.constexpr,
                          SCALE_IN_WEIGHT_DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Grid (row blocks of the longest segment, segments): a program past its segment's rows does nothing."""
    row0 = tl.program_id(0) * BM
    seg = tl.program_id(1).to(tl.int64)
    entry = table_ptr + seg * FIELDS
    w_ptr, q_ptr, s_ptr, w_stride, q_stride, n, k = _segment(entry, DTYPE, ALIGNED)
    k = tl.where(row0 < n, k, 0)  # no column to visit in a block past the rows
    n_updates = tl.load(entry + 7)
    rows = row0 + tl.arange(0, BM)
    rmask = rows < n
    amax = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, k, BK):
        cols = k0 + tl.arange(0, BK)
        m = _merged_tile(w_ptr, w_stride, rows, rmask, cols, cols < k, entry, scales_ptr, seg, n_updates, R, MAX_U,
                         DTYPE)
        amax = tl.maximum(amax, tl.max(tl.abs(m), axis=1))
    scale = _row_scale(amax, DTYPE, SCALE_IN_WEIGHT_DTYPE)
    inv = tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)
    for k0 in range(0, k, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < k
        m = _merged_tile(w_ptr, w_stride, rows, rmask, cols, cmask, entry, scales_ptr, seg, n_updates, R, MAX_U,
                         DTYPE)
        tl.store(q_ptr + rows[:, None] * q_stride + cols[None, :],
                 _to_fp8(m, scale[:, None], inv[:, None], SCALE_IN_WEIGHT_DTYPE), mask=rmask[:, None] & cmask[None, :])
    tl.store(s_ptr + rows, scale, mask=rmask)


@triton.jit
def restore_rows_fp8_kernel(table_ptr, BLOCK: tl.constexpr, ROWS: tl.constexpr, FIELDS: tl.constexpr,
                            DTYPE: tl.constexpr, SCALE_IN_WEIGHT_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                            ADD: tl.constexpr = False):
    """A launch with no update (a restore): grid (ROWS-row blocks of the longest segment, segments), each row held in
    registers: read once, written once (ROWS rows a program, so few programs find their segment already done). The
    same arithmetic as merge_rows_fp8_kernel's with no update. A segment with update rows U (the gemm-first way's
    s B A, fields 8 and 9: address and row stride) writes Q(W + U) instead, W + U rounded to W's dtype; only a launch
    compiled with ADD reads those fields (a restore's is the kernel as it was without them)."""
    row0 = tl.program_id(0) * ROWS
    entry = table_ptr + tl.program_id(1).to(tl.int64) * FIELDS
    w_ptr, q_ptr, s_ptr, w_stride, q_stride, n, k = _segment(entry, DTYPE, ALIGNED)
    if ADD:
        u_addr, u_stride = tl.load(entry + 8), tl.load(entry + 9)  # the gemm-first way's update rows (0: none)
        u_ptr = u_addr.to(tl.pointer_type(DTYPE))
        if ALIGNED:
            u_ptr, u_stride = tl.multiple_of(u_ptr, _ALIGN), tl.multiple_of(u_stride, _ALIGN)
    c = tl.arange(0, BLOCK)
    m = c < k
    for row in range(row0, tl.minimum(row0 + ROWS, n)):
        w = tl.load(w_ptr + row * w_stride + c, mask=m, other=0.0).to(tl.float32)
        if ADD:
            if u_addr != 0:  # W + U, rounded once to W's dtype, as _merged_tile's sum is
                u = tl.load(u_ptr + row * u_stride + c, mask=m, other=0.0).to(tl.float32)
                w = (w + u).to(DTYPE).to(tl.float32)
        scale = _row_scale(tl.max(tl.abs(w), axis=0), DTYPE, SCALE_IN_WEIGHT_DTYPE)
        tl.store(q_ptr + row * q_stride + c, _to_fp8(w, scale, tl.math.div_rn(1.0, scale), SCALE_IN_WEIGHT_DTYPE),
                 mask=m)
        tl.store(s_ptr + row, scale)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on the launch's device without waiting for the GPU: a blocking copy from pageable memory
    synchronises the stream, which would hold the host (and the next segments' addmms) until the work queued before
    it is done. Pinned by torch's caching host allocator, which keeps the block until the copy has run."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _replay(step, _alive: list) -> None:
    step()


def _aligned(*values: int) -> bool:
    """Whether pointers (bytes) and strides or widths (elements) are all multiples of ALIGN: an ALIGNED launch's."""
    return all(v % ALIGN == 0 for v in values)


def low_rank_update(updates: list, out: torch.Tensor) -> torch.Tensor:
    """sum s B A by cuBLAS into `out` (N, K), `updates` [(A (r, K), B (N, r), s)], rounded once to out's dtype where
    there is one update (several: stacked as add_low_rank stacks them). No W is read: the gemm-first way's one-pass
    kernel adds it, which saves the copy of W into the output that torch's addmm makes before its GEMM. Each s is read
    with float() when this runs."""
    if len(updates) == 1:
        a, b, s = updates[0]
        return torch.addmm(out, b, a, beta=0, alpha=float(s), out=out)  # beta 0: out's old values are not read
    return torch.mm(*_stacked(updates), out=out)


def add_low_rank(w: torch.Tensor, updates: list, out: torch.Tensor | None = None) -> torch.Tensor:
    """W + sum s B A by cuBLAS, `updates` [(A (r, K), B (N, r), s)]: rounded once to W's dtype where there is one
    update; several are stacked into one GEMM, each B scaled first (in W's dtype, as LoRA slots hold it). `out`:
    where to write it (e.g. a live weight's rows). Each s is read with float() when this runs (a recorded call may be
    given scales that change between its runs)."""
    if len(updates) == 1:
        a, b, s = updates[0]
        return torch.addmm(w, b, a, alpha=float(s), out=out)
    return torch.addmm(w, *_stacked(updates), out=out)


def _stacked(updates: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Several updates [(A, B, s)] as one GEMM's operands: [s1 B1 | s2 B2 ...] (each s B rounded to B's dtype) and
    [A1; A2 ...]."""
    return torch.cat([b * float(s) for _, b, s in updates], 1), torch.cat([a for a, _, _ in updates], 0)


class _Table:
    """The segments of one kernel launch: their fields (FIELDS int64s each), update scales and extents."""

    def __init__(self):
        self.ints: list[int] = []
        self.floats: list[float] = []
        self.rows = self.cols = self.rank = self.segments = 0  # the longest segment's rows, columns; the top rank
        self.scratch = 0  # bytes of the gemm-first way's scratch rows it holds
        self.aligned = True  # every segment's pointers, strides and widths multiples of ALIGN (see the kernels)
        self.added = False  # a segment has update rows to add (Launch(update_rows=True)): the one-pass kernel's ADD
        self.alive: list[torch.Tensor] = []  # what the table points into, until the launch is issued


def scratch_arena(device: torch.device, nbytes: int = SCRATCH_BYTES) -> torch.Tensor:
    """Memory for Launch(arena=...) (at most SCRATCH_BYTES): the gemm-first way's merged rows go there, and a
    recorded launch (`record`) writes into the same place each time it is replayed."""
    return torch.empty(min(nbytes, SCRATCH_BYTES), dtype=torch.uint8, device=device)


class Launch:
    """Tables of launches, built from addresses (no tensor views: a switch adds hundreds of segments, and the host's
    time is the switch's). `add` a block of rows of a weight and its updates; `run` writes them all.
    Segments are grouped: those with no update (a restore's, or the gemm-first way's) by their row length's power
    of two, for the one-pass kernel (a row of 3,072 is not held in a register block sized for 12,288); those with
    updates apart, for the tiled kernel. A segment longer than SEGMENT_ROWS rows is split, so that a launch's
    programs have like work. A group of CHUNK_SEGMENTS segments (or SCRATCH_BYTES of scratch rows held) is launched
    as `add` fills it, so that the host's building of the rest overlaps the GPU's writing.
    `record`: a list that gets every step issued (each addmm and each kernel launch, with its table already on the
    device) as a callable; calling them again in order writes the same values again without building anything
    (`replayable` says whether that holds: the scratch rows must be in an arena, not allocated per segment)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, scale_in_weight_dtype: bool,
                 gemm_first: bool = False, config: dict | None = None, one_pass: bool = True,
                 arena: torch.Tensor | None = None, record: list | None = None, update_rows: bool = False):
        """`gemm_first`: a segment's update is added by torch's addmm (cuBLAS) into a scratch copy of its rows as it
        is added, and the scratch rows are quantised by the one-pass kernel, instead of the tiled kernel computing
        the update itself. `update_rows` (with gemm_first): the scratch rows get s B A alone and the one-pass kernel
        adds W (rows up to ONE_PASS_MAX_K long; longer ones as without it). `config`: the tiled kernel's BM, BK,
        num_warps (tools compare them). `one_pass=False`: the tiled kernel even with no update (tests). `arena`
        (scratch_arena): where the scratch rows go, reused after each run (stream order keeps a launch's reads
        before the next rows' writes); else each segment's are allocated. `record`: see the class docstring."""
        if dtype not in _TL_DTYPES:
            raise ValueError(f"weights in bf16 or fp16, not {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current device, as tensors' .device say
            device = torch.device("cuda", torch.cuda.current_device())
        self.dtype, self.device, self.rounding = dtype, device, scale_in_weight_dtype
        self.gemm_first, self.config, self.one_pass, self.update_rows = gemm_first, config, one_pass, update_rows
        self.tables: dict[int, _Table] = {}  # 0: with updates (tiled); else the one-pass kernel's register block
        self.scratch = 0  # bytes of scratch rows held by the tables
        self.arena, self.arena_used, self.record, self.replayable = arena, 0, record, True

    def add(self, source: torch.Tensor, rows: torch.Tensor, scale: torch.Tensor, first: int, n: int,
            updates: list) -> None:
        """Rows [first, first + n) of `source` (N, K), quantised into those of `rows` (N, K) fp8 and `scale` (N
        contiguous fp32 values), with `updates` [(A (r, >= c + K), c, B (n, r), s)]: A's columns c.. c + K (an
        adapter's down-projection, of which this weight sees a column block). ValueError where the kernel's
        assumptions do not hold."""
        k = source.shape[1]
        if not n or not k:
            return
        if source.dtype != self.dtype or source.stride(1) != 1 or rows.shape != source.shape \
                or rows.dtype != torch.float8_e4m3fn or rows.stride(1) != 1 or scale.dtype != torch.float32 \
                or not scale.is_contiguous() or scale.numel() != source.shape[0] or first + n > source.shape[0] \
                or source.device != self.device:
            raise ValueError("a segment: the weight's rows (unit column stride), fp8 rows of its shape with unit "
                             "column stride, N contiguous fp32 scales, on the launch's device")
        if len(updates) > MAX_UPDATES:
            raise ValueError(f"at most {MAX_UPDATES} updates per segment")
        for a, c, b, _ in updates:
            if a.shape[1] < c + k or tuple(b.shape) != (n, a.shape[0]):
                raise ValueError(f"an update: A (r, >= {c + k}) and B ({n}, r); got {tuple(a.shape)} and "
                                 f"{tuple(b.shape)}")
            if a.dtype != self.dtype or b.dtype != self.dtype or a.stride(1) != 1 \
                    or (b.stride(1) != 1 and a.shape[0] > 1) or a.shape[0] > MAX_RANK:
                raise ValueError(f"an update: unit column strides, in {self.dtype}, rank <= {MAX_RANK}; got A "
                                 f"{tuple(a.shape)} {a.dtype} and B {tuple(b.shape)} {b.dtype}")
        size = source.element_size()
        one_pass = self.one_pass and k <= ONE_PASS_MAX_K
        added = None  # update_rows: the gemm-first way's s B A rows, which the one-pass kernel adds to W
        if updates and self.gemm_first:
            ups, out = [(a[:, c:c + k], b, s) for a, c, b, s in updates], self._scratch(n, k, size)
            if one_pass and self.update_rows:  # s B A alone into scratch rows; W is read once, by the kernel
                out = torch.empty(n, k, dtype=self.dtype, device=self.device) if out is None else out
                added = low_rank_update(ups, out=out)
                step = functools.partial(low_rank_update, ups, out=added)
                w, w_ptr = source, source.data_ptr() + first * source.stride(0) * size
            else:  # W + s B A into scratch rows, quantised as a weight
                w = add_low_rank(source[first:first + n], ups, out=out)
                step = functools.partial(add_low_rank, source[first:first + n], ups, out=w)
                w_ptr = w.data_ptr()
            if self.record is not None:
                self.record.append(step)
            updates = []
        else:
            w, w_ptr = source, source.data_ptr() + first * source.stride(0) * size
        key = triton.next_power_of_2(k) if not updates and one_pass else 0
        table = self.tables.setdefault(key, _Table())
        table.alive += [w, rows, scale] + [t for a, _, b, _ in updates for t in (a, b)] + [added] * (added is not None)
        held = added if added is not None else (w if w is not source else None)  # scratch rows this segment holds
        if held is not None:
            table.scratch += held.numel() * size
            self.scratch += held.numel() * size
        q_ptr, s_ptr = rows.data_ptr() + first * rows.stride(0), scale.data_ptr() + first * 4
        table.aligned = table.aligned and _aligned(w_ptr, q_ptr, w.stride(0), rows.stride(0), k) \
            and (added is None or _aligned(added.data_ptr(), added.stride(0)))
        for i in range(0, n, SEGMENT_ROWS):  # rows i.. of the block, as a segment of their own
            m = min(SEGMENT_ROWS, n - i)
            table.ints += [w_ptr + i * w.stride(0) * size, q_ptr + i * rows.stride(0), s_ptr + i * 4, w.stride(0),
                           rows.stride(0), m, k, len(updates)]
            for a, c, b, _ in updates:
                table.ints += [a.data_ptr() + c * size, a.stride(0), b.data_ptr() + i * b.stride(0) * size,
                               b.stride(0), a.shape[0]]
                table.rank = max(table.rank, a.shape[0])
            if added is not None:  # fields 8 and 9 of a segment with no update: rows to add (restore_rows_fp8_kernel)
                table.ints += [added.data_ptr() + i * added.stride(0) * size, added.stride(0)]
                table.added = True
            table.ints += [0] * (FIELDS - 8 - 5 * len(updates) - (2 if added is not None else 0))
            table.floats += [float(u[3]) for u in updates] + [0.0] * (MAX_UPDATES - len(updates))
            table.rows, table.cols = max(table.rows, m), max(table.cols, k)
            table.segments += 1
        if self.scratch >= SCRATCH_BYTES:
            self.run()
        elif table.segments >= CHUNK_SEGMENTS:
            self._launch(self.tables.pop(key))
            self.scratch -= table.scratch

    def _scratch(self, n: int, k: int, element_size: int) -> torch.Tensor | None:
        """(n, k) rows of the arena for a segment's merged rows (after a run, if the arena is full), or None: the
        addmm allocates them (no arena, or rows larger than it: then the launch cannot be replayed)."""
        if self.arena is None:
            self.replayable = False
            return None
        size = n * k * element_size
        if size > self.arena.numel():
            self.replayable = False
            return None
        if self.arena_used + size > self.arena.numel():
            self.run()
        start = self.arena_used
        self.arena_used += -(-size // 256) * 256  # each segment's rows 256-byte aligned, as an allocation's are
        return self.arena[start:start + size].view(self.dtype).view(n, k)

    def _launch(self, t: _Table) -> None:
        """One launch of the kernel for a table: the one-pass kernel for a table with no update, else the tiled
        one."""
        table = _to_device(torch.tensor(t.ints, dtype=torch.int64), self.device)
        dtype = _TL_DTYPES[self.dtype]
        aligned = t.aligned and VECTOR_ACCESS
        if not t.rank and self.one_pass and t.cols <= ONE_PASS_MAX_K:
            block = triton.next_power_of_2(t.cols)
            step = functools.partial(
                restore_rows_fp8_kernel[(-(-t.rows // ONE_PASS_ROWS), t.segments)], table, BLOCK=block,
                ROWS=ONE_PASS_ROWS, FIELDS=FIELDS, DTYPE=dtype, SCALE_IN_WEIGHT_DTYPE=self.rounding, ALIGNED=aligned,
                ADD=t.added, num_warps=8 if block >= 4096 else 4)
        else:
            c = {**TILED, **(self.config or {})}
            scales = _to_device(torch.tensor(t.floats, dtype=torch.float32), self.device)
            r = max(16, triton.next_power_of_2(t.rank)) if t.rank else 16
            step = functools.partial(
                merge_rows_fp8_kernel[(-(-t.rows // c["BM"]), t.segments)], table, scales, R=r, BM=c["BM"],
                BK=c["BK"], FIELDS=FIELDS, MAX_U=MAX_UPDATES, DTYPE=dtype, SCALE_IN_WEIGHT_DTYPE=self.rounding,
                ALIGNED=aligned, num_warps=c["num_warps"])
        step()
        if self.record is not None:  # with what its table points into, kept alive as long as the record is
            self.record.append(functools.partial(_replay, step, t.alive))

    def run(self) -> None:
        """Write every segment added since the last run. The tensors must stay alive until it has run (a model's
        weights and a store's adapters do; the scratch rows are kept until then): what a table pointed into is freed
        after its launch is issued, and reused only by work queued after it."""
        for t in self.tables.values():
            self._launch(t)
        self.tables, self.scratch, self.arena_used = {}, 0, 0


@dataclass
class Segment:
    """A whole weight to write: `source` (n, k) the exact weight, `rows` (n, k) fp8 and `scale` (n values,
    contiguous) where it goes, `updates` [(A (r, k), B (n, r), s)]: W + sum s B A is quantised."""
    source: torch.Tensor
    rows: torch.Tensor
    scale: torch.Tensor
    updates: list = field(default_factory=list)


def merge_weight_rows(segments: list[Segment], scale_in_weight_dtype: bool, **launch) -> None:
    """Write every segment (see the module docstring), in as few launches as Launch makes; all on one CUDA device,
    or on the CPU under Triton's interpreter. `launch`: Launch's options."""
    if not segments:
        return
    batch = Launch(segments[0].source.dtype, segments[0].source.device, scale_in_weight_dtype, **launch)
    for seg in segments:
        batch.add(seg.source, seg.rows, seg.scale.reshape(-1), 0, seg.source.shape[0],
                  [(a if a.stride(1) == 1 else a.contiguous(), 0, b if b.stride(1) == 1 else b.contiguous(), s)
                   for a, b, s in seg.updates])
    batch.run()


def quantize_weight_rows(w: torch.Tensor, scale_in_weight_dtype: bool,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 rows (N, K), fp32 scales (N, 1)) of a 2-D weight, by the merge's kernel with no update (the same code
    that writes a restore). `out`: where to write them instead (rows with unit column stride; N scales, contiguous,
    in any shape), e.g. a linear's own storage."""
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"a 2-D weight with contiguous rows, not shape {tuple(w.shape)} strides {w.stride()}")
    n, k = w.shape
    if out is None:
        q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=w.device)
        s = torch.empty(n, 1, dtype=torch.float32, device=w.device)
    else:
        q, s = out
    merge_weight_rows([Segment(w, q, s)], scale_in_weight_dtype)
    return q, s
