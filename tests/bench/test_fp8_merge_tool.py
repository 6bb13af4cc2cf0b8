"""bench/bench_fp8_merge.py runs (CPU, Triton's interpreter, small shapes): the real merge over FLUX's kinds of block
linear (fused q/k/v, a single block's fused q/k/v + MLP input with four parts, a split proj_out's column halves)
merges what torch's fp32 addmm gives and restores the copy bit for bit, for each way of adding the updates it is asked
to compare."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bench_fp8_merge as tool  # bench/ (pytest.ini's pythonpath)

ROOT = Path(__file__).resolve().parents[2]


def test_every_kind_of_block_linear_is_a_target_with_its_parts_rows():
    linears = tool.block_linears(32, 64, 1, 1)
    parts = {name.split(".", 2)[-1]: [size for _, size in p] for name, _, _, p, _ in linears}
    assert parts["attn.to_qkv"] == [32, 32, 32] and parts["qkv_mlp"] == [32, 32, 32, 64]
    assert all(n == sum(size for _, size in p) for _, n, _, p, _ in linears)
    halves = [(k, cols) for name, _, k, _, cols in linears if cols is not None]
    assert halves == [(32, slice(0, 32)), (64, slice(32, 96))]


def test_the_bench_merges_as_torch_does_and_restores_bit_for_bit_each_way(tmp_path):
    out = tmp_path / "merge.json"
    # One rank that is not a power of two (the kernel pads it) and one tile: tests/optimizations/test_fp8_weight_quant
    # covers the kernels' other tiles and roundings; this is the tool's own path over FLUX's kinds of linear (the tile
    # without the kernels' 16-byte accesses, as the tool compares them).
    assert tool.main(["--small", "--ranks", "20", "--configs", "gemm,32x32x4-scalar", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["linears"] == 11  # 8 of a double block, 3 of a single one
    from kontext_server.lora.fp8_merge import DEFAULT_WAY

    assert result["default_way"] == DEFAULT_WAY  # what the server runs when no way is forced
    assert set(result["ranks"]["20"]["configs"]) == {"gemm", "32x32x4-scalar"}
    for rank in ("20",):
        for tile, c in result["ranks"][rank]["configs"].items():
            assert "error" not in c, (rank, tile, c)
            assert c["restore_bit_identical"] is True
            assert c["merged_fp8_values_differing_from_torch"] < 1e-3, (rank, tile, c)


def test_the_host_mode_times_a_switch_built_and_replayed_and_the_replay_is_cheaper():
    """--host: the host's part of a switch over FLUX's block linears (small widths, no kernel run; here four blocks'
    worth), with each switch's launches built against replayed from the merge's recorded plans."""
    host = tool.host_time(4, double=2, single=2)
    assert set(host) == {"built", "replayed"}
    assert 0 < host["replayed"] < host["built"], host


def test_run_on_its_own_the_tools_cpu_mode_computes_the_tiled_kernel_as_the_gpu_does(tmp_path):
    """Outside the tests' process (whose conftest patches Triton's interpreter), --small makes the interpreter multiply
    bf16 values, not their bit patterns: the tiled kernel's merge is then torch's, as on the GPU."""
    out = tmp_path / "merge.json"
    subprocess.run([sys.executable, "bench/bench_fp8_merge.py", "--small", "--ranks", "8", "--configs", "32x32x4",
                    "--out", str(out)], cwd=ROOT, env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin",
                                                        "PYTHONPATH": str(ROOT)}, check=True, timeout=600,
                   capture_output=True)
    c = json.loads(out.read_text())["ranks"]["8"]["configs"]["32x32x4"]
    assert c["merged_fp8_values_differing_from_torch"] < 1e-3, c


def test_the_profile_of_a_way_lists_where_its_replayed_switches_spend_their_time(tmp_path):
    """--profile CONFIG: two replayed switches of that way under torch's profiler (on a CPU its ops' own time; on a GPU
    each kernel's), the largest first."""
    out = tmp_path / "merge.json"
    assert tool.main(["--small", "--ranks", "4", "--configs", "gemm", "--profile", "gemm", "--out", str(out)]) == 0
    prof = json.loads(out.read_text())["ranks"]["4"]["profile"]["gemm"]
    assert prof["time"] == "self_cpu_time_total" and prof["per_switch_ms"] > 0
    times = [row["ms_per_switch"] for row in prof["top"]]
    assert times == sorted(times, reverse=True) and len(times) > 1
    assert all(row["calls_per_switch"] > 0 for row in prof["top"])


def test_on_a_gpu_the_profile_counts_each_kernels_time_once_not_again_under_the_op_that_launched_it():
    """torch's profiler gives aten::addmm (a CPU op) the device time of the GEMM it launched, which is also listed as
    the kernel: summing both counted the GEMMs twice."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    events = [SimpleNamespace(key="aten::addmm", self_device_time_total=7.5, device_type=DeviceType.CPU),
              SimpleNamespace(key="nvjet_sm90", self_device_time_total=7.4, device_type=DeviceType.CUDA),
              SimpleNamespace(key="cuLaunchKernelEx", self_device_time_total=0.1, device_type=DeviceType.CPU),
              SimpleNamespace(key="Memset (Device)", self_device_time_total=0.2, device_type=DeviceType.CUDA),
              SimpleNamespace(key="idle", self_device_time_total=0.0, device_type=DeviceType.CUDA)]
    assert [e.key for e in tool.timed_events(events, "self_device_time_total")] == ["nvjet_sm90", "Memset (Device)"]
    assert len(tool.timed_events(events, "self_cpu_time_total")) == 0  # no CPU time on these: none kept
