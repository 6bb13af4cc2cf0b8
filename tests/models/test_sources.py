"""kontext_server/models: every source goes through load_model, and one that cannot load here says why."""
from __future__ import annotations

import pytest

from kontext_server.models import ModelLoadError, sources


def test_synthetic_full_on_a_cpu_says_it_needs_a_gpu():
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        sources.load_model(sources.SYNTHETIC_FULL, "cpu")


def test_tiny_loads_through_the_same_entry_and_says_it_is_synthetic(cache_dir):
    model = sources.load_model(sources.TINY, "cpu", cache_dir)
    assert model.synthetic and model.source == "tiny" and type(model.pipe).__name__ == "FluxKontextPipeline"
