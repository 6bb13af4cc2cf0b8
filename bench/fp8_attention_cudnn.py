"""fp8 attention through cuDNN (cudnn-frontend's `sdpa_fp8`), per-tensor scales: the experiment behind
bench/bench_fp8_attention.py. Measured, not part of the server: its error is too large (BENCHMARKS.md, 2026-11-23).

Why try: at 1024x1024 attention is ~40% of an fp8 step (edit-1024: ~88 of ~210 ms on an H100) and bf16 cuDNN SDPA
already runs at ~1.08x its floor, so only fp8 attention lowers it. FA3's fp8 path is not installable on our machines
(docs/design.md); NVIDIA's cudnn-frontend Python package (`nvidia-cudnn-frontend`, one wheel, no build) drives the cuDNN
library torch already ships. On Hopper its fp8 attention writes O in fp8 too (bf16 O needs Blackwell).

Scales (all per tensor, all on the GPU, no host sync), as a model integration would set them:
- Q and K: static, from the RMSNorm weights. FLUX RMS-normalises q and k per head before RoPE, so every element is
  at most sqrt(head_dim) * max|weight| (the normalised vector has norm sqrt(head_dim); RoPE rotates pairs and keeps
  their norm). descale = that bound / 448 (+1% for bf16 rounding, and a clamp): no reduction pass at all.
- V: dynamic, its amax over the tensor (one reduction inductor fuses with the cast).
- P (softmax probabilities, in [0, 1]): the fixed power-of-two scale 256 that cuDNN's samples use.
- O: |O| <= max|V| since each row of P sums to 1; written at half V's scale for headroom (P's rounding can push a
  row sum slightly over 1), then dequantised for the output projection, which quantises its input row-wise again.

Result on an H100 (2026-11-23): the kernel runs 1.33-1.52x faster than bf16 cuDNN SDPA at FLUX's shapes, but its
output differs from fp32 attention by 6% (flat attention) to 15% (sharp) against bf16's 0.2%: e4m3 keeps 3 mantissa
bits for q.k, which no per-tensor scale can help. So the server's fp8 tier keeps bf16 attention.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

FP8_MAX = 448.0
SOFTMAX_SCALE = 256.0  # P in [0, 1] -> [0, 256]; a power of two, as cuDNN's fp8 samples use
O_HEADROOM = 0.5  # O written at half of V's scale
Q_K_BOUND_MARGIN = 1.01  # bf16 rounding of the normalised, rotated q/k can exceed the exact bound by ~2^-8


def cudnn_frontend_status() -> tuple[object | None, str]:
    """(the imported `cudnn` module or None, a line saying which cuDNN runs or why none can)."""
    try:
        import cudnn  # nvidia-cudnn-frontend; torch is imported first, so its libcudnn is the one found
    except Exception as exc:  # ImportError, or OSError when the library cannot be loaded
        return None, f"cudnn-frontend not importable ({type(exc).__name__}: {exc})"
    try:
        backend = cudnn.backend_version_string() if hasattr(cudnn, "backend_version_string") \
            else str(cudnn.backend_version())
    except Exception as exc:
        return None, f"cudnn-frontend imported but found no cuDNN library ({exc})"
    return cudnn, f"cuDNN {backend} via cudnn-frontend {getattr(cudnn, '__version__', '?')}"


class _Plan:
    """One built cuDNN graph for a (batch, seq, heads, head_dim) shape on one device."""

    def __init__(self, cudnn, handle, b: int, s: int, h: int, d: int, device: torch.device):
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
        # Logical BHSD dims over BSHD memory (the layout the projections produce): no transposes, either side.
        dims, strides = (b, h, s, d), (s * h * d, d, h * d, 1)
        self.q, self.k, self.v = (g.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
        scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
        self.dq, self.dk, self.dv, self.ds, self.ss, self.so = (
            g.tensor(name=n, **scalar) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s",
                                                 "scale_o"))
        self.o, _, self.amax_s, self.amax_o = g.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, descale_q=self.dq, descale_k=self.dk, descale_v=self.dv,
            descale_s=self.ds, scale_s=self.ss, scale_o=self.so, is_inference=True, attn_scale=1.0 / math.sqrt(d),
            use_causal_mask=False, name="flux_sdpa_fp8")
        self.o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        for amax in (self.amax_s, self.amax_o):
            amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph = g
        # Held per plan (not allocated per call), so CUDA-graph capture and replay see the same addresses.
        self.workspace = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device=device)
        self.scale_s = torch.full((1, 1, 1, 1), SOFTMAX_SCALE, dtype=torch.float32, device=device)
        self.descale_s = torch.full((1, 1, 1, 1), 1.0 / SOFTMAX_SCALE, dtype=torch.float32, device=device)
        self.amax_buf = torch.empty((2, 1, 1, 1, 1), dtype=torch.float32, device=device)


class _Runtime:
    """cuDNN handle and built plans per device. The service's one GPU worker is the only caller; the lock only
    guards plan building against a second thread (tests, the benchmark's main thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.handles: dict[int, object] = {}
        self.plans: dict[tuple, _Plan] = {}

    def plan(self, cudnn, b, s, h, d, device: torch.device) -> tuple[object, _Plan]:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        key = (idx, b, s, h, d)
        with self.lock:
            if idx not in self.handles:
                with torch.cuda.device(idx):
                    self.handles[idx] = cudnn.create_handle()
            if key not in self.plans:
                with torch.cuda.device(idx):
                    self.plans[key] = _Plan(cudnn, self.handles[idx], b, s, h, d, device)
            return self.handles[idx], self.plans[key]


_RUNTIME = _Runtime()


@torch.library.custom_op("flux_kontext::sdpa_fp8", mutates_args=())
def sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
             descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of fp8 e4m3 q, k, v of shape (batch, seq, heads, head_dim), any strides; returns a
    contiguous fp8 O of that shape, O_true = O * (1 / scale_o). descale_* and scale_o: fp32 tensors of one element."""
    if q.device.type != "cuda":
        return _sdpa_fp8_reference(q, k, v, descale_q, descale_k, descale_v, scale_o).contiguous()
    cudnn, why = cudnn_frontend_status()
    if cudnn is None:
        raise RuntimeError(why)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, s, h, d = q.shape
    handle, plan = _RUNTIME.plan(cudnn, b, s, h, d, q.device)
    out = torch.empty_like(q)
    one = lambda t: t.reshape(1, 1, 1, 1).float().contiguous()  # noqa: E731
    pack = {plan.q: q, plan.k: k, plan.v: v, plan.dq: one(descale_q), plan.dk: one(descale_k),
            plan.dv: one(descale_v), plan.ds: plan.descale_s, plan.ss: plan.scale_s, plan.so: one(scale_o),
            plan.o: out, plan.amax_s: plan.amax_buf[0], plan.amax_o: plan.amax_buf[1]}
    cudnn.set_stream(handle, torch.cuda.current_stream(q.device).cuda_stream)
    plan.graph.execute(pack, plan.workspace, handle=handle)
    return out


@sdpa_fp8.register_fake
def _(q, k, v, descale_q, descale_k, descale_v, scale_o):
    # contiguous, as both real paths return, whatever q's strides (a view into a fused qkv projection has others)
    return q.new_empty(q.shape)


def _sdpa_fp8_reference(q, k, v, descale_q, descale_k, descale_v, scale_o) -> torch.Tensor:
    """What the cuDNN kernel computes, in fp32 (CPU tests, and the GPU check's reference): dequantise, attend,
    quantise O. (cuDNN also rounds P to fp8; this reference does not, so it bounds the kernel's own error.)"""
    deq = lambda t, s: (t.float() * s.float().reshape(())).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(deq(q, descale_q), deq(k, descale_k), deq(v, descale_v)).transpose(1, 2)
    return (o * scale_o.float().reshape(())).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_static(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    return (x.float() * (1.0 / descale)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    descale = x.abs().amax().float().clamp(min=1e-12) / FP8_MAX
    return quantize_static(x, descale), descale


def attention_fp8(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor) -> torch.Tensor:
    """bf16 (batch, seq, heads, head_dim) q, k, v -> bf16 attention output of the same shape, through fp8."""
    q8, k8 = quantize_static(query, descale_q), quantize_static(key, descale_k)
    v8, descale_v = quantize_dynamic(value)
    scale_o = O_HEADROOM / descale_v
    o8 = torch.ops.flux_kontext.sdpa_fp8(q8, k8, v8, descale_q, descale_k, descale_v, scale_o)
    return (o8.float() * (1.0 / scale_o)).to(query.dtype)
