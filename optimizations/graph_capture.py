"""How a graph is captured: the strategy the graph runners (cuda_graphs.py) take, so the same runners run on a CPU.

A strategy is a callable `capture(run, static, pool) -> (graph, out)`: `run(static)` is the work to capture, `static`
the inputs it reads (tensors at fixed addresses, possibly nested in dicts and tuples), `out` what it returned under
capture; `graph.replay()` runs the work again on whatever the static tensors hold then and leaves the results in
`out`'s tensors. The caller's discipline, the same for both strategies below:
- before a replay, copy the new inputs *into* the static tensors (never replace them: the graph reads the old
  addresses);
- after a replay, read (or clone) `out` before another graph of the same memory pool replays: graphs that share a
  pool may reuse each other's freed intermediate memory for their outputs;
- host-side work (Python bookkeeping, reading a value to the host) is not part of a replay: do it outside `run`, or
  skip it while `capturing()` is true.

`CudaCapture` is the real one. `RecordedCapture` is its stand-in where CUDA graphs cannot be captured (the CPU tests):
a "graph" that keeps the captured function and its static inputs and, on replay, runs the function again on them
and copies the results into the tensors returned at capture. It checks the discipline it can see: a static input
replaced rather than copied into is an error, and while it captures or replays, `capturing()` is true, so host-side
bookkeeping is skipped as it is on a real replay (where no Python runs at all).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

_local = threading.local()


def capturing() -> bool:
    """True while a CUDA stream capture, or a recorded capture or replay, is running on this thread: host-side work
    that a replay would not repeat (e.g. the modulation table's row bookkeeping) must be skipped."""
    if getattr(_local, "recording", 0):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class CudaCapture:
    """CUDA graph capture: `warmups` eager runs on a side stream (capture requires them; they also compile compiled
    code), then one run under capture into `pool`. Returns the torch.cuda.CUDAGraph and the captured output."""

    def __init__(self, warmups: int = 2):
        self.warmups = warmups

    @staticmethod
    def new_pool():
        return torch.cuda.graph_pool_handle()

    def __call__(self, run: Callable[[Any], Any], static, pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmups):
                run(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = run(static)
        torch.cuda.synchronize()
        return graph, out


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if torch.is_tensor(t)]


class _Recording:
    def __enter__(self):
        _local.recording = getattr(_local, "recording", 0) + 1

    def __exit__(self, *exc):
        _local.recording -= 1


class RecordedGraph:
    """A stand-in for a captured graph (see the module docstring): `replay()` runs the captured function again on the
    static inputs and writes its results into the captured output tensors. `replays` counts the replays."""

    def __init__(self, run: Callable[[Any], Any], static, out):
        self.run, self.static, self.out = run, static, out
        self._inputs = [(t, t.data_ptr()) for t in _tensors(static)]
        self.replays = 0

    def replay(self) -> None:
        now = _tensors(self.static)
        if len(now) != len(self._inputs) or any(a is not b or a.data_ptr() != p
                                                 for a, (b, p) in zip(now, self._inputs)):
            raise RuntimeError("a static input of a captured graph was replaced instead of copied into: a CUDA "
                               "graph would go on reading the old tensor")
        with _Recording():
            new = self.run(self.static)
        dst, src = _tensors(self.out), _tensors(new)
        if [t.shape for t in dst] != [t.shape for t in src]:
            raise RuntimeError("a replay produced outputs of other shapes than the capture")
        with torch.no_grad():
            for d, s in zip(dst, src):
                if d is not s:
                    d.copy_(s)
        self.replays += 1


class RecordedCapture:
    """The CPU stand-in for CudaCapture: the same eager warm-up runs (host-side work runs in them, as on the GPU),
    then the capture run with `capturing()` true. `graphs` lists every RecordedGraph made (tests count replays)."""

    def __init__(self, warmups: int = 2):
        self.warmups = warmups
        self.graphs: list[RecordedGraph] = []

    @staticmethod
    def new_pool():
        return object()

    def __call__(self, run: Callable[[Any], Any], static, pool):
        for _ in range(self.warmups):
            run(static)
        with _Recording():
            out = run(static)
        graph = RecordedGraph(run, static, out)
        self.graphs.append(graph)
        return graph, out
