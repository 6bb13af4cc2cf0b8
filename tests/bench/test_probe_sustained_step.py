"""bench/probe_sustained_step.py: the phases run end to end (CPU, tiny) and nvidia-smi's lines are read right."""
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

from kontext_server.benchmark import gpu_clocks  # noqa: E402
import probe_sustained_step as pss  # noqa: E402


def test_sustained_and_gapped_phases_time_every_call(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    out = tmp_path / "sustained.json"
    rc = pss.main(["--model", "tiny", "--device", "cpu", "--workload", "t2i-1024", "--width", "256", "--height",
                   "256", "--optimizations", "qkv_fusion", "--calls", "6", "--gapped-calls", "2", "--gap-ms", "10",
                   "--idle-s", "0.05", "--inductor-flags", "none", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["applied"] == ["qkv_fusion"] and report["seq_len"] == 256 + 512
    assert report["inductor_flags"] == "none" and report["load_and_first_request_s"] > 0
    sustained, gapped = report["phases"]["sustained"], report["phases"]["gapped"]
    assert sustained["calls"] == 6 and len(sustained["per_call_ms"]) == 6
    assert gapped["calls"] == 2 and gapped["gap_ms"] == 10
    assert all(ms > 0 for ms in sustained["per_call_ms"] + gapped["per_call_ms"])
    assert sustained["min_ms"] <= sustained["median_ms"] <= sustained["max_ms"]
    # no GPU here: the clocks say why they are missing instead of reporting nothing
    assert report["phases"]["idle"]["clocks"] == {"unavailable": "no CUDA device"}


def test_nvidia_smi_lines_parse_into_numbers_and_reasons():
    fields = gpu_clocks.FIELD_SETS[0]
    line = "1755, 2619, 698.51, 61, 700.00, Active, Not Active, Not Active, Not Active"
    s = gpu_clocks.parse_sample(line, fields)
    assert s == {"sm_mhz": 1755.0, "mem_mhz": 2619.0, "power_w": 698.51, "temp_c": 61.0, "power_limit_w": 700.0,
                 "sw_power_cap": True, "hw_slowdown": False, "sw_thermal_slowdown": False,
                 "hw_power_brake_slowdown": False}
    assert gpu_clocks.parse_sample("1755, 2619", fields) is None  # a torn line is dropped, not misread
    assert gpu_clocks.parse_sample("[N/A], 2619, 1, 2, 3, Active, Active, Active, Active", fields)["sm_mhz"] is None


def test_samples_summarise_per_window():
    sampler = gpu_clocks.ClockSampler()
    sampler.samples = [(1.0, {"sm_mhz": 1980.0, "sw_power_cap": False}),
                       (2.0, {"sm_mhz": 1700.0, "sw_power_cap": True}),
                       (3.0, {"sm_mhz": 1600.0, "sw_power_cap": True}),
                       (9.0, {"sm_mhz": 1980.0, "sw_power_cap": False})]
    w = sampler.window(1.5, 3.5)
    assert w == {"samples": 2, "sm_mhz": {"median": 1650.0, "min": 1600.0, "max": 1700.0}, "sw_power_cap_share": 1.0}
    assert sampler.window(4, 5) == {"samples": 0}


def test_the_stage_benchmark_reports_the_clocks_of_its_timed_runs_only(tiny_service):
    """time_request asks the sampler for the window of its timed runs (not the warm-up), and the table shows it."""
    from kontext_server.benchmark import report, timing
    from kontext_server.request import InferenceRequest

    class Sampler:
        def window(self, t0, t1):
            self.span = (t0, t1)
            return {"samples": 3, "sm_mhz": {"median": 1605.0, "min": 1455.0, "max": 1980.0},
                    "power_w": {"median": 690.4, "min": 500.0, "max": 699.0}}

    sampler = Sampler()
    before = time.monotonic()
    row = timing.time_request(tiny_service, InferenceRequest(prompt="p", width=256, height=256, steps=2), None,
                                 runs=2, sampler=sampler)
    t0, t1 = sampler.span
    assert before < t0 < t1 <= time.monotonic()
    # the window opens after the warm-up: it is shorter than the whole call by at least the warm-up run
    assert (t1 - t0) * 1000 < (time.monotonic() - before) * 1000 - row["first_run_ms"] * 0.5
    assert row["gpu_clocks"]["sm_mhz"]["median"] == 1605.0
    assert report.clocks_cell(row["gpu_clocks"]) == "1605, 690"
    assert report.clocks_cell(None) == "-" and report.clocks_cell({"unavailable": "no CUDA device"}) == "-"
    row.pop("_result")
    result = {"rows": [dict(row, stage="0", label="x", speedup_vs_stage0=1.0)], "device": "cpu", "model": "tiny"}
    assert "| SM MHz, W |" in report.to_markdown(result) and "| 1605, 690 |" in report.to_markdown(result)


def test_the_sampler_asks_nvidia_smi_for_the_gpu_this_process_uses():
    """nvidia-smi numbers all GPUs of the machine; CUDA_VISIBLE_DEVICES renumbers them for the process."""
    assert gpu_clocks.nvidia_smi_id(0, None) == "0"
    assert gpu_clocks.nvidia_smi_id(0, "3") == "3"
    assert gpu_clocks.nvidia_smi_id(1, "2, 5") == "5"
    assert gpu_clocks.nvidia_smi_id(0, "GPU-8a1b2c3d") == "GPU-8a1b2c3d"


def test_a_broken_nvidia_smi_does_not_stop_the_benchmark(monkeypatch):
    monkeypatch.setattr(gpu_clocks.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_clocks.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gpu_clocks.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def broken(*args, **kwargs):
        raise OSError("exec format error")

    monkeypatch.setattr(gpu_clocks.subprocess, "run", broken)
    sampler = gpu_clocks.ClockSampler().start()
    assert sampler.unavailable == "nvidia-smi failed: exec format error"
    assert sampler.window(0, 1) == {"unavailable": "nvidia-smi failed: exec format error"}
    sampler.stop()  # nothing started: a no-op


def test_the_request_benchmark_samples_clocks_and_stops_its_sampler(tiny_service, monkeypatch):
    """GET /benchmark's rows carry the clocks of their timed runs, and the sampler's child process is stopped."""
    from kontext_server.benchmark import requests, timing

    class Sampler:
        stopped = False

        def window(self, t0, t1):
            return {"samples": 1, "sm_mhz": {"median": 1980.0, "min": 1980.0, "max": 1980.0}}

        def stop(self):
            self.stopped = True

    sampler = Sampler()
    monkeypatch.setattr(timing, "clock_sampler", lambda service: sampler)
    result = requests.run_request_benchmark(tiny_service, runs=1, steps=2, width=256, height=256)
    assert [r["gpu_clocks"]["sm_mhz"]["median"] for r in result["rows"]] == [1980.0] * 3
    assert sampler.stopped
    monkeypatch.undo()
    assert timing.clock_sampler(tiny_service) is None  # CPU: nothing to sample
