"""Process settings that must be made before torch is imported (standard library only)."""
from __future__ import annotations

from kontext_server.startup import bytecode_cache, cublaslt_workspace, quiet


_done = False


def prepare_process() -> None:
    """Drop the libraries' known-harmless start-up messages, keep Python's bytecode under the cache directory where
    the image does not, and run cuBLASLt without a workspace: call first thing in an entry point, before torch,
    diffusers and fastapi are imported. Once per process; later calls do nothing."""
    global _done
    if _done:
        return
    _done = True
    quiet.install()
    bytecode_cache.enable()
    cublaslt_workspace.configure()
