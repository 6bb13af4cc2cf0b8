"""tools/profile_step.py: the per-step profile summary runs end to end (CPU, tiny) and accounts for the step."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_profile_step_summarises_a_real_step(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    import profile_step

    rc = profile_step.main(["--model", "tiny", "--device", "cpu", "--workload", "edit-512", "--width", "256",
                            "--height", "256", "--optimizations", "qkv_fusion,first_block_cache", "--calls", "2",
                            "--flags", "--flags", "use_first_block_cache=true", "--out-dir", str(tmp_path)])
    assert rc == 0
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("profile-*.json") if ".trace" not in p.name]
    assert sorted(s["applied"] for s in summaries) == [["qkv_fusion"], ["qkv_fusion", "first_block_cache"]]
    summary = next(s for s in summaries if s["applied"] == ["qkv_fusion"])
    assert summary["applied"] == ["qkv_fusion"] and summary["seq_len"] == 2 * 256 + 512
    assert summary["ms_per_step"] > 0 and summary["by_category_ms"]["attention"] > 0
    assert abs(sum(summary["by_category_ms"].values()) - summary["ms_per_step"]) < 1e-6
    assert any(p.name.endswith(".trace.json") for p in tmp_path.iterdir())
    assert profile_step.category("sm90_xmma_gemm_bf16") == "gemm"
    assert profile_step.category("cudnn_generated_fort_native_sdpa_sm90") == "attention"
    assert profile_step.category("triton_poi_fused_mul_0") == "norm / elementwise (triton)"
    # names seen in the 2026-11-22 H200 profiles
    assert profile_step.category("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_ovscale_bias_TNT") == "gemm (fp8)"
    assert profile_step.category("nvjet_sm90_tst_256x128_64x4_2x4_h_bz_coopA_bias_TNT") == "gemm"
    assert profile_step.category("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_gelu_t_unsqueeze_view_17") \
        == "activation quantisation (fused)"
    assert profile_step.category("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_add") \
        == "norm / elementwise (triton)"


def test_launchers_finds_the_innermost_cpu_op_of_each_device_event(tmp_path):
    """Device events are tied to their runtime call by correlation id, and the call to the innermost CPU op around
    it on its thread."""
    import json

    import profile_step

    cpu = lambda name, ts, dur: {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur,  # noqa: E731
                                 "pid": 1, "tid": 2}
    rt = lambda ts, c: {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1,  # noqa: E731
                        "pid": 1, "tid": 2, "args": {"correlation": c}}
    dev = lambda name, c, cat="kernel": {"ph": "X", "cat": cat, "name": name, "ts": 100 + c, "dur": 1,  # noqa: E731
                                        "pid": 0, "tid": 7, "args": {"correlation": c}}
    events = [cpu("graph", 0, 100), cpu("aten::_scaled_mm", 10, 20), cpu("aten::_scaled_mm", 40, 20),
              rt(12, 1), rt(15, 2), rt(42, 3), rt(45, 4), rt(70, 5),
              dev("gemm", 1), dev("Memset (Device)", 2, "gpu_memset"), dev("gemm", 3),
              dev("Memset (Device)", 4, "gpu_memset"), dev("triton_poi", 5)]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = profile_step.launchers(path, ["gemm", "Memset (Device)", "triton_poi"])
    assert got == {"gemm": {"aten::_scaled_mm": 2}, "Memset (Device)": {"aten::_scaled_mm": 2},
                   "triton_poi": {"graph": 1}}


def test_profile_request_attributes_gpu_idle_time_to_the_innermost_phase():
    """A hand-made trace: idle time goes to the innermost open range, busy time is the union of device events."""
    import profile_request

    def x(name, cat, ts, dur):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        x("request", "user_annotation", 0, 1000),
        x("pipe:encode_prompt", "user_annotation", 50, 300),
        x("stage:text_encode", "user_annotation", 100, 200),
        x("gemm", "kernel", 120, 160), x("copy", "gpu_memcpy", 200, 50),  # overlapping: counted once
        x("gemm", "kernel", 400, 500),
        x("cudaStreamSynchronize", "cuda_runtime", 920, 60),
        x("cudaLaunchKernel", "cuda_runtime", 100, 5),  # a launch, not a wait
    ]}
    (s,) = profile_request.analyse(trace)
    assert (s["wall_ms"], s["gpu_busy_ms"], s["gpu_idle_ms"]) == (1.0, 0.66, 0.34)
    p = s["phases"]
    assert p["stage:text_encode"] == {"calls": 1, "wall_ms": 0.2, "own_ms": 0.2, "gpu_busy_ms": 0.16,
                                      "gpu_idle_ms": 0.04}
    assert p["pipe:encode_prompt"] == {"calls": 1, "wall_ms": 0.3, "own_ms": 0.1, "gpu_busy_ms": 0.0,
                                       "gpu_idle_ms": 0.1}
    assert p[profile_request.UNMARKED]["own_ms"] == 0.7 and p[profile_request.UNMARKED]["gpu_idle_ms"] == 0.2
    assert s["host_waits"] == {f"cudaStreamSynchronize in {profile_request.UNMARKED}": {"calls": 1, "ms": 0.06}}


def test_profile_request_runs_a_real_request_on_cpu(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    import profile_request

    rc = profile_request.main(["--model", "tiny", "--device", "cpu", "--workload", "edit-512", "--width", "256",
                               "--height", "256", "--optimizations", "dpm_solver", "--flags", "use_dpm_solver=true",
                               "--steps", "3", "--requests", "1", "--out-dir", str(tmp_path)])
    assert rc == 0
    (s,) = json.loads((tmp_path / "request-edit-512-256x256.json").read_text())["requests"]
    p = s["phases"]
    assert p["stage:transformer"]["calls"] == 3 and p["scheduler:step"]["calls"] == 3
    assert p["scheduler:set_timesteps"]["calls"] == 1 and p["stage:image_encode"]["calls"] == 1
    assert p["stage:text_encode"]["calls"] == 2  # CLIP and T5
    assert abs(sum(v["own_ms"] for v in p.values()) - s["wall_ms"]) < 0.01  # every microsecond has one owner
    assert s["gpu_busy_ms"] is None  # no device timeline on CPU
    report = json.loads((tmp_path / "request-edit-512-256x256.json").read_text())
    (unprofiled,) = report["unprofiled_service_timings_ms"]
    assert unprofiled["total"] > 0 and unprofiled["transformer"] > 0


def test_bench_text_encoder_runs_on_a_small_t5_on_cpu(tmp_path):
    """The T5 bench is meant for scarce GPU time: its whole path (timing, profile, attention implementations) runs
    here first on a 2-layer T5."""
    import bench_text_encoder

    res = bench_text_encoder.main(["--small", "--out", str(tmp_path / "t5.json")])
    assert res["eager_ms"] > 0 and res["eager_profile"]["device_ms"] > 0
    assert set(res["by_attn_implementation_ms"]) == {"eager", "sdpa"}
    for entry in res["by_attn_implementation_ms"].values():  # a time and the difference, or why it could not run
        assert isinstance(entry, str) or (entry["ms"] > 0 and entry["rel_diff_vs_built"] < 1e-5)
    assert json.loads((tmp_path / "t5.json").read_text())["tokens"] == 512
    assert res["t5_contiguous_position_bias"] == 1  # measured as the service loads it
    gemms = res["gemm_tflops"]
    assert gemms["qkv fused"]["m_k_n"] == [512, 64, 192] and gemms["wo (k=d_ff)"]["m_k_n"] == [512, 128, 64]
    assert all(g["ms"] > 0 and g["tflops"] > 0 for g in gemms.values())


def test_bench_gelu_epilogue_runs_on_cpu():
    """Smoke test of the GPU experiment's script. On CPU, _addmm_activation applies the exact GELU, not the tanh one:
    the two differ by ~1e-4 here, which is what the error column must show (on CUDA the epilogue is the tanh GELU)."""
    import bench_gelu_epilogue

    (row,) = bench_gelu_epilogue.main(["--small", "--no-compile"])
    assert row["m_k_n"] == [64, 32, 128] and row["inductor_us"] > 0 and row["epilogue_us"] > 0
    assert row["inductor_rel_err"] < 1e-6 < row["epilogue_rel_err"] < 1e-2


def test_probe_t5_attention_runs_on_cpu(tmp_path):
    """Smoke test of the GPU probe: it records what T5 hands SDPA (two layers: two calls, the bias as the mask) and
    times each backend; on CPU the GPU-only kernels may refuse, and then the entry says why instead of a time."""
    import probe_t5_attention

    res = probe_t5_attention.main(["--small", "--out", str(tmp_path / "probe.json")])
    assert res["sdpa_calls"] == 2 and res["args"]["attn_mask"]["shape"] == [1, 4, 512, 512]
    assert res["args"]["q"]["dtype"] == "torch.bfloat16"
    default = res["backends"]["as called (default choice)"]
    assert default["ms_per_layer"] > 0 and default["rel_err_vs_fp32"] < 0.02
    assert all("ms_per_layer" in v or "error" in v for v in res["backends"].values())
    assert json.loads((tmp_path / "probe.json").read_text())["sdpa_calls"] == 2
