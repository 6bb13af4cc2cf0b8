"""The host memory a load takes: the process's resident-set high-water mark over the load.

What: `measure()` is a context manager around a load; its `result` says the resident set before and after and the
peak during the load, in bytes, and how the peak was measured. /health reports it (a 24 GB transformer should not
need 48 GB of host RAM to load).
How: Linux keeps a high-water mark of the resident set (VmHWM in /proc/self/status). Writing "5" to
/proc/self/clear_refs resets it to the current resident set (Linux 4.0+), so the mark read after the load is the
load's own peak. Where that reset is not allowed, the peak is `resource.getrusage`'s ru_maxrss, the high-water mark
since the process started: a peak from before the load then hides the load's (the result says which method ran).
Limits: Linux only for the precise peak; the resident set counts every thread of the process, so work running
beside the load (none at start-up) would count too; GPU memory is not host memory and is not counted.
"""
from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux


def _reset_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class _Measurement:
    def __init__(self):
        self.result: dict = {}


@contextlib.contextmanager
def measure():
    """Measure the host resident set over the block: `with measure() as m: ...`, then `m.result`."""
    m = _Measurement()
    before = rss_bytes()
    reset = before is not None and _reset_peak()
    maxrss_before = _maxrss_bytes()
    try:
        yield m
    finally:
        after = rss_bytes()
        if reset:
            peak, method = _status_bytes("VmHWM"), "VmHWM over the load (reset through /proc/self/clear_refs)"
        else:
            peak = _maxrss_bytes()
            method = ("ru_maxrss: the process's peak since it started"
                      + (" (at least as high before the load: the load's own peak is hidden)"
                         if peak <= maxrss_before else ""))
        m.result = {"peak_rss_bytes": peak, "rss_before_bytes": before, "rss_after_bytes": after,
                    "peak_rss_increase_bytes": (peak - before) if peak is not None and before is not None else None,
                    "method": method}


def rss_bytes() -> int | None:
    """The process's resident set now (VmRSS; None where /proc is not there)."""
    return _status_bytes("VmRSS")


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def summary(result: dict) -> dict:
    """The result in GiB, as /health shows it."""
    return {"peak_rss_gib": gib(result.get("peak_rss_bytes")), "rss_before_gib": gib(result.get("rss_before_bytes")),
            "rss_after_gib": gib(result.get("rss_after_bytes")),
            "peak_rss_increase_gib": gib(result.get("peak_rss_increase_bytes")), "method": result.get("method")}
