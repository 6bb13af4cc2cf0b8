"""Known-harmless start-up messages of third-party libraries, kept out of the server's output.

What: a logging filter on the few library loggers that print, at every start, lines that look like a broken install
but are not (docs/operations.md lists each and why it is harmless). Only these exact messages are dropped, each
counted (`/health` reports the counts); every other warning, of these loggers too, still shows.
Why: a new user's first command printed these before anything of ours and looked broken.
Contract: call before the libraries are imported (stdlib only); FLUX_SHOW_LIBRARY_NOISE=1 shows them again.
"""
from __future__ import annotations

import logging
import re

from kontext_server import settings

# (logger name, pattern, why it is harmless)
KNOWN_NOISE = [
    ("torchao", r"^Failed to load .*torchao[/\\]_C\w*\..*\.so",
     "torchao ships optional prebuilt kernels for other CUDA / Python builds; the ones this server uses load"),
    ("diffusers.quantizers.torchao.torchao_quantizer", r"^Unable to import `torchao` Tensor objects",
     "diffusers' loader of torchao-serialised checkpoints; the server quantises in memory and loads none"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile",
     "torchao registers enums the way older torch needed; a deprecation notice for torchao, not for us"),
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back to",
     "transformers' image processors (unused by FLUX.1-Kontext) fall back to their PIL versions"),
]

counts: dict[str, int] = {}  # logger name -> messages dropped (for /health)


class _KnownNoise(logging.Filter):
    def __init__(self, name: str, pattern: str):
        super().__init__()
        self.logger_name, self.pattern = name, re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.pattern.search(record.getMessage()):
            counts[self.logger_name] = counts.get(self.logger_name, 0) + 1
            return False
        return True


_installed = False


def install() -> bool:
    """Install the filters once; False when FLUX_SHOW_LIBRARY_NOISE=1 asks to see everything."""
    global _installed
    if _installed or settings.SHOW_LIBRARY_NOISE.get() == "1":
        return _installed
    for name, pattern, _why in KNOWN_NOISE:
        logging.getLogger(name).addFilter(_KnownNoise(name, pattern))
    _installed = True
    return True
