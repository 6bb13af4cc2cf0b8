"""The safety hook: where a deployment plugs in its own content classifier. No classifier ships with the server
(none can be loaded here: no model weights are reachable), so without `--safety-checker` nothing is checked.

What: `--safety-checker module:callable` (env FLUX_SAFETY_CHECKER) names a function `check(prompt, images)` that the
server calls twice per request, in the thread pool:
- before the job is queued, with the prompt and the request's input images (an empty list for text-to-image);
- after the generation, with the prompt and the generated images, before anything is encoded or sent (also for each
  streamed preview, so a blocked image is never shown in part).
It returns None or True (allowed), False (blocked), or a string (blocked; the string is the reason the client sees).
A blocked request is answered 422 `content_policy` on /inference and 400 `moderation_blocked` on /v1 (docs/api.md);
a checker that raises blocks the request too (fail closed: 500 `safety_check_failed`).
Contract: the callable must be thread-safe and quick enough for the request path; it may be a class instance's method
that loads its model once at import.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("flux.safety")
INPUT, OUTPUT = "input", "output"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""
    stage: str = INPUT  # input: the prompt and input images; output: the generated images


class SafetyCheckFailed(RuntimeError):
    """The checker itself raised: the request is not served (fail closed)."""


def load_checker(spec: str) -> Callable[[str, list], Any]:
    """`package.module:function` -> the callable, or ValueError saying what is wrong (at start-up)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--safety-checker {spec!r}: expected module:callable, e.g. mycompany.safety:check")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--safety-checker {spec!r}: cannot import {module_name}: {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"--safety-checker {spec!r}: {attr} is not a callable of {module_name}")
    return fn


class SafetyHook:
    def __init__(self, fn: Callable[[str, list], Any], name: str):
        self.fn, self.name = fn, name
        self.blocked = {INPUT: 0, OUTPUT: 0}

    @classmethod
    def from_spec(cls, spec: str | None) -> "SafetyHook | None":
        return cls(load_checker(spec), spec) if spec else None

    def check(self, prompt: str, images: list, stage: str) -> Verdict:
        try:
            result = self.fn(prompt, list(images))
        except Exception as exc:
            log.error("safety checker %s raised %s at the %s check", self.name, type(exc).__name__, stage)
            raise SafetyCheckFailed(f"the safety checker failed ({type(exc).__name__})") from None
        if result is None or result is True:
            return Verdict(True, stage=stage)
        reason = result if isinstance(result, str) and result.strip() else "flagged by the safety checker"
        self.blocked[stage] += 1
        return Verdict(False, reason, stage)

    def describe(self) -> dict:
        return {"checker": self.name, "blocked_input": self.blocked[INPUT], "blocked_output": self.blocked[OUTPUT]}
