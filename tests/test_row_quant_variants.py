"""tools/bench_row_quant.py's candidate layouts compute what the kernels in use compute (Triton's CPU interpreter,
set up by conftest), and tools/probe_fp8_gemm_step.py's GEMM list is the step's: the GPU figures in BENCHMARKS.md
compare like with like only if both hold."""
import torch

import bench_row_quant as rq
import probe_fp8_gemm_step as probe
from optimizations import fp8_norm_quant
from optimizations.fp8_gelu_quant import _gelu_quant_rows_kernel


def _bits(q):
    return q.view(torch.uint8)


def test_gelu_layouts_match_the_kernel_in_use_bit_for_bit():
    torch.manual_seed(0)
    m, k = 3, rq.GELU_K
    x = torch.randn(m, k, dtype=torch.bfloat16) * 3
    x[1] = 0  # an all-zero row: the scale floor
    outs = {}
    for name, launch in {
        "in use": lambda q, s: _gelu_quant_rows_kernel()[(m,)](x, q, s, k, k, k, BLOCK=16384),
        "chunks": lambda q, s: rq.gelu_quant_chunks[(m,)](x, q, s, k, k, CHUNK=4096, CHUNKS=3),
        "two passes": lambda q, s: rq.gelu_quant_two_pass[(m,)](x, q, s, k, k, k, BLOCK=2048),
    }.items():
        q, s = torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.empty(m, 1)
        launch(q, s)
        outs[name] = (q, s)
    ref_q, ref_s = outs["in use"]
    for name in ("chunks", "two passes"):
        assert torch.equal(_bits(outs[name][0]), _bits(ref_q)), name
        assert torch.equal(outs[name][1], ref_s), name


def test_norm_chunks_match_the_kernel_in_use():
    torch.manual_seed(0)
    m, k = 4, rq.NORM_K
    x = torch.randn(1, m, k, dtype=torch.bfloat16)
    mod = torch.randn(1, 6 * k, dtype=torch.bfloat16) * 0.1
    q_ref, s_ref, _ = fp8_norm_quant.launch_norm_modulate_quant(
        fp8_norm_quant._kernels().norm_modulate_quant_kernel, x, None, None, mod, 0, 1, -1, 1e-6)
    q, s = torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.empty(m, 1)
    rq.norm_quant_chunks[(m,)](x, mod, q, s, k, 0, k, 1e-6, CHUNK=1024)
    # fp32 sums in another order: at most a rare one-step difference
    assert (_bits(q) != _bits(q_ref.reshape(m, k))).float().mean() < 1e-3
    torch.testing.assert_close(s.reshape(m), s_ref.reshape(m), rtol=1e-6, atol=0)


def test_probe_runs_the_steps_266_gemms():
    """19 double blocks x 2 streams x 4 linears + 38 single blocks x 3 (the fused input projection and proj_out's
    two halves): the count of _scaled_mm calls per step in the model's profile."""
    for image in probe.IMAGE.values():
        gemms = probe.step_gemms(image)
        assert sum(c for *_, c in gemms) == 266
        assert (image + probe.TEXT, probe.D, 3 * probe.D + probe.MLP, probe.SINGLE) in gemms
