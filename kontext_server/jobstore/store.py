"""The job store: every accepted asynchronous job, its input, its state and its answer, in one SQLite file.

What: `JobStore.open(data_dir)` opens `<data dir>/jobs.sqlite3` (WAL journal) and takes an exclusive lock on
`<data dir>/.lock` for the life of the process: two servers on one data directory would each treat the other's running
jobs as interrupted, so the second one refuses to start.
States: `pending` -> `running` -> `ready` | `error`; `pending` -> `error` (cancelled, or interrupted by a restart under
`--on-restart error`). Every move is one conditional UPDATE (`... WHERE status IN (...)`), so of two writers racing
(a cancel and the worker, say) exactly one wins, and a job gets exactly one final state.
Durability: `synchronous=NORMAL` in WAL mode: a committed transaction survives the process being killed (SIGKILL, the
OOM killer) but not necessarily the machine losing power. `insert` commits before the route answers 200.
A job's webhook delivery is written in the same transaction as its final state, so a finished job's delivery cannot be
lost to a crash between the two (webhooks.py delivers it, after a restart too).
Contract: thread-safe (one connection, one lock; each call is short). The file and its WAL are 0600: they hold
webhook secrets. Limits: `count_unexpired()` is what the manager bounds (--max-jobs); inputs are BLOBs of at most the
image limit (20 MB) and are dropped as soon as the job leaves `pending`.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    expires_at REAL,
    request TEXT NOT NULL,
    meta TEXT NOT NULL,
    input BLOB,
    result TEXT,
    sample_key TEXT,
    error_code TEXT,
    error_message TEXT,
    webhook_url TEXT,
    webhook_secret TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs(expires_at);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_at);
"""
FINAL = ("ready", "error")


class DataDirInUse(RuntimeError):
    pass


@dataclass
class JobRow:
    id: str
    status: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    expires_at: float | None
    request: dict
    meta: dict
    result: dict | None
    sample_key: str | None
    error_code: str | None
    error_message: str | None
    webhook_url: str | None

    @classmethod
    def from_sql(cls, r) -> "JobRow":
        return cls(id=r["id"], status=r["status"], created_at=r["created_at"], started_at=r["started_at"],
                   ended_at=r["ended_at"], expires_at=r["expires_at"], request=json.loads(r["request"]),
                   meta=json.loads(r["meta"]), result=json.loads(r["result"]) if r["result"] else None,
                   sample_key=r["sample_key"], error_code=r["error_code"], error_message=r["error_message"],
                   webhook_url=r["webhook_url"])


@dataclass
class Delivery:
    job_id: str
    url: str
    secret: str | None
    body: bytes
    attempts: int


