"""cuBLASLt runs without a workspace in this server: its GEMMs then need no memset, and the fp8 ones are faster.

torch reads CUBLASLT_WORKSPACE_SIZE (KiB; default 1,024) once, at the process's first cuBLASLt GEMM, so this must be
set before that, as the entry points do (service.py, before torch is imported). With the default workspace, cuBLASLt
picks nvjet kernels with a dynamic tile scheduler and zeroes its counters with a memset before each GEMM; with no
workspace it picks the same tiles with a static scheduler (`ssched` in the kernel name) and no memset. Measured with
tools/probe_fp8_gemm_step.py (one step's GEMMs, FLUX's shapes; H100, torch 2.11, BENCHMARKS.md):
- fp8 (torch._scaled_mm, row-wise scales): device time 41.9 -> 40.4 ms per step at t2i-1024, 24.0 -> 23.1 at
  edit-512; the 228 memsets per step are gone;
- bf16 (the exact tier, F.linear with bias): 79.5 -> 79.3 and 44.1 -> 43.3 ms; 76-190 memsets gone.
Same kernels' arithmetic, so outputs keep their precision (the GPU tests compare them as before).

An operator's own CUBLASLT_WORKSPACE_SIZE is kept. FLUX_CUBLASLT_NO_WORKSPACE=0 leaves torch's default. Standard
library only: imported before torch.
"""
from __future__ import annotations

import os
import sys

ENV = "CUBLASLT_WORKSPACE_SIZE"
SWITCH = "FLUX_CUBLASLT_NO_WORKSPACE"

status: dict = {}  # the decision, for /health


def configure() -> dict:
    """Set CUBLASLT_WORKSPACE_SIZE=0 unless the operator set it or switched this off; returns (and keeps) why."""
    if status:
        return status
    if os.environ.get(SWITCH, "1") == "0":
        status.update(workspace_kib=None, reason=f"{SWITCH}=0: torch's default workspace")
    elif ENV in os.environ:
        status.update(workspace_kib=os.environ[ENV], reason=f"{ENV} set by the operator")
    else:
        os.environ[ENV] = "0"
        status.update(workspace_kib="0", reason="no workspace: static tile scheduler, no memset per GEMM")
    # torch reads it at its first cuBLASLt GEMM: set before torch is even imported, no GEMM can have read it yet
    status["set_before_torch_import"] = "torch" not in sys.modules
    return status
