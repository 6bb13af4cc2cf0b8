"""The context-parallel group: N ranks on one host; rank 0 serves and posts jobs, the other ranks follow them.

What: `Group.connect()` joins the torch.distributed world (gloo on CPU, NCCL on GPUs, one GPU per rank) through a
TCPStore that rank 0 hosts, builds para-attn's device mesh (batch 1 x ring x Ulysses) for the attention, and a
separate gloo group for control messages. Jobs travel through the store (`post` on rank 0, `next_job` elsewhere):
a follower waits for the next job as long as the server is idle, which no collective with a timeout could do.
Agreement: every rank calls `sync(status)` at the same points of a job (before each transformer call, and once at the
end, unless a sync already ended the job); it returns the worst status of all ranks, so every rank learns of a
failure at the same point and ends that job, and the next job starts with all ranks in step. Error messages go
through the store (`report_error` / `errors`) to rank 0, which answers the request.
Failure model (docs/design.md, "Context parallelism"): a failure at a sync point (before the pipeline, between
steps, a cancel or timeout on rank 0, the VAE on rank 0) fails the job on every rank and leaves the group usable; a
failure inside a transformer call leaves the other ranks in a collective that times out after `timeout_s`: that job
fails and the group is marked broken (rank 0's /health then answers 503 until the process is restarted). A follower
that dies is noticed by rank 0's monitor (its process handle, or its heartbeat in the store) within seconds.
Contract: one job at a time (the engine's single worker on rank 0); the store client of the job thread is used by
that thread only (the heartbeat and the monitor open their own).
"""
from __future__ import annotations

import logging
import math
import pickle
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("flux.parallel")

OK, FAILED, BROKEN = 0, 1, 2  # sync statuses, in order of severity
# Joining: followers start (spawn, imports) long after rank 0 on a loaded machine; the rendezvous waits this long,
# and only then do collectives get the group's own (shorter) timeout.
START_TIMEOUT_S = 900.0
HEARTBEAT_S = 1.0
HEARTBEAT_STALE_S = 15.0
PREFIX = "flux/"


class PeerFailed(RuntimeError):
    """Another rank ended this job (its error, a cancel on rank 0): raised on the ranks that learn of it at a sync."""

    def __init__(self, status: int):
        self.status = status
        super().__init__("another rank of the context-parallel group ended this job")


@dataclass(frozen=True)
class Split:
    """How one request's sequence is split: `degree` ranks, as `ulysses` x `ring` (para-attn's mesh)."""
    degree: int
    ulysses: int
    ring: int

    def as_dict(self) -> dict:
        return asdict(self)


