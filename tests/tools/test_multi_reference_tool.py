"""tools/multi_reference_cost.py runs end to end on CPU with the tiny model and writes the figures its notes quote:
one row per reference count, the sequence growing by one reference's tokens each time, the cost per extra one."""
from __future__ import annotations

import json


def test_the_multi_reference_tool_times_each_count_and_the_cost_of_each_extra_reference(tmp_path, cache_dir):
    import multi_reference_cost as tool

    out = tmp_path / "refs.json"
    assert tool.main(["--model", "tiny", "--device", "cpu", "--cache-dir", str(cache_dir), "--width", "256",
                      "--height", "256", "--references", "1,2,3", "--steps", "2", "--runs", "1", "--quality", "high",
                      "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = r["rows"]
    assert list(rows) == ["1", "2", "3"] and r["steps"] == 2
    assert [rows[n]["seq_len"] for n in rows] == [256 * 2 + 512, 256 * 3 + 512, 256 * 4 + 512]
    assert all(rows[n]["timings_ms"]["total"] > 0 for n in rows)
    # the transformer really ran the longer sequence: the output's 256 tokens and 256 per reference
    assert [rows[n]["image_tokens_seen"] for n in rows] == [[512], [768], [1024]]
    assert set(r["per_extra_reference_vs_one"]) == {"2", "3"}
    extra = r["per_extra_reference_vs_one"]["3"]
    base, three = rows["1"]["timings_ms"], rows["3"]["timings_ms"]
    assert abs(extra["total_ms"] - (three["total"] - base["total"]) / 2) < 0.1
    assert extra["peak_memory_gib"] is None and rows["1"]["peak_memory_gib"] is None  # CPU: not measured
    assert tool.references(64, 64, 4)[1].tobytes() != tool.references(64, 64, 4)[0].tobytes()
