"""The GPU's clocks, power and clock-event (throttle) reasons while work runs, sampled by `nvidia-smi` in loop mode.

Why: an H100 at its power cap lowers its SM clock under sustained work (benchmarks/2026-11-23-h100-power), so the
same kernels take longer in a long run than in a short profile. A step time means little without the clocks it ran
at; the stage benchmark and bench/probe_sustained_step.py report them.

`ClockSampler(...).start()` runs nvidia-smi in a child process and stamps each line with the host's monotonic clock;
`window(t0, t1)` summarises the samples between two `time.monotonic()` readings. Without a CUDA device or
nvidia-smi it samples nothing and every window says why.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time

import torch

from kontext_server import settings

# nvidia-smi field sets, newest names first: drivers before 535 call the reasons clocks_throttle_reasons.*
FIELD_SETS = [
    ["clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "enforced.power.limit",
     "clocks_event_reasons.sw_power_cap", "clocks_event_reasons.hw_slowdown",
     "clocks_event_reasons.sw_thermal_slowdown", "clocks_event_reasons.hw_power_brake_slowdown"],
    ["clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "enforced.power.limit",
     "clocks_throttle_reasons.sw_power_cap", "clocks_throttle_reasons.hw_slowdown",
     "clocks_throttle_reasons.sw_thermal_slowdown", "clocks_throttle_reasons.hw_power_brake_slowdown"],
    ["clocks.sm", "clocks.mem", "power.draw", "temperature.gpu"],
]
SHORT = {"clocks.sm": "sm_mhz", "clocks.mem": "mem_mhz", "power.draw": "power_w", "temperature.gpu": "temp_c",
         "enforced.power.limit": "power_limit_w"}


def short_name(field: str) -> str:
    """clocks_event_reasons.sw_power_cap -> sw_power_cap; the numeric fields get names with their unit."""
    return SHORT.get(field, field.rsplit(".", 1)[-1])


def parse_sample(line: str, fields: list[str]) -> dict | None:
    """One csv,noheader,nounits line: numbers as floats, reasons as booleans ("Active" / "Not Active"); None if the
    line does not have one value per field."""
    values = [v.strip() for v in line.split(",")]
    if len(values) != len(fields):
        return None
    out = {}
    for field, v in zip(fields, values):
        name = short_name(field)
        if "reasons" in field:
            out[name] = v.lower() == "active"
        else:
            try:
                out[name] = float(v)
            except ValueError:
                out[name] = None  # "[N/A]" and the like
    return out


def nvidia_smi_id(device_index: int, visible: str | None) -> str:
    """nvidia-smi's id for CUDA device `device_index` of this process. nvidia-smi ignores CUDA_VISIBLE_DEVICES and
    numbers every GPU of the machine, so a process that sees only GPU 3 as cuda:0 must ask for 3 (or its UUID)."""
    if not visible:
        return str(device_index)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    return entries[device_index] if device_index < len(entries) else str(device_index)


class ClockSampler:
    """nvidia-smi in loop mode in a child process; each line is stamped with the host's monotonic clock on arrival.
    Never raises: where sampling cannot start, `unavailable` says why and every window reports that."""

    def __init__(self, sample_ms: int = 50, device_index: int | None = None):
        self.sample_ms, self.device_index = sample_ms, device_index
        self.samples: list[tuple[float, dict]] = []
        self.fields: list[str] | None = None
        self.unavailable: str | None = None
        self._proc = self._thread = None

    def _query(self, fields: list[str], gpu: str) -> list[str]:
        return ["nvidia-smi", "-i", gpu, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]

    def _pick_fields(self, gpu: str) -> list[str] | None:
        for fields in FIELD_SETS:
            r = subprocess.run(self._query(fields, gpu), capture_output=True, text=True, timeout=30)
            lines = r.stdout.strip().splitlines()
            if r.returncode == 0 and lines and parse_sample(lines[0], fields) is not None:
                return fields
        return None

    def start(self) -> "ClockSampler":
        if not torch.cuda.is_available():
            self.unavailable = "no CUDA device"
            return self
        if shutil.which("nvidia-smi") is None:
            self.unavailable = "nvidia-smi not found"
            return self
        index = torch.cuda.current_device() if self.device_index is None else self.device_index
        gpu = nvidia_smi_id(index, settings.CUDA_VISIBLE_DEVICES.get())
        try:
            fields = self._pick_fields(gpu)
            if fields is None:
                self.unavailable = f"nvidia-smi -i {gpu} accepted none of the field sets"
                return self
            self._proc = subprocess.Popen(self._query(fields, gpu) + ["-lms", str(self.sample_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except (OSError, subprocess.SubprocessError) as e:  # a broken nvidia-smi must not stop a benchmark
            self.unavailable = f"nvidia-smi failed: {e}"
            return self
        self.fields = fields
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            sample = parse_sample(line, self.fields)
            if sample is not None:
                self.samples.append((time.monotonic(), sample))

    def stop(self):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._thread.join(timeout=10)

    def window(self, t0: float, t1: float) -> dict:
        """Summary of the samples stamped in [t0, t1]: median / min / max of each number, the share of samples in
        which each clock-event reason was active."""
        if self.unavailable:
            return {"unavailable": self.unavailable}
        return summarise_samples([s for t, s in self.samples if t0 <= t <= t1])


def summarise_samples(samples: list[dict]) -> dict:
    out: dict = {"samples": len(samples)}
    if not samples:
        return out
    for key in samples[0]:
        values = [s[key] for s in samples if s.get(key) is not None]
        if not values:
            continue
        if isinstance(values[0], bool):
            out[f"{key}_share"] = round(sum(values) / len(values), 3)
        else:
            out[key] = {"median": round(statistics.median(values), 1), "min": min(values), "max": max(values)}
    return out
