"""The split transformer call alone, two spawned ranks on gloo: one tiny transformer call split over 2 ranks equals
the unsplit call, with token counts that do not divide (289 image tokens, 7 text tokens: both padded), with
diffusers' attention processor and with our fused q/k norm + RoPE prologue (Triton's interpreter on CPU), whose
attention call must go through the split attention too."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.helpers import free_port

TOLERANCE = 1e-4


def _rank(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton loads: the fused kernel runs in its interpreter
    import torch
    from diffusers import FluxTransformer2DModel

    from kontext_server.parallel.adapter import SequenceSplit, SplitCall
    from kontext_server.parallel.group import Address, Group, Split
    from optimizations.attention import install_fused_prologue
    from tests.helpers import transformer_inputs

    torch.set_num_threads(1)
    transformer = FluxTransformer2DModel.from_pretrained(Path(model_dir) / "transformer").eval()
    # A generous timeout: on a loaded machine one rank may reach the rendezvous long after the other
    group = Group(rank, 2, Address("127.0.0.1", port), "cpu", Split(2, 2, 1), timeout_s=300)
    group.connect()
    inputs = transformer_inputs(transformer, n_img=289, n_txt=7, device="cpu", dtype=torch.float32)
    diffs = {}
    with torch.inference_mode():
        for name in ("diffusers", "fused"):
            if name == "fused":
                diffs["fused_detail"] = install_fused_prologue([transformer])
            full = transformer(**inputs)[0]
            split = SplitCall(transformer, SequenceSplit(group))(**inputs)[0]
            diffs[name] = float((split - full).abs().max())
    if rank == 0:
        Path(out).write_text(json.dumps(diffs))
    group.close()
    import torch.distributed as dist

    dist.destroy_process_group()


def test_a_split_transformer_call_equals_the_whole_call_with_padding_and_with_the_fused_prologue(cache_dir, tmp_path):
    pytest.importorskip("triton")
    from kontext_server.models import tiny

    model_dir = tiny.ensure_tiny_saved(cache_dir)
    out = tmp_path / "diffs.json"
    mp.start_processes(_rank, args=(free_port(), str(model_dir), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    diffs = json.loads(out.read_text())
    assert "one Triton pass" in diffs["fused_detail"]  # the fused prologue really ran
    assert diffs["diffusers"] < TOLERANCE and diffs["fused"] < TOLERANCE, diffs
