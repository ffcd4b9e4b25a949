#!/usr/bin/python3
"""Plain-PyTorch reference of the Lumen CPU engine (Hugging Face Llama, fp32).

Its own implementation (autograd, torch.optim.AdamW, torch.nn.utils.clip_grad_norm_), used by
parity_test.cc to check the C++ engine step by step. Needs only torch and numpy (Debian's
python3-torch); safetensors files are read and written by the small helpers below.

  torch_reference.py train  --model-dir DIR --data FILE [--dtype uint16] --steps N --seq-len T
                            --micro-batch B --grad-accum A --lr LR ... --out-weights FILE
      DIR holds config.json and model.safetensors (the initial weights). Prints one line per
      step: "step S loss L lr X grad_norm G". Writes the final weights to FILE.
  torch_reference.py logits --model-dir DIR --tokens 1,2,3,... --batch B --out FILE
      Writes the logits [B*T, vocab] as tensor "logits" of a safetensors file.
  torch_reference.py bench  --model-dir DIR --data FILE --steps N ...   (prints tokens/s)
"""
import argparse
import json
import math
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        buf = bytearray(data[b:end])
        if e["dtype"] == "F32":
            t = torch.frombuffer(buf, dtype=torch.float32) if buf else torch.zeros(0)
        elif e["dtype"] == "BF16":
            t = torch.frombuffer(buf, dtype=torch.bfloat16).float()
        else:
            raise ValueError("unsupported dtype %s for %s" % (e["dtype"], name))
        out[name] = t.reshape(e["shape"]).clone()
    return out


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name in tensors:
        t = tensors[name].detach().contiguous().float()
        b = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def param_names(cfg):
    names = ["model.embed_tokens.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % i
        names += [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight", p + "self_attn.o_proj.weight",
                  p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                  p + "mlp.down_proj.weight", p + "input_layernorm.weight",
                  p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not cfg.get("tie_word_embeddings", False):
        names.append("lm_head.weight")
    return names


class Llama(torch.nn.Module):
    """Hugging Face LlamaForCausalLM semantics, written out directly."""

    def __init__(self, cfg, weights):
        super().__init__()
        self.cfg = cfg
        self.names = param_names(cfg)
        self.params = torch.nn.ParameterList(
            [torch.nn.Parameter(weights[n].clone()) for n in self.names])
        self.p = dict(zip(self.names, self.params))

    def rmsnorm(self, x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.cfg["rms_norm_eps"]))

    def forward(self, ids):
        cfg, p = self.cfg, self.p
        B, T = ids.shape
        H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        D = cfg["hidden_size"] // H
        inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
        t = torch.arange(T, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()

        def rot(x):
            x1, x2 = x[..., :D // 2], x[..., D // 2:]
            return torch.cat((-x2, x1), dim=-1)

        mask = torch.full((T, T), float("-inf")).triu(1)
        x = p["model.embed_tokens.weight"][ids]
        for i in range(cfg["num_hidden_layers"]):
            pre = "model.layers.%d." % i
            h = self.rmsnorm(x, p[pre + "input_layernorm.weight"])
            q = (h @ p[pre + "self_attn.q_proj.weight"].T).view(B, T, H, D).transpose(1, 2)
            k = (h @ p[pre + "self_attn.k_proj.weight"].T).view(B, T, KV, D).transpose(1, 2)
            v = (h @ p[pre + "self_attn.v_proj.weight"].T).view(B, T, KV, D).transpose(1, 2)
            q = q * cos + rot(q) * sin
            k = k * cos + rot(k) * sin
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
            att = (q @ k.transpose(2, 3)) / math.sqrt(D) + mask
            att = torch.softmax(att, dim=-1)
            o = (att @ v).transpose(1, 2).reshape(B, T, H * D)
            x = x + o @ p[pre + "self_attn.o_proj.weight"].T
            h = self.rmsnorm(x, p[pre + "post_attention_layernorm.weight"])
            g = h @ p[pre + "mlp.gate_proj.weight"].T
            u = h @ p[pre + "mlp.up_proj.weight"].T
            x = x + (F.silu(g) * u) @ p[pre + "mlp.down_proj.weight"].T
        x = self.rmsnorm(x, p["model.norm.weight"])
        head = p["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else p["lm_head.weight"]
        return x @ head.T


def load(model_dir):
    with open(model_dir + "/config.json") as f:
        cfg = json.load(f)
    weights = read_safetensors(model_dir + "/model.safetensors")
    return cfg, Llama(cfg, weights)


def lr_at(a, s):
    if s < a.warmup:
        return a.lr * (s + 1) / a.warmup
    if a.schedule == "constant":
        return a.lr
    span = a.steps - a.warmup
    if span <= 0:
        return a.min_lr
    prog = min(1.0, (s - a.warmup) / span)
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * prog))


def train(a, bench=False):
    cfg, model = load(a.model_dir)
    toks = np.fromfile(a.data, dtype="<u2" if a.dtype == "uint16" else "<u4").astype(np.int64)
    toks = torch.from_numpy(toks)
    N, T, B, A = len(toks), a.seq_len, a.micro_batch, a.grad_accum
    decay = [q for q in model.params if q.dim() >= 2]
    no_decay = [q for q in model.params if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps)
    t0 = time.time()
    for s in range(a.steps):
        opt.zero_grad(set_to_none=False)
        loss_sum = 0.0
        for m in range(A):
            starts = [((s * A + m) * B + b) * T % (N - T - 1) for b in range(B)]
            x = torch.stack([toks[st:st + T] for st in starts])
            y = torch.stack([toks[st + 1:st + T + 1] for st in starts])
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            (loss / A).backward()
            loss_sum += loss.item()
        if a.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(model.params, a.grad_clip).item()
        else:
            gn = torch.norm(torch.stack([q.grad.norm() for q in model.params])).item()
        lr = lr_at(a, s)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        if not bench:
            print("step %d loss %.9g lr %.9g grad_norm %.9g" % (s, loss_sum / A, lr, gn), flush=True)
    dt = time.time() - t0
    if bench:
        print("tokens_per_s %.1f" % (a.steps * A * B * T / dt))
    if a.out_weights:
        write_safetensors(a.out_weights, {n: q for n, q in zip(model.names, model.params)})


def logits(a):
    cfg, model = load(a.model_dir)
    ids = torch.tensor([int(t) for t in a.tokens.split(",")], dtype=torch.int64)
    ids = ids.view(a.batch, -1)
    with torch.no_grad():
        out = model(ids)
    write_safetensors(a.out, {"logits": out.reshape(-1, out.shape[-1])})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "logits", "bench"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data")
    ap.add_argument("--dtype", default="uint16", choices=["uint16", "uint32"])
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=0.0)
    ap.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--out-weights")
    ap.add_argument("--tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.mode == "logits":
        logits(a)
    else:
        train(a, bench=(a.mode == "bench"))


if __name__ == "__main__":
    sys.exit(main())
