"""bench/sim_attention_quant_error.py: its roundings are the ones named (int8 per block or per token, e4m3 with a
scale), its bf16 recipe is FlashAttention's rounding of exact attention, and the script runs end to end on a CPU."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import torch

import sim_attention_quant_error as sim


def test_int8_rounding_shares_one_scale_per_block_and_keeps_each_block_maximum_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    x[70, 3] = 50.0  # an outlier: only its block's scale grows
    out = sim.fake_int8(x, 64)
    step = (out - x).abs()
    assert float(step[64:128].max()) <= 50.0 / sim.INT8 / 2 + 1e-6
    assert float(step[:64].max()) <= float(x[:64].abs().max()) / sim.INT8 / 2 + 1e-6
    assert float(step[:64].max()) < float(step[64:128].max())
    for b in range(0, 200, 64):  # the block's largest |x| is representable exactly (it sets the scale)
        i = x[b:b + 64].abs().argmax()
        assert torch.allclose(out[b:b + 64].flatten()[i], x[b:b + 64].flatten()[i], rtol=1e-6)


def test_per_token_int8_is_finer_than_per_block():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g) * torch.linspace(0.1, 3, 256)[:, None]
    assert sim.rel(sim.fake_int8(x, None), x) < sim.rel(sim.fake_int8(x, 128), x)


def test_e4m3_rounding_is_torchs_float8_cast_under_the_scale():
    x = torch.tensor([[0.3, -1.7, 600.0, 1e-4]])
    scale = torch.tensor(0.5)
    want = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(sim.fake_e4m3(x, scale), want)
    assert float(sim.fake_e4m3(x, scale).abs().max()) == 448 * 0.5  # saturates, never inf


def test_bf16_recipe_is_exact_attention_up_to_bf16_rounding_of_p_and_the_output():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(96, 32, generator=g).to(torch.bfloat16).float() for _ in range(3))
    exact = torch.softmax(q @ k.T / math.sqrt(32), -1) @ v
    ident = lambda t: t  # noqa: E731
    unrounded = sim.attend(q, k, v, ident, ident)
    assert sim.rel(unrounded, exact.to(torch.bfloat16).float()) < 1e-6  # only the output's rounding
    err = sim.rel(sim.recipes()["bf16"](q, k, v), exact)
    assert sim.rel(unrounded, exact) * 1.05 < err < 1e-2  # rounding P adds bf16-sized error


def test_script_reports_every_recipe_against_bf16_on_cpu(tmp_path):
    out = tmp_path / "sim.json"
    run = subprocess.run([sys.executable, "bench/sim_attention_quant_error.py", "--workloads", "edit-512",
                          "--heads", "1", "--device", "cpu", "--out", str(out)], capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["recipe"] for r in rows} == set(sim.recipes())
    bf16 = [r for r in rows if r["recipe"] == "bf16"]
    assert len(bf16) == 3 and all(r["err_over_bf16"] == 1.0 for r in bf16)
    assert all(r["rel_err"] > 0 for r in rows)
    assert "| edit-512 | int8-block |" in run.stdout
