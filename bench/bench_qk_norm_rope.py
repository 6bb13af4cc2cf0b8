"""A/B of the fused q/k RMSNorm + RoPE kernel (optimizations/qk_norm_rope.py) against inductor's fusion of the same
ops, at FLUX's shapes, on a GPU.

Per workload: a double block (text rows from the context projection, 512 tokens) and a single block (text already in
the sequence), bf16, inputs as views of one fused to_qkv output (row stride 3 x 3072). The reference is diffusers'
own sequence (chunk, torch RMSNorm, concatenation, apply_rotary_emb, q/k/v made contiguous in the (batch, seq,
heads, head_dim) layout the kernel writes and cuDNN attention takes as strided views) compiled by torch.compile.
Prints microseconds per call and the bandwidth over the bytes that must move (q/k/v read once, written once), for
several tile shapes. Usage: python bench/bench_qk_norm_rope.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


from kontext_server.benchmark import floor
from optimizations import qk_norm_rope

IMAGE_TOKENS = {name: floor.IMAGE_TOKENS[name] for name in ("edit-512", "t2i-1024", "edit-1024")}
TEXT, HEADS, D = 512, 24, 128
TILES = [(8, 4), (16, 4), (32, 4), (32, 8), (64, 8)]  # (tokens per program, warps)


def reference(qkv_img, qkv_txt, wq, wk, wq_t, wk_t, cos, sin):
    from diffusers.models.embeddings import apply_rotary_emb

    heads = lambda t: t.unflatten(-1, (HEADS, D))  # noqa: E731
    q, k, v = (heads(t) for t in qkv_img.chunk(3, dim=-1))
    q, k = F.rms_norm(q, (D,), wq, 1e-6), F.rms_norm(k, (D,), wk, 1e-6)
    if qkv_txt is not None:
        eq, ek, ev = (heads(t) for t in qkv_txt.chunk(3, dim=-1))
        q = torch.cat([F.rms_norm(eq, (D,), wq_t, 1e-6), q], 1)
        k = torch.cat([F.rms_norm(ek, (D,), wk_t, 1e-6), k], 1)
        v = torch.cat([ev, v], 1)
    q = apply_rotary_emb(q, (cos, sin), sequence_dim=1)
    k = apply_rotary_emb(k, (cos, sin), sequence_dim=1)
    return tuple(t.contiguous() for t in (q, k, v))  # (batch, seq, heads, head_dim) memory, as the kernel writes


def main() -> None:
    import triton.testing

    p = argparse.ArgumentParser()
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    kernel = qk_norm_rope._kernel()
    ref = torch.compile(reference, fullgraph=True, dynamic=False)
    bench = lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))  # noqa: E731
    rows = []
    for name, n_img in IMAGE_TOKENS.items():
        for kind in ("double", "single"):
            s_img = n_img if kind == "double" else n_img + TEXT
            s = n_img + TEXT
            qkv_img = torch.randn(1, s_img, 3 * HEADS * D, device="cuda", dtype=torch.bfloat16)
            qkv_txt = torch.randn(1, TEXT, 3 * HEADS * D, device="cuda", dtype=torch.bfloat16) \
                if kind == "double" else None
            w = [(1 + 0.3 * torch.randn(D, device="cuda")).to(torch.bfloat16) for _ in range(4)]
            ang = torch.rand(s, D // 2, device="cuda") * 100
            cos, sin = ang.cos().repeat_interleave(2, 1), ang.sin().repeat_interleave(2, 1)
            img, txt = qkv_img.chunk(3, -1), (qkv_txt.chunk(3, -1) if qkv_txt is not None else (None,) * 3)
            wt = (w[2], w[3]) if qkv_txt is not None else (None, None)
            want = ref(qkv_img, qkv_txt, w[0], w[1], w[2], w[3], cos, sin)
            moved = 2 * 3 * s * HEADS * D * 2  # q, k, v read once and written once, bf16
            row = dict(workload=name, block=kind, seq=s,
                       inductor_us=round(1000 * bench(lambda: ref(qkv_img, qkv_txt, *w, cos, sin)), 1))
            for bt, nw in TILES:
                def call(bt=bt, nw=nw):
                    return qk_norm_rope.launch(kernel, *img, *txt, w[0], w[1], *wt, cos, sin, HEADS, 1e-6,
                                               block_t=bt, num_warps=nw)
                got = call()
                err = max(float((g.float() - r.float()).abs().max()) for g, r in zip(got, want))
                row[f"kernel_{bt}x{nw}_us"] = round(1000 * bench(call), 1)
                row[f"kernel_{bt}x{nw}_maxdiff"] = err
            best = min((k for k in row if k.startswith("kernel_") and k.endswith("_us")), key=row.get)
            row["best"] = best
            row["best_tb_s"] = round(moved / (row[best] * 1e-6) / 1e12, 2)
            row["inductor_tb_s"] = round(moved / (row["inductor_us"] * 1e-6) / 1e12, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    tiles = " | ".join(f"{bt}x{nw} us" for bt, nw in TILES)
    print(f"| workload | block | inductor us (TB/s) | {tiles} | best TB/s |")
    print("|---|---|---|" + "---|" * len(TILES) + "---|")
    for r in rows:
        print(f"| {r['workload']} | {r['block']} | {r['inductor_us']} ({r['inductor_tb_s']}) | "
              + " | ".join(str(r[f'kernel_{bt}x{nw}_us']) for bt, nw in TILES) + f" | {r['best_tb_s']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
