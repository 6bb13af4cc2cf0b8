"""kontext_server/startup/cublaslt_workspace.py: the server sets CUBLASLT_WORKSPACE_SIZE=0 before torch exists, and
never overrides the operator. Each case runs in a fresh interpreter, since the module keeps its decision per process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What each entry point runs: the service module (imported by anything that serves), and the uvicorn app built from
# the environment (`uvicorn flux_kontext_optimized:app`); the CLI calls the same prepare_process before any command.
ENTRY_POINTS = ["import kontext_server.service.service",
                "import flux_kontext_optimized; flux_kontext_optimized.app._get()"]


def configure_in_child(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUBLASLT_WORKSPACE_SIZE", "FLUX_CUBLASLT_NO_WORKSPACE")}
    env.update(env_extra)
    code = ("import json, os; from kontext_server.startup import cublaslt_workspace as c; s = c.configure(); "
            "print(json.dumps({'status': s, 'env': os.environ.get('CUBLASLT_WORKSPACE_SIZE'), "
            "'again': c.configure() is s}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_unset_becomes_no_workspace():
    got = configure_in_child({})
    assert got["env"] == "0" and got["status"]["workspace_kib"] == "0" and got["again"]
    assert got["status"]["set_before_torch_import"] is True


def test_the_operators_value_is_kept():
    got = configure_in_child({"CUBLASLT_WORKSPACE_SIZE": "32768"})
    assert got["env"] == "32768" and "operator" in got["status"]["reason"]


def test_switched_off_leaves_torchs_default():
    got = configure_in_child({"FLUX_CUBLASLT_NO_WORKSPACE": "0"})
    assert got["env"] is None and got["status"]["workspace_kib"] is None


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_set_it_before_torch_is_imported(entry, tmp_path):
    """torch reads the variable once, at its first cuBLASLt GEMM; set before torch is even imported, no GEMM can
    have run."""
    code = f"""
import os, sys
os.environ.pop("CUBLASLT_WORKSPACE_SIZE", None)
from kontext_server.startup import cublaslt_workspace
real = cublaslt_workspace.configure
seen = []
def spy():
    seen.append("torch" in sys.modules)
    return real()
cublaslt_workspace.configure = spy
{entry}
print(seen, os.environ.get("CUBLASLT_WORKSPACE_SIZE"))
"""
    env = {k: v for k, v in os.environ.items() if k != "FLUX_CUBLASLT_NO_WORKSPACE"} | {"FLUX_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last == "[False] 0", f"configure() must run once, before torch is imported: {last}"