def choose_split(degree: int, heads: int, ring: int = 1) -> Split:
    """Ulysses over as many ranks as the heads allow (it splits heads: heads % ulysses == 0), ring for the rest.
    `ring` > 1 asks for at least that ring degree (it must divide `degree`)."""
    if degree < 1:
        raise ValueError(f"context parallel degree must be at least 1 (got {degree})")
    if ring < 1 or degree % ring:
        raise ValueError(f"the ring degree {ring} must divide the context parallel degree {degree}")
    ulysses = math.gcd(degree // ring, heads)
    return Split(degree=degree, ulysses=ulysses, ring=degree // ulysses)


@dataclass
class Address:
    host: str
    port: int


def is_collective_error(exc: BaseException) -> bool:
    """An error of torch.distributed itself (a timeout, a lost peer): the group's collectives may be out of step."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(s in text for s in ("gloo", "nccl", "timed out", "connection closed", "connection reset",
                                   "broken pipe", "distbackenderror"))


class Group:
    def __init__(self, rank: int, world: int, address: Address, device_type: str, split: Split,
                 timeout_s: float = 300.0):
        self.rank, self.world, self.address, self.device_type = rank, world, address, device_type
        self.split, self.timeout_s = split, timeout_s
        self.store = None
        self.control = None
        self.mesh = None
        self.seq_mesh = None
        self.seq_group = None
        self.job_id = 0
        self.broken: str | None = None  # why the group cannot run jobs any more (rank 0 reports it)
        self.dead: dict[int, str] = {}  # followers known to be gone (rank 0's monitor)
        self.processes: dict[int, object] = {}  # followers this process started (launch.py)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- joining ------------------------------------------------------------------------------------------------
    def connect(self) -> None:
        from para_attn.context_parallel import init_context_parallel_mesh

        from patches import para_attn_enable_gqa

        para_attn_enable_gqa.apply()
        start = timedelta(seconds=max(START_TIMEOUT_S, self.timeout_s))
        self.store = self._client(is_master=self.rank == 0)
        backend = "nccl" if self.device_type == "cuda" else "gloo"
        if self.device_type == "cuda":
            torch.cuda.set_device(self.rank)
        dist.init_process_group(backend, store=dist.PrefixStore("pg/", self.store), rank=self.rank,
                                world_size=self.world, timeout=start)
        self.control = dist.new_group(backend="gloo", timeout=start)
        self.mesh = init_context_parallel_mesh(self.device_type, max_ring_dim_size=self.split.ring)
        self.seq_mesh = self.mesh["ring", "ulysses"]._flatten()
        self.seq_group = self.seq_mesh.get_group()
        self.sync(OK)  # every rank has joined every group: from here on, the groups' own timeouts
        # Control messages wait longer than data collectives: a rank stuck in a data collective times out first and
        # can still tell the others at the next sync.
        timeout = timedelta(seconds=self.timeout_s)
        groups = [(None, timeout), (self.control, timedelta(seconds=self.timeout_s + 60)), (self.seq_group, timeout)]
        groups += [(self.mesh[name].get_group(), timeout) for name in ("batch", "ring", "ulysses")]
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
        for pg, t in groups if set_timeout is not None else ():
            try:
                set_timeout(t, pg)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot change it keeps the start timeout
                log.warning("could not set a context-parallel group's timeout: %s", exc)
        thread = threading.Thread(target=self._monitor if self.rank == 0 else self._heartbeat,
                                  name="cp-monitor" if self.rank == 0 else "cp-heartbeat", daemon=True)
        thread.start()
        self._threads.append(thread)
        log.info("context parallel rank %d/%d joined (%s, ulysses %d x ring %d)", self.rank, self.world, backend,
                 self.split.ulysses, self.split.ring)

    def _client(self, is_master: bool = False):
        return dist.TCPStore(self.address.host, self.address.port, self.world, is_master,
                             timedelta(seconds=max(START_TIMEOUT_S, self.timeout_s)), wait_for_workers=False)

    @property
    def seq_rank(self) -> int:
        return dist.get_rank(self.seq_group)

    # ---- jobs -----------------------------------------------------------------------------------------------------
    def post(self, job) -> int:
        """Rank 0: the next job for every follower. Returns its id."""
        self.job_id += 1
        self.store.set(f"{PREFIX}job/{self.job_id}", pickle.dumps(job))
        if self.job_id > 1:  # every rank has read the previous one: it synced on it
            self.store.delete_key(f"{PREFIX}job/{self.job_id - 1}")
        return self.job_id

    def next_job(self, poll_s: float = 86400.0):
        """A follower: wait (as long as it takes) for rank 0's next job. Raises when rank 0 is gone (its store's
        socket closes). One long wait, not short polls: each wait that times out logs a c10d warning."""
        key = f"{PREFIX}job/{self.job_id + 1}"
        while True:
            try:
                self.store.wait([key], timedelta(seconds=poll_s))
                break
            except Exception as exc:  # noqa: BLE001 - a wait timeout (a day idle) or rank 0 gone
                if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                    raise
        self.job_id += 1
        return pickle.loads(self.store.get(key))

    def sync(self, status: int = OK) -> int:
        """Every rank at the same point of a job: the worst status of all ranks (OK, FAILED or BROKEN)."""
        t = torch.tensor([status], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def check(self) -> None:
        """Before a transformer call: raise PeerFailed when another rank has ended the job."""
        status = self.sync(OK)
        if status != OK:
            raise PeerFailed(status)

    def report_error(self, message: str) -> None:
        try:
            self.store.set(f"{PREFIX}error/{self.job_id}/{self.rank}", message)
        except Exception:  # noqa: BLE001 - the message is a courtesy; the agreed status is what counts
            pass

    def report_result(self, summary: dict) -> None:
        """A follower, before the job's final sync: what rank 0 shows of this rank (its step counts)."""
        self.store.set(f"{PREFIX}result/{self.job_id}/{self.rank}", pickle.dumps(summary))

    def results(self) -> dict[int, dict]:
        """Rank 0, after a job that succeeded: each follower's summary."""
        found = {}
        for r in range(1, self.world):
            key = f"{PREFIX}result/{self.job_id}/{r}"
            if self.store.check([key]):
                found[r] = pickle.loads(self.store.get(key))
                self.store.delete_key(key)
        return found

    def errors(self) -> dict[int, str]:
        """Rank 0, after a failed job: what each rank that failed reported."""
        found = {}
        for r in range(1, self.world):
            key = f"{PREFIX}error/{self.job_id}/{r}"
            try:
                if self.store.check([key]):
                    found[r] = self.store.get(key).decode(errors="replace")
                    self.store.delete_key(key)
            except Exception:  # noqa: BLE001
                pass
        return found

    # ---- liveness -------------------------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        store = self._client()
        while not self._stop.wait(HEARTBEAT_S):
            try:
                store.set(f"{PREFIX}alive/{self.rank}", str(time.time()))
            except Exception:  # noqa: BLE001 - rank 0 is gone: the job loop notices and exits
                return

    def _monitor(self) -> None:
        store = self._client()
        started = time.time()
        while not self._stop.wait(HEARTBEAT_S):
            for r in range(1, self.world):
                if r in self.dead:
                    continue
                proc = self.processes.get(r)
                if proc is not None and not proc.is_alive():
                    self.dead[r] = f"rank {r} exited (exit code {proc.exitcode})"
                    continue
                try:
                    key = f"{PREFIX}alive/{r}"
                    last = float(store.get(key)) if store.check([key]) else started
                except Exception:  # noqa: BLE001
                    continue
                if time.time() - last > HEARTBEAT_STALE_S:
                    self.dead[r] = f"rank {r} sent no heartbeat for {time.time() - last:.0f} s"
            if self.dead and not self.broken:
                self.broken = "; ".join(self.dead.values())
                log.error("context-parallel group lost a rank: %s", self.broken)

    def close(self) -> None:
        """Stop the heartbeat / monitor threads and wait for them: a thread still inside a store call when the process
        exits aborts it ("terminate called without an active exception")."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=2 * HEARTBEAT_S + 5)
        self._threads.clear()
