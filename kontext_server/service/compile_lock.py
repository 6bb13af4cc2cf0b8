"""One compiler per cache directory: the first process to compile does it, the others wait and load what it saved.

What: `first_compiler(directory, wait_s)` is a context manager around a start-up's prepare + warm-ups. The first
process to enter takes an exclusive `flock` on `<directory>/.compile.lock` and holds it for the block (the
"leader": it compiles, and the compile cache and saved regions are written as it goes). A process that finds the lock
taken waits until it is released (a "follower"), then runs its block without holding it: by then the leader's
artifacts are on disk, so the follower's compile cache loads them instead of compiling again, and several followers
load in parallel.
Why: N replicas of one model starting together on one host (Ray Serve, or one process per GPU) would otherwise
compile N times at once, each for minutes on the full model. The artifacts' writes are atomic already (a temporary
file renamed over the path), so this saves work; correctness never depends on it.
Contract: never blocks longer than `wait_s` (then the follower goes ahead and compiles itself, and says so); a
leader that dies releases the lock with its process (flock), so nobody waits for a dead one; a directory that cannot
be locked (read-only, a file system without flock) is reported and the block runs unlocked.
Limits: one lock per cache directory, not per cache key: two differently configured servers sharing a directory
also take turns. `flock` coordinates processes of one host; on a network file system it may be advisory or absent
(docs/operations.md, "Scaling out with Ray Serve", says how to share artifacts across hosts).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger("flux.service")
LOCK_NAME = ".compile.lock"


@contextlib.contextmanager
def first_compiler(directory: Path, wait_s: float, poll_s: float = 0.2) -> Iterator[dict]:
    """Yields what this process is: {"role": "leader" | "follower" | "unlocked", "waited_s", "detail"}."""
    fd, info = _acquire(Path(directory), wait_s, poll_s)
    try:
        yield info
    finally:
        if fd is not None:
            if info["role"] == "leader":
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _acquire(directory: Path, wait_s: float, poll_s: float) -> tuple[int | None, dict]:
    """(the lock file's descriptor or None, the role): a leader returns holding the lock, anyone else without it."""
    t0 = time.monotonic()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        return None, {"role": "unlocked", "waited_s": 0.0, "detail": f"cannot open the lock file: {exc}"}
    try:
        if _try_lock(fd):
            return fd, {"role": "leader", "waited_s": 0.0, "detail": "first to compile on this cache directory"}
        log.info("another process is compiling into %s: waiting up to %.0f s for its artifacts", directory, wait_s)
        got = False
        while not got and time.monotonic() - t0 < wait_s:
            time.sleep(poll_s)
            got = _try_lock(fd)
        if got:
            fcntl.flock(fd, fcntl.LOCK_UN)  # the leader is done: load its artifacts, in parallel with the others
        waited = round(time.monotonic() - t0, 3)
        detail = (f"waited {waited:.1f} s for another process's compile, then loaded its artifacts" if got else
                  f"another process was still compiling after {wait_s:.0f} s: compiled here too")
        return fd, {"role": "follower", "waited_s": waited, "detail": detail}
    except OSError as exc:  # flock unsupported here (some network file systems)
        return fd, {"role": "unlocked", "waited_s": round(time.monotonic() - t0, 3), "detail": f"cannot lock: {exc}"}


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
