"""Which SDPA backend does T5's self-attention get, and what would the others cost? (T5-XXL shapes, bf16.)

bench_text_encoder.py's H100 profile of the synthetic-full T5 (24 layers, 512 tokens) showed fp32 GEMMs
(sm80_xmma_gemm_f32f32) and an fp32 softmax once per layer: PyTorch's math SDPA, which upcasts bf16 to fp32. This
records the arguments transformers hands to F.scaled_dot_product_attention (dtype, shape, strides of q/k/v and the
position-bias mask), then times each backend on them, with the reason a backend refuses (PyTorch's warnings), and
each output's relative error against an fp32 reference.
Usage: python bench/probe_t5_attention.py [--out results.json] [--small]
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_text_encoder import build_t5, report, time_ms


def describe(t):
    return None if t is None else {"dtype": str(t.dtype), "shape": list(t.shape), "stride": list(t.stride())}


def measure(fn, ref: torch.Tensor) -> dict:
    """Time per call of `fn` and its output's relative error against the fp32 reference."""
    out = fn()
    return {"ms_per_layer": round(time_ms(fn), 4), "rel_err_vs_fp32": float((out.float() - ref).norm() / ref.norm())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--small", action="store_true", help="CPU smoke test: a small T5")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t5 = build_t5(device, a.small, dtype=torch.bfloat16, num_layers=2)  # bf16 on CPU too: the GPU's arguments
    calls = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        calls.append({"q": q, "k": k, "v": v, "attn_mask": attn_mask, "kw": kw})
        return real(q, k, v, attn_mask=attn_mask, **kw)

    ids = torch.randint(0, 1000, (1, 512), device=device)
    F.scaled_dot_product_attention = recording
    try:
        with torch.inference_mode():
            t5(ids)
    finally:
        F.scaled_dot_product_attention = real
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                 "attn_implementation": t5.config._attn_implementation, "sdpa_calls": len(calls)}
    if not calls:
        report(res, a.out)
        return res
    c = calls[0]
    res["args"] = ({k: describe(c[k]) for k in ("q", "k", "v", "attn_mask")}
                   | {"kw": {k: str(v) for k, v in c["kw"].items()}})
    q, k, v, m = c["q"], c["k"], c["v"], c["attn_mask"]
    with torch.inference_mode():
        ref = real(q.float(), k.float(), v.float(), attn_mask=None if m is None else m.float(), **c["kw"])
        variants = {"as called (default choice)": (None, m)}
        for name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION", "MATH"):
            variants[name] = (getattr(SDPBackend, name), m)
        if m is not None:
            variants["EFFICIENT_ATTENTION, mask contiguous"] = (SDPBackend.EFFICIENT_ATTENTION, m.contiguous())
            variants["EFFICIENT_ATTENTION, mask expanded to batch x heads"] = (
                SDPBackend.EFFICIENT_ATTENTION, m.expand(q.shape[0], q.shape[1], -1, -1).contiguous())
        res["backends"] = {}
        for name, (backend, mask) in variants.items():
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    if backend is None:
                        fn = lambda: real(q, k, v, attn_mask=mask, **c["kw"])  # noqa: E731
                    else:
                        def fn(backend=backend, mask=mask):
                            with sdpa_kernel(backend):
                                return real(q, k, v, attn_mask=mask, **c["kw"])
                    res["backends"][name] = measure(fn, ref)
                except Exception as exc:
                    res["backends"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                res["backends"][name]["warnings"] = [str(x.message)[:300] for x in w][:6]
        # the math backend without its fp32 upcast (bf16 reductions), as PyTorch allows
        if device == "cuda" and hasattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp"):
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
            try:
                def fn():
                    with sdpa_kernel(SDPBackend.MATH):
                        return real(q, k, v, attn_mask=m, **c["kw"])
                res["backends"]["MATH, bf16 reductions allowed"] = measure(fn, ref)
            finally:
                torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(False)
    report(res, a.out)
    return res


if __name__ == "__main__":
    main()
