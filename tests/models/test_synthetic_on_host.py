"""synthetic-full's build for a memory budget (`on_host`): the transformer and T5 made on the meta device and filled
one tensor at a time, kept in host memory. Checked with the tiny model's component configs on a CPU (the device that
fills each tensor is then the CPU too): nothing is left on meta, tied weights stay tied, and the pipeline runs."""
from __future__ import annotations

import torch


def _tiny_configs() -> dict:
    from kontext_server.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    strip = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    return {"transformer": strip(pipe.transformer.config), "vae": strip(pipe.vae.config),
            "text_encoder": pipe.text_encoder.config.to_dict(), "text_encoder_2": pipe.text_encoder_2.config.to_dict(),
            "scheduler": strip(pipe.scheduler.config)}


def test_synthetic_full_built_on_the_host_holds_real_tied_weights_and_runs():
    from kontext_server.models.synthetic import build_synthetic_full

    pipe = build_synthetic_full("cpu", on_host=True, configs=_tiny_configs())
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name)
        tensors = [*module.parameters(), *module.buffers()]
        assert all(t.device.type == "cpu" for t in tensors), name
        assert all(t.dtype == torch.bfloat16 for t in module.parameters()), name
        assert all(bool(torch.isfinite(t.float()).all()) for t in tensors), name
    t5 = pipe.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied, as transformers ties them
    norm = pipe.transformer.transformer_blocks[0].attn.norm_q.weight
    assert bool((norm == 1).all())  # a norm's scale starts at one
    linear = pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert float(linear.float().abs().max()) <= 1 / linear.shape[1] ** 0.5 and float(linear.float().std()) > 0
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipe(prompt="a red car", width=256, height=256, num_inference_steps=2, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(0), max_area=256 * 256, _auto_resize=False)
    assert out.images[0].shape == (256, 256, 3)


def test_a_meta_buffer_cannot_be_built_on_the_host():
    import pytest

    from kontext_server.models import ModelLoadError
    from kontext_server.models.synthetic import materialise_on_host

    with torch.device("meta"):
        m = torch.nn.BatchNorm1d(4)
    with pytest.raises(ModelLoadError, match="running_mean"):
        materialise_on_host(m, "cpu")
