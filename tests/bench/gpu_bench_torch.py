#!/usr/bin/env python3
"""The PyTorch side of tests/bench/gpu_bench: trains the same Llama architecture in bf16 on the
same GPU, in the same run, and prints one JSON object per configuration.

Recipe: fp32 parameters and fused AdamW, torch.autocast(bfloat16) for the forward,
F.scaled_dot_product_attention(is_causal=True) (flash attention), no activation checkpointing,
gradient accumulation over micro-batches - the standard mixed-precision PyTorch step. MFU uses
the same model-FLOPs formula as gpu_bench (recompute not counted):
  flops/token = 6 * (decoder matrices + LM head) + 6 * layers * seq * q_dim
Run by tests/gpu/check.sh --run; no network, no downloads.

  gpu_bench_torch.py --name 1b --hidden 2048 --inter 8192 --layers 16 --heads 32 --kv-heads 8
                     --vocab 128256 --tied 1 --batch 4 --seq 2048 --micro-batches 2
                     [--warmup 2] [--steps 4] [--compile 0]
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def peak_flops(name):
    env = os.environ.get("LUMEN_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    n = name.upper()
    if "H100" in n and "PCIE" in n:
        return 756e12
    if "H100" in n or "H200" in n or "H800" in n:
        return 989e12
    if "A100" in n:
        return 312e12
    if "4090" in n:
        return 165e12
    if "L4" in n:
        return 121e12
    return None


class Rms(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.w * y.to(x.dtype)


def rope_tables(seq, d, theta, device):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device).float() / d))
    ang = torch.outer(torch.arange(seq, device=device).float(), inv)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Layer(nn.Module):
    def __init__(self, a):
        super().__init__()
        d = a.hidden // a.heads
        self.h, self.kv, self.d = a.heads, a.kv_heads, d
        self.ln1 = Rms(a.hidden, 1e-5)
        self.ln2 = Rms(a.hidden, 1e-5)
        self.q = nn.Linear(a.hidden, a.heads * d, bias=False)
        self.k = nn.Linear(a.hidden, a.kv_heads * d, bias=False)
        self.v = nn.Linear(a.hidden, a.kv_heads * d, bias=False)
        self.o = nn.Linear(a.heads * d, a.hidden, bias=False)
        self.gate = nn.Linear(a.hidden, a.inter, bias=False)
        self.up = nn.Linear(a.hidden, a.inter, bias=False)
        self.down = nn.Linear(a.inter, a.hidden, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, T, self.h, self.d).transpose(1, 2)
        k = self.k(h).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v(h).view(B, T, self.kv, self.d).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, self.h * self.d))
        h = self.ln2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.hidden)
        self.layers = nn.ModuleList([Layer(a) for _ in range(a.layers)])
        self.norm = Rms(a.hidden, 1e-5)
        self.head = nn.Linear(a.hidden, a.vocab, bias=False)
        if a.tied:
            self.head.weight = self.embed.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, targets, cos, sin):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    for k in ["hidden", "inter", "layers", "heads", "kv-heads", "vocab", "batch", "seq",
              "micro-batches"]:
        ap.add_argument("--" + k, type=int, required=True)
    ap.add_argument("--tied", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--compile", type=int, default=0)
    a = ap.parse_args()
    out = {"name": a.name, "impl": "pytorch", "torch": torch.__version__}
    if not torch.cuda.is_available():
        out["skipped"] = "no GPU (torch.cuda.is_available() is False)"
        print(json.dumps(out))
        return
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    try:
        model = Llama(a).to(dev)
        step_model = torch.compile(model) if a.compile else model
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": other, "weight_decay": 0.0}],
                                lr=1e-4, betas=(0.9, 0.95), fused=True)
        cos, sin = rope_tables(a.seq, a.hidden // a.heads, 500000.0, dev)
        n_tok = a.batch * a.seq
        ids = torch.randint(0, a.vocab, (a.micro_batches, a.batch, a.seq + 1), device=dev)

        def step():
            opt.zero_grad(set_to_none=True)
            for m in range(a.micro_batches):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = step_model(ids[m, :, :-1], ids[m, :, 1:], cos, sin)
                (loss / a.micro_batches).backward()
            opt.step()
            return loss

        for _ in range(a.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            loss = step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / a.steps
    except torch.cuda.OutOfMemoryError as e:
        out["error"] = "out of memory: " + str(e).split("\n")[0]
        print(json.dumps(out))
        return
    d = a.hidden // a.heads
    qd, kd = a.heads * d, a.kv_heads * d
    mats = a.layers * (a.hidden * (qd + 2 * kd) + qd * a.hidden + 3 * a.hidden * a.inter)
    flops_tok = 6 * (mats + a.vocab * a.hidden) + 6 * a.layers * a.seq * qd
    tokens = a.micro_batches * n_tok
    peak = peak_flops(torch.cuda.get_device_name())
    out.update({
        "device": torch.cuda.get_device_name(),
        "tokens_per_step": tokens,
        "step_s": dt,
        "tokens_per_s": tokens / dt,
        "model_flops_per_token": flops_tok,
        "mfu": (flops_tok * tokens / dt / peak) if peak else None,
        "peak_flops": peak,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        "last_loss": float(loss),
        "compile": bool(a.compile),
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
