"""tools/single_file_load.py: its BFL mapping agrees with the tests' own, and save + measure run end to end on the
tiny model (the GPU run on synthetic-full uses the same code)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import single_file_load as tool  # tools/ (pytest.ini's pythonpath)
from tests.helpers import ROOT
from tests.models.bfl_files import to_bfl


@pytest.fixture(scope="module")
def tiny_state(cache_dir) -> dict[str, torch.Tensor]:
    from kontext_server.models import sources

    return dict(sources.load_model("tiny", "cpu", cache_dir).pipe.transformer.state_dict())


def test_the_tools_bfl_mapping_is_the_tests_mapping(tiny_state):
    state = tiny_state
    ours, theirs = tool.to_bfl(dict(state)), to_bfl(dict(state))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("scaling", ["row", "tensor", "none"])
def test_the_tools_fp8_files_are_recognised_by_the_server(tiny_state, scaling, tmp_path):
    from kontext_server.models import fp8_storage
    from kontext_server.models.safetensors_file import SafetensorsFile

    path = tmp_path / "f.safetensors"
    from safetensors.torch import save_file

    save_file(tool.quantize_fp8(tool.to_bfl(dict(tiny_state)), scaling), str(path))
    f = SafetensorsFile.open(path)
    storage = fp8_storage.inspect(f, {k: k for k in f.tensors})
    kind = {"row": "per-row", "tensor": "per-tensor", "none": "none"}[scaling]
    assert storage.dtype == "float8_e4m3fn" and list(storage.scaling) == [kind]


def test_save_then_measure_reports_seconds_and_peak_host_memory_against_the_file_size(tmp_path, capsys):
    out = tmp_path / "tiny-bfl.safetensors"
    tool.main(["save", "--model", "tiny", "--out", str(out)])
    saved = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert saved["bytes"] == out.stat().st_size and "double_blocks.0.img_attn.qkv.weight" in load_file(str(out))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "single_file_load.py"), "measure", "--transformer",
                           str(out), "--dtype", "fp32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])["server"]
    assert report["loader"] == "server" and report["seconds"] > 0
    mem = report["host_memory"]
    assert mem["peak_rss_gib"] >= mem["rss_after_gib"] > 0 and mem["method"].startswith("VmHWM")
    assert report["transformer_file"]["stored_dtypes"] == {"float32": len(load_file(str(out)))}
    assert "peak_rss_increase_over_file_size" in report
