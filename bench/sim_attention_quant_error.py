"""The error a quantised attention kernel would have, whatever its speed: SageAttention-style recipes simulated exactly.

Why: the issue's last untested candidate is a Triton kernel of our own in SageAttention's style (int8 or fp8 Q.K^T
with per-block scales and smoothed K, fp8 P.V with per-channel V scales). Its error does not depend on how fast the
kernel is: it is the rounding of Q, K, P and V, which this script applies in fp32 ("fake quantisation") and compares
with fp32 attention, beside the same simulation of bf16 FlashAttention (Q, K, V in bf16, P rounded to bf16 before
P.V). A recipe whose simulated error is over 2x bf16's fails the adoption rule before any kernel is written; one under
it is worth a kernel. The simulation of SageAttention v1 (int8 per block, P.V in fp16) is checked against the real
sageattention 1.0.6 kernel's measured error (bench/bench_attention_candidates.py) in the lab note.
Recipes (K smoothed, i.e. its mean over tokens subtracted, in every quantised one; softmax is unchanged by it):
- `bf16`: the reference kernel's own rounding; `int8-block`: Q per 128 tokens, K per 64 (SageAttention v1), P.V in
  fp16; `int8-token`: one scale per token for Q and K; `fp8-block`: e4m3 per block; `... +fp8pv`: P (unnormalised,
  in [0, 1]) as e4m3 times 448 and V in e4m3 per channel, as SageAttention2's sm_90 kernels do (`bf16+fp8pv`: that
  alone, Q.K^T left in bf16).
Runs on a CPU or a GPU (same inputs as bench_attention_candidates.py: q/k RMS-normalised times a per-channel weight,
`flat`, `sharp`, `sharp+bias`); draws differ between devices (their generators), the distributions do not.
Usage: python bench/sim_attention_quant_error.py [--workloads edit-512,t2i-1024,edit-1024] [--heads 2] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from bench_attention_candidates import INPUTS, qk  # bench/ beside this script
from bench_fp8_attention import HEAD_DIM, HEADS, SEQ, rel

INT8, E4M3 = 127.0, 448.0
RULE = 2.0  # the adoption rule: within 2x of bf16 SDPA's error


def token_amax(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """(S, 1): each token's |x| max over its block of `block` tokens (None: the token's own)."""
    m = x.abs().amax(-1)
    if block is not None:
        m = torch.nn.functional.pad(m, (0, (-x.shape[0]) % block)).reshape(-1, block).amax(-1)
        m = m.repeat_interleave(block)[:x.shape[0]]
    return m[:, None]


def block_scale(x: torch.Tensor, block: int | None, top: float) -> torch.Tensor:
    """(S, 1): the scale that maps each block's |x| max to `top` (INT8 or E4M3)."""
    return (token_amax(x, block) / top).clamp(min=1e-12)


def fake_int8(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """x (S, D) fp32 rounded to int8 with one scale per `block` tokens (None: one per token), back in fp32."""
    scale = block_scale(x, block, INT8)
    return torch.round(x / scale).clamp(-INT8, INT8) * scale


def fake_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to float8 e4m3 (saturating at 448), times scale."""
    return (x / scale).clamp(-E4M3, E4M3).to(torch.float8_e4m3fn).float() * scale


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p_round, v_round) -> torch.Tensor:
    """One head, fp32: FlashAttention's order of rounding. P = exp(S - rowmax) is rounded (p_round) before P.V; the
    row sum is taken from the unrounded P, as the kernel's running sum is; the output is rounded to bf16."""
    s = (q @ k.T) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return ((p_round(p) @ v_round(v)) / p.sum(-1, keepdim=True)).to(torch.bfloat16).float()


def recipes() -> dict:
    """name -> fn(q, k, v) for one head, (S, D) fp32 holding bf16 values."""
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    fp16 = lambda t: t.to(torch.float16).float()  # noqa: E731
    ident = lambda t: t  # noqa: E731
    p8 = lambda p: fake_e4m3(p, torch.tensor(1 / E4M3))  # noqa: E731 - P in [0, 1], static scale
    v8 = lambda v: fake_e4m3(v, (v.abs().amax(0, keepdim=True) / E4M3).clamp(min=1e-12))  # noqa: E731 - per channel
    smooth = lambda k: k - k.mean(0, keepdim=True)  # noqa: E731

    # how Q and K are rounded: Q per 128 tokens and K per 64 (SageAttention's blocks), or per token
    rounding = {"int8-block": (lambda q: fake_int8(q, 128), lambda k: fake_int8(k, 64)),
                "int8-token": (lambda q: fake_int8(q, None), lambda k: fake_int8(k, None)),
                "fp8-block": (lambda q: fake_e4m3(q, block_scale(q, 128, E4M3)),
                              lambda k: fake_e4m3(k, block_scale(k, 64, E4M3)))}

    def qk8(q, k, mode):
        round_q, round_k = rounding[mode]
        return round_q(q), round_k(smooth(k))

    out = {"bf16": lambda q, k, v: attend(q, k, v, bf16, ident), "bf16+fp8pv": lambda q, k, v: attend(q, k, v, p8, v8)}
    for mode in ("int8-block", "int8-token", "fp8-block"):
        out[mode] = lambda q, k, v, m=mode: attend(*qk8(q, k, m), v, fp16 if m == "int8-block" else bf16, ident)
        out[mode + "+fp8pv"] = lambda q, k, v, m=mode: attend(*qk8(q, k, m), v, p8, v8)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", default=",".join(SEQ))
    p.add_argument("--heads", type=int, default=2, help="heads whose error is measured (of the 24 drawn)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    args = p.parse_args()
    gen = torch.Generator(args.device).manual_seed(0)
    rows, table = [], recipes()
    for name in args.workloads.split(","):
        s = SEQ[name]
        for kind, (gain, bias) in INPUTS.items():
            q, k = qk(s, gain, bias, gen)
            v = torch.randn(1, s, HEADS, HEAD_DIM, device=args.device, generator=gen).to(torch.bfloat16)
            heads = [(q[0, :, h].float(), k[0, :, h].float(), v[0, :, h].float()) for h in range(args.heads)]
            ref = torch.stack([torch.softmax(a @ b.T / math.sqrt(HEAD_DIM), -1) @ c for a, b, c in heads])
            errs = {n: rel(torch.stack([fn(*h) for h in heads]), ref) for n, fn in table.items()}
            for n, e in errs.items():
                row = dict(workload=name, seq=s, inputs=kind, recipe=n, rel_err=round(e, 5),
                           err_over_bf16=round(e / errs["bf16"], 2))
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("| workload | recipe | rel. error flat / sharp / sharp+bias | x bf16's (worst) | within the rule |")
    print("|---|---|---|---|---|")
    for name in args.workloads.split(","):
        for n in table:
            mine = {r["inputs"]: r for r in rows if r["workload"] == name and r["recipe"] == n}
            worst = max(r["err_over_bf16"] for r in mine.values())
            errs = " / ".join(str(mine[k]["rel_err"]) for k in INPUTS)
            print(f"| {name} | {n} | {errs} | {worst} | {'yes' if worst <= RULE else 'no'} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                              "heads": args.heads, "rule": RULE, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
