"""Per-key limits: requests per period (a token bucket) and concurrent jobs, so one client cannot starve the others.

What: `RateRule.parse("60/min,2")` = 60 requests per minute and at most 2 jobs at once; `RateRule.parse("60/min")`
has no concurrency limit. Units: s, sec, second(s), m, min, minute(s), h, hour(s). `RateLimiter.admit(key_id, job)`
says whether a request may proceed and, when not, after how many seconds it may (Retry-After); an admitted job holds
one concurrency slot until `release(key_id)`.
The bucket holds N tokens and refills N per period: a client may burst N requests, then one every period / N. So
Retry-After for the bucket is the time until it holds one token again, in whole seconds rounded up. For the
concurrency limit no window frees a slot: its Retry-After comes from the caller's estimate (a typical job's time).
Contract: in-memory (per process), thread-safe (one lock), O(1) per request; state per key id, so its size is bounded
by the number of keys (all clients share the id "anonymous" when the server has no keys).
"""
from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
         "minutes": 60.0, "h": 3600.0, "hour": 3600.0, "hours": 3600.0}
_RULE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*(?:,\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class RateRule:
    requests: int  # per period
    period_s: float
    concurrent: int | None = None  # jobs at once; None: no limit

    @classmethod
    def parse(cls, spec: str) -> "RateRule":
        m = _RULE.match(spec.lower())
        if not m or m.group(2) not in UNITS:
            raise ValueError(f"rate limit {spec!r}: expected N/UNIT or N/UNIT,C (e.g. 60/min,2: 60 requests a minute, "
                             f"2 concurrent jobs); units: {', '.join(sorted(UNITS))}")
        requests, concurrent = int(m.group(1)), (int(m.group(3)) if m.group(3) else None)
        if requests < 1 or (concurrent is not None and concurrent < 1):
            raise ValueError(f"rate limit {spec!r}: requests and concurrent jobs must be at least 1")
        return cls(requests, UNITS[m.group(2)], concurrent)

    def __str__(self) -> str:
        return f"{self.requests}/{self.period_s:g}s" + (f",{self.concurrent}" if self.concurrent else "")


@dataclass(frozen=True)
class Admission:
    ok: bool
    retry_after_s: int = 0  # when refused: seconds until the request may succeed
    reason: str = ""


class _Bucket:
    __slots__ = ("tokens", "updated", "active")

    def __init__(self, tokens: float, now: float):
        self.tokens, self.updated, self.active = tokens, now, 0


class RateLimiter:
    def __init__(self, rule: RateRule, clock: Callable[[], float] = time.monotonic,
                 job_retry_after: Callable[[], int] = lambda: 1):
        self.rule, self.clock, self.job_retry_after = rule, clock, job_retry_after
        self.rate = rule.requests / rule.period_s  # tokens per second
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def admit(self, key_id: str, job: bool = False) -> Admission:
        """Take one request from `key_id`'s bucket (and, for a job, one concurrency slot) or say why not."""
        with self._lock:
            now = self.clock()
            b = self._buckets.get(key_id)
            if b is None:
                b = self._buckets[key_id] = _Bucket(float(self.rule.requests), now)
            b.tokens = min(float(self.rule.requests), b.tokens + (now - b.updated) * self.rate)
            b.updated = now
            if b.tokens < 1.0:
                wait = max(1, math.ceil((1.0 - b.tokens) / self.rate - 1e-9))
                return Admission(False, wait, f"rate limit of {self.rule.requests} requests per "
                                              f"{self.rule.period_s:g} s reached")
            limit = self.rule.concurrent
            if job and limit is not None and b.active >= limit:
                return Admission(False, max(1, int(self.job_retry_after())),
                                 f"{limit} concurrent job{'s' if limit > 1 else ''} per key already running")
            b.tokens -= 1.0
            if job:
                b.active += 1
            return Admission(True)

    def release(self, key_id: str) -> None:
        """An admitted job ended: its concurrency slot is free."""
        with self._lock:
            b = self._buckets.get(key_id)
            if b is not None and b.active > 0:
                b.active -= 1

    def active(self, key_id: str) -> int:
        with self._lock:
            b = self._buckets.get(key_id)
            return b.active if b is not None else 0
