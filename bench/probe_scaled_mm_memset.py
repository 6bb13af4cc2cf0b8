"""Does torch._scaled_mm (row-wise fp8, bf16 out) launch a memset per call, and does its bias epilogue cost time?

Profiles 10 calls at a FLUX shape (2,560 x 3,072 x 9,216: edit-512's fused QKV projection) with and without bias,
listing the device events, then times 100 calls captured in one CUDA graph. Usage (GPU):
python bench/probe_scaled_mm_memset.py
"""
import torch
from torch.profiler import ProfilerActivity, profile

M, K, N = 2560, 3072, 9216


def main() -> None:
    a = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn).t()
    sa = torch.rand(M, 1, device="cuda") + 0.5
    sb = torch.rand(1, N, device="cuda") + 0.5
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    for name, b in (("bias", bias), ("no bias", None)):
        def f(b=b):
            return torch._scaled_mm(a, w, scale_a=sa, scale_b=sb, bias=b, out_dtype=torch.bfloat16,
                                    use_fast_accum=True)
        for _ in range(3):
            f()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(10):
                f()
            torch.cuda.synchronize()
        events = [(e.key, e.count) for e in p.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            f()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g):
            for _ in range(100):
                f()
        g.replay()
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(5):
            g.replay()
        t1.record()
        torch.cuda.synchronize()
        print(name, events, "graph us per gemm", t0.elapsed_time(t1) * 1000 / 500)


if __name__ == "__main__":
    main()
