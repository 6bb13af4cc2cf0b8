"""Starting a context-parallel group on one host: rank 0 (the serving process) spawns the N-1 followers.

What: `start_followers(service)` (called by rank 0's `ParallelService.load`) picks a free loopback port for the
group's store, starts ranks 1..N-1 with torch.multiprocessing's "spawn" (each loads the same model on its own GPU,
or as a CPU process on gloo) and joins them. `follower_main` is a follower's whole life: join, load, follow rank 0's
jobs, exit when rank 0 says stop or is gone. `stop_followers` ends them (at exit, registered here).
Why processes started by rank 0 (not torchrun, not Ray actors): one command starts the whole group, the same way
under `serve`, `generate`, `benchmark` and inside a Ray Serve replica (which then holds N GPUs: its children are its
ranks, and a rank that dies makes the replica fail its health check, so Serve replaces the whole group);
docs/design.md, "Context parallelism", says more.
"""
from __future__ import annotations

import atexit
import logging
import socket

from kontext_server.parallel.group import Address, Group, Split

log = logging.getLogger("flux.parallel")
STOP_GRACE_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_for(config) -> Split:
    n, ring = config.context_parallel, config.cp_ring
    return Split(degree=n, ulysses=n // ring, ring=ring)


def start_followers(service) -> Group:
    """Rank 0: start ranks 1..N-1 and join them; returns rank 0's group (connected)."""
    import torch
    import torch.multiprocessing as mp

    config = service.config
    n = config.context_parallel
    device_type = "cuda" if service.device.startswith("cuda") else "cpu"
    if device_type == "cuda" and torch.cuda.device_count() < n:
        raise ValueError(f"--context-parallel {n} needs {n} GPUs; this process sees {torch.cuda.device_count()}")
    if device_type == "cpu" and config.cp_ring > 1:
        raise ValueError("ring attention needs CUDA tensors (para-attn): on CPU use ring degree 1 (Ulysses)")
    split = split_for(config)
    address = Address("127.0.0.1", free_port())
    group = Group(0, n, address, device_type, split, config.cp_timeout)
    ctx = mp.get_context("spawn")
    for rank in range(1, n):
        proc = ctx.Process(target=follower_main, args=(rank, n, address, device_type, split, config),
                           name=f"flux-cp-rank{rank}")
        proc.start()
        group.processes[rank] = proc
    atexit.register(stop_followers, group)
    try:
        group.connect()
    except Exception:
        stop_followers(group)
        raise
    return group


def follower_main(rank: int, world: int, address: Address, device_type: str, split: Split, config) -> None:
    """A follower process: join the group, load the model, run rank 0's jobs."""
    from kontext_server.startup import prepare_process

    prepare_process()
    from kontext_server import settings

    logging.basicConfig(level=settings.LOG_LEVEL.get(), format=f"%(asctime)s rank {rank} %(name)s %(message)s")
    from kontext_server.parallel.service import ParallelService

    group = Group(rank, world, address, device_type, split, config.cp_timeout)
    try:
        group.connect()
        service = ParallelService(config, rank=rank, group=group)
        service.load()
    except Exception:
        log.exception("context-parallel rank %d could not start", rank)
        raise SystemExit(1)
    try:
        service.follow()
    finally:
        group.close()


def stop_followers(group: Group) -> None:
    """Rank 0: tell the followers to stop, wait a little, then end those still running."""
    if not group.processes:
        return
    try:
        if group.store is not None:
            group.post(("stop",))
    except Exception:  # noqa: BLE001 - the store is gone: they exit by themselves
        pass
    for proc in group.processes.values():
        proc.join(STOP_GRACE_S)
    for rank, proc in group.processes.items():
        if proc.is_alive():
            log.warning("context-parallel rank %d did not stop: terminating it", rank)
            proc.terminate()
            proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
    group.processes.clear()
    group.close()
