"""kontext_server/startup/quiet.py: the libraries' known-harmless start-up lines are dropped and counted, every other
line still shows, and FLUX_SHOW_LIBRARY_NOISE=1 shows them all. Fresh interpreters: the filters are per process."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from kontext_server.startup.quiet import KNOWN_NOISE

CHILD = """
import json, logging, sys
from kontext_server.startup import prepare_process, quiet
prepare_process()
import torchao  # noqa: F401  (prints its optional-kernel lines where they do not load)
from diffusers import FluxKontextPipeline  # noqa: F401  (imports diffusers' torchao quantizer, transformers)
logging.getLogger("torchao").warning("a real torchao warning")
print("COUNTS " + json.dumps(quiet.counts))
"""


def _run(**env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "FLUX_SHOW_LIBRARY_NOISE"} | env)


def _noise_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(re.search(p, line) for _, p, _ in KNOWN_NOISE)]


def test_known_library_noise_is_dropped_and_counted_and_real_warnings_stay():
    quiet = _run()
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert _noise_lines(quiet.stderr) == []
    assert "a real torchao warning" in quiet.stderr
    counts = json.loads(quiet.stdout.split("COUNTS ", 1)[1])
    noisy = _run(FLUX_SHOW_LIBRARY_NOISE="1")
    assert noisy.returncode == 0, noisy.stderr[-2000:]
    # what the quiet start dropped is exactly what the noisy one shows (none at all where every library loads clean)
    assert sum(counts.values()) == len(_noise_lines(noisy.stderr))
    assert json.loads(noisy.stdout.split("COUNTS ", 1)[1]) == {}
