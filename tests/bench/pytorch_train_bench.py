#!/usr/bin/python3
"""The PyTorch side of //tests/bench:train_bench.

Trains worker/engine/torch_reference.py's Llama (plain PyTorch autograd, the Hugging Face
Llama math) with torch.optim.AdamW and clip_grad_norm_, exactly the step Lumen runs: same
weights (read from the directory Lumen exported), same batches (DESIGN.md section 7
sequential order), same hyperparameters. Prints one JSON object.

  pytorch_train_bench.py --reference PATH/torch_reference.py --model-dir DIR --data FILE
                         [--seq 256] [--batch 8] [--threads 2] [--warmup 1] [--steps 3]
"""
import argparse
import importlib.util
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = importlib.util.spec_from_file_location("torch_reference", a.reference)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    _, model = ref.load(a.model_dir)
    toks = torch.from_numpy(np.fromfile(a.data, dtype="<u2").astype(np.int64))
    N, T, B = len(toks), a.seq, a.batch
    decay = [q for q in model.params if q.dim() >= 2]
    no_decay = [q for q in model.params if q.dim() < 2]
    # The same hyperparameters as lumen_train_bench (OptimizerConfig defaults, constant lr).
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    losses, times = [], []
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        starts = [(s * B + b) * T % (N - T - 1) for b in range(B)]
        x = torch.stack([toks[st:st + T] for st in starts])
        y = torch.stack([toks[st + 1:st + T + 1] for st in starts])
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.params, 1.0)
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    timed = sum(times[a.warmup:])
    print(json.dumps({"tokens_per_s": round(a.steps * B * T / timed, 1),
                      "step_time_s": round(timed / a.steps, 4), "timed_steps": a.steps,
                      "first_loss": round(losses[0], 6), "last_loss": round(losses[-1], 6),
                      "torch_version": torch.__version__,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