class JobStore:
    def __init__(self, conn: sqlite3.Connection, lock_fd: int | None, path: Path):
        self._conn = conn
        self._lock = threading.Lock()
        self._lock_fd = lock_fd
        self.path = path

    @classmethod
    def open(cls, data_dir: Path) -> "JobStore":
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise DataDirInUse(f"the data directory {data_dir} is in use by another server process; give each "
                               "server its own --data-dir") from None
        path = data_dir / "jobs.sqlite3"
        old = os.umask(0o077)  # the database and its WAL hold webhook secrets
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return cls(conn, lock_fd, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    # ---- jobs -----------------------------------------------------------------------------------------------------
    def insert(self, job_id: str, request: dict, meta: dict, input_bytes: bytes | None, webhook_url: str | None,
               webhook_secret: str | None, created_at: float | None = None) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO jobs (id, status, created_at, request, meta, input, webhook_url, webhook_secret) "
                "VALUES (?, 'pending', ?, ?, ?, ?, ?, ?)",
                (job_id, created_at or time.time(), json.dumps(request), json.dumps(meta), input_bytes, webhook_url,
                 webhook_secret))

    def remove(self, job_id: str) -> None:
        """Forget a job that was never accepted (the queue refused it after it was written)."""
        with self._lock:
            self._conn.execute("DELETE FROM jobs WHERE id = ? AND status = 'pending'", (job_id,))

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            r = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRow.from_sql(r) if r else None

    def input_of(self, job_id: str) -> bytes | None:
        with self._lock:
            r = self._conn.execute("SELECT input FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return r["input"] if r else None

    def mark_running(self, job_id: str, now: float | None = None) -> bool:
        """pending -> running (committed before the job touches the device). False: it is no longer pending
        (cancelled, or already run): the caller must not run it."""
        with self._lock:
            cur = self._conn.execute("UPDATE jobs SET status = 'running', started_at = ?, input = NULL "
                                     "WHERE id = ? AND status = 'pending'", (now or time.time(), job_id))
            return cur.rowcount == 1

    def finish(self, job_id: str, status: str, *, expires_at: float, result: dict | None = None,
               sample_key: str | None = None, error_code: str | None = None, error_message: str | None = None,
               from_states: tuple[str, ...] = ("pending", "running"), delivery_body=None,
               now: float | None = None) -> bool:
        """The job's one final state, and its webhook delivery (when it has a webhook) in the same transaction.
        `delivery_body(row) -> bytes` makes the delivery's body from the finished row. False: another writer
        finished it first (nothing changed)."""
        assert status in FINAL
        now = now or time.time()
        marks = ",".join("?" * len(from_states))
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    f"UPDATE jobs SET status = ?, ended_at = ?, expires_at = ?, result = ?, sample_key = ?, "
                    f"error_code = ?, error_message = ?, input = NULL WHERE id = ? AND status IN ({marks})",
                    (status, now, expires_at, json.dumps(result) if result is not None else None, sample_key,
                     error_code, error_message, job_id, *from_states))
                changed = cur.rowcount == 1
                if changed and delivery_body is not None:
                    r = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    if r["webhook_url"]:
                        self._conn.execute(
                            "INSERT OR REPLACE INTO deliveries (job_id, url, secret, body, state, attempts, next_at, "
                            "updated_at) VALUES (?, ?, ?, ?, 'pending', 0, ?, ?)",
                            (job_id, r["webhook_url"], r["webhook_secret"], delivery_body(JobRow.from_sql(r)), now,
                             now))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return changed

    def ids_in(self, status: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT id FROM jobs WHERE status = ? ORDER BY created_at",
                                                     (status,))]

    def count_unexpired(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    def counts_by_status(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}

    def expired(self, now: float) -> list[tuple[str, str | None]]:
        """(id, sample_key) of finished jobs past their expiry."""
        with self._lock:
            return [(r[0], r[1]) for r in self._conn.execute(
                "SELECT id, sample_key FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))]

    def delete(self, job_id: str) -> None:
        """Drop an expired job and its delivery record (a delivery still being retried is dropped with it)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("DELETE FROM deliveries WHERE job_id = ?", (job_id,))
            self._conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._conn.execute("COMMIT")

    # ---- webhook deliveries -----------------------------------------------------------------------------------------
    def due_deliveries(self, now: float, exclude: set[str], limit: int = 16) -> list[Delivery]:
        with self._lock:
            rows = self._conn.execute("SELECT * FROM deliveries WHERE state = 'pending' AND next_at <= ? "
                                      "ORDER BY next_at LIMIT ?", (now, limit + len(exclude))).fetchall()
        out = [Delivery(r["job_id"], r["url"], r["secret"], r["body"], r["attempts"]) for r in rows
               if r["job_id"] not in exclude]
        return out[:limit]

    def next_delivery_at(self) -> float | None:
        with self._lock:
            r = self._conn.execute("SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'").fetchone()
        return r[0]

    def record_attempt(self, job_id: str, *, delivered: bool, error: str | None, next_at: float | None) -> None:
        """One attempt's outcome: delivered, failed for good (next_at None), or to retry at next_at."""
        state = "delivered" if delivered else ("pending" if next_at is not None else "failed")
        now = time.time()
        with self._lock:
            self._conn.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, next_at = ?, "
                               "last_error = ?, updated_at = ? WHERE job_id = ?",
                               (state, next_at if next_at is not None else now, error, now, job_id))

    def delivery_of(self, job_id: str) -> dict | None:
        with self._lock:
            r = self._conn.execute("SELECT state, attempts, last_error FROM deliveries WHERE job_id = ?",
                                   (job_id,)).fetchone()
        return {"state": r[0], "attempts": r[1], "last_error": r[2]} if r else None

    def delivery_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}
