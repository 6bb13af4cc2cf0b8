"""cuBLASLt runs without a workspace in this server: its GEMMs then need no memset, and the fp8 ones are faster.

torch reads CUBLASLT_WORKSPACE_SIZE (KiB; default 1,024) once, at the process's first cuBLASLt GEMM, so this must be
set before that, as the entry points do (before torch is imported). With the default workspace, cuBLASLt picks
kernels with a dynamic tile scheduler and zeroes its counters with a memset before each GEMM; with no workspace it
picks the same tiles with a static scheduler and no memset: the same arithmetic, a few percent less time per fp8
step (benchmarks/2026-11-23-h100-cublaslt, measured with bench/probe_fp8_gemm_step.py).

An operator's own CUBLASLT_WORKSPACE_SIZE is kept. FLUX_CUBLASLT_NO_WORKSPACE=0 leaves torch's default. Standard
library only: imported before torch.
"""
from __future__ import annotations

import sys

from kontext_server import settings

status: dict = {}  # the decision, for /health


def configure() -> dict:
    """Set CUBLASLT_WORKSPACE_SIZE=0 unless the operator set it or switched this off; returns (and keeps) why."""
    if status:
        return status
    env, switch = settings.CUBLASLT_WORKSPACE_SIZE, settings.CUBLASLT_NO_WORKSPACE
    if switch.off():
        status.update(workspace_kib=None, reason=f"{switch.name}=0: torch's default workspace")
    elif env.is_set():
        status.update(workspace_kib=env.get(), reason=f"{env.name} set by the operator")
    else:
        settings.set_process_env(env, "0")
        status.update(workspace_kib="0", reason="no workspace: static tile scheduler, no memset per GEMM")
    # torch reads it at its first cuBLASLt GEMM: set before torch is even imported, no GEMM can have read it yet
    status["set_before_torch_import"] = "torch" not in sys.modules
    return status
