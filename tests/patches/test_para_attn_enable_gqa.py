"""patches/para_attn_enable_gqa.py: para-attn's context-parallel attention takes the `enable_gqa` keyword diffusers
0.42.1 passes to SDPA (in a one-process gloo world: the keyword fails before any collective)."""
import contextlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from patches import para_attn_enable_gqa


@contextlib.contextmanager
def world_of_one():
    """A gloo world of this process alone and para-attn's mesh on it (torn down after)."""
    from para_attn.context_parallel import init_context_parallel_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        yield init_context_parallel_mesh("cpu")
    finally:
        dist.destroy_process_group()


def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 8, 4, generator=g) for _ in range(3)]


def test_upstream_rejects_enable_gqa_and_the_patched_attention_matches_sdpa():
    from para_attn import para_attn_interface as pai
    from para_attn.para_attn_interface import UnifiedAttnMode

    q, k, v = qkv()
    with world_of_one() as mesh:
        # Upstream: the keyword diffusers' attention backends always pass is refused. If this fails, para-attn takes
        # it now and the patch can go.
        upstream = getattr(pai.ulysses_attn_func, "original", pai.ulysses_attn_func)
        with pytest.raises(TypeError, match="enable_gqa"):
            upstream(q, k, v, enable_gqa=False, mesh=mesh["ulysses"])
        para_attn_enable_gqa.apply()
        assert para_attn_enable_gqa.apply() == 0  # idempotent
        with UnifiedAttnMode(mesh):
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=False)  # diffusers' call
            with pytest.raises(NotImplementedError, match="grouped-query"):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
