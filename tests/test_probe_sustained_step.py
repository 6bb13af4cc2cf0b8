"""tools/probe_sustained_step.py: the phases run end to end (CPU, tiny) and nvidia-smi's lines are read right."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import probe_sustained_step as pss  # noqa: E402


def test_sustained_and_gapped_phases_time_every_call(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("FLUX_CACHE_DIR", str(cache_dir))
    out = tmp_path / "sustained.json"
    rc = pss.main(["--model", "tiny", "--device", "cpu", "--workload", "t2i-1024", "--width", "256", "--height",
                   "256", "--optimizations", "qkv_fusion", "--calls", "6", "--gapped-calls", "2", "--gap-ms", "10",
                   "--idle-s", "0.05", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["applied"] == ["qkv_fusion"] and report["seq_len"] == 256 + 512
    sustained, gapped = report["phases"]["sustained"], report["phases"]["gapped"]
    assert sustained["calls"] == 6 and len(sustained["per_call_ms"]) == 6
    assert gapped["calls"] == 2 and gapped["gap_ms"] == 10
    assert all(ms > 0 for ms in sustained["per_call_ms"] + gapped["per_call_ms"])
    assert sustained["min_ms"] <= sustained["median_ms"] <= sustained["max_ms"]
    # no GPU here: the clocks say why they are missing instead of reporting nothing
    assert report["phases"]["idle"]["clocks"] == {"unavailable": "no CUDA device"}


def test_nvidia_smi_lines_parse_into_numbers_and_reasons():
    fields = pss.FIELD_SETS[0]
    line = "1755, 2619, 698.51, 61, 700.00, Active, Not Active, Not Active, Not Active"
    s = pss.parse_sample(line, fields)
    assert s == {"sm_mhz": 1755.0, "mem_mhz": 2619.0, "power_w": 698.51, "temp_c": 61.0, "power_limit_w": 700.0,
                 "sw_power_cap": True, "hw_slowdown": False, "sw_thermal_slowdown": False,
                 "hw_power_brake_slowdown": False}
    assert pss.parse_sample("1755, 2619", fields) is None  # a torn line is dropped, not misread
    assert pss.parse_sample("[N/A], 2619, 1, 2, 3, Active, Active, Active, Active", fields)["sm_mhz"] is None


def test_samples_summarise_per_window():
    sampler = pss.ClockSampler()
    sampler.samples = [(1.0, {"sm_mhz": 1980.0, "sw_power_cap": False}), (2.0, {"sm_mhz": 1700.0, "sw_power_cap": True}),
                       (3.0, {"sm_mhz": 1600.0, "sw_power_cap": True}), (9.0, {"sm_mhz": 1980.0, "sw_power_cap": False})]
    w = sampler.window(1.5, 3.5)
    assert w == {"samples": 2, "sm_mhz": {"median": 1650.0, "min": 1600.0, "max": 1700.0}, "sw_power_cap_share": 1.0}
    assert sampler.window(4, 5) == {"samples": 0}
