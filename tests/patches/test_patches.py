"""patches/t5_contiguous_position_bias.py: the T5 position bias reaches SDPA with a unit last stride, same output."""
import copy

import torch
import torch.nn.functional as F
from transformers import T5Config, T5EncoderModel

from patches import t5_contiguous_position_bias


def small_t5() -> T5EncoderModel:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=3,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return T5EncoderModel(cfg).eval().to(torch.bfloat16)


def masks_handed_to_sdpa(model, ids) -> tuple[torch.Tensor, list]:
    seen, real = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention = recording
    try:
        with torch.inference_mode():
            out = model(ids)[0]
    finally:
        F.scaled_dot_product_attention = real
    return out, seen


def test_upstream_bias_is_a_permuted_view_and_the_patch_makes_it_contiguous():
    model = small_t5()
    attn = model.encoder.block[0].layer[0].SelfAttention
    # Upstream: a permuted view whose last stride is the head count. If this fails, upstream builds the bias
    # contiguous and the patch can go.
    assert attn.compute_bias(16, 16, device="cpu").stride(-1) == model.config.num_heads
    assert t5_contiguous_position_bias.apply(model) == 1  # only the first layer computes a bias
    bias = attn.compute_bias(16, 16, device="cpu")
    assert bias.is_contiguous() and bias.shape == (1, 4, 16, 16)
    assert t5_contiguous_position_bias.apply(model) == 0  # idempotent
    twin = copy.deepcopy(model)  # the copy's patched method uses the copy's weights
    twin.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.data.zero_()
    assert twin.encoder.block[0].layer[0].SelfAttention.compute_bias(16, 16, device="cpu").abs().max() == 0
    assert attn.compute_bias(16, 16, device="cpu").abs().max() > 0


def test_patched_encoder_output_is_identical_and_sdpa_gets_unit_stride_masks():
    model = small_t5()
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    patched = copy.deepcopy(model)
    t5_contiguous_position_bias.apply(patched)
    ids = torch.randint(0, 100, (1, 64))
    ref, _ = masks_handed_to_sdpa(model, ids)
    out, masks = masks_handed_to_sdpa(patched, ids)
    assert torch.equal(out, ref)
    assert len(masks) == 3 and all(m is not None and m.stride(-1) == 1 for m in masks)


def test_service_loads_t5_with_the_patch(tiny_service):
    t5 = tiny_service.pipe.text_encoder_2
    attn = t5.encoder.block[0].layer[0].SelfAttention
    assert attn.compute_bias(8, 8).is_contiguous()
    assert tiny_service.load_fixes["t5_contiguous_position_bias"] == 1
