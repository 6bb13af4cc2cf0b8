"""kontext_server/models/host_memory.py: the peak host memory of a block, not of the process's whole life."""
from __future__ import annotations

import torch

from kontext_server.models import host_memory

MB = 2**20


def test_the_peak_of_a_load_is_its_own_even_after_a_larger_earlier_peak():
    big = torch.ones(384 * MB // 4)  # an earlier, larger peak of the process (written: resident)
    del big
    with host_memory.measure() as m:
        block = torch.ones(128 * MB // 4)
        del block
    r = m.result
    assert r["method"].startswith("VmHWM over the load")
    assert 120 * MB <= r["peak_rss_increase_bytes"] < 300 * MB, r  # the 128 MB block, not the 384 MB before it
    assert r["rss_after_bytes"] < r["peak_rss_bytes"]  # freed inside the block: the peak remembers it


def test_without_the_reset_the_result_says_the_peak_is_the_processs(monkeypatch, tmp_path):
    monkeypatch.setattr(host_memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    with host_memory.measure() as m:
        pass
    assert m.result["method"].startswith("ru_maxrss") and "hidden" in m.result["method"]
    assert host_memory.summary(m.result)["peak_rss_gib"] > 0
