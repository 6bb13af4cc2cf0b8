"""tools/bench_lora.py runs (CPU, tiny, a reduced --small run without compile: the no-recompile switch under compile
is tested in tests/lora/test_lora_service.py) and writes what it says it measures."""
from __future__ import annotations

import json

import pytest

from optimizations.compile import Compile


@pytest.mark.slow
def test_the_lora_benchmark_runs_on_the_tiny_model_and_writes_its_figures(cache_dir, tmp_path):
    from bench_lora import main  # tools/ (pytest.ini's pythonpath)

    from kontext_server.lora import fp8_merge

    kwargs = Compile._kwargs
    out = tmp_path / "lora.json"
    assert main(["--model", "tiny", "--device", "cpu", "--small", "--ranks", "4", "--runs", "1", "--steps", "1",
                 "--switches", "2", "--optimizations", "qkv_fusion,modulation_table", "--cache-dir", str(cache_dir),
                 "--work-dir", str(tmp_path / "work"), "--profile-switches", "--out", str(out)]) == 0
    assert Compile._kwargs is kwargs  # the tool's compile backend is undone
    report = json.loads(out.read_text())
    assert report["merge_kernel"] == "default" and report["merge_way"] == fp8_merge.DEFAULT_WAY  # what "default" was
    r = report["ranks"]["4"]
    exact = r["tiers"]["exact"]
    assert exact["step_ms_without"] > 0 and exact["step_ms_with"] > 0 and "overhead_pct" in exact
    # both branches timed in the one server, each against the same steps without an adapter
    assert r["paths"] == ["fused", "unfused"] and r["default_path"] == "fused"
    assert set(exact["paths"]) == {"fused", "unfused"} and all(p["step_ms_with"] > 0 for p in exact["paths"].values())
    assert exact["step_ms_with"] == exact["paths"]["fused"]["step_ms_with"]
    assert set(exact["cold_start_ms"]) == {"without", "with_fused", "with_unfused"}
    assert r["branch"]["variants"]["exact"]["fused_modules"] > 0
    # the fp8 branch's own error, measured without an fp8 tier: A's rows in e4m3 add to the input rows' rounding
    err = r["fp8_branch_error"]
    assert err["layers"] == r["branch"]["variants"]["exact"]["fused_modules"]
    assert 0 < err["unfused_vs_update_median"] < err["fused_vs_update_median"] < 0.1
    assert err["fused_vs_output_median"] < 0.01
    switch = r["switch"]["exact"]
    assert len(switch["switch_ms"]) == 2 and all(ms >= 0 for ms in switch["switch_ms"])
    assert switch["switch_ms_median_fresh"] > 0 and switch["switch_ms_median_one_op_each"] > 0
    assert r["health_lora"]["switch_plans"]["enabled"] is True  # written afresh only for that comparison
    assert switch["dynamo_graphs_compiled_during_switches"] == 0 and switch["cold_starts_during_switches"] == 0
    # --profile-switches: only the manager's switch was profiled, each profiled request did switch, and the profile
    # holds the slots' writes (replayed: both adapters' switches were recorded by then)
    prof = switch["paths"]["fused"]["host_profile"]
    assert prof["switches"] == 2 and all(ms is not None and ms > 0 for ms in prof["switch_ms"])
    functions = {row["function"].split("(")[-1].rstrip(")") for row in prof["top_cumulative"]}
    assert {"_write", "replay", "run"} <= functions and "generate" not in functions
    assert 0 < prof["profiled_ms_per_switch"] < 10 * max(switch["switch_ms"])
    assert set(r["first_load_ms"]) == {"r4a", "r4b"} and all(v > 0 for v in r["first_load_ms"].values())
    assert r["adapter_effect_bf16"]["rel_latent_error"] > 0
    assert r["fp8"].startswith("not prepared")  # no fp8 tier on a CPU: said, not silently left out
    assert r["merged"] == "not timed: no fp8 tier"
    assert r["memory_gib"] == {"after_load": None, "end": None}  # device memory is reported on CUDA only


@pytest.mark.slow
def test_with_the_exact_merge_forced_the_benchmark_times_the_exact_tiers_merged_path(cache_dir, tmp_path, monkeypatch):
    from bench_lora import main

    monkeypatch.setenv("FLUX_LORA_EXACT_MERGE", "1")  # auto makes the copies only on a CUDA device
    out = tmp_path / "lora.json"
    assert main(["--model", "tiny", "--device", "cpu", "--small", "--ranks", "4", "--runs", "1", "--steps", "1",
                 "--switches", "2", "--lora-paths", "fused,merged", "--cache-dir", str(cache_dir),
                 "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())["ranks"]["4"]
    assert r["default_path"] == "merged" and r["paths"] == ["fused", "merged"]
    exact = r["tiers"]["exact"]
    assert set(exact["paths"]) == {"fused", "merged"} and exact["paths"]["merged"]["step_ms_with"] > 0
    switch = r["switch"]["exact"]
    assert switch["path"] == "merged" and switch["dynamo_graphs_compiled_during_switches"] == 0
    assert len(switch["restore_ms"]) == 2 and switch["merge_issue_ms_median"] >= 0
    assert r["branch"]["exact_merge"]["linears"] > 0
    assert r["exact_merged_vs_branch"]["rel_latent_error"] < 1e-3  # one rounding of W + s B A against the branch's


def test_merged_alone_on_a_server_without_the_exact_merge_stops_with_a_reason_instead_of_a_stopiteration(
        cache_dir, tmp_path, monkeypatch):
    from bench_lora import main

    monkeypatch.setenv("FLUX_LORA_EXACT_MERGE", "0")
    with pytest.raises(SystemExit, match="the exact tier has no branch to time.*add fused or unfused"):
        main(["--model", "tiny", "--device", "cpu", "--small", "--ranks", "4", "--runs", "1", "--steps", "1",
              "--lora-paths", "merged", "--cache-dir", str(cache_dir), "--work-dir", str(tmp_path / "work"),
              "--out", str(tmp_path / "lora.json")])


def test_the_merge_kernel_taken_from_a_merge_benchmark_is_its_fastest_exact_way_at_the_lowest_rank(tmp_path):
    from bench_lora import fastest_merge_kernel

    from kontext_server.lora.fp8_merge import kernel_from_spec

    def way(ms, exact=True, off=1e-4):
        return {"switch_ms_median": ms, "restore_bit_identical": exact, "merged_fp8_values_differing_from_torch": off}

    bench = tmp_path / "merge.json"
    bench.write_text(json.dumps({"ranks": {
        "128": {"configs": {"gemm": way(90.0), "64x64x4": way(50.0)}},
        "32": {"configs": {"gemm": way(30.0), "64x64x4": way(40.0), "32x128x4": way(20.0, exact=False),
                           "128x64x8": way(10.0, off=0.2), "16x16x1": {"error": "OutOfResources"}}}}}))
    assert fastest_merge_kernel(str(bench)) == "gemm"
    assert kernel_from_spec("gemm") == {"gemm_first": True, "config": None, "update_rows": False}
    assert kernel_from_spec("gemm-u") == {"gemm_first": True, "config": None, "update_rows": True}
    assert kernel_from_spec("64x32x8")["config"] == {"BM": 64, "BK": 32, "num_warps": 8}
    with pytest.raises(ValueError, match="BMxBKxWARPS"):
        kernel_from_spec("fast")
