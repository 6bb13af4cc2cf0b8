"""tools/openai_route_overhead.py and tools/preview_cost.py run end to end on CPU (small sizes, few runs) and write
what their notes quote."""
from __future__ import annotations

import json

import pytest


def test_the_route_overhead_tool_times_both_pairs_and_writes_its_json(tmp_path, cache_dir):
    import openai_route_overhead as tool

    out = tmp_path / "route.json"
    assert tool.main(["--runs", "3", "--warmup", "1", "--size", "256", "--cache-dir", str(cache_dir),
                      "--json-out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["size"] == 256 and result["runs"] == 3 and result["machine"]["cpus"] >= 1
    names = {"t2i/inference", "t2i/openai", "edit/inference", "edit/openai"}
    for clock in ("wall", "cpu"):
        assert set(result[clock]["median_ms"]) == names
        assert all(len(v) == 3 and min(v) > 0 for v in result["samples_ms"][clock].values())
        med = result[clock]["median_ms"]
        diff = result[clock]["t2i_openai_minus_inference_ms"]
        assert diff == pytest.approx(med["t2i/openai"] - med["t2i/inference"], abs=0.002)  # rounded apart
        paired = result[clock]["edit_paired_difference_ms"]
        assert paired["q1"] <= paired["median"] <= paired["q3"]
    # the edit pair carries the same reference image both ways: base64 in JSON (4/3 larger) vs a multipart file
    assert result["request_bytes"]["edit/inference"] > result["request_bytes"]["edit/openai"]


def test_the_route_overhead_tools_multipart_body_is_what_the_edits_route_reads():
    import openai_route_overhead as tool

    body, content_type = tool.multipart({"prompt": "x", "seed": "1"}, "image", b"\x89PNG-bytes")
    assert content_type.startswith("multipart/form-data; boundary=")
    boundary = content_type.split("=", 1)[1]
    assert body.count(f"--{boundary}".encode()) == 4 and body.endswith(f"--{boundary}--\r\n".encode())


def test_the_preview_cost_tool_measures_previews_against_the_plain_request(tmp_path, cache_dir):
    import preview_cost

    out = tmp_path / "preview.json"
    assert preview_cost.main(["--model", "tiny", "--device", "cpu", "--cache-dir", str(cache_dir), "--workload",
                              "t2i-1024", "--width", "256", "--height", "256", "--quality", "high", "--steps", "4",
                              "--partial-images", "2", "--runs", "1", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["workload"]["preview_steps"] == [1, 3] and r["previews_per_request"] == 2
    assert r["preview_ms_per_request"] > 0
    assert r["ms_per_preview"] == pytest.approx(r["preview_ms_per_request"] / 2, abs=0.01)
    assert r["preview_fraction_of_request"] == pytest.approx(r["preview_ms_per_request"] / r["plain_total_ms"],
                                                             abs=1e-3)
    assert r["workload"]["flags"]["use_mxfp4"] is False and r["png_encode_ms_per_preview"] > 0
    assert r["vae_decode_ms"] > 0 and r["preview_over_vae_decode"] > 0.5  # a preview is a full-size decode


def test_the_request_overhead_tool_measures_a_real_servers_requests_end_to_end(tmp_path, cache_dir):
    import json

    import request_overhead

    out = tmp_path / "ro.json"
    assert request_overhead.main(["--model", "tiny", "--device", "cpu", "--workload", "edit-512", "--width", "256",
                                  "--height", "256", "--steps", "1", "--optimizations", "none", "--runs", "1",
                                  "--inputs", "smooth", "--timeout", "300", "--cache-dir", str(cache_dir),
                                  "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())["inputs"]["smooth"]
    m = r["median"]
    assert m["wall_ms"] >= m["request_total_ms"] >= m["total_ms"] > 0
    assert m["decode_input_ms"] > 0 and m["encode_output_ms"] > 0
    assert r["input_png_here"]["pil_level_6"]["bytes"] < r["input_png_here"]["pil_level_1"]["bytes"]
    assert set(r["output_png_here"]) == {"server", "pil_level_1", "pil_level_6"}
