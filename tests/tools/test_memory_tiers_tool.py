"""tools/memory_tiers.py runs end to end on a CPU with the tiny model, placed as the full model would be (--plan-sizes
full): one process per budget and one for the unlimited baseline, a row per workload with the tier and the median,
the ratio to the baseline; a budget that cannot load loses only its own row; --stacks-every keeps each process's
sampled stacks beside the JSON; a failed load keeps its traceback, and with --memory-history the device memory
still held by the code that allocated it. Its --plan table is the planner's."""
from __future__ import annotations

import json

import memory_tiers as tool  # tools/ (pytest.ini's pythonpath)


def test_the_memory_tiers_tool_measures_each_budget_in_its_own_process_and_keeps_the_others_when_one_fails(
        tmp_path, cache_dir):
    out = tmp_path / "tiers.json"
    assert tool.main(["--model", "tiny", "--device", "cpu", "--cache-dir", str(cache_dir), "--budgets", "10GB,1GB",
                      "--workloads", "t2i-1024", "--size", "256", "--steps", "2", "--runs", "1",
                      "--plan-sizes", "full", "--stacks-every", "0.2", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = {row["budget"]: row for row in r["rows"]}
    assert list(rows) == ["10GB", "1GB", "unlimited"]
    ten = rows["10GB"]
    assert "transformer offloaded" in ten["tier"] and "text_encoder_2 offloaded" in ten["tier"]
    w = ten["workloads"]["t2i-1024"]
    assert w["oom"] is False and w["total_ms_median"] > 0 and w["steps"] == 2 and w["vs_unlimited"] > 0
    assert w["memory_tier"]["transformer_offloaded"] and w["peak_allocated_gib"] is None  # a CPU: not measured
    assert "too small" in rows["1GB"]["load_error"] and not rows["1GB"]["workloads"]  # its own row only
    assert "too small" in rows["1GB"]["load_traceback"][-1]  # and where it came from
    host = ten["host_memory_load"]  # the host side of the budget, measured over the load and after the requests
    assert host["peak_rss_gib"] >= host["rss_after_gib"] > 0 and host["method"].startswith("VmHWM")
    assert ten["host_rss_after_gib"] > 0
    assert rows["unlimited"]["tier"] == "everything resident (no budget)"
    stacks = tmp_path / ten["stacks"]
    assert ten["stacks"] == "tiers.10GB.stacks.txt" and "(main)" in stacks.read_text()  # sampled while it ran
    assert rows["unlimited"]["workloads"]["t2i-1024"]["total_ms_median"] > 0
    table = tool.markdown(r)
    assert table.count("\n") == 4 and "| 1GB |" in table and "too small" in table
    assert f"| {ten['host_memory_load']['peak_rss_gib']} | no |" in table


def test_the_plan_table_is_the_planners_for_the_full_model(capsys):
    assert tool.main(["--plan", "80GB,24GB,16GB,2GB"]) == 0
    table = capsys.readouterr().out
    assert "| 24GB | resident | offloaded (leaf level) | offloaded (block level) | whole |" in table
    assert "| 16GB | resident, modulation weights on the host |" in table
    assert "| 2GB |" in table and "too small" in table


def test_live_memory_is_summed_by_the_innermost_frame_of_this_repository_largest_first():
    def block(size, state, *files):
        return {"size": size, "state": state,
                "frames": [{"filename": f, "line": i, "name": "f"} for i, f in enumerate(files)]}
    torch_file, ours = "/venv/torch/nn/modules/module.py", "/work/main/optimizations/low_precision.py"
    snapshot = {"segments": [{"blocks": [
        block(3 << 30, "active_allocated", torch_file, ours, "/work/main/kontext_server/service/service.py"),
        block(1 << 30, "active_allocated", torch_file, ours),
        block(2 << 30, "active_allocated", torch_file),
        block(8 << 30, "inactive", ours),  # free: not held
    ]}]}
    rows = tool.live_by_origin(snapshot)
    assert rows == [{"where": "optimizations/low_precision.py:1 f", "gib": 4.0, "blocks": 2},
                    {"where": "nn/modules/module.py:0 f", "gib": 2.0, "blocks": 1}]


def test_the_stack_sampler_holds_no_frame_between_samples_so_a_returned_functions_locals_are_freed(tmp_path):
    """A frame kept from one sample to the next keeps its locals alive after its function returns: a start whose
    deepcopy was sampled kept the copy's replaced weights on the device and ran out of memory."""
    import time
    import weakref

    class Held:
        pass

    tool.sample_stacks(tmp_path / "stacks.txt", 1.0)
    alive = []

    def work():
        obj = Held()
        alive.append(weakref.ref(obj))
        time.sleep(1.5)  # sampled once, at about 1 s

    work()
    deadline = time.monotonic() + 0.3  # well before the next sample, at about 2 s
    while alive[0]() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alive[0]() is None  # freed on return, not at the next sample
    assert "in work" in (tmp_path / "stacks.txt").read_text()  # it was sampled inside work()
