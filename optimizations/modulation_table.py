"""Per-step modulation from a table (`use_modulation_table`): the AdaLN linears run once per request, not per step.

Every FLUX block turns the conditioning vector `temb` into its shift / scale / gate with one linear: 19 double blocks
x 2 (3072 -> 18432), 38 single blocks (3072 -> 9216) and the final norm (3072 -> 6144), 3.2 B weights. With one
vector per step (M = 1) these are GEMVs that read all 6.4 GB of bf16 weights every step: ~2 ms per step on an H200
(profile, BENCHMARKS.md), for results that depend only on (timestep, guidance, pooled text embedding), all known
before the denoising loop starts.

So the first transformer call of a request computes them for all of the scheduler's timesteps at once (one GEMM
per linear with M = steps, reading each weight once), and every call then gathers its rows. Same math; the batched
GEMM may round differently in the last bit (like QKV fusion), and the stage table reports fidelity as always.
Measured (H100, edit-512, bf16): 66.9 -> 64.8 ms of device time per transformer call (BENCHMARKS.md).

How a call finds its row, without a host sync and inside CUDA graphs: every table row carries its key (timestep,
guidance, pooled embedding) and a pre-hook on the transformer picks, on the GPU, the row whose key equals the
call's exactly. A call whose key is in no row is counted on the GPU; the request's context checks that count after
the generation and fails the request rather than return an image made with the wrong modulation. Rows are written
on the host side (`host_prepare`): for a conditioning seen for the first time, and whenever the call count passes
the rows written, from the scheduler's timesteps (replaying the pipeline's `t.to(dtype) / 1000`) plus one row for
the call's own timestep (so a call outside the pipeline's loop, e.g. the benchmark's per-step probe, always hits).

Not with full-graph compile: the host-side bookkeeping would be traced into the graph.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from optimizations.base import Components, DeviceInfo, Optimization, RunContext
from optimizations.graph_capture import capturing

# The AdaLN modulation linears, by name: AdaLayerNormZero (double blocks), AdaLayerNormZeroSingle (single blocks),
# AdaLayerNormContinuous (norm_out). Each computes linear(silu(temb)) (norm_out's `.to(x.dtype)` is a no-op here:
# temb already has the model's dtype).
MODULATION_SUFFIXES = (".norm1.linear", ".norm1_context.linear", ".norm.linear")
MODULATION_TOP_LEVEL = ("norm_out.linear",)
STATE_ATTR = "_flux_modulation_table"
CAPACITY_ROWS = 64  # 28-step requests with true CFG (2 x 29 rows) fit; longer ones refill in chunks
MAX_BATCH = 64


def is_modulation_linear(fqn: str) -> bool:
    return fqn in MODULATION_TOP_LEVEL or fqn.endswith(MODULATION_SUFFIXES)


@dataclass
class _Entry:
    """One conditioning (a pooled-embedding / guidance tensor pair) of one transformer variant."""
    refs: tuple  # held so that the tensors' ids and addresses cannot be reused while the entry lives
    epoch: int
    calls: int = 0
    rows_until: int = 0  # scheduler step index up to which rows are written


@dataclass
class TableState:
    """The table shared by all transformer variants (their modulation weights are the same bf16 tensors' copies).

    Tensors are allocated once: CUDA graphs and compiled blocks read them at fixed addresses."""
    table: torch.Tensor  # (CAPACITY_ROWS, total modulation width), the model's dtype
    keys: torch.Tensor  # (CAPACITY_ROWS, 2 + pooled dim) float32: timestep, guidance, pooled embedding; +inf = empty
    idx: torch.Tensor  # (MAX_BATCH,) int64: the row of each batch element of the current call
    misses: torch.Tensor  # () int64: calls whose key matched no row (checked after each request)
    timesteps: object = None  # callable: the active scheduler's timesteps
    used: int = 0
    epoch: int = 0
    entries: dict = field(default_factory=dict)
    fills: int = 0  # how many times rows were written (tests)

    def __deepcopy__(self, memo):  # shared, never copied: the fp8 copy of the transformer uses the same table
        return self

    def __getstate__(self) -> dict:
        # Pickled only by torch's guard serialiser when a compiled block is saved whole (aot_regions.py): it walks
        # what a block reads. The compiled code reads the tensors; the host-side bookkeeping stays out, above all
        # `timesteps`, a closure over the pipeline (and whatever a request has swapped into it, e.g. CUDA events).
        return {k: v for k, v in self.__dict__.items() if k not in ("timesteps", "entries")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, timesteps=None, entries={})

    def reset(self) -> None:
        """Drop all rows. Conditionings keep their call counts (a long request refills from its current step);
        those idle for a whole epoch are forgotten."""
        self.keys.fill_(float("inf"))
        self.used, self.epoch = 0, self.epoch + 1
        self.entries = {k: e for k, e in self.entries.items() if e.epoch >= self.epoch - 1}

    # ---- host side: make sure the rows this call needs are in the table -------------------------------------
    def host_prepare(self, module: torch.nn.Module, kwargs: dict) -> None:
        if capturing():
            return  # the device-side lookup is what gets captured; rows are written before each replay
        pooled, guidance, timestep = _conditioning(kwargs)
        if timestep.shape[0] > self.idx.shape[0]:
            raise ValueError(f"modulation table: batch {timestep.shape[0]} > {self.idx.shape[0]}")
        # Identity of the conditioning tensors (kept alive by the entry, so ids and addresses are not reused), plus
        # their version counters where they have one (inference tensors do not: the pipeline creates them once per
        # request and never writes to them).
        key = (id(module), id(pooled), pooled.data_ptr(), _version(pooled), id(guidance), _version(guidance))
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry(refs=(pooled, guidance), epoch=self.epoch)
        elif entry.epoch != self.epoch:  # its rows were dropped by a reset; its call count (= step) stays
            entry.epoch, entry.rows_until = self.epoch, 0
        step = entry.calls
        entry.calls += 1
        if step < entry.rows_until:
            return
        self._fill(module, entry, step, pooled, guidance, timestep, kwargs["hidden_states"].dtype)

    def _fill(self, module, entry: _Entry, step: int, pooled, guidance, timestep, hidden_dtype) -> None:
        capacity = self.table.shape[0]
        schedule = self.timesteps() if self.timesteps is not None else None
        ahead = 0 if schedule is None else max(0, min(len(schedule) - step, capacity // 2 - 1))
        n = ahead + 1  # the scheduler's next timesteps, plus the call's own
        if self.used + n > capacity:
            self.reset()  # full: start over (other conditionings refill on their next call)
            entry.epoch = self.epoch
        # What the pipeline passes (`t.expand(B).to(latents.dtype) / 1000`), then the call's own value.
        keys_t = timestep[:1]
        if ahead:
            keys_t = torch.cat([schedule[step:step + ahead].to(timestep.device, timestep.dtype) / 1000, keys_t])
        rows = slice(self.used, self.used + n)
        # FluxTransformer2DModel.forward's conditioning, batched over the n timesteps.
        t_in = keys_t.to(hidden_dtype) * 1000
        pooled_in = pooled[:1].expand(n, -1)
        device = keys_t.device
        with _params_on(module.time_text_embed, device):
            if guidance is None:
                temb = module.time_text_embed(t_in, pooled_in)
            else:
                temb = module.time_text_embed(t_in, (guidance[:1].to(hidden_dtype) * 1000).expand(n), pooled_in)
        act = F.silu(temb)
        for m in module.modules():
            if isinstance(m, ModulationLinear):
                x = act.to(m.weight.dtype)
                out = F.linear(x, _on(m.weight, device), _on(m.bias, device))
                if m.table_branch is not None:  # e.g. an active LoRA adapter on this linear
                    out = out + m.table_branch(x).to(out.dtype)
                self.table[rows, m.offset:m.offset + m.out_features] = out
        g = torch.zeros(n, device=keys_t.device) if guidance is None else guidance[:1].float().expand(n)
        self.keys[rows] = torch.cat([keys_t.float()[:, None], g[:, None], pooled[:1].float().expand(n, -1)], 1)
        self.used += n
        entry.rows_until = step + ahead
        self.fills += 1

    # ---- device side: each batch element's row, as GPU ops (eager, compiled, or captured) ---------------------
    def lookup_hook(self, module, args, kwargs):
        if args:
            raise TypeError("the modulation table needs the transformer called with keyword arguments")
        self.host_prepare(module, kwargs)
        pooled, guidance, timestep = _conditioning(kwargs)
        b = timestep.shape[0]
        g = torch.zeros_like(timestep, dtype=torch.float32) if guidance is None else guidance.float()
        query = torch.cat([timestep.float()[:, None], g[:, None], pooled.float()], 1)
        dist = (self.keys[None] - query[:, None]).abs().sum(-1)  # (batch, rows): 0 exactly where the key matches
        best, idx = dist.min(1)
        self.idx[:b].copy_(idx)
        self.misses.add_((best != 0).sum())
        return None


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`t` on `device`: itself when it is there; a copy for this fill when a memory budget keeps it on the host."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


@contextlib.contextmanager
def _params_on(module: torch.nn.Module, device: torch.device):
    """`module`'s parameters on `device` for one call, as they were after. A no-op when they are there; with a memory
    budget that offloads the transformer, the embedders' weights are on the host outside its forward, where the
    table is filled (the pre-hook runs before the offload hooks bring them in)."""
    moved = [(p, p.data) for p in module.parameters() if p.device != device]
    for p, data in moved:
        p.data = data.to(device, non_blocking=True)
    try:
        yield
    finally:
        for p, data in moved:
            p.data = data


def _version(t: torch.Tensor | None) -> int | None:
    if t is None or t.is_inference():
        return None
    return t._version


def _conditioning(kwargs: dict):
    try:
        return kwargs["pooled_projections"], kwargs.get("guidance"), kwargs["timestep"]
    except KeyError as e:
        raise TypeError(f"the modulation table needs the transformer's {e.args[0]!r} argument") from None


class ModulationLinear(torch.nn.Linear):
    """A modulation linear that returns its rows of the table (the weights stay, for filling it).

    `table_branch`: None, or a function of the linear's input whose result the table fill adds to the linear's (a
    duck-typed hook: the server's LoRA slots set it, so this package never imports the server). Whoever sets it, or
    changes what it computes, resets the table (TableState.reset): rows already written hold the old result."""

    table_branch = None

    def __init__(self, linear: torch.nn.Linear, state: TableState, offset: int):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters, not copies
        self.state, self.offset = state, offset
        # A view per linear (same shape for all blocks of a kind): compiled blocks read it as an input tensor, so the
        # 57 blocks still share one compiled graph per kind (an integer offset would be specialised per block).
        self.rows = state.table[:, offset:offset + linear.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows[self.state.idx[: x.shape[0]]]

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = v if k in ("state", "rows") else copy.deepcopy(v, memo)
        return new


def install(module: torch.nn.Module, state: TableState | None = None, device=None) -> TableState:
    """Swap the modulation linears of `module` for table lookups and add the lookup pre-hook; idempotent. `device`:
    where a new table lives (None: with the module's weights; a memory budget may keep those on the host)."""
    existing = getattr(module, STATE_ATTR, None)
    if existing is not None:
        return existing
    targets = [(fqn, m) for fqn, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and is_modulation_linear(fqn)]
    if not targets:
        raise ValueError("no AdaLN modulation linears found: not a FLUX transformer?")
    width = sum(m.out_features for _, m in targets)
    if state is None:
        w = targets[0][1].weight
        device = w.device if device is None else device
        pooled_dim = module.config.pooled_projection_dim
        state = TableState(table=torch.zeros(CAPACITY_ROWS, width, dtype=w.dtype, device=device),
                           keys=torch.full((CAPACITY_ROWS, 2 + pooled_dim), float("inf"), device=device),
                           idx=torch.zeros(MAX_BATCH, dtype=torch.long, device=device),
                           misses=torch.zeros((), dtype=torch.long, device=device))
    elif state.table.shape[1] != width:
        raise ValueError("modulation table layout differs between transformer variants")
    offset = 0
    for fqn, m in targets:
        parent_name, _, child = fqn.rpartition(".")
        setattr(module.get_submodule(parent_name), child, ModulationLinear(m, state, offset))
        offset += m.out_features
    module.register_forward_pre_hook(state.lookup_hook, with_kwargs=True)
    setattr(module, STATE_ATTR, state)
    return state


def table_state(module) -> TableState | None:
    """The table installed on a transformer variant, if any."""
    return getattr(module, STATE_ATTR, None)


def before_replay(module, kwargs: dict) -> None:
    """For callers that replay a captured graph instead of calling the module (cuda_graphs.py): write the rows."""
    state = getattr(module, STATE_ATTR, None)
    if state is not None:
        state.host_prepare(module, kwargs)


class ModulationTable(Optimization):
    name, flag, load_time = "modulation_table", "use_modulation_table", True
    toggle = False  # the linears are swapped in place

    def __init__(self, compile_scope: str = "regional"):
        self.compile_scope = compile_scope
        self.state: TableState | None = None

    def available(self, device: DeviceInfo) -> str | None:
        if self.compile_scope == "full":
            return "not with full-graph compile (its host-side row bookkeeping would be traced): use regional"
        return None

    def prepare(self, components: Components) -> str:
        for module in components.variants.values():
            self.state = install(module, self.state, getattr(components, "device", None))
        pipe = components.pipe
        self.state.timesteps = lambda: getattr(pipe.scheduler, "timesteps", None)
        mib = self.state.table.numel() * self.state.table.element_size() / 2**20
        return (f"AdaLN modulation ({self.state.table.shape[1]:,} outputs per step) computed once per request for "
                f"all timesteps, gathered per step ({self.state.table.shape[0]}-row table, {mib:.0f} MiB)")

    @contextlib.contextmanager
    def activate(self, run: RunContext):
        state = self.state
        try:
            yield
        except BaseException:
            state.misses.zero_()  # this request failed anyway: do not charge its misses to the next one
            raise
        finally:
            state.entries.clear()  # this request's conditioning tensors are not reused: drop the references
        missed = int(state.misses.item())  # after the generation: its outputs have synchronised already
        if missed:
            state.misses.zero_()
            raise RuntimeError(f"modulation table: {missed} transformer call(s) matched no table row; "
                               "the result would be wrong, so the request fails (a bug: please report it)")
