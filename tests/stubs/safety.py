"""Stub safety checkers for the hook's tests (kontext_server/safety.py): keyword rules, no model."""
from __future__ import annotations

CALLS: list[tuple[str, int]] = []  # (prompt, number of images) of each call, for the tests to read


def flag_keyword(prompt: str, images: list):
    """Blocks a prompt with the word "forbidden"; blocks an image set when the prompt says "flag-the-output" and
    there are images to judge (a text-to-image request's input check has none)."""
    CALLS.append((prompt, len(images)))
    if "forbidden" in prompt.lower():
        return "the prompt mentions something forbidden"
    if "flag-the-output" in prompt and images:
        return False
    return None


def broken(prompt: str, images: list):
    raise RuntimeError("the classifier crashed")
